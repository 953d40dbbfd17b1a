"""One provider-neutral request: checked, clamped, and written as fal or AIML JSON.

Mapping (remote_api.md §3): both providers take the same fields; AIML adds `model` and calls the
image list `image_urls` instead of `input_image_urls`. Images go in the order
[subject/content, style, style].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InputError

PROVIDERS = ("fal", "aiml")
PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
SIZE_CHOICES = ("custom", *PRESETS)
OUTPUT_FORMATS = ("png", "jpeg")
AIML_MODEL = "bytedance/uso"

MAX_PROMPT_CHARS = 4000  # AIML's limit; applied to fal too so both get the same prompt
SIDE_RANGE = (256, 2048)
STEPS_RANGE = (1, 50)
GUIDANCE_RANGE = (1.0, 10.0)  # fal accepts 1-10, AIML 1-20
NUM_IMAGES_RANGE = (1, 4)
TIMEOUT_RANGE = (10, 3600)
MAX_STYLES = 2
PROVIDER_SEED_MAX = 2_147_483_646  # AIML needs seed >= 1; fold ComfyUI's 64-bit seeds into 1..PROVIDER_SEED_MAX


@dataclass(frozen=True)
class UsoRequest:
    prompt: str
    negative_prompt: str
    image_size: str | tuple[int, int]
    keep_size: bool
    steps: int
    guidance: float
    seed: int | None  # None: the provider picks
    num_images: int
    output_format: str
    safety_checker: bool
    image_urls: tuple[str, ...] = ()  # [content or "" (style-only), style, style]
    warnings: tuple[str, ...] = field(default=(), compare=False)


def map_seed(seed: int) -> int | None:
    """0 -> None (provider picks); 1..PROVIDER_SEED_MAX unchanged; larger seeds folded into that range."""
    if seed == 0:
        return None
    return (seed - 1) % PROVIDER_SEED_MAX + 1


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise InputError(f"{name}: expected a whole number, got {value!r}. Enter an integer.")
    return int(value)


def _clamp(name: str, value, lo, hi, warnings: list[str], why: str = ""):
    if value < lo or value > hi:
        new = min(max(value, lo), hi)
        warnings.append(f"{name} {value} is outside {lo}-{hi}{why}; using {new}")
        return new
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        listed = ", ".join(f"'{c}'" for c in choices)
        raise InputError(f"{name}: '{value}' is not supported; choose one of {listed}.")
    return value


def _cut(name: str, text: str, warnings: list[str]) -> str:
    if len(text) <= MAX_PROMPT_CHARS:
        return text
    warnings.append(f"{name} has {len(text)} characters; AIML accepts at most {MAX_PROMPT_CHARS}, so it "
                    f"was cut to {MAX_PROMPT_CHARS} (for fal too, so both get the same text)")
    return text[:MAX_PROMPT_CHARS]


def _side(name: str, value, warnings: list[str]) -> int:
    value = _clamp(name, _int(name, value), *SIDE_RANGE, warnings)
    rounded = min(SIDE_RANGE[1], max(SIDE_RANGE[0], (value + 8) // 16 * 16))
    if rounded != value:
        warnings.append(f"{name} {value} is not a multiple of 16 (FLUX needs one); using {rounded}")
    return rounded


def build_request(*, provider: str, prompt: str, size: str, width, height, keep_size: bool, steps,
                  guidance, seed, num_images, negative_prompt: str, output_format: str,
                  safety_checker: bool, has_subject: bool, style_count: int) -> UsoRequest:
    """Check and clamp the node's inputs. Raises InputError for what cannot be fixed."""
    warnings: list[str] = []
    _choice("provider", provider, PROVIDERS)
    _choice("size", size, SIZE_CHOICES)
    _choice("output_format", output_format, OUTPUT_FORMATS)
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InputError(f"{name}: expected text, got {type(text).__name__}.")
    if not has_subject and style_count == 0:
        raise InputError("No input image: connect subject_image (the subject / content image) and/or "
                           "style_images (1-2 style references). fal and AIML both need at least one image.")

    prompt = _cut("prompt", prompt.strip(), warnings)
    negative_prompt = _cut("negative_prompt", negative_prompt.strip(), warnings)

    if size == "custom":
        image_size: str | tuple[int, int] = (_side("width", width, warnings), _side("height", height, warnings))
    else:
        image_size = size

    if keep_size and not has_subject:
        warnings.append("keep_size is on but no subject_image is connected; keep_size keeps the subject "
                        "image's layout and size, so it was ignored")
        keep_size = False

    steps = _clamp("steps", _int("steps", steps), *STEPS_RANGE, warnings)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InputError(f"guidance: expected a number between 1 and 10, got {guidance!r}.")
    guidance = float(_clamp("guidance", round(float(guidance), 3), *GUIDANCE_RANGE, warnings,
                            " (fal accepts 1-10)"))
    num_images = _clamp("num_images", _int("num_images", num_images), *NUM_IMAGES_RANGE, warnings)
    seed = _int("seed", seed)
    if seed < 0:
        raise InputError(f"seed: {seed} is negative; use 0 (let the provider pick) or a positive seed.")

    return UsoRequest(prompt=prompt, negative_prompt=negative_prompt, image_size=image_size,
                      keep_size=bool(keep_size), steps=steps, guidance=guidance, seed=map_seed(seed),
                      num_images=num_images, output_format=output_format,
                      safety_checker=bool(safety_checker), warnings=tuple(warnings))


def image_list(provider: str, subject: str | None, styles: list[str]) -> tuple[list[str], list[str]]:
    """The provider's image list and a note when a style-only request changes meaning."""
    if subject is not None:
        return [subject, *styles], []
    if provider == "fal":
        # The reference implementation marks "no content image" with an empty first entry.
        return ["", *styles], []
    return list(styles), ["AIML cannot leave the subject slot empty (it needs a URL there), so the first "
                          "style image also fills the subject/content slot and shapes the layout; connect "
                          "subject_image to avoid this"]


def clamp_timeout(timeout_s, warnings: list[str]) -> int:
    return _clamp("timeout_s", _int("timeout_s", timeout_s), *TIMEOUT_RANGE, warnings)


def _common(req: UsoRequest) -> dict:
    body: dict = {"prompt": req.prompt}
    if req.negative_prompt:
        body["negative_prompt"] = req.negative_prompt
    if isinstance(req.image_size, tuple):
        body["image_size"] = {"width": req.image_size[0], "height": req.image_size[1]}
    else:
        body["image_size"] = req.image_size
    if req.keep_size:
        body["keep_size"] = True
    body.update({
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance,
        "num_images": req.num_images,
        "enable_safety_checker": req.safety_checker,
        "output_format": req.output_format,
    })
    if req.seed is not None:
        body["seed"] = req.seed
    return body


def fal_body(req: UsoRequest) -> dict:
    return {"input_image_urls": list(req.image_urls), **_common(req)}


def aiml_body(req: UsoRequest) -> dict:
    return {"model": AIML_MODEL, "image_urls": list(req.image_urls), **_common(req)}
