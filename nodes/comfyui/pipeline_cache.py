"""Keeps the last loaded USO pipeline alive across prompts.

ComfyUI's output cache already keeps a loader node's result while the node stays unchanged; this
also survives --cache-none and graph switches. One pipeline at most: loading another first drops
the old one, so two full model sets never sit in memory together. Device memory is ComfyUI's to
manage: the pipeline's modules are ComfyUI models (bridge.device_hooks), which ComfyUI unloads
when it needs the room (Unload Models, /free, another model loading).
"""
from __future__ import annotations

import gc
import threading

from . import bridge
from ..engine import EngineOptions, ModelFiles, USOPipeline
from ..engine.model_set import check_files

_lock = threading.Lock()
_current: tuple[tuple, USOPipeline] | None = None


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
        gc.collect()  # the old pipeline's modules leave ComfyUI's records with it
        pipeline = USOPipeline.from_files(files, options, on_load_step=on_load_step,
                                          hooks=bridge.device_hooks())
        _current = (key, pipeline)
        return pipeline


def clear() -> None:
    """Forget the cached pipeline (tests; a reload)."""
    global _current
    with _lock:
        _current = None
    gc.collect()
