"""USO from Python, without ComfyUI: load the models once, generate many times.

Run from the pack folder (the folder holding ``nodes/``), or put that folder on ``sys.path``::

    from nodes import api

    uso = api.load(comfy_models="~/ComfyUI/models")      # or diffusers=..., transformer=..., ...
    out = uso.generate("a woman in a red coat", subject="me.jpg", styles=["ink.png"], seed=7)
    out.save("out/portrait.png")                           # PNG with its parameters embedded
    out.images[0]                                          # PIL.Image

    tiny = api.load(tiny=True)                             # random tiny models: a smoke test, noise
    remote = api.remote("fal")                             # fal / AIML with FAL_KEY / AIML_API_KEY

`generate` takes the parameters of the USO Generate node with the same defaults (width/height 1024,
steps 25, guidance 4.0, seed 0, batch_size 1; style crop "reference", subject long side 512, shift
"reference"). Image arguments are file paths or PIL images. Image i of a batch uses seed + i, and
equals a single run with that seed. The engine underneath is `nodes.engine.USOPipeline`
(`uso.pipeline`), for encodings reused across calls or latents.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

from .cancel import Cancelled  # what `generate` raises after `cancel()` (Ctrl-C on the command line)
from .engine import EngineOptions, InputError, USOPipeline
from .engine.pipeline import batch_seeds
from .files import model_paths, png_info
from .files.image_files import load_image, to_8bit
from .jobs import ray_runner, runner
from .jobs.backend import TINY_NOTICE, Backend
from .jobs.plan import jobs_for
from .jobs.progress import BatchProgress
from .remote import Hooks, RemoteInputs, Settings
from .remote import generate as generate_remotely

ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass
class Output:
    """What one `generate` call made."""

    images: list[Image.Image]
    seeds: list[int]                    # per image (remote: the seed the provider reports)
    parameters: dict                    # what went in; written into each PNG
    latents: object = None              # (B, 16, H/8, W/8) unscaled FLUX latents (local only)
    warnings: list[str] = field(default_factory=list)

    def image_parameters(self, i: int) -> dict:
        return {**self.parameters, "seed": self.seeds[i], "image": f"{i + 1}/{len(self.images)}"}

    def save(self, path: str | Sequence[str]) -> list[str]:
        """Write PNGs with their parameters. One path: used as is for one image, else numbered
        ``name_1.png``, ``name_2.png``...; or one path per image."""
        if isinstance(path, (str, os.PathLike)):
            path = os.fspath(path)
            if len(self.images) == 1:
                paths = [path]
            else:
                stem, ext = os.path.splitext(path)
                paths = [f"{stem}_{i + 1}{ext or '.png'}" for i in range(len(self.images))]
        else:
            paths = [os.fspath(p) for p in path]
            if len(paths) != len(self.images):
                raise ValueError(f"{len(paths)} paths for {len(self.images)} images")
        for i, (img, p) in enumerate(zip(self.images, paths)):
            png_info.save_png(img, p, self.image_parameters(i))
        return paths


def _describe_image(image: ImageInput | None):
    """How an input image is recorded in the parameters (and so in the PNGs): its file name only,
    never the absolute path, which tells whoever gets the image about the machine it came from."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return f"<image {image.width}x{image.height}>"
    return os.path.basename(os.fspath(image))


def _open(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_8bit(image)
    return load_image(os.fspath(image))


def _lora_list(loras) -> list[tuple[str, float]]:
    """[(path, strength)] from paths, "PATH:STRENGTH" texts and (path, strength) pairs."""
    from .engine.user_lora import parse_lora_spec

    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]
    out = []
    for item in loras or ():
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((os.fspath(item[0]), float(item[1])))
        else:
            path, strength = parse_lora_spec(os.fspath(item))
            out.append((path, strength))
    return out


def _styles_list(styles) -> list:
    if styles is None:
        return []
    if isinstance(styles, (str, os.PathLike, Image.Image)):
        return [styles]
    return list(styles)


