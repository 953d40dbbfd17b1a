"""USO Encode Style / USO Encode Subject: IMAGE -> encodings for USO Generate (thin adapters)."""
from __future__ import annotations

from . import bridge
from ..engine import InputError, USOPipeline
from ..engine.style import CROPS
from .image_convert import image_batch_to_pils

POSTERIORS = ("mean", "sample")


def require_model(uso_model) -> USOPipeline:
    if not isinstance(uso_model, USOPipeline):
        raise InputError("uso_model: expected the output of USO Load Models, got "
                         f"{type(uso_model).__name__}. Connect USO Load Models to this input.")
    return uso_model


def image_frames(image, input_name: str = "image"):
    """The IMAGE batch as PIL images; a wrong tensor becomes an InputError naming the input."""
    try:
        return image_batch_to_pils(image, input_name)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


class USOEncodeStyle:
    NODE_ID = "USOEncodeStyle"
    DISPLAY_NAME = "USO Encode Style"
    CATEGORY = "USO"
    FUNCTION = "encode"
    RETURN_TYPES = ("USO_STYLE",)
    RETURN_NAMES = ("style",)
    OUTPUT_TOOLTIPS = ("Style tokens (192 per style image) for USO Generate's style input.",)
    DESCRIPTION = ("Encodes style reference images with SigLIP and the USO projector. Each image of the batch is "
                   "one style; chain nodes through 'previous' to combine styles. Encodings are cached by image "
                   "content, so a new seed does not re-encode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "uso_model": ("USO_MODEL", {"tooltip": "From USO Load Models."}),
                "image": ("IMAGE", {"tooltip": "One or more style images (each batch element is one style)."}),
                "crop": (list(CROPS), {
                    "default": "reference",
                    "tooltip": "reference: squash the whole image to 384x384 like the official USO. center: "
                               "ComfyUI's CLIP Vision Encode (short side to 384, center crop)."}),
            },
            "optional": {
                "previous": ("USO_STYLE", {"tooltip": "Styles to add these to (chaining)."}),
            },
        }

    def encode(self, uso_model, image, crop="reference", previous=None):
        pipeline = require_model(uso_model)
        encoding = previous
        for frame in image_frames(image, "image"):  # Cancel is honoured between images
            bridge.throw_if_interrupted()
            one = pipeline.encode_style([frame], crop)
            encoding = one if encoding is None else encoding + one
        return (encoding,)


class USOEncodeSubject:
    NODE_ID = "USOEncodeSubject"
    DISPLAY_NAME = "USO Encode Subject"
    CATEGORY = "USO"
    FUNCTION = "encode"
    RETURN_TYPES = ("USO_SUBJECT",)
    RETURN_NAMES = ("subject",)
    OUTPUT_TOOLTIPS = ("The subject's reference latents for USO Generate's subject input.",)
    DESCRIPTION = ("Prepares a subject (identity / object) image like the official USO: long side to 512, "
                   "center crop to multiples of 16, VAE encode. Each image of the batch is one subject; chain "
                   "through 'previous' for several subjects.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "uso_model": ("USO_MODEL", {"tooltip": "From USO Load Models."}),
                "image": ("IMAGE", {"tooltip": "The subject photo."}),
                "long_side": ("INT", {
                    "default": 512, "min": 64, "max": 2048, "step": 16,
                    "tooltip": "Long side of the subject before encoding. 512 is USO's recommendation; larger "
                               "keeps less identity."}),
                "posterior": (list(POSTERIORS), {
                    "default": "mean",
                    "tooltip": "mean: the VAE posterior mean (reproducible). sample: a sample with sample_seed "
                               "(the reference samples unseeded)."}),
                "sample_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                        "tooltip": "Seed of the posterior sample when posterior is 'sample'."}),
            },
            "optional": {
                "previous": ("USO_SUBJECT", {"tooltip": "Subjects to add this one to (chaining)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, long_side=None):
        if long_side is not None and (not 64 <= long_side <= 2048 or long_side % 16):
            return f"long_side: {long_side} must be a multiple of 16 between 64 and 2048 (USO uses 512)."
        return True

    def encode(self, uso_model, image, long_side=512, posterior="mean", sample_seed=0, previous=None):
        pipeline = require_model(uso_model)
        if posterior not in POSTERIORS:
            raise InputError(f"posterior: '{posterior}' is not one of {', '.join(POSTERIORS)}.")
        encoding = previous
        for frame in image_frames(image, "image"):  # Cancel is honoured between images
            bridge.throw_if_interrupted()
            one = pipeline.encode_subject([frame], int(long_side),
                                          int(sample_seed) if posterior == "sample" else None)
            encoding = one if encoding is None else encoding + one
        return (encoding,)


class USOStyleFromClipVision:
    NODE_ID = "USOStyleFromClipVision"
    DISPLAY_NAME = "USO Style From CLIP Vision"
    CATEGORY = "USO"
    FUNCTION = "encode"
    RETURN_TYPES = ("USO_STYLE",)
    RETURN_NAMES = ("style",)
    OUTPUT_TOOLTIPS = ("Style tokens for USO Generate's style input.",)
    DESCRIPTION = ("Turns the output of ComfyUI's CLIP Vision Encode with SigLIP so400m 384 "
                   "(sigclip_vision_patch14_384) into USO style tokens: the USO projector reads the same SigLIP "
                   "layers (-20, -11, -2) it reads from USO Encode Style. Each image of the batch is one style.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "uso_model": ("USO_MODEL", {"tooltip": "From USO Load Models (its projector is used)."}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "From CLIP Vision Encode with a SigLIP 384 model (crop 'center' or 'none')."}),
            },
            "optional": {
                "previous": ("USO_STYLE", {"tooltip": "Styles to add these to (chaining)."}),
            },
        }

    def encode(self, uso_model, clip_vision_output, previous=None):
        pipeline = require_model(uso_model)
        try:
            hidden = clip_vision_output["all_hidden_states"]
        except (KeyError, TypeError, IndexError, AttributeError):  # ComfyUI's Output: attribute access
            hidden = None
        bridge.throw_if_interrupted()
        encoding = pipeline.encode_style_hidden_states(hidden)  # None or a CLIP's output: refused there
        return (encoding if previous is None else previous + encoding,)


NODE_CLASSES = [USOEncodeStyle, USOEncodeSubject, USOStyleFromClipVision]
