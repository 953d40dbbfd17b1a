"""USO Encode Style / USO Encode Subject: IMAGE -> encodings for USO Generate (thin adapters)."""
from __future__ import annotations

from . import bridge
from .bridge import io
from .image_convert import image_batch_to_pils
from .sockets import USOModel, USOStyle, USOSubject
from ..engine import InputError, USOPipeline
from ..engine.limits import LONG_SIDE, SEED
from ..engine.style import CROPS

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


class USOEncodeStyle(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USOEncodeStyle", display_name="USO Encode Style", category="USO",
            description=("Encodes style reference images with SigLIP and the USO projector. Each image of the batch "
                         "is one style; chain nodes through 'previous' to combine styles. Encodings are cached by "
                         "image content, so a new seed does not re-encode."),
            inputs=[
                USOModel.Input("uso_model", tooltip="From USO Load Models."),
                io.Image.Input("image", tooltip="One or more style images (each batch element is one style)."),
                io.Combo.Input("crop", options=list(CROPS), default="reference",
                               tooltip="reference: squash the whole image to 384x384 like the official USO. "
                                       "center: ComfyUI's CLIP Vision Encode (short side to 384, center crop)."),
                USOStyle.Input("previous", optional=True, tooltip="Styles to add these to (chaining)."),
            ],
            outputs=[USOStyle.Output(display_name="style", tooltip="Style tokens (192 per style image) for USO "
                                                                    "Generate's style input.")],
        )

    @classmethod
    def execute(cls, uso_model, image, crop="reference", previous=None) -> io.NodeOutput:
        pipeline = require_model(uso_model)
        encoding = previous
        for frame in image_frames(image, "image"):  # Cancel is honoured between images
            bridge.throw_if_interrupted()
            one = pipeline.encode_style([frame], crop)
            encoding = one if encoding is None else encoding + one
        return io.NodeOutput(encoding)


class USOEncodeSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USOEncodeSubject", display_name="USO Encode Subject", category="USO",
            description=("Prepares a subject (identity / object) image like the official USO: long side to 512, "
                         "center crop to multiples of 16, VAE encode. Each image of the batch is one subject; "
                         "chain through 'previous' for several subjects."),
            inputs=[
                USOModel.Input("uso_model", tooltip="From USO Load Models."),
                io.Image.Input("image", tooltip="The subject photo."),
                io.Int.Input("long_side", default=LONG_SIDE.default, min=LONG_SIDE.low, max=LONG_SIDE.high,
                             step=LONG_SIDE.multiple,
                             tooltip="Long side of the subject before encoding. 512 is USO's recommendation; "
                                     "larger keeps less identity."),
                io.Combo.Input("posterior", options=list(POSTERIORS), default="mean",
                               tooltip="mean: the VAE posterior mean (reproducible). sample: a sample with "
                                       "sample_seed (the reference samples unseeded)."),
                io.Int.Input("sample_seed", default=SEED.default, min=SEED.low, max=SEED.high,
                             tooltip="Seed of the posterior sample when posterior is 'sample'."),
                USOSubject.Input("previous", optional=True, tooltip="Subjects to add this one to (chaining)."),
            ],
            outputs=[USOSubject.Output(display_name="subject",
                                       tooltip="The subject's reference latents for USO Generate's subject input.")],
        )

    @classmethod
    def validate_inputs(cls, long_side):
        # The one input checked here: ComfyUI reports the message under each argument of this method.
        # A linked value arrives as None (known at run time, where the engine checks it).
        return long_side is None or LONG_SIDE.problem(long_side) or True

    @classmethod
    def execute(cls, uso_model, image, long_side=512, posterior="mean", sample_seed=0,
                previous=None) -> io.NodeOutput:
        pipeline = require_model(uso_model)
        if posterior not in POSTERIORS:
            raise InputError(f"posterior: '{posterior}' is not one of {', '.join(POSTERIORS)}.")
        encoding = previous
        for frame in image_frames(image, "image"):  # Cancel is honoured between images
            bridge.throw_if_interrupted()
            one = pipeline.encode_subject([frame], int(long_side),
                                          int(sample_seed) if posterior == "sample" else None)
            encoding = one if encoding is None else encoding + one
        return io.NodeOutput(encoding)


class USOStyleFromClipVision(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USOStyleFromClipVision", display_name="USO Style From CLIP Vision", category="USO",
            description=("Turns the output of ComfyUI's CLIP Vision Encode with SigLIP so400m 384 "
                         "(sigclip_vision_patch14_384) into USO style tokens: the USO projector reads the same "
                         "SigLIP layers (-20, -11, -2) it reads from USO Encode Style. Each image of the batch is "
                         "one style."),
            inputs=[
                USOModel.Input("uso_model", tooltip="From USO Load Models (its projector is used)."),
                io.ClipVisionOutput.Input("clip_vision_output",
                                          tooltip="From CLIP Vision Encode with a SigLIP 384 model (crop 'center' "
                                                  "or 'none')."),
                USOStyle.Input("previous", optional=True, tooltip="Styles to add these to (chaining)."),
            ],
            outputs=[USOStyle.Output(display_name="style", tooltip="Style tokens for USO Generate's style input.")],
        )

    @classmethod
    def execute(cls, uso_model, clip_vision_output, previous=None) -> io.NodeOutput:
        pipeline = require_model(uso_model)
        try:
            hidden = clip_vision_output["all_hidden_states"]
        except (KeyError, TypeError, IndexError, AttributeError):  # ComfyUI's Output: attribute access
            hidden = None
        bridge.throw_if_interrupted()
        encoding = pipeline.encode_style_hidden_states(hidden)  # None or a CLIP's output: refused there
        return io.NodeOutput(encoding if previous is None else previous + encoding)


NODE_CLASSES = [USOEncodeStyle, USOEncodeSubject, USOStyleFromClipVision]
