"""Test-only ComfyUI extension, linked into custom_nodes by test_5_memory_records.py (never part
of the pack, which ComfyUI loads from the repository root's __init__.py):

- GET /uso_test/loaded_models: ComfyUI's own records, comfy.model_management.current_loaded_models,
  one row per model (newest first, as ComfyUI keeps them).
- USOTestNeedMemory: asks ComfyUI's free_memory for `extra_mib` more than is free on ComfyUI's
  device: what comfy.model_management.load_models_gpu asks when a model does not fit, and the only
  way ComfyUI unloads a model for another one; with --cpu, load_models_gpu never asks it itself.
"""
import comfy.model_management as mm
from aiohttp import web
from server import PromptServer


def records():
    rows = []
    for loaded in mm.current_loaded_models:
        patcher = loaded.model
        if patcher is None:
            continue
        rows.append({"model": type(patcher.model).__name__, "patcher": type(patcher).__name__,
                     "device": str(loaded.device), "size": int(loaded.model_memory()),
                     "loaded": int(loaded.model_loaded_memory())})
    return rows


@PromptServer.instance.routes.get("/uso_test/loaded_models")
async def loaded_models(request):
    return web.json_response(records())


class USOTestNeedMemory:
    CATEGORY = "testing"
    FUNCTION = "need"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"extra_mib": ("INT", {"default": 4096, "min": 1, "max": 1 << 20})}}

    @classmethod
    def IS_CHANGED(cls, extra_mib):
        return float("nan")  # runs every time it is queued

    def need(self, extra_mib):
        device = mm.get_torch_device()
        unloaded = mm.free_memory(mm.get_free_memory(device) + extra_mib * (1 << 20), device)
        return {"ui": {"unloaded": [type(lm.model.model).__name__ for lm in unloaded if lm.model is not None]}}


NODE_CLASS_MAPPINGS = {"USOTestNeedMemory": USOTestNeedMemory}