class _Cancellable:
    def __init__(self):
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the running `generate` (from another thread or a signal handler)."""
        self._cancel.set()

    def _start(self) -> None:
        self._cancel.clear()


class LocalUSO(_Cancellable):
    """USO on this machine: the loaded models (`pipeline`) and `generate`."""

    def __init__(self, pipeline: USOPipeline, backend: Backend = Backend(), models: dict | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.backend = backend                      # Backend() or Backend(tiny=True)
        self.models = models or {}                  # slot -> file name, for the metadata
        self.defaults = backend.defaults

    def generate(self, prompt: str | None = None, *, subject: ImageInput | None = None,
                 styles: ImageInput | Sequence[ImageInput] | None = None, width: int | None = None,
                 height: int | None = None, keep_size: bool | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None, batch_size: int | None = None,
                 style_crop: str | None = None, long_side: int | None = None, shift: str | None = None,
                 extra_references: bool = False, loras: Sequence = (),
                 init_image: ImageInput | None = None, denoise: float | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> Output:
        """Images for `prompt` (may be empty: with a subject and keep_size, a restyle).
        Unset arguments take USO Generate's defaults (`self.defaults`). `on_step(done, total)`
        runs after every denoising step of the batch.

        `loras`: FLUX.1-dev LoRAs on top of USO's, each a path, "PATH:STRENGTH" or (path, strength)
        (what USO Load LoRA and --lora take; the loaded models are re-used). `init_image` with
        `denoise` < 1: image to image from that image's latent (USO Generate's latent input)."""
        given = dict(prompt=prompt, width=width, height=height, keep_size=keep_size, steps=steps,
                     guidance=guidance, seed=seed, batch_size=batch_size, style_crop=style_crop,
                     long_side=long_side, shift=shift)
        p = {k: (self.defaults[k] if v is None else v) for k, v in given.items()}
        seeds = batch_seeds(p["seed"], p["batch_size"])  # checks both
        styles = _styles_list(styles)
        self._start()

        def step(done: int, total: int) -> None:
            if self._cancel.is_set():
                raise Cancelled("cancelled")
            if on_step is not None:
                on_step(done, total)

        pipe = self.pipeline
        lora_list = _lora_list(loras)
        for path, strength in lora_list:
            pipe = pipe.with_lora(path, strength)
        denoise = 1.0 if denoise is None else float(denoise)
        init_latents = pipe.encode_image_latents(_open(init_image)) if init_image is not None else None
        style_enc = pipe.encode_style([_open(s) for s in styles], p["style_crop"]) if styles else None
        subject_enc = pipe.encode_subject([_open(subject)], int(p["long_side"])) if subject is not None else None
        extra = {"extra_references": True} if extra_references else {}
        result = pipe.generate(p["prompt"], styles=style_enc, subjects=subject_enc, width=int(p["width"]),
                               height=int(p["height"]), keep_size=bool(p["keep_size"]), steps=int(p["steps"]),
                               guidance=float(p["guidance"]), seeds=seeds, shift=p["shift"], on_step=step,
                               init_latents=init_latents, denoise=denoise, **extra)
        as_bytes = (result.images * 255.0).round().clamp(0, 255).to("cpu").numpy().astype(np.uint8)
        images = [Image.fromarray(frame, "RGB") for frame in as_bytes]
        parameters = {
            "prompt": p["prompt"], "subject": _describe_image(subject),
            "styles": [_describe_image(s) for s in styles], "width": result.width, "height": result.height,
            "keep_size": bool(p["keep_size"]), "steps": int(p["steps"]), "guidance": float(p["guidance"]),
            "seed": seeds[0], "batch_size": len(seeds), "style_crop": p["style_crop"],
            "long_side": int(p["long_side"]), "shift": p["shift"], "extra_references": bool(extra_references),
            "loras": [[os.path.basename(path), strength] for path, strength in lora_list],
            "init_image": _describe_image(init_image), "denoise": denoise,
            "backend": self.backend.name,
            "precision": str(pipe.precision.compute).replace("torch.", ""), "device": pipe.device.type,
            # What ran: on a CPU nothing is placed on or offloaded to a GPU, whatever the plan is called.
            "memory": pipe.memory_mode if pipe.placement.moves else "none (cpu)",
            "models": self.models, "software": png_info.software(),
        }
        if self.backend.tiny:
            parameters["note"] = TINY_NOTICE
        return Output(images, list(result.seeds), parameters, result.latents, pipe.lora_warnings)


def load(*, tiny: bool = False, comfy_models: str | Sequence[str] | None = None,
         extra_model_paths: str | Sequence[str] | None = None, diffusers: str | None = None,
         transformer: str | None = None, vae: str | None = None, t5: str | None = None,
         clip_l: str | None = None, siglip: str | None = None, uso_lora: str | None = None,
         projector: str | None = None, tokenizers: str | None = None, precision: str = "auto",
         memory: str = "auto", device: str | None = None, on_load_step: Callable[[str], None] | None = None,
         resolved: model_paths.ResolvedModels | None = None) -> LocalUSO:
    """Load USO once. Files come from explicit paths (or names inside the ComfyUI folders), a
    diffusers FLUX.1-dev folder, ComfyUI ``models/`` folders and extra_model_paths.yaml files
    (see `nodes.files.model_paths`); `resolved`: what `resolve_files` found already (a driver
    hands it to its workers, whose current folder may differ). ``tiny=True`` builds random tiny
    models instead (no files)."""
    options = EngineOptions(precision=precision, memory=memory, device=device)
    if tiny:
        from .engine.random_models import build_random_models

        if on_load_step:
            on_load_step("random tiny models")
        return LocalUSO(USOPipeline(build_random_models("tiny"), options), Backend(tiny=True),
                        {"models": "random-tiny"})
    if resolved is None:
        resolved = resolve_files(comfy_models=comfy_models, extra_model_paths=extra_model_paths, diffusers=diffusers,
                                 transformer=transformer, vae=vae, t5=t5, clip_l=clip_l, siglip=siglip,
                                 uso_lora=uso_lora, projector=projector, tokenizers=tokenizers)
    options = EngineOptions(precision=precision, memory=memory, device=device,
                            comfy_tokenizer_dirs=resolved.comfy_tokenizer_dirs)
    pipe = USOPipeline.from_files(resolved.files, options, on_load_step)
    return LocalUSO(pipe, Backend(), model_names(resolved.files))


def open_backend(backend: Backend, *, precision: str = "auto", memory: str = "auto", device: str | None = None,
                 on_load_step: Callable[[str], None] | None = None, timeout_s: int = 600,
                 safety_checker: bool = True, **model_files) -> "LocalUSO | RemoteUSO":
    """The USO that runs `backend`'s jobs: `load` on this machine (`model_files` are its
    comfy_models, diffusers, transformer, ... or resolved), `remote` for a provider. What the
    command line and `run_manifest` hand the runners, which call it in this process or on each
    Ray worker."""
    if backend.is_local:
        return load(tiny=backend.tiny, precision=precision, memory=memory, device=device,
                    on_load_step=on_load_step, **model_files)
    return remote(backend.provider, timeout_s=timeout_s, safety_checker=safety_checker)


def run_manifest(manifest: str | os.PathLike, out: str | os.PathLike = "out", *, tiny: bool = False,
                 ray: str | None = None, ray_workers: int | None = None, ray_shared_out: bool = False,
                 overwrite: bool = False, progress: bool = False, precision: str = "auto", memory: str = "auto",
                 device: str | None = None, **model_files) -> list[dict]:
    """Every job of a JSON Lines / CSV manifest, as ``python -m nodes.cli --manifest`` runs it:
    every row checked first (nodes.jobs.manifest.ManifestError lists the problems), the same
    output names inside `out`, PNGs with their parameters, finished jobs skipped unless
    `overwrite`, a failed job recorded and the others run. One dict per job (status, outputs,
    error, seconds, parameters).

    ``ray``: run on a Ray cluster instead of this process: "local" starts one for the run,
    "auto" or an address joins one (or the one this process has already `ray.init`-ed); one
    worker per GPU, at most `ray_workers` (without GPUs, `ray_workers` CPU workers, default 1).
    `model_files` are `load`'s: comfy_models, diffusers, transformer, ..."""
    backend = Backend(tiny=tiny)
    jobs = jobs_for({}, os.fspath(manifest), backend)
    resolved = None if tiny else resolve_files(**model_files)   # a missing file is reported before anything runs
    open_uso = functools.partial(open_backend, backend, precision=precision, memory=memory, device=device,
                                 resolved=resolved)
    out_dir = os.path.abspath(os.fspath(out))
    bars = BatchProgress(len(jobs), enabled=progress)
    try:
        if ray is None:
            outcomes = runner.run_jobs(jobs, backend, open_uso, out_dir, overwrite=overwrite, progress=bars)
        else:
            outcomes = ray_runner.run_on_ray(jobs, backend, open_uso, out_dir, address=ray, workers=ray_workers,
                                             overwrite=overwrite, progress=bars, write_on_workers=ray_shared_out)
    finally:
        bars.close()
    return [o.as_dict() for o in outcomes]


