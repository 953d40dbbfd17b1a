"""USO Load LoRA: a FLUX.1-dev LoRA of the user's on top of the USO LoRA (thin adapter, chainable)."""
from __future__ import annotations

import os

from . import bridge
from .encode_nodes import require_model
from ..engine import InputError, USOError

LORA_FOLDER = "loras"


class USOLoraLoader:
    NODE_ID = "USOLoraLoader"
    DISPLAY_NAME = "USO Load LoRA"
    CATEGORY = "USO"
    FUNCTION = "load"
    RETURN_TYPES = ("USO_MODEL",)
    RETURN_NAMES = ("uso_model",)
    OUTPUT_TOOLTIPS = ("The same loaded USO model with this LoRA on top (chain more USO Load LoRA nodes).",)
    DESCRIPTION = ("Adds a FLUX.1-dev LoRA (kohya, ComfyUI, xlabs or diffusers layout) on top of the USO LoRA. "
                   "Nothing is reloaded: changing the LoRA or its strength re-uses the loaded weights, and the "
                   "order of chained LoRAs does not change the image. Text-encoder parts are ignored (USO does not "
                   "change T5/CLIP).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "uso_model": ("USO_MODEL", {"tooltip": "From USO Load Models or another USO Load LoRA."}),
                "lora_name": (bridge.list_model_files(LORA_FOLDER), {
                    "tooltip": "A FLUX.1-dev LoRA from ComfyUI's loras folder."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How much of the LoRA to add (1.0 as trained; 0 = off)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name=None, **_ignored):
        """Run again when the LoRA file changes on disk (size or modification time)."""
        try:
            stat = os.stat(bridge.resolve_model_path(LORA_FOLDER, lora_name))
        except (ValueError, OSError, TypeError):
            return ""
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def load(self, uso_model, lora_name, strength=1.0):
        pipeline = require_model(uso_model)
        try:
            path = bridge.resolve_model_path(LORA_FOLDER, lora_name)
        except (ValueError, FileNotFoundError) as exc:
            raise USOError(f"lora_name: {exc}") from None
        if not isinstance(strength, (int, float)) or isinstance(strength, bool):
            raise InputError(f"strength: expected a number, got {strength!r}.")
        view = pipeline.with_lora(path, float(strength))
        for warning in view.lora_warnings[len(pipeline.lora_warnings):]:
            bridge.log.warning("USO: %s", warning)
        return (view,)


NODE_CLASSES = [USOLoraLoader]
