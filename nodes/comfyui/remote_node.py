"""USO Remote Generate: the local graph's inputs sent to fal or AIML (thin ComfyUI adapter)."""
from __future__ import annotations

from . import bridge
from .bridge import io
from .image_convert import image_batch_to_pils, pils_to_image_batch
from .sockets import unique_id
from ..engine.limits import SEED
from ..remote import (OUTPUT_FORMATS, PROVIDERS, SIZE_CHOICES, Cancelled, Hooks, InputError, RemoteInputs,
                     Settings, generate)
from ..remote.request import GUIDANCE_RANGE, NUM_IMAGES_RANGE, SIDE_RANGE, STEPS_RANGE, TIMEOUT_RANGE

_KEYS_HELP = ("Keys are never widgets (widgets end up in workflow JSON and PNG metadata): set FAL_KEY "
              "('key_id:key_secret') or AIML_API_KEY in the environment, or write "
              '{"fal": "key_id:key_secret", "aiml": "..."} into uso_remote_keys.json in ComfyUI\'s user '
              "directory (ComfyUI/user/, read on every run; USO_REMOTE_KEYS_FILE names another path). "
              "USO_FAL_QUEUE_URL and USO_AIML_URL override the service URLs (proxies).")


class USORemoteGenerate(io.ComfyNode):
    # Seconds between fal status polls and the first retry backoff; tests shorten them.
    POLL_INTERVAL_S = 1.0
    BACKOFF_BASE_S = 0.5

    @classmethod
    def define_schema(cls) -> io.Schema:
        side = dict(min=SIDE_RANGE[0], max=SIDE_RANGE[1], step=16)
        return io.Schema(
            node_id="USORemoteGenerate", display_name="USO Remote Generate (fal / AIML)", category="USO",
            description=("Runs USO on fal.ai (fal-ai/uso; queued, cancellable) or AIML API (bytedance/uso; one "
                         "blocking request that cannot be cancelled remotely and is billed once sent). Takes the "
                         "same images and settings as the local USO nodes. " + _KEYS_HELP),
            inputs=[
                io.Combo.Input("provider", options=list(PROVIDERS), default="fal",
                               tooltip="fal: queue API, shows queue position, Cancel stops the remote job. "
                                       "aiml: one blocking request; Cancel only stops waiting. " + _KEYS_HELP),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What to generate. May be empty: with a subject image and keep_size that "
                                        "is a layout-preserving restyle. At most 4000 characters are sent."),
                io.Combo.Input("size", options=list(SIZE_CHOICES), default="custom",
                               tooltip="custom: use width and height. Presets: square_hd 1024x1024, square "
                                       "512x512, portrait_4_3 768x1024, portrait_16_9 576x1024, landscape_4_3 "
                                       "1024x768, landscape_16_9 1024x576."),
                io.Int.Input("width", default=1024, **side,
                             tooltip="Output width when size is custom (multiple of 16)."),
                io.Int.Input("height", default=1024, **side,
                             tooltip="Output height when size is custom (multiple of 16)."),
                io.Boolean.Input("keep_size", default=False,
                                 tooltip="Keep the subject image's layout and size (style transfer). Needs "
                                         "subject_image."),
                io.Int.Input("steps", default=28, min=STEPS_RANGE[0], max=STEPS_RANGE[1],
                             tooltip="Denoising steps (providers accept 1-50)."),
                io.Float.Input("guidance", default=4.0, min=GUIDANCE_RANGE[0], max=GUIDANCE_RANGE[1], step=0.1,
                               tooltip="Guidance scale (1-10, what both providers accept)."),
                io.Int.Input("seed", default=0, min=SEED.low, max=SEED.high, control_after_generate=True,
                             tooltip="0 = the provider picks a random seed (the one used comes out of the seed "
                                     "output). Other seeds are sent as they are up to 2147483646; larger ones are "
                                     "folded into 1..2147483646 because AIML takes no larger seeds."),
                io.Int.Input("num_images", default=1, min=NUM_IMAGES_RANGE[0], max=NUM_IMAGES_RANGE[1],
                             tooltip="Images per run (1-4); each is billed."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid. Left out when empty."),
                io.Combo.Input("output_format", options=list(OUTPUT_FORMATS), default="png",
                               tooltip="Format the provider returns: png (lossless) or jpeg."),
                io.Boolean.Input("safety_checker", default=True,
                                 tooltip="The provider's NSFW checker. Flagged images usually come back black; the "
                                         "node then warns."),
                io.Int.Input("timeout_s", default=600, min=TIMEOUT_RANGE[0], max=TIMEOUT_RANGE[1],
                             tooltip="Give up after this many seconds. fal: the remote job is cancelled. AIML: "
                                     "cannot be cancelled and may still be billed."),
                io.Image.Input("subject_image", optional=True,
                               tooltip="The subject / content image (first image of the batch is used)."),
                io.Image.Input("style_images", optional=True,
                               tooltip="Style references: each image of the batch is one style, at most 2 (extra "
                                       "ones are dropped with a warning)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The generated images, RGB, one batch."),
                io.Int.Output(display_name="seed",
                              tooltip="The seed the provider actually used (feed it back with control 'fixed' to "
                                      "repeat)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, provider, prompt, size, width, height, keep_size, steps, guidance, seed, num_images,
                negative_prompt, output_format, safety_checker, timeout_s, subject_image=None,
                style_images=None) -> io.NodeOutput:
        node_id = unique_id(cls)
        bridge.throw_if_interrupted()
        bar = bridge.Progress(100, node_id)
        hooks = Hooks(
            is_cancelled=bridge.interrupt_requested,
            report=lambda text: bridge.send_progress_text(text, node_id),
            progress=lambda fraction: bar.set(round(100 * fraction)),
        )
        inputs = RemoteInputs(
            provider=provider, prompt=prompt, size=size, width=width, height=height, keep_size=keep_size,
            steps=steps, guidance=guidance, seed=seed, num_images=num_images, negative_prompt=negative_prompt,
            output_format=output_format, safety_checker=safety_checker, timeout_s=timeout_s,
            subject_image=_pils(subject_image, "subject_image"), style_images=_pils(style_images, "style_images"))
        settings = Settings.from_env(poll_interval_s=cls.POLL_INTERVAL_S, backoff_base_s=cls.BACKOFF_BASE_S)
        try:
            result = generate(inputs, user_dir=bridge.user_directory(), hooks=hooks, settings=settings)
        except Cancelled:
            bridge.throw_if_interrupted()
            raise Cancelled("USO Remote Generate was cancelled") from None
        return io.NodeOutput(pils_to_image_batch(result.images), int(result.seed))


def _pils(image, input_name: str):
    """An optional IMAGE input as PIL images (what the remote package takes)."""
    if image is None:
        return None
    try:
        return image_batch_to_pils(image, input_name)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


NODE_CLASSES = [USORemoteGenerate]
