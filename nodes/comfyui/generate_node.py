"""USO Generate: prompt + style / subject encodings -> IMAGE and LATENT (thin adapter)."""
from __future__ import annotations

from . import bridge
from .encode_nodes import require_model
from ..engine import InputError
from ..engine.pipeline import MAX_BATCH, MAX_SIZE, MIN_SIZE, SEED_MAX, StyleEncoding, SubjectEncoding, batch_seeds
from ..engine.schedule import SHIFTS


def check_size(name: str, value) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name}: expected a whole number of pixels, got {value!r}."
    if not MIN_SIZE <= value <= MAX_SIZE:
        return f"{name}: {value} is outside {MIN_SIZE}..{MAX_SIZE} px; 1024 is USO's native size."
    if value % 16:
        return (f"{name}: {value} is not a multiple of 16 (FLUX works on 16 px patches); use "
                f"{value // 16 * 16} or {value // 16 * 16 + 16}.")
    return None


class USOGenerate:
    NODE_ID = "USOGenerate"
    DISPLAY_NAME = "USO Generate"
    CATEGORY = "USO"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("images", "latent")
    OUTPUT_TOOLTIPS = ("The generated images.",
                       "The FLUX latents (unscaled, [B,16,H/8,W/8]): native VAE Decode gives the same picture.")
    DESCRIPTION = ("Generates with USO like the official implementation: reference time shift, Euler, guidance "
                   "embedding 4.0, 25 steps. Empty prompt + subject + keep_size = layout-preserving restyle. One "
                   "seed per image (seed, seed+1, ...): image i of a batch equals a single run with its seed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "uso_model": ("USO_MODEL", {"tooltip": "From USO Load Models."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What to generate. May be empty (with a subject and keep_size: "
                                                 "restyle the subject's layout)."}),
                "width": ("INT", {"default": 1024, "min": MIN_SIZE, "max": MAX_SIZE, "step": 16,
                                  "tooltip": "Output width, a multiple of 16."}),
                "height": ("INT", {"default": 1024, "min": MIN_SIZE, "max": MAX_SIZE, "step": 16,
                                   "tooltip": "Output height, a multiple of 16."}),
                "keep_size": ("BOOLEAN", {"default": False,
                                          "tooltip": "Output size from the subject instead of width/height: "
                                                     "each side of its encoded size x 1024 / long_side, down "
                                                     "to a multiple of 16 (2x at long side 512)."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "Denoising steps (USO: 25)."}),
                "guidance": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 20.0, "step": 0.1,
                                       "tooltip": "FLUX guidance embedding (USO: 4.0; ComfyUI's template: 3.5)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                                 "tooltip": "Noise seed; image i of a batch uses seed + i."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH,
                                       "tooltip": "Images per run, one seed each."}),
            },
            "optional": {
                "style": ("USO_STYLE", {"tooltip": "From USO Encode Style (up to two style images)."}),
                "subject": ("USO_SUBJECT", {"tooltip": "From USO Encode Subject."}),
                "shift": (list(SHIFTS), {
                    "default": "reference",
                    "tooltip": "reference: USO's own time shift. flux: FLUX.1-dev's standard shift (what "
                               "ComfyUI's native sampler uses at 1024x1024)."}),
                "extra_references": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Allow more than two style images and more than one subject (beyond what USO was "
                               "shown with; results vary)."}),
                "latent": ("LATENT", {
                    "tooltip": "Image to image: FLUX latents to start from (VAE Encode with the FLUX VAE, or a USO "
                               "Generate latent). The size follows the latent; width/height/keep_size are unused."}),
                "denoise": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "With a latent: how much to change it. 1.0 starts from noise; 0.6 runs the last 60% of "
                               "the steps from the latent noised to that point (like diffusers' strength)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, batch_size=None, steps=None):
        # Naming an input here switches off ComfyUI's own range check for it, so the ranges are checked too.
        for name, value in (("width", width), ("height", height)):
            if value is not None and (problem := check_size(name, value)):
                return problem
        if batch_size is not None and not 1 <= batch_size <= MAX_BATCH:
            return f"batch_size: {batch_size} is outside 1..{MAX_BATCH}."
        if steps is not None and not 1 <= steps <= 200:
            return f"steps: {steps} is outside 1..200 (USO uses 25)."
        return True

    def generate(self, uso_model, prompt, width, height, keep_size, steps, guidance, seed, batch_size,
                 style=None, subject=None, shift="reference", extra_references=False, latent=None, denoise=1.0,
                 unique_id=None):
        pipeline = require_model(uso_model)
        init_latents = None
        if latent is not None:
            if not isinstance(latent, dict) or "samples" not in latent:
                raise InputError("latent: expected a LATENT (e.g. from VAE Encode); connect one here.")
            if latent.get("noise_mask") is not None:
                raise InputError("latent: has a noise mask (Set Latent Noise Mask / inpainting); USO Generate does "
                                 "not inpaint. Connect the latent without the mask.")
            init_latents = latent["samples"]
            if getattr(init_latents, "ndim", 0) == 4 and init_latents.shape[0] > 1 and int(batch_size) == 1:
                batch_size = init_latents.shape[0]  # like ComfyUI's samplers: the latent batch sets the count
        if not keep_size and init_latents is None:  # with a latent the size comes from it
            for name, value in (("width", width), ("height", height)):
                if problem := check_size(name, value):
                    raise InputError(problem)
        if style is not None and not isinstance(style, StyleEncoding):
            raise InputError("style: expected the output of USO Encode Style; connect that node here.")
        if subject is not None and not isinstance(subject, SubjectEncoding):
            raise InputError("subject: expected the output of USO Encode Subject; connect that node here.")
        if not 1 <= int(batch_size) <= MAX_BATCH:  # before a list of that many seeds is built
            raise InputError(f"batch_size: {batch_size} is outside 1..{MAX_BATCH}.")
        seeds = batch_seeds(seed, batch_size)
        progress = bridge.Progress(int(steps) * len(seeds), node_id=unique_id)

        def on_step(done: int, total: int) -> None:
            progress.set(done, total)
            bridge.throw_if_interrupted()

        def on_decode(_index: int, _count: int) -> None:
            bridge.throw_if_interrupted()

        bridge.throw_if_interrupted()
        result = pipeline.generate(prompt, styles=style, subjects=subject, width=int(width), height=int(height),
                                   keep_size=bool(keep_size), steps=int(steps), guidance=float(guidance),
                                   seeds=seeds, shift=shift, extra_references=bool(extra_references),
                                   init_latents=init_latents, denoise=float(denoise),
                                   on_step=on_step, on_decode=on_decode)
        return (result.images, {"samples": result.latents})


NODE_CLASSES = [USOGenerate]
