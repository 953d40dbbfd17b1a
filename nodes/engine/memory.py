"""Precision and placement: which dtype each model runs in, and where it lives when idle.

Built on diffusers' own machinery (layerwise casting for fp8 storage, group offload); "auto"
picks by the free memory of the device.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")
MEMORY_MODES = ("auto", "gpu", "model_offload", "group_offload")

_GIB = 1024 ** 3


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype          # the DiT's compute dtype (and x's dtype while sampling)
    fp8_storage: bool             # DiT Linear weights stored as float8_e4m3fn
    text: torch.dtype             # T5 / CLIP-L
    vision: torch.dtype           # SigLIP + projector input side
    vae: torch.dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision not in PRECISIONS:
        raise InputError(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}.")
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else ("bf16" if bf16_ok else "fp16")
    if precision == "fp32":
        return Precision(torch.float32, False, torch.float32, torch.float32, torch.float32)
    if precision == "fp16":
        # T5 overflows in fp16; it runs in fp32 (it leaves the GPU after encoding anyway).
        return Precision(torch.float16, False, torch.float32, torch.float32, torch.float32)
    compute = torch.bfloat16 if bf16_ok else torch.float16
    return Precision(compute, precision == "fp8_e4m3fn", torch.bfloat16 if bf16_ok else torch.float32,
                     torch.float32, torch.float32)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return 1 << 62


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def choose_memory_mode(mode: str, device: torch.device, transformer_bytes: int,
                       others_bytes: int, margin_bytes: int = 6 * _GIB) -> str:
    """The fastest placement that fits: everything resident, else one model at a time, else
    the transformer streamed block by block."""
    if mode not in MEMORY_MODES:
        raise InputError(f"memory: '{mode}' is not one of {', '.join(MEMORY_MODES)}.")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "gpu"
    free = free_memory(device)
    if transformer_bytes + others_bytes + margin_bytes <= free:
        return "gpu"
    if transformer_bytes + margin_bytes <= free:
        return "model_offload"
    return "group_offload"


class Placement:
    """Moves models to the run device when used and back to the CPU when idle, per mode."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = device
        self._offload_device = torch.device("cpu")

    def setup(self, transformer: nn.Module, others: list[nn.Module]) -> None:
        if self.device.type == "cpu":
            return
        if self.mode == "gpu":
            transformer.to(self.device)
            for m in others:
                m.to(self.device)
        elif self.mode == "group_offload":
            transformer.enable_group_offload(onload_device=self.device,
                                             offload_device=self._offload_device,
                                             offload_type="block_level", num_blocks_per_group=1,
                                             use_stream=True)

    @contextmanager
    def use(self, module: nn.Module, keep: bool = False):
        """Run `module` on the device; afterwards send it back unless it stays resident.

        `keep=False` for T5 and the other encoders in offload modes: they leave the GPU right
        after encoding so the transformer has the room."""
        moved = self.device.type != "cpu" and self.mode == "model_offload" and not _has_group_offload(module)
        if moved:
            module.to(self.device)
        try:
            yield module
        finally:
            if moved and not keep:
                module.to(self._offload_device)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def release(self, modules: list[nn.Module]) -> None:
        """Everything off the GPU (ComfyUI asked for its memory back)."""
        if self.device.type == "cpu":
            return
        for m in modules:
            if not _has_group_offload(m):
                m.to(self._offload_device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def restore(self, transformer: nn.Module, others: list[nn.Module]) -> None:
        if self.mode == "gpu" and self.device.type != "cpu":
            self.setup(transformer, others)


def _has_group_offload(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


def enable_fp8_storage(transformer: nn.Module, compute: torch.dtype, storable) -> None:
    """Layerwise casting: fp8 weights upcast per layer at run time. Our skip list stores the
    modulation Linears in fp8 as well (diffusers' default keeps them in bf16, ~3.2 B params)."""
    from diffusers.hooks import apply_layerwise_casting_hook

    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and type(module) is nn.Linear and storable(name) \
                and module.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            apply_layerwise_casting_hook(module, module.weight.dtype, compute, non_blocking=False)
