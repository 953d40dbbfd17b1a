"""USO Load LoRA: a FLUX.1-dev LoRA of the user's on top of the USO LoRA (thin adapter, chainable)."""
from __future__ import annotations

import os

from . import bridge
from .bridge import io
from .encode_nodes import require_model
from .sockets import USOModel
from ..engine import InputError, USOError
from ..engine.lora import holds_uso_lora

LORA_FOLDER = "loras"


class USOLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USOLoraLoader", display_name="USO Load LoRA", category="USO",
            description=("Adds a FLUX.1-dev LoRA (kohya, ComfyUI, xlabs or diffusers layout) on top of the USO "
                         "LoRA. Nothing is reloaded: changing the LoRA or its strength re-uses the loaded weights, "
                         "and the order of chained LoRAs does not change the image. Text-encoder parts are ignored "
                         "(USO does not change T5/CLIP)."),
            inputs=[
                USOModel.Input("uso_model", tooltip="From USO Load Models or another USO Load LoRA."),
                io.Combo.Input("lora_name", options=bridge.list_model_files(LORA_FOLDER),
                               tooltip="A FLUX.1-dev LoRA from ComfyUI's loras folder (not the USO LoRA, which "
                                       "USO Load Models applies)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How much of the LoRA to add (1.0 as trained; 0 = off)."),
            ],
            outputs=[USOModel.Output(display_name="uso_model",
                                     tooltip="The same loaded USO model with this LoRA on top (chain more USO Load "
                                             "LoRA nodes).")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, **_ignored):
        """Run again when the LoRA file changes on disk (size or modification time)."""
        try:
            stat = os.stat(bridge.resolve_model_path(LORA_FOLDER, lora_name))
        except (ValueError, OSError, TypeError):
            return ""
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    @classmethod
    def execute(cls, uso_model, lora_name, strength=1.0) -> io.NodeOutput:
        pipeline = require_model(uso_model)
        try:
            path = bridge.resolve_model_path(LORA_FOLDER, lora_name)
        except (ValueError, FileNotFoundError) as exc:
            raise USOError(f"lora_name: {exc}") from None
        if not isinstance(strength, (int, float)) or isinstance(strength, bool):
            raise InputError(f"strength: expected a number, got {strength!r}.")
        if holds_uso_lora(path, pipeline.models.lora_parts):
            raise InputError(f"lora_name: '{lora_name}' is the USO LoRA itself, which USO Load Models already "
                             "applies (its uso_lora input); adding it again would apply USO twice. Pick a "
                             "FLUX.1-dev LoRA of your own, or remove this node.")
        view = pipeline.with_lora(path, float(strength))
        for warning in view.lora_warnings[len(pipeline.lora_warnings):]:
            bridge.log.warning("USO: %s", warning)
        return io.NodeOutput(view)


NODE_CLASSES = [USOLoraLoader]
