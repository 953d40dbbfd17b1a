"""USOPipeline: load the models once, encode prompts / styles / subjects (cached), generate.

Reads like a diffusers pipeline: explicit steps, plain tensors. Knows nothing of ComfyUI.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import fp8, lora, memory, positions, sampler, schedule, speed, style, subject, text, vae
from .gguf_files import is_quantized
from .limits import (BATCH_SIZE, DENOISE, GUIDANCE, HEIGHT, LONG_SIDE, MAX_PROMPT_CHARS, MAX_REFERENCE_STYLES,
                     MAX_REFERENCE_SUBJECTS, SEED, SEED_MAX, STEPS, WIDTH)
from .model_set import LoadedModels, ModelFiles, fitted_precision, load_models
from .user_lora import UserLora, read_user_lora
from .errors import InputError, ModelFileError, OutOfMemoryError

LORA_MODES = ("auto", "fused", "unfused")


def batch_seeds(seed: int, count: int) -> list[int]:
    """The seeds of a batch, checked where seed and batch_size enter (every face calls this before
    `generate`): image i uses seed + i (wrapping past SEED_MAX), so it equals a single run with that seed."""
    SEED.check(seed)
    BATCH_SIZE.check(count)  # before a list of that many seeds is built
    return [(int(seed) + i) % (SEED_MAX + 1) for i in range(int(count))]


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "auto"        # memory.PRECISIONS
    memory: str = "auto"           # memory.MEMORY_MODES
    device: str | None = None      # None: cuda, else mps, else xpu, else cpu (`memory.resolve_device`)
    lora_mode: str = "auto"        # auto = fused, except unfused over fp8 / GGUF weights
    lora_strength: float = 1.0
    comfy_tokenizer_dirs: dict = field(default_factory=dict)
    encoders: str = "auto"         # memory.ENCODER_PLACEMENTS: T5/CLIP/SigLIP in "gpu" mode
    attention: str = "native"      # speed.ATTENTION_CHOICES (diffusers' attention dispatcher)
    compile: bool = False          # regional torch.compile of the repeated transformer blocks
    step_cache: float = 0.0        # First Block Cache threshold; 0 = off
    #: What the device can do and what the user forced (inside ComfyUI: its flags, `bridge.device_facts`);
    #: None: `memory.DeviceFacts.probe` of the device.
    facts: memory.DeviceFacts | None = None


def device_facts(options: EngineOptions) -> memory.DeviceFacts:
    """The facts the options carry, else those torch gives for the options' device."""
    if options.facts is not None:
        return options.facts
    return memory.DeviceFacts.probe(memory.resolve_device(options.device))


def run_device(options: EngineOptions) -> torch.device:
    """The options' device; with none named, the one the facts describe."""
    if options.device is None and options.facts is not None:
        return options.facts.torch_device
    return memory.resolve_device(options.device)


def _host_given_free_bytes(hooks: memory.DeviceHooks | None, device: torch.device) -> int | None:
    """The device memory a host (ComfyUI) says we may use; None outside one, or on the CPU."""
    if hooks and hooks.available_bytes and device.type != "cpu":
        return hooks.available_bytes(device)
    return None


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


@dataclass(frozen=True)
class GenerationInputs:
    """The checked inputs of one `generate` call (`check_inputs`)."""
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float
    shift: str
    denoise: float
    init_latents: torch.Tensor | None  # image to image: scaled, float32, CPU, (1 or len(seeds), 16, H/8, W/8)

    def start_latent(self, index: int) -> torch.Tensor | None:
        """Image `index`'s scaled latent to start from (1, 16, H/8, W/8); one latent serves every image."""
        if self.init_latents is None:
            return None
        return self.init_latents[index if len(self.init_latents) > 1 else 0][None]


@dataclass(frozen=True)
class Conditioning:
    """What the transformer is conditioned on (`encode_references`), on the CPU."""
    t5_tokens: torch.Tensor                         # (1, 512, 4096)
    pooled: torch.Tensor                            # (1, 768) CLIP
    style_tokens: torch.Tensor | None               # (1, n, hidden): every style image's tokens in order
    subject_tokens: list[sampler.SubjectTokens]     # packed latents of each subject


def _batch_progress(on_step: Callable[[int, int], None] | None, done_before: int,
                    total: int) -> Callable[[int, int], None] | None:
    """One image's step callback reporting to `on_step(done, total)` over the whole batch."""
    if on_step is None:
        return None
    return lambda done, _steps: on_step(done_before + done, total)


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


