"""The one place that talks to ComfyUI.

The node classes are ComfyUI V3 nodes built on `io` and `ComfyExtension` re-exported from here.
Inside ComfyUI this module uses folder_paths, comfy.model_management (our models are ComfyUI
models: `USOModelPatcher`), comfy.utils.ProgressBar and the server's progress text. Outside a running
ComfyUI (tests, with ComfyUI's comfy_api only) every function falls back to plain behaviour. tests/real_comfyui runs the ComfyUI side against ComfyUI's own
modules and in a real server.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
import weakref
from typing import Callable

from .. import model_catalog
from ..cancel import Cancelled

log = logging.getLogger("uso")

try:
    import folder_paths as _folder_paths
    import comfy.model_management as _mm
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _comfy_utils
    from comfy.cli_args import args as _args
except ImportError:  # ComfyUI is absent
    _folder_paths = None
    _args = None
    _mm = None
    _model_patcher = None
    _comfy_utils = None

try:
    # ComfyUI's V3 node schema, from a versioned module: `comfy_api.latest` changes between releases.
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError as _missing:
    raise ImportError("The USO nodes need ComfyUI 0.8.0 or newer (comfy_api.v0_0_2 is missing): "
                      "update ComfyUI.") from _missing

try:
    from server import PromptServer as _PromptServer
except ImportError:  # ComfyUI is absent, or imported without its server (scripts, tests)
    _PromptServer = None


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------

#: Folders used when ComfyUI is absent: {folder name: [directories]}. The command line and the
#: tests fill this (e.g. from --comfy-models DIR); inside ComfyUI folder_paths is the truth.
standalone_model_folders: dict[str, list[str]] = {}

#: ComfyUI's own extension filter hides .gguf files; like ComfyUI-GGUF (whose key this is, so the
#: two packs share one list) we register the diffusion_models directories under this name with
#: the .gguf extension, and ComfyUI's cached file lists serve them.
GGUF_FOLDER = "unet_gguf"


def register_gguf_folder() -> None:
    if _folder_paths is None or GGUF_FOLDER in _folder_paths.folder_names_and_paths:
        return
    dirs = _folder_paths.folder_names_and_paths.get("diffusion_models", ([], set()))[0]
    # The same list object: directories ComfyUI adds to diffusion_models later are seen too.
    _folder_paths.folder_names_and_paths[GGUF_FOLDER] = (dirs, {".gguf"})


register_gguf_folder()


def model_folder_paths(folder: str) -> list[str]:
    if _folder_paths is not None:
        try:
            return list(_folder_paths.get_folder_paths(folder))
        except KeyError:
            return []
    return list(standalone_model_folders.get(folder, []))


def list_model_files(folder: str) -> list[str]:
    """Names (relative to their folder, '/' separated) of the weight files in a model folder; for
    `diffusers`, the sub-folders holding a diffusers model. Inside ComfyUI from folder_paths' cached
    lists (refreshed by ComfyUI's Refresh), the diffusers folders walked like ComfyUI's own loader.
    A file reached by several names (a folder linked into itself) is listed once, shortest name."""
    if _folder_paths is None or folder == "diffusers":
        return model_catalog.list_folder_files(model_folder_paths(folder), folder)
    by_file: dict[str, str] = {}
    for listed in (folder, GGUF_FOLDER) if folder == "diffusion_models" else (folder,):
        try:
            names = _folder_paths.get_filename_list(listed)
        except KeyError:
            continue
        for name in sorted(names, key=lambda n: (len(n), n)):
            if name.lower().endswith(model_catalog.WEIGHT_EXTENSIONS):
                target = os.path.realpath(_folder_paths.get_full_path(listed, name) or name)
                by_file.setdefault(target, name)
    return sorted(n.replace(os.sep, "/") for n in by_file.values())


def resolve_model_path(folder: str, name: str) -> str:
    """Absolute path of `name` inside one of the folder's directories.

    Names come from workflows, which are untrusted: absolute paths and '..' are refused, and
    the result must lie inside a configured model directory.
    """
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(
            f"{folder}: '{name}' is not a file name inside ComfyUI's '{folder}' model folder; "
            "pick a file from the list (absolute paths and '..' are not allowed)."
        )
    for root in model_folder_paths(folder):
        candidate = os.path.realpath(os.path.join(root, name))
        if os.path.exists(candidate):
            return candidate
    roots = ", ".join(model_folder_paths(folder)) or "(none configured)"
    raise FileNotFoundError(
        f"{folder}: '{name}' was not found in the '{folder}' model folder ({roots}). "
        "Put the file there and press 'Refresh' in ComfyUI, or pick another file."
    )


def user_directory() -> str | None:
    """ComfyUI's user folder (where the remote node looks for its key file); None outside ComfyUI."""
    return _folder_paths.get_user_directory() if _folder_paths is not None else None


def shipped_tokenizer_dirs() -> dict[str, str]:
    """The CLIP-L and T5 tokenizer folders ComfyUI ships, when running inside ComfyUI."""
    if _mm is None:
        return {}
    # `comfy` is a namespace package (no __file__); model_management.py lives in it. inspect.getfile
    # rather than the module's __file__: ComfyUI's import guard cannot see module dunders.
    return model_catalog.comfy_tokenizer_dirs(os.path.dirname(os.path.abspath(inspect.getfile(_mm))))


# ---------------------------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------------------------

_standalone_interrupt = threading.Event()


def request_interrupt() -> None:
    """Ask the running generation to stop (what ComfyUI's Cancel button does)."""
    if _mm is not None:
        _mm.interrupt_current_processing(True)
    else:
        _standalone_interrupt.set()


def interrupt_requested() -> bool:
    if _mm is not None:
        return _mm.processing_interrupted()
    return _standalone_interrupt.is_set()


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception once Cancel was pressed (outside ComfyUI: `Cancelled`)."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()
        return
    if _standalone_interrupt.is_set():
        _standalone_interrupt.clear()
        raise Cancelled("cancelled")


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class Progress:
    """ComfyUI's progress bar for one node; silent outside ComfyUI unless a listener is set."""

    #: Outside ComfyUI: called as listener(current, total, node_id); the tests use it.
    listener: Callable[[int, int, str | None], None] | None = None

    def __init__(self, total: int, node_id: str | None = None):
        self.total = max(int(total), 1)
        self.current = 0
        self.node_id = node_id
        self._bar = _comfy_utils.ProgressBar(self.total, node_id=node_id) if _comfy_utils else None

    def update(self, n: int = 1) -> None:
        self.set(self.current + n)

    def set(self, value: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
        self.current = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.current, self.total)
        elif Progress.listener is not None:
            Progress.listener(self.current, self.total, self.node_id)


def send_progress_text(text: str, node_id: str | None) -> None:
    """Text under a node in the ComfyUI UI (remote status, warnings); logged outside ComfyUI."""
    server = getattr(_PromptServer, "instance", None)  # set once ComfyUI's server runs
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)  # in ComfyUI 0.8.0 (the pack requires >= 0.8.0)
    else:
        log.info("%s", text)


