"""What the bridge asks ComfyUI for before each job (nodes/comfyui/bridge.py `_ComfyModels`): the
room the job needs beyond its weights, not one margin for all. ComfyUI's model_management is
imitated by its rule that matters here: `load_models_gpu(models, memory_required)` unloads the
models already loaded when the free memory is less than the new weights (x1.1) plus
`memory_required` plus ComfyUI's own reserve."""
from __future__ import annotations

import pytest
import random_pipelines
import torch

from nodes.comfyui import bridge
from nodes.engine import EngineOptions, USOPipeline
from nodes.engine.random_models import build_random_models

GIB = 1024 ** 3


class ImitatedModelManagement:
    """ComfyUI's records and eviction rule, with a fixed amount of free device memory."""

    EXTRA_RESERVED = 400 * 1024 ** 2       # ComfyUI's reserve on top of memory_required

    def __init__(self, free: int):
        self.free = free
        self.loaded: list = []             # patchers, as current_loaded_models
        self.evicted: list[str] = []
        self.asked: list[tuple[list[str], int]] = []

    def load_models_gpu(self, patchers, memory_required=0, **_):
        new = [p for p in patchers if p not in self.loaded]
        need = sum(p.placement.device_bytes(p.module) for p in new) * 1.1 + memory_required + self.EXTRA_RESERVED
        self.asked.append(([p.name for p in patchers], memory_required))
        if self.free < need:
            for p in [p for p in self.loaded if p not in patchers]:
                self.evicted.append(p.name)
                self.loaded.remove(p)
        self.loaded.extend(new)


class Patcher:
    def __init__(self, module, placement):
        self.module, self.placement = module, placement
        self.name = type(module).__name__


@pytest.mark.parametrize("free_gib", [6.2, 6.5])
def test_encoders_and_the_vae_do_not_evict_the_transformer_with_6_gib_free(monkeypatch, free_gib):
    mm = ImitatedModelManagement(int(free_gib * GIB))
    monkeypatch.setattr(bridge, "_mm", mm)
    monkeypatch.setattr(bridge, "USOModelPatcher", Patcher)
    pipe = USOPipeline(build_random_models("tiny", dtype=torch.bfloat16),
                       EngineOptions(device="cpu", precision="bf16", memory="gpu"), bridge.device_hooks())
    random_pipelines.run(pipe, steps=1)
    pipe.encode_prompt("a new prompt")            # T5 + CLIP-L beside the loaded transformer
    random_pipelines.run(pipe, steps=1)
    assert mm.evicted == []
    asked = {tuple(names): required for names, required in mm.asked}
    assert asked[("T5EncoderModel", "CLIPTextModel")] == GIB // 2           # an encoder pass
    assert asked[("AutoencoderKL",)] == 3 * GIB                              # the decode
    assert asked[("FluxTransformer2DModel",)] == GIB                         # a sampling step