def _adapters_leave_with(transformer: torch.nn.Module) -> Callable[[list[torch.nn.Module]], None]:
    """The user-LoRA adapters are not parameters: they leave the device with the transformer.
    (A function of the transformer, not a pipeline method: the placement holds it, and a bound
    method would keep the pipeline alive in a reference cycle.)"""
    def released(modules: list[torch.nn.Module]) -> None:
        if any(m is transformer for m in modules):
            lora.place_adapters(transformer, torch.device("cpu"))
    return released


class USOPipeline:
    """The loaded USO models and everything to run them."""

    def __init__(self, models: LoadedModels, options: EngineOptions = EngineOptions(),
                 hooks: memory.DeviceHooks | None = None):
        """`hooks`: how a host (ComfyUI) shares the device; None outside one."""
        self.options = options
        self.device = run_device(options)
        self.facts = device_facts(options)
        # Loaded models carry the precision their files were read in (`auto` follows the files).
        self.precision = models.precision or memory.resolve_precision(options.precision, self.device,
                                                                      facts=self.facts)
        self._lock = threading.RLock()
        self._prompt_cache = _LRU(8)
        self._style_cache = _LRU(32)
        self._subject_cache = _LRU(16)

        self.models = models
        self.transformer = models.transformer
        self.transformer_config = models.transformer_config
        self.hidden_size = models.hidden_size
        self.vae, self.t5, self.clip = models.vae, models.t5, models.clip
        self.t5_tokenizer, self.clip_tokenizer = models.t5_tokenizer, models.clip_tokenizer
        self.siglip, self.siglip_layers, self.projector = models.siglip, models.siglip_layers, models.projector
        self.style_size = self.siglip.config.image_size
        self.style_owner, self.subject_owner = models.style_owner, models.subject_owner
        self.lora_rank = models.lora_rank

        self.lora_mode = self._resolve_lora_mode(options.lora_mode)
        # Recorded on the transformer: a second pipeline over the same models does not fuse again.
        lora.apply_uso(self.transformer, models.lora_parts, self.lora_mode, options.lora_strength,
                       self.precision.compute)
        self.user_loras: tuple[tuple[UserLora, float], ...] = ()
        self._shared = {"released": False, "lora_files": _LRU(8)}  # shared with `with_lora` views
        if self.precision.fp8_storage:
            fp8.enable_fp8_storage(self.transformer, self.precision.compute)

        if self.facts.positions_on_cpu:
            positions.embed_positions_on_host(self.transformer)
        if not self.facts.vae_sdpa:
            from diffusers.models.attention_processor import AttnProcessor
            self.vae.set_attn_processor(AttnProcessor())   # ComfyUI turns the VAE's SDPA off on AMD
        others = [self.vae, self.t5, self.clip, self.siglip, self.projector]
        encoders = [self.t5, self.clip, self.siglip, self.projector]
        # ComfyUI's text encoder device (a Mac's CPU, --lowvram ...) and --cpu-vae keep those on the host.
        on_host = ([self.t5, self.clip] if self.facts.text_device == "cpu" else []) + \
            ([self.vae] if self.facts.vae_device == "cpu" else [])
        self.memory_plan = memory.plan_memory(
            options.memory, options.encoders, self.device,
            memory.ModelSizes.of(self.transformer, self.vae, [m for m in encoders if m not in on_host],
                                 self._quantized()),
            free_bytes=_host_given_free_bytes(hooks, self.device), facts=self.facts)
        # Offloading is slower; the reason says whether fp8 or GGUF weights would avoid it.
        logging.getLogger("uso.engine").log(logging.INFO if self.memory_plan.mode == "gpu" else logging.WARNING,
                                            "memory plan: %s", self.memory_plan.summary())
        self.memory_mode = self.memory_plan.mode
        self.placement = memory.Placement(self.memory_mode, self.device, self.memory_plan.encoders,
                                          self.memory_plan.pin_budget_bytes,
                                          hooks.before_use if hooks else None, unified=self.facts.unified)
        self.placement.on_release = _adapters_leave_with(self.transformer)
        self.placement.setup(self.transformer, others, encoders=encoders, on_host=on_host)
        self.speed = speed.apply(self.transformer, speed.SpeedSettings(
            options.attention, options.compile, options.step_cache), self.device, self.precision.compute)

    @classmethod
    def from_files(cls, files: ModelFiles, options: EngineOptions = EngineOptions(),
                   on_load_step: Callable[[str], None] | None = None,
                   hooks: memory.DeviceHooks | None = None) -> "USOPipeline":
        device, facts = run_device(options), device_facts(options)
        free = _host_given_free_bytes(hooks, device)
        chosen = fitted_precision(files, options.precision, device,
                                  free if free is not None else memory.free_memory(device),
                                  memory.host_memory(), options.encoders, facts=facts)
        if chosen.note:   # 16-bit weights stored as fp8 to fit, or what would fit
            logging.getLogger("uso.engine").warning("precision: %s", chosen.note)
        models = load_models(files, chosen.precision, options.comfy_tokenizer_dirs, on_load_step)
        return cls(models, options, hooks)

    def _quantized(self) -> bool:
        """fp8 storage or GGUF weights: the transformer is already as small as it gets here."""
        return self.precision.fp8_storage or any(
            is_quantized(p) for p in self.transformer.parameters())

    # -- user LoRAs -------------------------------------------------------------------------

    @property
    def _released(self) -> bool:
        return self._shared["released"]

    @_released.setter
    def _released(self, value: bool) -> None:
        self._shared["released"] = value

    def with_lora(self, path: str, strength: float = 1.0) -> "USOPipeline":
        """This pipeline with one more FLUX.1-dev LoRA on top of the USO LoRA (the loaded models are
        shared, nothing is copied; the LoRA is applied when a view generates). Strength 0 leaves the
        image as it is without the LoRA; the order LoRAs are added in does not change the image."""
        strength = float(strength)
        if not math.isfinite(strength) or abs(strength) > 100:
            raise InputError(f"strength: {strength} is not a usable LoRA strength; use -100..100 (1.0 is the "
                             "LoRA as trained).")
        from .user_lora import file_identity

        try:
            identity = file_identity(path)
        except OSError:
            raise ModelFileError(f"lora: '{path}' does not exist; pick a file from ComfyUI's loras folder.") from None
        with self._lock:
            loaded = self._shared["lora_files"].get_or(
                identity, lambda: read_user_lora(path, self.transformer, self.transformer_config))
        view = copy.copy(self)
        view.user_loras = self.user_loras + ((loaded, strength),)
        return view

    @property
    def lora_warnings(self) -> list[str]:
        """What the user LoRAs of this view left out (text-encoder parts, unknown modules)."""
        return [w for loaded, _s in self.user_loras if (w := loaded.warning())]

    def _user_lora_entries(self) -> tuple[tuple, list]:
        """(key, [(part, strength x part scale)]) in one canonical order (file identity, strength),
        so the order LoRAs were added in cannot change the arithmetic; strength 0 adds nothing."""
        active = sorted(((loaded, s) for loaded, s in self.user_loras if s != 0.0),
                        key=lambda item: (item[0].identity, item[1]))
        key = tuple((loaded.identity, s) for loaded, s in active)
        return key, [(part, s * part.scale) for loaded, s in active for part in loaded.parts]

    def _sync_user_loras(self) -> None:
        """Put this view's user LoRAs on the shared transformer (under the lock, before sampling)."""
        key, entries = self._user_lora_entries()
        # Fused into the weights where they are ours to edit; under group offload diffusers holds
        # the streamed host copies, so the user LoRAs run unfused there.
        fused = self.lora_mode == "fused" and self.memory_mode != "group_offload"
        state = lora.state_of(self.transformer)
        if state.user_key == (key, fused):
            lora.place_adapters(self.transformer, self.device)
            return
        if fused and self.placement.moves and self.memory_mode == "model_offload":
            # Edit the host copies (what the next onload copies from), not a device copy.
            self.placement.release(self.modules())
            self._released = True
        lora.set_user_loras(self.transformer, key, entries, fused, self.device, self.precision.compute)

    def _resolve_lora_mode(self, mode: str) -> str:
        if mode not in LORA_MODES:
            raise InputError(f"lora_mode: '{mode}' is not one of {', '.join(LORA_MODES)}.")
        quantized = self._quantized()
        if mode == "fused" and quantized:
            raise InputError("lora_mode: 'fused' cannot be used with fp8 or GGUF transformer weights "
                             "(fusing into fp8 loses about half of the LoRA); use 'unfused' or 'auto'.")
        if mode == "auto":
            return "unfused" if quantized else "fused"
        return mode

    # -- encoding (cached) ------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 tokens (1, 512, d), CLIP pooled (1, 768)) on the CPU in the text dtype."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt: expected text, got {type(prompt).__name__}.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt: {len(prompt)} characters is more than {MAX_PROMPT_CHARS}; T5 "
                             "reads only the first 512 tokens anyway. Shorten the prompt.")

        def compute():
            with self._lock, self._placed(), self.placement.using(self.t5, self.clip):
                t5_tokens = text.encode_t5(self.t5, self.t5_tokenizer, prompt, self._device_of(self.t5))
                pooled = text.encode_clip(self.clip, self.clip_tokenizer, prompt,
                                          self._device_of(self.clip))
            return t5_tokens.cpu(), pooled.cpu()

        return self._prompt_cache.get_or(prompt, lambda: self._guarded("encoding the prompt", compute))

    def encode_style(self, images: list[Image.Image], crop: str = "reference") -> StyleEncoding:
        if crop not in style.CROPS:
            raise InputError(f"crop: '{crop}' is not one of {', '.join(style.CROPS)}.")
        tokens = []
        for image in images:
            def compute(image=image):
                pixels = style.style_pixels(image, self.style_size, crop)
                with self._lock, self._placed(), \
                        self.placement.using(self.siglip, self.projector):
                    return style.encode_style(self.siglip, self.siglip_layers, self.projector,
                                              pixels).cpu()
            tokens.append(self._style_cache.get_or(
                (_image_key(image), crop),
                lambda compute=compute: self._guarded("encoding a style image", compute)))
        return StyleEncoding(tuple(tokens), self.style_owner)

    def encode_style_hidden_states(self, hidden_states: torch.Tensor) -> StyleEncoding:
        """Style tokens from SigLIP hidden states computed elsewhere: (B, layers, tokens, dim), the
        output of every encoder layer (ComfyUI's CLIP_VISION_OUTPUT `all_hidden_states` from a
        SigLIP). Entry -k is HF's hidden_states[-k] (HF's list also starts with the embeddings),
        so the projector reads the same layers -20, -11, -2 as from our own SigLIP. One style per
        image of the batch."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
            raise InputError("clip_vision_output: carries no per-layer hidden states; it must come from CLIP "
                             "Vision Encode with a SigLIP model (sigclip_vision_patch14_384), not a CLIP one.")
        _b, layers, tokens, dim = hidden_states.shape
        proj = self.projector
        want_tokens, want_dim = proj.high_embedding_linear[0].in_features, proj.high_layer_norm.normalized_shape[0]
        if (layers, tokens, dim) != (self.siglip_layers, want_tokens, want_dim):
            raise InputError(f"clip_vision_output: is {layers} layers x {tokens} tokens x {dim} from its vision "
                             f"model, but the USO projector needs SigLIP so400m at 384 px ({self.siglip_layers} "
                             f"layers x {want_tokens} tokens x {want_dim}). Load sigclip_vision_patch14_384 in "
                             "Load CLIP Vision.")
        tokens_out = []
        with self._lock, self._placed(), self.placement.using(self.projector), torch.inference_mode():
            device = next(self.projector.parameters()).device
            for one in hidden_states:
                picked = {layer: one[layer][None].to(device) for layer in style.BRANCH_LAYERS.values()}
                tokens_out.append(self.projector(picked).cpu())
        return StyleEncoding(tuple(tokens_out), self.style_owner)

    def encode_subject(self, images: list[Image.Image], long_side: int = LONG_SIDE.default,
                       sample_seed: int | None = None) -> SubjectEncoding:
        LONG_SIDE.check(long_side)
        latents, sizes = [], []
        for image in images:
            def compute(image=image):
                try:
                    prepared = subject.preprocess_subject(image, long_side)
                except ValueError as exc:
                    raise InputError(f"subject: {exc}") from exc
                with self._lock, self._placed(), self.placement.using(self.vae, keep=True):
                    z = vae.encode_latents(self.vae, subject.subject_pixels(prepared), sample_seed)
                return z.to(self.precision.compute).cpu(), prepared.size
            z, size = self._subject_cache.get_or(
                (_image_key(image), long_side, sample_seed),
                lambda compute=compute: self._guarded("encoding a subject image", compute))
            latents.append(z)
            sizes.append(size)
        return SubjectEncoding(tuple(latents), tuple(sizes), long_side, self.subject_owner)

    # -- generation, in stages -----------------------------------------------------------------
    #
    # generate = check_inputs -> encode_references -> prepare_timesteps -> for each seed:
    # prepare_latents -> denoise_latents -> unscale -> decode (diffusers' FluxPipeline order).

    def generate(self, prompt: str, styles: StyleEncoding | None = None,
                 subjects: SubjectEncoding | None = None, width: int = WIDTH.default,
                 height: int = HEIGHT.default, keep_size: bool = False, steps: int = STEPS.default,
                 guidance: float = GUIDANCE.default, seeds: list[int] = (SEED.default,),
                 shift: str = "reference", extra_references: bool = False,
                 on_step: Callable[[int, int], None] | None = None,
                 on_decode: Callable[[int, int], None] | None = None,
                 init_latents: torch.Tensor | None = None, denoise: float = DENOISE.default) -> GenerationResult:
        """One image per seed; image i equals a single run with seeds[i] (`batch_seeds` checks and
        makes the seeds of a batch).

        Image to image: `init_latents` (unscaled, (1 or len(seeds), 16, H/8, W/8), what a VAE
        encodes) set the size, and sampling starts at step `schedule.first_step(steps, denoise)` of
        the same schedule from x_t = (1 - t) x0 + t noise (x0 the scaled latent, t that step's
        timestep). denoise 1.0 starts from the noise itself, like a run without a latent.

        `on_step(done, total)` runs after every denoising step and `on_decode(i, n)` before decoding
        image i of n; raising from either stops the run (Cancel).

        The reference takes at most two style images and one subject; `extra_references` allows
        more (style tokens are concatenated, subjects continue down the UnoPE diagonal).
        """
        run = self.check_inputs(seeds, width, height, keep_size, steps, guidance, shift, denoise,
                                init_latents, styles, subjects, extra_references)
        conditioning = self.encode_references(prompt, styles, subjects)
        timesteps = self.prepare_timesteps(run.steps, run.width, run.height, run.shift, run.denoise)
        images, latents = self._guarded(f"generating {run.width}x{run.height}", lambda: self._sample_and_decode(
            run, conditioning, timesteps, on_step, on_decode))
        return GenerationResult(images, latents, run.seeds, run.width, run.height)

    def _sample_and_decode(self, run: "GenerationInputs", conditioning: "Conditioning",
                           timesteps: list[float], on_step, on_decode) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, unscaled latents) of every seed: each image sampled on its own, then all decoded."""
        steps_per_image = len(timesteps) - 1
        with self._lock, self._placed():
            self._sync_user_loras()
            latents = []
            for n, seed in enumerate(run.seeds):
                start = self.prepare_latents(seed, run.width, run.height, run.start_latent(n), timesteps[0])
                z = self.denoise_latents(start, conditioning, timesteps, run.guidance,
                                         _batch_progress(on_step, n * steps_per_image,
                                                         len(run.seeds) * steps_per_image))
                latents.append(vae.unscale(self.vae, z))
            unscaled = torch.cat(latents).cpu()
            return self.decode(unscaled, on_decode), unscaled

    def check_inputs(self, seeds, width, height, keep_size, steps, guidance, shift, denoise,
                     init_latents, styles, subjects, extra_references) -> "GenerationInputs":
        """Every input of `generate` checked (the messages of `limits`), before any model runs."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise InputError("seeds: no seed given; give one seed per image (batch_seeds(seed, batch_size)).")
        steps = int(STEPS.check(steps))
        guidance = float(GUIDANCE.check(guidance))
        if shift not in schedule.SHIFTS:
            raise InputError(f"shift: '{shift}' is not one of {', '.join(schedule.SHIFTS)}.")
        denoise = float(DENOISE.check(denoise))
        if schedule.first_step(steps, denoise) >= steps:
            raise InputError(f"denoise: {denoise} x {steps} steps leaves no step to run; raise denoise or steps.")
        x0 = None
        if init_latents is not None:
            x0 = self._scaled_init_latents(init_latents, len(seeds))
            height, width = x0.shape[2] * 8, x0.shape[3] * 8
        elif denoise < 1.0:
            raise InputError(f"denoise: {denoise} needs a latent to start from; connect a LATENT (e.g. from VAE "
                             "Encode) or set denoise to 1.0.")
        else:
            width, height = self.output_size(width, height, keep_size, subjects)
        self.check_encodings(styles, subjects)
        if not extra_references:
            if styles is not None and styles.count > MAX_REFERENCE_STYLES:
                raise InputError(f"style: {styles.count} style images; the reference takes at most "
                                 f"{MAX_REFERENCE_STYLES}. Remove some, or turn on extra_references.")
            if subjects is not None and len(subjects.latents) > MAX_REFERENCE_SUBJECTS:
                raise InputError(f"subject: {len(subjects.latents)} subjects; the reference takes one. Use "
                                 "one subject image, or turn on extra_references.")
        return GenerationInputs(seeds, width, height, steps, guidance, shift, denoise, x0)

    def output_size(self, width: int, height: int, keep_size: bool,
                    subjects: SubjectEncoding | None) -> tuple[int, int]:
        """The reference's size rules: keep_size = 2x the preprocessed subject, down to /16;
        otherwise width and height as given (multiples of 16, `limits.WIDTH` / `HEIGHT`)."""
        if keep_size:
            if subjects is None or not subjects.latents:
                raise InputError("keep_size: needs a subject (the output size comes from it); connect "
                                 "a USO Encode Subject output or turn keep_size off.")
            w, h = subjects.sizes[0]
            width = int(w * (1024 / subjects.long_side)) // 16 * 16
            height = int(h * (1024 / subjects.long_side)) // 16 * 16
        return int(WIDTH.check(width)), int(HEIGHT.check(height))

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

    def encode_references(self, prompt: str, styles: StyleEncoding | None,
                          subjects: SubjectEncoding | None) -> "Conditioning":
        """What the transformer is conditioned on: the prompt's T5 tokens and pooled CLIP vector,
        the style tokens of every style image in one sequence, each subject's packed latents."""
        t5_tokens, pooled = self.encode_prompt(prompt)
        style_tokens = torch.cat(list(styles.tokens), dim=1) if styles and styles.count else None
        subject_tokens = [sampler.SubjectTokens(positions.pack(z), (z.shape[2] // 2, z.shape[3] // 2))
                          for z in (subjects.latents if subjects else ())]
        return Conditioning(t5_tokens, pooled, style_tokens, subject_tokens)

    @staticmethod
    def prepare_timesteps(steps: int, width: int, height: int, shift: str = "reference",
                          denoise: float = 1.0) -> list[float]:
        """The schedule's timesteps from image to image's first step on (all of them at denoise 1.0)."""
        return schedule.timesteps(steps, width, height, shift)[schedule.first_step(steps, denoise):]

    def prepare_latents(self, seed: int, width: int, height: int, start_latent: torch.Tensor | None = None,
                        t_start: float = 1.0) -> torch.Tensor:
        """Where sampling starts, on the device: the seed's noise, or image to image's scaled latent
        (1, 16, H/8, W/8) moved along the flow to the first timestep `t_start`."""
        noise = sampler.initial_noise(seed, width, height, self.device)
        if start_latent is None:
            return noise
        return sampler.noised_latent(start_latent.to(self.device), noise, t_start)

    def denoise_latents(self, latents: torch.Tensor, conditioning: "Conditioning", timesteps: list[float],
                        guidance: float, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The transformer (placed, with the step cache of this run) from `latents` along
        `timesteps`: the scaled image latents, in the compute dtype."""
        with self.placement.using(self.transformer, keep=True), speed.step_cache_run(self.transformer):
            return sampler.denoise(self.transformer, latents, conditioning.t5_tokens, conditioning.pooled,
                                   conditioning.style_tokens, conditioning.subject_tokens, timesteps,
                                   guidance, self.precision.compute, on_step)

    def _scaled_init_latents(self, latents, count: int) -> torch.Tensor:
        """A LATENT's samples (unscaled, like ComfyUI's and our own LATENT output) checked and
        scaled the way the transformer sees latents: (z - shift) * scale, float32 on the CPU."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise InputError("latent: expected FLUX latents [B, 16, H/8, W/8] (from VAE Encode with the FLUX VAE "
                             "or USO Generate), got "
                             f"{list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}.")
        b, c, h, w = latents.shape
        if c != 16:
            raise InputError(f"latent: has {c} channels; FLUX latents have 16 (a {c}-channel latent comes from "
                             "another model's VAE, e.g. SD/SDXL). Encode with the FLUX VAE (ae.safetensors).")
        if WIDTH.problem(8 * (w // 2 * 2)) or HEIGHT.problem(8 * (h // 2 * 2)):
            raise InputError(f"latent: is for a {8 * w}x{8 * h} image; USO makes sides of {WIDTH.low}..{WIDTH.high} "
                             "px. Scale the image first (e.g. Upscale Image).")
        if b not in (1, count):
            raise InputError(f"latent: holds {b} latents for {count} images; give one latent (used for every "
                             "image) or one per image.")
        # FLUX packs 2x2 latent patches: an odd last row / column (an image side of 8 * odd) is left out.
        z = latents.detach()[:, :, : h // 2 * 2, : w // 2 * 2].to("cpu", torch.float32)
        if not torch.isfinite(z).all():
            raise InputError("latent: contains NaN or infinite values; encode the image again.")
        return vae.scale(self.vae, z)

    def encode_image_latents(self, image: Image.Image) -> torch.Tensor:
        """An image -> unscaled latents (1, 16, H/8, W/8) for `generate(init_latents=...)`: the VAE's
        posterior mean of the image center-cropped to multiples of 16."""
        rgb = image.convert("RGB")
        w, h = rgb.width // 16 * 16, rgb.height // 16 * 16
        left, top = (rgb.width - w) // 2, (rgb.height - h) // 2
        prepared = rgb.crop((left, top, left + w, top + h))
        if WIDTH.problem(prepared.width) or HEIGHT.problem(prepared.height):
            raise InputError(f"init_image: {image.width}x{image.height} is outside {WIDTH.low}..{WIDTH.high} px.")

        def compute():
            with self._lock, self._placed(), self.placement.using(self.vae, keep=True):
                z = vae.encode_latents(self.vae, subject.subject_pixels(prepared))
            return vae.unscale(self.vae, z).cpu()

        return self._guarded("encoding the init image", compute)

    def decode(self, latents_unscaled: torch.Tensor,
               on_decode: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Unscaled latents (B, 16, H/8, W/8) -> images (B, H, W, 3); tiled above ~1.5k px.
        `on_decode(i, n)` runs before image i of n (raising from it stops, e.g. on Cancel)."""
        tiled = max(latents_unscaled.shape[2:]) * 8 > 1536
        images = []
        with self._lock, self.placement.using(self.vae, keep=True):
            for i, z in enumerate(latents_unscaled):
                if on_decode is not None:
                    on_decode(i, len(latents_unscaled))
                images.append(vae.decode_latents(self.vae, z[None], tiled))
        return torch.cat(images)

    # -- memory ------------------------------------------------------------------------------

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, self.t5, self.clip, self.siglip, self.projector]

    @contextmanager
    def _placed(self):
        """Put released models back where the memory mode keeps them, before running any."""
        if self._released:
            self.placement.restore(self.transformer, [self.vae, self.t5, self.clip, self.siglip, self.projector])
            self._released = False
        yield

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def _guarded(self, doing: str, work: Callable[[], object]):
        """`work()`; out of device memory, the memory is given back (the models leave the device and
        the next run places them again, so nothing stays half-placed) and an OutOfMemoryError names
        the memory mode that would fit."""
        try:
            return work()
        except RuntimeError as exc:  # CUDA's OutOfMemoryError is one; MPS and XPU raise a plain one
            if not memory.is_out_of_memory(exc):
                raise
            # leave the except block first: the error's traceback holds the failed run's tensors
        with self._lock:
            gc.collect()
            self.placement.release(self.modules())
            self._released = True
            self._empty_cache()
        raise OutOfMemoryError(self._oom_message(doing))

    def _oom_message(self, doing: str) -> str:
        order = ["gpu", "model_offload", "group_offload"]
        current = self.memory_mode
        lighter = order[order.index(current) + 1:] if current in order else []
        fixes = [f"memory '{lighter[0]}'"] if lighter else []
        if not self.precision.fp8_storage and self.facts.fp8_storage:
            fixes.append("precision 'fp8_e4m3fn'")
        if not fixes:
            fixes.append("a smaller GGUF transformer (e.g. Q8_0)")
        chosen = f"memory='{current}'" if self.options.memory == current else \
            f"memory='{self.options.memory}' (which chose '{current}')"
        return (f"Out of memory on {self.device} {doing} with {chosen}. The memory was released; choose "
                f"{' or '.join(fixes)} in USO Load Models, or generate a smaller image.")

    @staticmethod
    def _device_of(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device

