"""USOPipeline: load the models once, encode prompts / styles / subjects (cached), generate.

Reads like a diffusers pipeline: explicit steps, plain tensors. Knows nothing of ComfyUI.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import loaders, lora, memory, positions, sampler, schedule, style, subject, text, tokenizers
from .errors import InputError, ModelFileError, OutOfMemoryError
from .loaders import Component

MIN_SIZE = 16
MAX_SIZE = 4096
MAX_BATCH = 16
MAX_PROMPT_CHARS = 20000
REFERENCE_LONG_SIDE = 512

LORA_MODES = ("auto", "fused", "unfused")


@dataclass(frozen=True)
class ModelFiles:
    """Paths of the weights. vae / t5 / clip_l may be None when the transformer is a ComfyUI
    all-in-one checkpoint or a diffusers FLUX folder that contains them."""

    transformer: str
    siglip: str
    uso_lora: str
    projector: str
    vae: str | None = None
    t5: str | None = None
    clip_l: str | None = None
    tokenizer_dir: str | None = None


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "auto"        # memory.PRECISIONS
    memory: str = "auto"           # memory.MEMORY_MODES
    device: str | None = None      # None: cuda if available, else cpu
    lora_mode: str = "auto"        # auto = fused, except unfused over fp8 / GGUF weights
    lora_strength: float = 1.0
    comfy_tokenizer_dirs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StyleEncoding:
    """Style tokens, one (1, tokens, hidden) tensor per style image, in order."""

    tokens: tuple[torch.Tensor, ...]
    owner: str

    def __add__(self, other: "StyleEncoding") -> "StyleEncoding":
        if other.owner != self.owner:
            raise InputError("style: the chained styles were encoded by different USO models; "
                             "encode every style with the same USO Load Models output.")
        return StyleEncoding(self.tokens + other.tokens, self.owner)

    @property
    def count(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class SubjectEncoding:
    """Reference latents (scaled, (1, 16, h/8, w/8)) and the preprocessed pixel size of each."""

    latents: tuple[torch.Tensor, ...]
    sizes: tuple[tuple[int, int], ...]
    long_side: int
    owner: str

    def __add__(self, other: "SubjectEncoding") -> "SubjectEncoding":
        if other.owner != self.owner:
            raise InputError("subject: the chained subjects were encoded by different USO models; "
                             "encode every subject with the same USO Load Models output.")
        return SubjectEncoding(self.latents + other.latents, self.sizes + other.sizes,
                               self.long_side, self.owner)


@dataclass
class GenerationResult:
    images: torch.Tensor           # (B, H, W, 3) float 0..1, CPU, 8-bit values like the reference
    latents: torch.Tensor          # (B, 16, H/8, W/8) float32, unscaled (what a VAE decodes)
    seeds: list[int]
    width: int
    height: int


def _image_key(image: Image.Image) -> str:
    h = hashlib.sha1()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, compute):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = compute()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class USOPipeline:
    """The loaded USO models and everything to run them."""

    def __init__(self, files: ModelFiles, options: EngineOptions = EngineOptions(),
                 on_load_step: Callable[[str], None] | None = None):
        self.files = files
        self.options = options
        self.device = memory.resolve_device(options.device)
        self.precision = memory.resolve_precision(options.precision, self.device)
        step = on_load_step or (lambda _what: None)
        self._lock = threading.RLock()
        self._prompt_cache = _LRU(8)
        self._style_cache = _LRU(32)
        self._subject_cache = _LRU(16)

        transformer_path = files.transformer
        component, _layout = loaders.transformer_component(transformer_path)
        is_diffusers_folder = os.path.isdir(transformer_path)
        is_aio = bool(component.prefix)

        step("transformer")
        self.transformer, self.transformer_config = loaders.load_transformer(
            transformer_path, self.precision.compute, self.precision.fp8_storage)
        self.hidden_size = self.transformer_config["num_attention_heads"] * \
            self.transformer_config["attention_head_dim"]

        step("uso_lora")
        parts, self.lora_rank = lora.load_uso_lora(files.uso_lora)
        lora.check_fits(parts, self.transformer, os.path.basename(files.uso_lora))
        self.lora_mode = self._resolve_lora_mode(options.lora_mode)
        if self.lora_mode == "fused":
            lora.apply_fused(self.transformer, parts, options.lora_strength)
        else:
            lora.apply_unfused(self.transformer, parts, options.lora_strength, self.precision.compute)
        if self.precision.fp8_storage:
            memory.enable_fp8_storage(self.transformer, self.precision.compute, loaders.fp8_storable)

        step("vae")
        self.vae = loaders.load_vae(self._component("vae", files.vae, transformer_path, is_aio,
                                                    is_diffusers_folder, "vae"), self.precision.vae)
        step("t5")
        self.t5 = loaders.load_t5(self._component("t5", files.t5, transformer_path, is_aio,
                                                  is_diffusers_folder, "text_encoder_2"),
                                  self.precision.text)
        step("clip_l")
        self.clip = loaders.load_clip(self._component("clip_l", files.clip_l, transformer_path, is_aio,
                                                      is_diffusers_folder, "text_encoder"),
                                      self.precision.text)
        step("tokenizers")
        diffusers_root = transformer_path if is_diffusers_folder else None
        self.t5_tokenizer = tokenizers.load_tokenizer("t5", tokenizers.tokenizer_roots(
            files.tokenizer_dir, diffusers_root, options.comfy_tokenizer_dirs, "t5"))
        self.clip_tokenizer = tokenizers.load_tokenizer("clip_l", tokenizers.tokenizer_roots(
            files.tokenizer_dir, diffusers_root, options.comfy_tokenizer_dirs, "clip_l"))
        self._check_text_widths()

        step("siglip")
        self.siglip, self.siglip_layers = loaders.load_siglip(loaders.siglip_component(files.siglip),
                                                              self.precision.vision)
        step("projector")
        self.projector = loaders.load_projector(files.projector, self.precision.compute)
        self._check_projector()
        self.style_size = self.siglip.config.image_size

        # Encodings made by another pipeline are fine when they come from the same files.
        self.style_owner = f"{os.path.realpath(files.siglip)}|{os.path.realpath(files.projector)}|" \
                           f"{self.precision.compute}"
        self.subject_owner = f"{os.path.realpath(files.vae or transformer_path)}|{self.precision.vae}"

        others = [self.vae, self.t5, self.clip, self.siglip, self.projector]
        self.memory_mode = memory.choose_memory_mode(
            options.memory, self.device, memory.module_bytes(self.transformer),
            sum(memory.module_bytes(m) for m in others))
        self.placement = memory.Placement(self.memory_mode, self.device)
        self.placement.setup(self.transformer, others)

    # -- loading helpers --------------------------------------------------------------------

    def _component(self, slot: str, explicit: str | None, transformer_path: str, is_aio: bool,
                   is_diffusers_folder: bool, diffusers_sub: str) -> Component:
        from .detect import AIO_PREFIXES, has_prefix
        from .weight_files import open_weights

        if explicit:
            if slot == "vae":
                return loaders.vae_component(explicit)
            return Component(os.path.join(explicit, diffusers_sub) if os.path.isdir(
                os.path.join(explicit, diffusers_sub)) else explicit)
        if is_diffusers_folder:
            return Component(os.path.join(transformer_path, diffusers_sub))
        if is_aio:
            if not has_prefix(open_weights(transformer_path), AIO_PREFIXES[slot]):
                raise ModelFileError(f"{slot}: '{os.path.basename(transformer_path)}' does not contain a "
                                     f"{slot} ('from checkpoint' needs it); pick a separate {slot} file.")
            return Component(transformer_path, AIO_PREFIXES[slot])
        raise ModelFileError(f"{slot}: no file chosen. 'from checkpoint' only works when the transformer "
                             "is an all-in-one checkpoint or a diffusers folder; pick a "
                             f"{slot} file.")

    def _resolve_lora_mode(self, mode: str) -> str:
        if mode not in LORA_MODES:
            raise InputError(f"lora_mode: '{mode}' is not one of {', '.join(LORA_MODES)}.")
        quantized = self.precision.fp8_storage or any(
            hasattr(p, "quant_type") for p in self.transformer.parameters())
        if mode == "fused" and quantized:
            raise InputError("lora_mode: 'fused' cannot be used with fp8 or GGUF transformer weights "
                             "(fusing into fp8 loses about half of the LoRA); use 'unfused' or 'auto'.")
        if mode == "auto":
            return "unfused" if quantized else "fused"
        return mode

    def _check_text_widths(self) -> None:
        t5_width = self.t5.config.d_model
        if t5_width != self.transformer_config["joint_attention_dim"]:
            raise ModelFileError(f"t5: the T5 encoder outputs {t5_width}-wide tokens but the transformer "
                                 f"expects {self.transformer_config['joint_attention_dim']}; pick the "
                                 "T5-XXL encoder that goes with FLUX.1-dev.")
        clip_width = self.clip.config.hidden_size
        if clip_width != self.transformer_config["pooled_projection_dim"]:
            raise ModelFileError(f"clip_l: the CLIP encoder outputs {clip_width} values but the transformer "
                                 f"expects {self.transformer_config['pooled_projection_dim']}; pick CLIP-L.")

    def _check_projector(self) -> None:
        proj = self.projector
        siglip_tokens = proj.high_embedding_linear[0].in_features
        siglip_dim = proj.high_layer_norm.normalized_shape[0]
        cfg = self.siglip.config
        grid = (cfg.image_size // cfg.patch_size) ** 2
        if (siglip_tokens, siglip_dim) != (grid, cfg.hidden_size):
            raise ModelFileError(
                f"projector: '{os.path.basename(self.files.projector)}' expects SigLIP features of "
                f"{siglip_tokens} tokens x {siglip_dim}, but the SigLIP model gives {grid} x "
                f"{cfg.hidden_size}; pick the SigLIP so400m patch14-384 encoder.")
        if proj.high_projection.out_features != self.hidden_size:
            raise ModelFileError(
                f"projector: '{os.path.basename(self.files.projector)}' makes "
                f"{proj.high_projection.out_features}-wide tokens but the transformer is "
                f"{self.hidden_size} wide; the projector belongs to another model.")

    # -- encoding (cached) ------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 tokens (1, 512, d), CLIP pooled (1, 768)) on the CPU in the text dtype."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt: expected text, got {type(prompt).__name__}.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt: {len(prompt)} characters is more than {MAX_PROMPT_CHARS}; T5 "
                             "reads only the first 512 tokens anyway. Shorten the prompt.")

        def compute():
            with self._lock, self.placement.use(self.t5), self.placement.use(self.clip):
                t5_tokens = text.encode_t5(self.t5, self.t5_tokenizer, prompt, self._device_of(self.t5))
                pooled = text.encode_clip(self.clip, self.clip_tokenizer, prompt,
                                          self._device_of(self.clip))
            return t5_tokens.cpu(), pooled.cpu()

        return self._prompt_cache.get_or(prompt, compute)

    def encode_style(self, images: list[Image.Image], crop: str = "reference") -> StyleEncoding:
        if crop not in style.CROPS:
            raise InputError(f"crop: '{crop}' is not one of {', '.join(style.CROPS)}.")
        tokens = []
        for image in images:
            def compute(image=image):
                pixels = style.style_pixels(image, self.style_size, crop)
                with self._lock, self.placement.use(self.siglip), self.placement.use(self.projector):
                    return style.encode_style(self.siglip, self.siglip_layers, self.projector,
                                              pixels).cpu()
            tokens.append(self._style_cache.get_or((_image_key(image), crop), compute))
        return StyleEncoding(tuple(tokens), self.style_owner)

    def encode_subject(self, images: list[Image.Image], long_side: int = REFERENCE_LONG_SIDE,
                       sample_seed: int | None = None) -> SubjectEncoding:
        if not 64 <= long_side <= 2048 or long_side % 16:
            raise InputError(f"long_side: {long_side} must be a multiple of 16 between 64 and 2048 "
                             "(the reference uses 512).")
        latents, sizes = [], []
        for image in images:
            def compute(image=image):
                try:
                    prepared = subject.preprocess_subject(image, long_side)
                except ValueError as exc:
                    raise InputError(f"subject: {exc}") from exc
                with self._lock, self.placement.use(self.vae, keep=True):
                    z = subject.encode_latents(self.vae, subject.subject_pixels(prepared), sample_seed)
                return z.to(self.precision.compute).cpu(), prepared.size
            z, size = self._subject_cache.get_or((_image_key(image), long_side, sample_seed), compute)
            latents.append(z)
            sizes.append(size)
        return SubjectEncoding(tuple(latents), tuple(sizes), long_side, self.subject_owner)

    # -- generation ------------------------------------------------------------------------

    def output_size(self, width: int, height: int, keep_size: bool,
                    subjects: SubjectEncoding | None) -> tuple[int, int]:
        """The reference's size rules: keep_size = 2x the preprocessed subject; floor to /16."""
        if keep_size:
            if subjects is None or not subjects.latents:
                raise InputError("keep_size: needs a subject (the output size comes from it); connect "
                                 "a USO Encode Subject output or turn keep_size off.")
            w, h = subjects.sizes[0]
            width, height = int(w * (1024 / subjects.long_side)), int(h * (1024 / subjects.long_side))
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < MIN_SIZE or value > MAX_SIZE:
                raise InputError(f"{name}: {value} is outside {MIN_SIZE}..{MAX_SIZE}; pick a size in "
                                 "that range (1024 is USO's native size).")
        return width // 16 * 16, height // 16 * 16

    def check_encodings(self, styles: StyleEncoding | None, subjects: SubjectEncoding | None) -> None:
        if styles is not None:
            if styles.owner != self.style_owner:
                raise InputError("style: it was encoded by a different USO model (other SigLIP/projector "
                                 "files or precision). Connect USO Encode Style to the same USO Load "
                                 "Models output as USO Generate.")
            for t in styles.tokens:
                if t.shape[-1] != self.hidden_size:
                    raise InputError("style: its tokens do not fit this transformer; re-encode the style "
                                     "with this model.")
        if subjects is not None and subjects.owner != self.subject_owner:
            raise InputError("subject: it was encoded by a different USO model (another VAE or "
                             "precision). Connect USO Encode Subject to the same USO Load Models output "
                             "as USO Generate.")

    def generate(self, prompt: str, styles: StyleEncoding | None = None,
                 subjects: SubjectEncoding | None = None, width: int = 1024, height: int = 1024,
                 keep_size: bool = False, steps: int = 25, guidance: float = 4.0,
                 seeds: list[int] = (0,), shift: str = "reference",
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """One image per seed; image i equals a single run with seeds[i]."""
        seeds = [int(s) for s in seeds]
        if not 1 <= len(seeds) <= MAX_BATCH:
            raise InputError(f"batch_size: {len(seeds)} images; pick 1..{MAX_BATCH}.")
        if not 1 <= int(steps) <= 200:
            raise InputError(f"steps: {steps} is outside 1..200 (the reference uses 25).")
        if shift not in schedule.SHIFTS:
            raise InputError(f"shift: '{shift}' is not one of {', '.join(schedule.SHIFTS)}.")
        width, height = self.output_size(int(width), int(height), keep_size, subjects)
        self.check_encodings(styles, subjects)
        t5_tokens, pooled = self.encode_prompt(prompt)
        style_tokens = torch.cat(list(styles.tokens), dim=1) if styles and styles.count else None
        subject_tokens = [sampler.SubjectTokens(positions.pack(z), (z.shape[2] // 2, z.shape[3] // 2))
                          for z in (subjects.latents if subjects else ())]
        ts = schedule.timesteps(int(steps), width, height, shift)
        total = len(seeds) * int(steps)

        latents = []
        with self._lock:
            try:
                for n, seed in enumerate(seeds):
                    noise = sampler.initial_noise(seed, width, height, self.device)

                    def report(done, _steps, base=n * int(steps)):
                        if on_step is not None:
                            on_step(base + done, total)

                    with self.placement.use(self.transformer, keep=True):
                        z = sampler.denoise(self.transformer, noise, t5_tokens, pooled, style_tokens,
                                            subject_tokens, ts, float(guidance), self.precision.compute,
                                            report)
                    latents.append(z.float() / self.vae.config.scaling_factor +
                                   self.vae.config.shift_factor)
                unscaled = torch.cat(latents).cpu()
                images = self.decode(unscaled)
            except torch.OutOfMemoryError as exc:
                latents.clear()
                self._empty_cache()
                raise OutOfMemoryError(self._oom_message(width, height)) from exc
        return GenerationResult(images, unscaled, seeds, width, height)

    def decode(self, latents_unscaled: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 16, H/8, W/8) -> images (B, H, W, 3); tiled above ~1.5k px."""
        tiled = max(latents_unscaled.shape[2:]) * 8 > 1536
        with self._lock, self.placement.use(self.vae, keep=True):
            return torch.cat([subject.decode_latents(self.vae, z[None], tiled) for z in latents_unscaled])

    # -- memory ------------------------------------------------------------------------------

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, self.t5, self.clip, self.siglip, self.projector]

    def release_device_memory(self) -> None:
        with self._lock:
            self.placement.release(self.modules())

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_message(self, width: int, height: int) -> str:
        order = ["gpu", "model_offload", "group_offload"]
        current = self.memory_mode
        lighter = order[order.index(current) + 1:] if current in order else []
        hint = (f"set memory to '{lighter[0]}'" if lighter else
                "lower the size or use precision 'fp8_e4m3fn' or a GGUF transformer")
        if not self.precision.fp8_storage and lighter:
            hint += " or precision to 'fp8_e4m3fn'"
        return (f"Out of memory on {self.device} generating {width}x{height} with memory='{current}'. "
                f"The memory was released; {hint} in USO Load Models, or generate a smaller image.")

    @staticmethod
    def _device_of(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device

