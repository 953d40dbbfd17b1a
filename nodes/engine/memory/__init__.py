"""Memory: which dtype each model runs in (`precision`; under `auto`, 16-bit weights stored as fp8
where they would not fit otherwise: `fit`), which memory mode fits (`plan`; at full size before
loading: `engine.memory_table`), and where each model lives and moving it there (`placement`).

Built on diffusers' own machinery:
- fp8 storage: `fp8.UpcastLinear` (weights stored in float8, upcast to the compute dtype inside the
  layer's own forward, so `compile` traces it), with our skip list (`fp8.FP8_SKIP_PATTERNS`, `fp8.py`), which unlike diffusers' default
  also stores the AdaLN modulation Linears in fp8. An unfused LoRA stays in the compute dtype on top.
- group offload: diffusers' `apply_group_offloading` (block level for the transformer, CUDA stream
  prefetch of the next block; leaf level for the encoders).
- model offload: the models take turns on the GPU, like diffusers' `enable_model_cpu_offload`; the
  host copies are kept so sending a model back costs nothing, page-locked (pinned) within the plan's
  host-RAM budget (`pin_budget`).

Memory modes (`MEMORY_MODES`):
- "gpu": the transformer and the VAE stay on the GPU; the encoders (T5, CLIP-L, SigLIP, projector)
  stay too when `encoders` resolves to "resident", else they are streamed through the GPU layer by
  layer when they encode and take no room between prompts (prompt and style encodings are cached).
- "model_offload": one model on the GPU at a time; the encoders are streamed.
- "group_offload": the transformer is streamed block by block every step; the VAE stays; the
  encoders are streamed.
- "auto": the fastest of these whose peak (weights on the device plus the largest job's working
  memory) fits the free memory (`plan_memory`).

On a machine without a GPU nothing moves; the offload modes still install their diffusers hooks
(with the CPU as both places), which is how the tests check that they leave the result unchanged.
"""
from __future__ import annotations

from . import fit
from .device_facts import DEVICE_KINDS, VRAM_STATES, DeviceFacts
from .placement import OUT_OF_MEMORY, DeviceHooks, Placement, has_group_offload, is_out_of_memory
from .host import HostMemory, host_memory
from .plan import (ENCODER_PLACEMENTS, HOST_RESERVE_BYTES, MAX_PINNED_SHARE, MEMORY_MODES,
                   MemoryPlan, ModelSizes, ModuleSize, free_memory, module_bytes, pin_budget,
                   pinned_block_bytes, pinned_bytes, plan_memory)
from .precision import (FP8_KINDS, PRECISIONS, FileStorage, Precision, native_bf16, resolve_device,
                        resolve_precision)

__all__ = ["DEVICE_KINDS", "VRAM_STATES", "DeviceFacts", "OUT_OF_MEMORY", "DeviceHooks", "Placement",
           "has_group_offload", "is_out_of_memory",
           "ENCODER_PLACEMENTS", "HOST_RESERVE_BYTES", "MAX_PINNED_SHARE", "MEMORY_MODES", "HostMemory",
           "MemoryPlan", "ModelSizes", "ModuleSize", "free_memory", "host_memory", "module_bytes",
           "pin_budget", "pinned_block_bytes", "pinned_bytes", "plan_memory", "fit",
           "FP8_KINDS", "PRECISIONS", "FileStorage", "Precision", "native_bf16", "resolve_device",
           "resolve_precision"]
