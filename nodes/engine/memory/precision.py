"""Precision: which dtypes each model is stored and computed in, for the chosen device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 in hardware. `torch.cuda.is_bf16_supported()` also counts the
    emulated bf16 of pre-Ampere cards (T4, RTX 20xx, V100: compute capability < 8.0), which runs far
    slower than their fp16, and it asks about the current device, not the chosen one."""
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True  # every ROCm architecture torch supports has bf16
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(precision: str, device: torch.device) -> Precision:
    if precision not in PRECISIONS:
        raise InputError(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}.")
    bf16_ok = native_bf16(device)
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else ("bf16" if bf16_ok else "fp16")
    elif precision in ("bf16", "fp8_e4m3fn") and not bf16_ok and device.type == "cuda":
        # Named explicitly: emulated bf16 is slow but it is what was asked for, where it runs at all.
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=True)
    if precision == "fp32":
        return Precision(torch.float32, False, torch.float32, torch.float32, torch.float32)
    if precision == "fp16":
        # T5 overflows in fp16; it runs in fp32 (it leaves the GPU after encoding anyway).
        return Precision(torch.float16, False, torch.float32, torch.float32, torch.float32)
    compute = torch.bfloat16 if bf16_ok else torch.float16
    return Precision(compute, precision == "fp8_e4m3fn", torch.bfloat16 if bf16_ok else torch.float32,
                     torch.float32, torch.float32)