# ---------------------------------------------------------------------------------------------
# Devices and memory
# ---------------------------------------------------------------------------------------------

def torch_device() -> str | None:
    """ComfyUI's device (honours --cpu, --cuda-device ...); None outside ComfyUI: the engine picks."""
    return str(_mm.get_torch_device()) if _mm is not None else None


#: FLUX.1-dev's transformer parameters, for ComfyUI's dtype decisions that weigh the model's size.
FLUX_PARAMS = 11_901_408_320


def device_facts():
    """The device and ComfyUI's decisions for it as `DeviceFacts` (None outside ComfyUI: the
    engine probes the device itself), read from comfy.model_management and the command-line
    flags, so a flag means for USO what it means for ComfyUI's own nodes:

    - the transformer dtype: `unet_dtype` when a flag forced it (--force-fp32, --force-fp16,
      --bf16-unet, --fp16-unet, --fp32-unet, --fp8_e4m3fn-unet); `should_use_bf16` for native bf16;
    - the text encoders: `text_encoder_device` (the CPU on a Mac, with --lowvram or --novram),
      --fp16-text-enc / --bf16-text-enc / --fp32-text-enc / --fp8_e4m3fn-text-enc, fp16 on a Mac;
    - the VAE: --cpu-vae, --fp16-vae / --bf16-vae / --fp32-vae;
    - fp8 storage where `supports_cast` allows float8 (not MPS, not DirectML);
    - the memory: `get_free_memory` / `get_total_memory` (DirectML: ComfyUI's fixed 1 GiB is not
      a measurement, so no figure), `vram_state` (--lowvram, --novram, --highvram, --gpu-only),
      `extra_reserved_memory` (--reserve-vram, else ComfyUI's default reserve), pinning only when
      ComfyUI pins (not --disable-pinned-memory; NVIDIA and AMD) within its cap.
    --disable-mmap needs nothing: the loaders always copy each tensor out of the file's map.
    """
    if _mm is None:
        return None
    import torch

    from ..engine.memory import DeviceFacts

    device = _mm.get_torch_device()
    if _mm.directml_enabled:
        kind = "directml"
    elif device.type in ("mps", "xpu", "cpu"):
        kind = device.type
    else:
        kind = "rocm" if _mm.is_amd() else "cuda"
    a = _args
    unet = None
    if a.force_fp32 or a.fp16_unet or a.bf16_unet or a.fp32_unet or a.fp8_e4m3fn_unet:
        unet = _mm.unet_dtype(device, model_params=FLUX_PARAMS,
                              supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
    text = {"fp8_e4m3fn_text_enc": torch.float8_e4m3fn, "fp16_text_enc": torch.float16,
            "bf16_text_enc": torch.bfloat16, "fp32_text_enc": torch.float32}
    text_dtype = next((d for flag, d in text.items() if getattr(a, flag, False)), None)
    if text_dtype is None and kind == "mps":
        text_dtype = _mm.text_encoder_dtype(device)    # ComfyUI's T5 on a Mac: fp16 (on the CPU)
    vae = {"fp16_vae": torch.float16, "bf16_vae": torch.bfloat16, "fp32_vae": torch.float32}
    vae_dtype = next((d for flag, d in vae.items() if getattr(a, flag, False)), None)
    if kind == "directml":
        total = free = None
        note = "DirectML reports no memory figures (ComfyUI assumes 1 GiB)"
    else:
        total, free, note = int(_mm.get_total_memory(device)), int(_mm.get_free_memory(device)), ""
    cap = getattr(_mm, "MAX_PINNED_MEMORY", -1)
    return DeviceFacts(
        device=str(device), kind=kind, native_bf16=bool(_mm.should_use_bf16(device)),
        fp16_ok=bool(_mm.should_use_fp16(device)),
        fp8_storage=bool(_mm.supports_cast(device, torch.float8_e4m3fn)),
        total_bytes=total, free_bytes=free, unified=kind == "mps",
        positions_on_cpu=kind in ("xpu", "directml"), generator=kind != "directml",
        vae_sdpa=not _mm.is_amd(),   # pytorch_attention_enabled_vae: off on AMD (high-res crashes)
        # macOS 14.5+ or --force-upcast-attention: ComfyUI computes fp16 attention in fp32 there.
        fp16_attention_fails=_mm.force_upcast_attention_dtype() is not None,
        unet_dtype=unet, text_dtype=text_dtype,
        text_device="cpu" if _mm.text_encoder_device().type == "cpu" else None,
        vae_dtype=vae_dtype, vae_device="cpu" if _mm.vae_device().type == "cpu" else None,
        vram_state=_mm.vram_state.name.lower().removesuffix("_vram"),
        reserve_bytes=int(_mm.extra_reserved_memory()),
        pin_allowed=not a.disable_pinned_memory and cap > 0,
        pin_cap_bytes=max(0, int(cap - getattr(_mm, "TOTAL_PINNED_MEMORY", 0))) if cap > 0 else None,
        note=note)


def device_hooks():
    """How the engine shares the device with ComfyUI (None outside ComfyUI: the engine then plans
    and moves on its own). Each of our modules becomes a ComfyUI model (`USOModelPatcher`): before
    the engine puts modules on the device it asks ComfyUI's load_models_gpu, which unloads ComfyUI's
    own models (or ours) to make room and lists ours in current_loaded_models; ComfyUI's
    free_memory, Unload Models and /free unload ours through the same records."""
    if _mm is None:
        return None
    from ..engine.memory import DeviceHooks

    return DeviceHooks(before_use=_ComfyModels().before_use, available_bytes=available_device_bytes)


def available_device_bytes(device) -> int:
    """Free memory on `device` plus what ComfyUI's own models hold there: loading ours makes
    ComfyUI unload them, so the memory mode may plan with it."""
    held = 0
    for loaded in list(_mm.current_loaded_models):
        patcher = loaded.model
        if patcher is not None and loaded.device == device and not isinstance(patcher, USOModelPatcher):
            held += loaded.model_loaded_memory()
    return int(_mm.get_free_memory(device)) + held


class _ComfyModels:
    """One USOModelPatcher per module of one USO pipeline, made when the engine first uses it."""

    def __init__(self):
        self._patchers: dict[int, USOModelPatcher] = {}

    def before_use(self, placement, modules) -> None:
        patchers = []
        for module in modules:
            patcher = self._patchers.get(id(module))
            if patcher is None:  # the patcher holds the module: its id is not reused meanwhile
                patcher = self._patchers[id(module)] = USOModelPatcher(module, placement)
            patchers.append(patcher)
        # Room for the weights and, beyond them, what this job needs to run (an encoder pass asks
        # for 0.5 GiB, the decode for 3, sampling for 1; ComfyUI adds its own reserve): asking
        # every job for the largest would evict the transformer to run an encoder.
        _mm.load_models_gpu(patchers, memory_required=placement.work_bytes(modules))


USOModelPatcher = None
if _model_patcher is not None:
    import torch

    class _Holder(torch.nn.Module):
        """What ComfyUI's records point at (ComfyUI sets its bookkeeping attributes on a patcher's
        model, so they go here and not on our module). Named after the module it holds: ComfyUI
        logs "Requested to load USO<class>"."""

        def __init__(self, module):
            super().__init__()
            self.module = module

    _holder_classes: dict[str, type] = {}

    def _holder(module):
        name = "USO" + type(module).__name__
        cls = _holder_classes.setdefault(name, type(name, (_Holder,), {}))
        return cls(module)

    class USOModelPatcher(_model_patcher.ModelPatcher):
        """One of our modules (transformer, VAE, T5, CLIP-L, SigLIP, projector) as a ComfyUI model.

        ComfyUI sees its size (`model_size`: what it needs on the device while it runs, per the
        memory mode: all its weights, or two streamed groups), what of it is on the device now
        (`loaded_size`) and its device (`load_device`). Moving weights stays with the engine's
        placement, so every memory mode keeps its arithmetic: ComfyUI "loading" it only records
        it (the engine moves it right after), and ComfyUI unloading it (`detach`) is the
        placement's release of that module; the next use places it again.
        """

        def __init__(self, module, placement):
            super().__init__(_holder(module), load_device=placement.device,
                             offload_device=torch.device("cpu"))
            self.module = module
            self._placement = weakref.ref(placement)  # the pipeline owns the placement
            self._listed = False                      # loaded, as far as ComfyUI knows

        def model_size(self):
            placement = self._placement()
            return placement.device_bytes(self.module) if placement is not None else 0

        def loaded_size(self):
            placement = self._placement()
            if not self._listed or placement is None:
                return 0
            return placement.bytes_on_device(self.module)

        def current_loaded_device(self):
            # ComfyUI then asks for room for what is not on the device yet (model_size - loaded_size).
            return self.load_device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            self._listed = True
            return 0

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0  # whole modules only: ComfyUI then unloads all of it (detach)

        def detach(self, unpatch_all=True):
            # load_models_gpu detaches with unpatch_all=False only to list a model again: keep it.
            if unpatch_all:
                placement = self._placement()
                if placement is not None:
                    placement.release([self.module])
                self._listed = False
            return self.model
