"""USO Generate: prompt + style / subject encodings -> IMAGE and LATENT (thin adapter)."""
from __future__ import annotations

from . import bridge
from .bridge import io
from .encode_nodes import require_model
from .sockets import USOModel, USOStyle, USOSubject, unique_id
from ..engine import InputError
from ..engine.limits import BATCH_SIZE, DENOISE, GUIDANCE, HEIGHT, SEED, STEPS, WIDTH
from ..engine.pipeline import StyleEncoding, SubjectEncoding, batch_seeds
from ..engine.schedule import SHIFTS


def _int_input(limit, tooltip: str, **options) -> io.Int.Input:
    return io.Int.Input(limit.name, default=limit.default, min=limit.low, max=limit.high, tooltip=tooltip,
                        **({"step": limit.multiple} if limit.multiple > 1 else {}), **options)


class USOGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USOGenerate", display_name="USO Generate", category="USO",
            description=("Generates with USO like the official implementation: reference time shift, Euler, "
                         "guidance embedding 4.0, 25 steps. Empty prompt + subject + keep_size = layout-preserving "
                         "restyle. One seed per image (seed, seed+1, ...): image i of a batch equals a single run "
                         "with its seed."),
            inputs=[
                USOModel.Input("uso_model", tooltip="From USO Load Models."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to generate. May be empty (with a subject and keep_size: restyle the "
                                        "subject's layout)."),
                _int_input(WIDTH, "Output width, a multiple of 16."),
                _int_input(HEIGHT, "Output height, a multiple of 16."),
                io.Boolean.Input("keep_size", default=False,
                                 tooltip="Output size from the subject instead of width/height: each side of its "
                                         "encoded size x 1024 / long_side, down to a multiple of 16 (2x at long "
                                         "side 512)."),
                _int_input(STEPS, "Denoising steps (USO: 25)."),
                io.Float.Input("guidance", default=GUIDANCE.default, min=GUIDANCE.low, max=GUIDANCE.high, step=0.1,
                               tooltip="FLUX guidance embedding (USO: 4.0; ComfyUI's template: 3.5)."),
                _int_input(SEED, "Noise seed; image i of a batch uses seed + i.", control_after_generate=True),
                _int_input(BATCH_SIZE, "Images per run, one seed each."),
                USOStyle.Input("style", optional=True, tooltip="From USO Encode Style (up to two style images)."),
                USOSubject.Input("subject", optional=True, tooltip="From USO Encode Subject."),
                io.Combo.Input("shift", options=list(SHIFTS), default="reference", optional=True,
                               tooltip="reference: USO's own time shift. flux: FLUX.1-dev's standard shift (what "
                                       "ComfyUI's native sampler uses at 1024x1024)."),
                io.Boolean.Input("extra_references", default=False, optional=True,
                                 tooltip="Allow more than two style images and more than one subject (beyond what "
                                         "USO was shown with; results vary)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Image to image: FLUX latents to start from (VAE Encode with the FLUX VAE, "
                                        "or a USO Generate latent). The size follows the latent; "
                                        "width/height/keep_size are unused."),
                io.Float.Input("denoise", default=DENOISE.default, min=DENOISE.low, max=DENOISE.high, step=0.01,
                               optional=True,
                               tooltip="With a latent: how much to change it. 1.0 starts from noise; 0.6 runs the "
                                       "last 60% of the steps from the latent noised to that point (like diffusers' "
                                       "strength)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The generated images."),
                io.Latent.Output(display_name="latent",
                                 tooltip="The FLUX latents (unscaled, [B,16,H/8,W/8]): native VAE Decode gives the "
                                         "same picture."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    # No validate_inputs: ComfyUI 0.8.0 reports a refusal under every argument of it (width 1000 came
    # back under width, height, steps and batch_size). ComfyUI checks the ranges above per input; the
    # multiples of 16 are checked first thing when the node runs, naming the one input.

    @classmethod
    def execute(cls, uso_model, prompt, width, height, keep_size, steps, guidance, seed, batch_size,
                style=None, subject=None, shift="reference", extra_references=False, latent=None,
                denoise=1.0) -> io.NodeOutput:
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
            for limit, value in ((WIDTH, width), (HEIGHT, height)):
                if problem := limit.problem(value):
                    raise InputError(problem)
        if style is not None and not isinstance(style, StyleEncoding):
            raise InputError("style: expected the output of USO Encode Style; connect that node here.")
        if subject is not None and not isinstance(subject, SubjectEncoding):
            raise InputError("subject: expected the output of USO Encode Subject; connect that node here.")
        if problem := BATCH_SIZE.problem(int(batch_size)):  # before a list of that many seeds is built
            raise InputError(problem)
        seeds = batch_seeds(seed, batch_size)
        progress = bridge.Progress(int(steps) * len(seeds), node_id=unique_id(cls))

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
        return io.NodeOutput(result.images, {"samples": result.latents})


NODE_CLASSES = [USOGenerate]
