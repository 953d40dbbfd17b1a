"""The one place that talks to ComfyUI.

Inside ComfyUI this module uses folder_paths, comfy.model_management and comfy.utils.ProgressBar.
Outside ComfyUI (tests, command line) every function falls back to plain behaviour, so the node
classes stay importable and callable anywhere.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from .. import model_catalog

log = logging.getLogger("uso")

try:  # pragma: no cover - exercised only inside a real ComfyUI
    import folder_paths as _folder_paths
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
except Exception:  # ComfyUI is absent
    _folder_paths = None
    _mm = None
    _comfy_utils = None

try:  # pragma: no cover - exercised only inside a real ComfyUI
    from server import PromptServer as _PromptServer
except Exception:
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
    lists (refreshed by ComfyUI's Refresh), the diffusers folders walked like ComfyUI's own loader."""
    if _folder_paths is None or folder == "diffusers":
        return model_catalog.list_folder_files(model_folder_paths(folder), folder)
    names: set[str] = set()
    for listed in (folder, GGUF_FOLDER) if folder == "diffusion_models" else (folder,):
        try:
            names.update(n for n in _folder_paths.get_filename_list(listed)
                         if n.lower().endswith(model_catalog.WEIGHT_EXTENSIONS))
        except KeyError:
            pass
    return sorted(n.replace(os.sep, "/") for n in names)


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
    if _folder_paths is not None:
        try:
            return _folder_paths.get_user_directory()
        except Exception:
            return None
    return None


def shipped_tokenizer_dirs() -> dict[str, str]:
    """The CLIP-L and T5 tokenizer folders ComfyUI ships, when running inside ComfyUI."""
    if _mm is None:
        return {}
    # `comfy` is a namespace package (no __file__); model_management.py lives in it.
    return model_catalog.comfy_tokenizer_dirs(os.path.dirname(os.path.abspath(_mm.__file__)))


# ---------------------------------------------------------------------------------------------
# Cancel
# ---------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Raised outside ComfyUI when a run is cancelled (ComfyUI raises its own exception)."""


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
    """Raise ComfyUI's interrupt exception (or `Interrupted`) once Cancel was pressed."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()
        return
    if _standalone_interrupt.is_set():
        _standalone_interrupt.clear()
        raise Interrupted("cancelled")


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class Progress:
    """ComfyUI's progress bar for one node; silent outside ComfyUI unless a listener is set."""

    #: Outside ComfyUI: called as listener(current, total, node_id); tests and the CLI use it.
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
    server = getattr(_PromptServer, "instance", None) if _PromptServer is not None else None
    if server is not None and node_id is not None and hasattr(server, "send_progress_text"):
        try:
            server.send_progress_text(text, node_id)
            return
        except Exception:  # the UI text is a courtesy; never fail a run over it
            pass
    log.info("%s", text)


# ---------------------------------------------------------------------------------------------
# Devices and memory
# ---------------------------------------------------------------------------------------------

def torch_device():
    import torch

    if _mm is not None:
        return _mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def free_comfy_memory(bytes_needed: int, device) -> None:
    """Evict ComfyUI's own models from `device` until `bytes_needed` are free."""
    if _mm is None or getattr(device, "type", str(device)) == "cpu":
        return
    # ComfyUI's own free_memory, not our wrapper: we are about to use the memory ourselves.
    (_original_free_memory or _mm.free_memory)(bytes_needed, device)
    _mm.soft_empty_cache()


_release_callbacks: list[Callable[[], None]] = []
_original_free_memory = None
_patch_lock = threading.Lock()


def on_comfy_unload(callback: Callable[[], None]) -> None:
    """Call `callback` when ComfyUI unloads its models ("Unload models", /free, low VRAM).

    Our diffusers modules are not ModelPatchers, so ComfyUI does not see them; this wraps
    comfy.model_management.unload_all_models and free_memory so that releasing memory in
    ComfyUI releases ours too.
    """
    global _original_free_memory
    if callback not in _release_callbacks:
        _release_callbacks.append(callback)
    if _mm is None:
        return
    with _patch_lock:
        if _original_free_memory is not None:
            return
        original_unload_all = _mm.unload_all_models
        original_free_memory = _original_free_memory = _mm.free_memory

        def unload_all_models(*args, **kwargs):
            _run_release_callbacks()
            return original_unload_all(*args, **kwargs)

        def free_memory(memory_required, device, *args, **kwargs):
            result = original_free_memory(memory_required, device, *args, **kwargs)
            try:
                if _mm.get_free_memory(device) < memory_required:
                    _run_release_callbacks()
                    _mm.soft_empty_cache()
            except Exception:
                log.exception("USO: releasing USO models for ComfyUI failed")
            return result

        _mm.unload_all_models = unload_all_models
        _mm.free_memory = free_memory


def _run_release_callbacks() -> None:
    for cb in list(_release_callbacks):
        try:
            cb()
        except Exception:
            log.exception("USO: releasing USO models failed")
