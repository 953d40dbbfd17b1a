"""Keeps the last loaded USO pipeline alive across prompts, and gives its GPU memory back when
ComfyUI asks (Unload models, /free, or ComfyUI needing VRAM for its own models).

ComfyUI's output cache already keeps a loader node's result while the node stays unchanged; this
also survives --cache-none and graph switches. One pipeline at most: loading another first drops
the old one, so two full model sets never sit in memory together.
"""
from __future__ import annotations

import gc
import threading

from . import bridge
from ..engine import EngineOptions, ModelFiles, USOPipeline
from ..engine.model_set import check_files

_lock = threading.Lock()
_current: tuple[tuple, USOPipeline] | None = None


def _release_all() -> None:
    current = _current
    if current is not None:
        current[1].release_device_memory()


def get_or_load(files: ModelFiles, options: EngineOptions, fingerprint: str,
                on_load_step=None) -> USOPipeline:
    """The pipeline for these files and options, loading it unless it is the cached one."""
    global _current
    key = (files, options, fingerprint)
    with _lock:
        if _current is not None and _current[0] == key:
            return _current[1]
        # Headers only: a wrong or truncated file fails here, and the loaded model stays cached.
        check_files(files)
        _current = None
        gc.collect()
        bridge.free_comfy_memory(1 << 62, bridge.torch_device())
        pipeline = USOPipeline.from_files(files, options, on_load_step=on_load_step)
        _current = (key, pipeline)
        bridge.on_comfy_unload(_release_all)
        return pipeline


def clear() -> None:
    """Forget the cached pipeline (tests; a reload)."""
    global _current
    with _lock:
        _current = None
    gc.collect()
