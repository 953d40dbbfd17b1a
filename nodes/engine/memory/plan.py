"""Planning: which memory mode fits the device and the host, and how much host RAM may be pinned."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

MEMORY_MODES = ("auto", "gpu", "model_offload", "group_offload")
#: Where the encoders (T5, CLIP-L, SigLIP + projector) live in "gpu" mode. The offload modes always
#: stream them. T5-XXL is 9.5 GB in bf16 and runs once per new prompt, so streaming it costs about
#: one PCIe pass over its weights per new prompt and nothing for a cached prompt.
ENCODER_PLACEMENTS = ("auto", "offload", "resident")

_GIB = 1024 ** 3
#: Room kept free beyond the weights: a 1024² USO step's activations (~1 GiB with SDPA), the fp32
#: VAE decode at 1024² (~3 GiB; larger images are decoded in tiles) and allocator slack.
DEFAULT_MARGIN_BYTES = 6 * _GIB


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return 1 << 62


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


# ---------------------------------------------------------------------------------------------

#: Host RAM left to the system and other programs when deciding how much to page-lock.
HOST_RESERVE_BYTES = 4 * _GIB
#: At most this share of the machine's RAM is ever page-locked (pinned memory cannot be swapped
#: out; pinning most of the RAM starves everything else on the machine).
MAX_PINNED_SHARE = 0.5


@dataclass(frozen=True)
class HostMemory:
    available: int     # MemAvailable: what can be allocated without swapping
    total: int


def host_memory() -> HostMemory | None:
    """The host's RAM figures (torch has no API for them): Linux's /proc/meminfo, else sysconf;
    None where neither answers (then pinning is not bounded by a figure we do not have)."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        return HostMemory(fields["MemAvailable"], fields["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return HostMemory(os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page)
    except (AttributeError, ValueError, OSError):
        return None


def pin_budget(host: HostMemory | None) -> int | None:
    """How many bytes of host copies may be page-locked: what is available beyond a reserve, and
    never more than `MAX_PINNED_SHARE` of the RAM. None: no figure, no bound."""
    if host is None:
        return None
    return max(0, min(host.available - HOST_RESERVE_BYTES, int(host.total * MAX_PINNED_SHARE)))


@dataclass(frozen=True)
class MemoryPlan:
    mode: str          # "gpu" | "model_offload" | "group_offload"
    encoders: str      # "resident" | "offload"
    reason: str        # one line for logs and the benchmark; says when fp8 or GGUF would fit
    pin_budget_bytes: int | None = None  # page-locked host copies allowed; None = no bound (no GPU)


def plan_memory(mode: str, encoders: str, device: torch.device, transformer_bytes: int,
                encoder_bytes: int, vae_bytes: int, margin_bytes: int = DEFAULT_MARGIN_BYTES,
                free_bytes: int | None = None, host: HostMemory | None = None,
                transformer_quantized: bool = False) -> MemoryPlan:
    """The placement to use. "auto" picks the fastest that fits `free_bytes` (the device's free
    memory when None), keeping `margin_bytes` for activations:

    1. everything resident (transformer + VAE + encoders) -- no transfers at all;
    2. transformer + VAE resident, encoders streamed -- one pass over T5 per *new* prompt;
    3. model offload -- the transformer moves in for sampling and out for the VAE decode;
    4. group offload -- the transformer is streamed block by block every step.

    `encoders` ("auto" | "offload" | "resident") only matters in "gpu" mode; "auto" keeps them
    resident when they fit beside everything else.

    Host RAM (`host`, measured when None): the offload modes keep their models in RAM, where they
    already are after loading; what costs more is page-locking (pinning) the host copies, which
    makes transfers fast, and which diffusers' group offloading does by *copying* every weight.
    The plan's `pin_budget_bytes` bounds it (`pin_budget`); past it, host copies stay pageable
    (pinned per transfer: slower, no extra RAM). When the transformer is not already fp8 or GGUF
    and does not fit resident, the reason says what an fp8 or GGUF transformer would need.
    """
    if mode not in MEMORY_MODES:
        raise InputError(f"memory: '{mode}' is not one of {', '.join(MEMORY_MODES)}.")
    if encoders not in ENCODER_PLACEMENTS:
        raise InputError(f"encoders: '{encoders}' is not one of {', '.join(ENCODER_PLACEMENTS)}.")
    on_gpu = device.type == "cuda" or free_bytes is not None
    free = free_bytes if free_bytes is not None else free_memory(device)
    pins = pin_budget(host if host is not None else host_memory()) if on_gpu else None
    gib = lambda n: f"{n / _GIB:.1f} GiB"  # noqa: E731
    everything = transformer_bytes + vae_bytes + encoder_bytes + margin_bytes
    lean = transformer_bytes + vae_bytes + margin_bytes

    def smaller_weights_hint() -> str:
        if not on_gpu or transformer_quantized or lean <= free:
            return ""
        # fp8 storage keeps the embedders and norms in 16 bits: a little over half of bf16.
        half = transformer_bytes * 0.52
        if half + vae_bytes + margin_bytes <= free:
            fit = "would stay on the GPU (no streaming)"
        elif half + margin_bytes <= free:
            fit = "would fit with model offload (moved once per image, not every step)"
        else:
            fit = "would halve what streams every step"
        return (f"; precision 'fp8_e4m3fn' (transformer about {gib(half)}) {fit}, and a Q8_0 / Q5 / Q4 "
                f"GGUF transformer is about {gib(half)} / {gib(transformer_bytes * 0.35)} / "
                f"{gib(transformer_bytes * 0.29)}")

    def planned(chosen: str, placed: str, reason: str) -> MemoryPlan:
        if chosen != "gpu" and pins is not None:
            reason += f"; at most {gib(pins)} of host RAM page-locked"
        return MemoryPlan(chosen, placed, reason + smaller_weights_hint(), pins)

    if mode != "auto":
        if mode == "gpu" and encoders == "auto":
            resident = not on_gpu or everything <= free
            return planned("gpu", "resident" if resident else "offload",
                           "encoders fit beside the transformer" if resident else
                           f"encoders streamed: {gib(everything)} needed with them, {gib(free)} free")
        placed = encoders if mode == "gpu" else "offload"
        return planned(mode, "resident" if placed == "auto" else placed, f"memory='{mode}' chosen")
    if not on_gpu:
        return MemoryPlan("gpu", "resident" if encoders == "auto" else encoders,
                          f"{device.type}: nothing to offload")
    if encoders != "offload" and everything <= free:
        return planned("gpu", "resident", f"all models fit: {gib(everything)} of {gib(free)} free")
    if encoders != "resident" and lean <= free:
        return planned("gpu", "offload", f"transformer + VAE fit ({gib(lean)} of {gib(free)} free); "
                                         "encoders streamed")
    if transformer_bytes + margin_bytes <= free:
        return planned("model_offload", "offload",
                       f"transformer alone fits ({gib(transformer_bytes + margin_bytes)} of {gib(free)})")
    return planned("group_offload", "offload",
                   f"transformer ({gib(transformer_bytes)}) does not fit in {gib(free)} free with a "
                   f"{gib(margin_bytes)} margin; streamed block by block")