def resolve_files(**kwargs) -> model_paths.ResolvedModels:
    """The files `load` would use (raises model_paths.ModelPathError naming each missing slot)."""
    def as_list(v):
        return [] if v is None else [os.fspath(v)] if isinstance(v, (str, os.PathLike)) else [os.fspath(x) for x in v]

    explicit = {slot: os.fspath(kwargs[slot]) for slot in model_paths.SLOT_FLAGS if kwargs.get(slot)}
    sources = model_paths.ModelSources(as_list(kwargs.get("comfy_models")), as_list(kwargs.get("extra_model_paths")),
                                       kwargs.get("diffusers"), explicit, kwargs.get("tokenizers"))
    return model_paths.resolve(sources)


def model_names(files) -> dict:
    """Slot -> file (or folder) name, without the machine's directories (for PNG metadata)."""
    out = {}
    for slot in ("transformer", "vae", "t5", "clip_l", "siglip", "uso_lora", "projector"):
        path = getattr(files, slot)
        out[slot] = os.path.basename(os.path.normpath(path)) if path else "(from transformer)"
    return out


class RemoteUSO(_Cancellable):
    """USO on fal or AIML (`nodes.remote`), with `generate` like the local one.

    Keys come from FAL_KEY / AIML_API_KEY or a key file (USO_REMOTE_KEYS_FILE, or
    uso_remote_keys.json in the user directory of the ComfyUI this pack sits in); never printed.
    """

    POLL_INTERVAL_S = 1.0
    BACKOFF_BASE_S = 0.5

    def __init__(self, provider: str, *, timeout_s: int = 600, safety_checker: bool = True,
                 output_format: str = "png", user_dir: str | None = None):
        super().__init__()
        self.backend = Backend(provider=provider)   # ValueError for a provider that is not one
        self.provider = provider
        self.timeout_s, self.safety_checker, self.output_format = timeout_s, safety_checker, output_format
        if user_dir is None:
            root = model_paths.enclosing_comfyui()
            user_dir = os.path.join(root, "user") if root else None
        self.user_dir = user_dir
        self.defaults = self.backend.defaults

    def generate(self, prompt: str | None = None, *, subject: ImageInput | None = None,
                 styles: ImageInput | Sequence[ImageInput] | None = None, width: int | None = None,
                 height: int | None = None, keep_size: bool | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int | None = None, batch_size: int | None = None,
                 negative_prompt: str = "", on_status: Callable[[str], None] | None = None,
                 on_progress: Callable[[float], None] | None = None) -> Output:
        """One request. seed 0 lets the provider pick (the seed used is in `Output.seeds`)."""
        given = dict(prompt=prompt, width=width, height=height, keep_size=keep_size, steps=steps,
                     guidance=guidance, seed=seed, batch_size=batch_size)
        p = {k: (self.defaults[k] if v is None else v) for k, v in given.items()}
        styles = _styles_list(styles)
        self._start()
        inputs = RemoteInputs(
            provider=self.provider, prompt=p["prompt"], size="custom", width=int(p["width"]),
            height=int(p["height"]), keep_size=bool(p["keep_size"]), steps=int(p["steps"]),
            guidance=float(p["guidance"]), seed=int(p["seed"]), num_images=int(p["batch_size"]),
            negative_prompt=negative_prompt or "", output_format=self.output_format,
            safety_checker=self.safety_checker, timeout_s=self.timeout_s,
            subject_image=[_open(subject)] if subject is not None else None,
            style_images=[_open(s) for s in styles] or None)
        hooks = Hooks(is_cancelled=self._cancel.is_set, report=on_status or (lambda _t: None),
                      progress=on_progress or (lambda _f: None))
        settings = Settings.from_env(poll_interval_s=self.POLL_INTERVAL_S, backoff_base_s=self.BACKOFF_BASE_S,
                                     in_comfyui=False)
        result = generate_remotely(inputs, user_dir=self.user_dir, hooks=hooks, settings=settings)
        w, h = result.images[0].size
        parameters = {
            "prompt": p["prompt"], "negative_prompt": negative_prompt or "", "subject": _describe_image(subject),
            "styles": [_describe_image(s) for s in styles], "width": w, "height": h,
            "keep_size": bool(p["keep_size"]), "steps": int(p["steps"]), "guidance": float(p["guidance"]),
            "seed": int(result.seed), "requested_seed": int(p["seed"]), "batch_size": len(result.images),
            "backend": self.backend.name, "request_id": result.request_id, "software": png_info.software(),
        }
        return Output([img.convert("RGB") for img in result.images], [int(result.seed)] * len(result.images),
                      parameters, None, list(result.warnings))


def remote(provider: str, **kwargs) -> RemoteUSO:
    """USO on fal or AIML; kwargs: timeout_s, safety_checker, output_format, user_dir."""
    return RemoteUSO(provider, **kwargs)
