"""Planning: which memory mode fits the device and the host, the peak device memory and host RAM
it takes, and how much host RAM may be page-locked.

The same arithmetic serves a loaded pipeline (its real modules) and the full-size table
(`engine.memory_table`: the real architectures built on the meta device), so what the README and
`--plan` print is what a run decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from .device_facts import DeviceFacts
from .host import HostMemory, host_memory

MEMORY_MODES = ("auto", "gpu", "model_offload", "group_offload")
#: Where the encoders (T5, CLIP-L, SigLIP + projector) live in "gpu" mode. The offload modes always
#: stream them. T5-XXL is 9.5 GB in bf16 and runs once per new prompt, so streaming it costs about
#: one PCIe pass over its weights per new prompt and nothing for a cached prompt.
ENCODER_PLACEMENTS = ("auto", "offload", "resident")

_GIB = 1024 ** 3
#: Working memory beyond the weights, per job (1024² images): a USO sampling step's activations
#: (~1 GiB with SDPA), the fp32 VAE decode (~3 GiB; larger images are decoded in tiles), an encoder
#: pass (T5 at 512 tokens, SigLIP at 384²: well under 0.5 GiB). The jobs never run at the same time.
SAMPLING_WORK_BYTES = 1 * _GIB
DECODE_WORK_BYTES = 3 * _GIB
ENCODE_WORK_BYTES = _GIB // 2
#: Kept free on top of the largest job: the caching allocator's fragmentation and cuBLAS workspaces.
ALLOCATOR_SLACK_BYTES = 2 * _GIB

#: Host RAM left to the system and other programs when deciding how much to page-lock.
HOST_RESERVE_BYTES = 4 * _GIB
#: At most this share of the machine's RAM is ever page-locked (pinned memory cannot be swapped
#: out; pinning most of the RAM starves everything else on the machine).
MAX_PINNED_SHARE = 0.5

#: The order "auto" tries, fastest first.
MODE_ORDER = ("gpu", "model_offload", "group_offload")


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return 1 << 62


def _tensors(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def pinned_block_bytes(nbytes: int) -> int:
    """What page-locking one tensor of `nbytes` takes: PyTorch's CachingHostAllocator (behind
    `Tensor.pin_memory()`) rounds every block up to the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def pinned_bytes(module: nn.Module) -> int:
    """Host RAM that page-locking `module`'s tensors takes: diffusers' group offloading and the
    model-offload host copies pin each tensor on its own, each rounded by the allocator."""
    return sum(pinned_block_bytes(t.numel() * t.element_size()) for t in _tensors(module))


def streamed_bytes(module: nn.Module, offload_type: str) -> int:
    """Device bytes of a module streamed by diffusers' group offloading while it runs: its two
    largest groups (the one running and the one prefetched). "block_level": each transformer block
    is a group and the tensors outside the blocks are one more; "leaf_level": every module holding
    tensors of its own is a group."""
    if offload_type == "block_level":
        blocks = [b for child in module.children() if isinstance(child, (nn.ModuleList, nn.Sequential))
                  for b in child]
        in_blocks = {id(t) for b in blocks for t in _tensors(b)}
        rest = sum(t.numel() * t.element_size() for t in _tensors(module) if id(t) not in in_blocks)
        groups = [module_bytes(b) for b in blocks] + [rest]
    else:
        groups = [sum(t.numel() * t.element_size() for t in _tensors(m, recurse=False)) for m in module.modules()]
    return sum(sorted(groups)[-2:])


@dataclass(frozen=True)
class ModuleSize:
    """One model's bytes as the plan needs them."""

    weights: int    # its tensors as stored
    pinned: int     # page-locking them (each tensor rounded up to a power of two)
    streamed: int   # on the device while streamed (two groups)

    @classmethod
    def of(cls, module: nn.Module, offload_type: str = "leaf_level") -> "ModuleSize":
        return cls(module_bytes(module), pinned_bytes(module), streamed_bytes(module, offload_type))


@dataclass(frozen=True)
class ModelSizes:
    """The USO model set's sizes: the transformer, the VAE and the encoders (T5, CLIP-L, SigLIP,
    projector; each runs, and streams, on its own)."""

    transformer: ModuleSize
    vae: ModuleSize
    encoders: tuple[ModuleSize, ...]
    quantized: bool = False   # the transformer is fp8-stored or GGUF: as small as it gets here

    @classmethod
    def of(cls, transformer: nn.Module, vae: nn.Module, encoders: list[nn.Module],
           quantized: bool = False) -> "ModelSizes":
        return cls(ModuleSize.of(transformer, "block_level"), ModuleSize.of(vae),
                   tuple(ModuleSize.of(m) for m in encoders if m is not None), quantized)

    @property
    def encoder_bytes(self) -> int:
        return sum(e.weights for e in self.encoders)

    @property
    def total_bytes(self) -> int:
        return self.transformer.weights + self.vae.weights + self.encoder_bytes


def pin_budget(host: HostMemory | None) -> int | None:
    """How many bytes may be page-locked (as the allocator rounds them): what is available beyond a
    reserve, and never more than `MAX_PINNED_SHARE` of the RAM. None: no figure, no bound."""
    if host is None:
        return None
    return max(0, min(host.available - HOST_RESERVE_BYTES, int(host.total * MAX_PINNED_SHARE)))


@dataclass(frozen=True)
class MemoryPlan:
    mode: str          # "gpu" | "model_offload" | "group_offload"
    encoders: str      # "resident" | "offload"
    reason: str        # one line for logs and the benchmark; says when fp8 or GGUF would fit
    pin_budget_bytes: int | None = None  # page-locked host copies allowed; None = no bound (no GPU)
    device_peak_bytes: int = 0           # weights on the device + the largest job + slack
    host_bytes: int = 0                  # host RAM of the weights at the placement's peak (pins rounded)
    pinned_bytes: int = 0                # of which page-locked, as the allocator rounds them
    fits: bool = True                    # False: even the lightest mode exceeds the free memory

    def summary(self) -> str:
        gib = lambda n: f"{n / _GIB:.1f} GiB"  # noqa: E731
        return (f"memory={self.mode}, encoders={self.encoders}: device peak {gib(self.device_peak_bytes)}, "
                f"host {gib(self.host_bytes)} (pinned {gib(self.pinned_bytes)}); {self.reason}")


def device_peak(mode: str, encoders: str, sizes: ModelSizes) -> int:
    """Peak device memory of a mode: per job (encode, sample, decode), what is on the device then
    plus that job's working memory; the largest, plus the allocator slack. In "model_offload" the
    transformer and the VAE take turns, so the decode's memory is never needed beside the
    transformer."""
    t, v = sizes.transformer, sizes.vae
    streamed_encoder = max((e.streamed for e in sizes.encoders), default=0)
    if mode == "gpu":
        resident = t.weights + v.weights + (sizes.encoder_bytes if encoders == "resident" else 0)
        encode = resident + (0 if encoders == "resident" else streamed_encoder) + ENCODE_WORK_BYTES
        jobs = [encode, resident + SAMPLING_WORK_BYTES, resident + DECODE_WORK_BYTES]
    elif mode == "model_offload":
        # A model kept after its run (keep=True) may still be there while an encoder streams.
        jobs = [max(t.weights, v.weights) + streamed_encoder + ENCODE_WORK_BYTES,
                t.weights + SAMPLING_WORK_BYTES, v.weights + DECODE_WORK_BYTES]
    else:  # group_offload: the VAE stays, the transformer and the encoders stream
        jobs = [v.weights + streamed_encoder + ENCODE_WORK_BYTES,
                v.weights + t.streamed + SAMPLING_WORK_BYTES, v.weights + DECODE_WORK_BYTES]
    return max(jobs) + ALLOCATOR_SLACK_BYTES


def host_use(mode: str, encoders: str, sizes: ModelSizes, budget: int | None,
             pin: bool = True) -> tuple[int, int]:
    """(host bytes at the placement's peak, pinned bytes), pinning as `Placement.setup` does:
    module by module (the transformer first, then the encoders, then the rest), while the rounded
    bytes stay within `budget`. The peak comes during setup, with every weight still in RAM: a
    module streamed with pinned copies holds its original tensors too until its first run
    (diffusers copies them), a model-offload host copy replaces each tensor as it is pinned, and
    only then do resident models leave for the device."""
    pinned = 0
    extra = 0

    def take(size: ModuleSize) -> bool:
        nonlocal pinned
        if not pin or (budget is not None and pinned + size.pinned > budget):
            return False
        pinned += size.pinned
        return True

    stream_encoders = mode != "gpu" or encoders == "offload"
    if mode == "group_offload" and take(sizes.transformer):
        extra += sizes.transformer.pinned
    for e in sizes.encoders:
        if stream_encoders and take(e):
            extra += e.pinned
    if mode == "model_offload":
        for size in (sizes.transformer, sizes.vae):
            if take(size):
                extra += size.pinned - size.weights
    return sizes.total_bytes + extra, pinned


def plan_memory(mode: str, encoders: str, device: torch.device, sizes: ModelSizes,
                free_bytes: int | None = None, host: HostMemory | None = None,
                facts: DeviceFacts | None = None) -> MemoryPlan:
    """The placement to use. "auto" picks the fastest that fits `free_bytes` (the device's free
    memory when None), `device_peak` of each:

    1. everything resident (transformer + VAE + encoders) -- no transfers at all;
    2. transformer + VAE resident, encoders streamed -- one pass over T5 per *new* prompt;
    3. model offload -- the transformer moves in for sampling and out for the VAE decode;
    4. group offload -- the transformer is streamed block by block every step.

    `encoders` ("auto" | "offload" | "resident") only matters in "gpu" mode; "auto" keeps them
    resident when they fit beside everything else.

    Host RAM (`host`, measured when None; after loading): the offload modes keep their models in
    RAM, where they already are after loading; page-locking (pinning) the host copies makes
    transfers fast, and diffusers' group offloading does it by *copying* every weight. The plan's
    `pin_budget_bytes` bounds the pinned bytes as the allocator rounds them (`pin_budget`); past
    it, host copies stay pageable (pinned per transfer: slower, no extra RAM). When the
    transformer is not already fp8 or GGUF and does not fit resident, the reason says what an fp8
    or GGUF transformer would need.

    `facts` (`DeviceFacts`, inside ComfyUI from its flags): `reserve_bytes` is kept free;
    `vram_state` "no" streams the transformer (group offload), "low" never keeps the transformer
    beside the VAE (model offload or lighter), "high" keeps the models on the device; with pinning
    off nothing is page-locked. On unified memory (a Mac) the device and the host are one pool of
    `plan_free_bytes`: moving a model to the device takes no more RAM and offloading frees none, so
    "auto" keeps everything on the device, and the plan does not fit when the pool is too small.
    Where the device has no free figure (DirectML) the plan cannot check and says so. fp8 is only
    suggested where the device can hold float8 tensors.
    """
    if mode not in MEMORY_MODES:
        raise InputError(f"memory: '{mode}' is not one of {', '.join(MEMORY_MODES)}.")
    if encoders not in ENCODER_PLACEMENTS:
        raise InputError(f"encoders: '{encoders}' is not one of {', '.join(ENCODER_PLACEMENTS)}.")
    on_gpu = device.type != "cpu" or free_bytes is not None
    gib = lambda n: f"{n / _GIB:.1f} GiB"  # noqa: E731
    unified = facts is not None and facts.unified
    note = ""
    if facts is not None:
        if unified or free_bytes is None:
            known = facts.plan_free_bytes()
        else:
            known = max(0, free_bytes - facts.reserve_bytes)
        if known is None and on_gpu:
            note = f"; {facts.kind} reports no free memory: the plan cannot check that it fits"
        free = known if known is not None else 1 << 62
    else:
        free = free_bytes if free_bytes is not None else free_memory(device)
    pins = pin_budget(host if host is not None else host_memory()) if on_gpu and not unified else None
    if facts is not None and pins is not None:
        if not facts.pin_allowed:
            pins = 0
        elif facts.pin_cap_bytes is not None:
            pins = min(pins, facts.pin_cap_bytes)
    if facts is not None and facts.note and not note:
        note = f"; {facts.note}"
    fp8_ok = facts is None or facts.fp8_storage

    def smaller_weights_hint() -> str:
        if not on_gpu or sizes.quantized or device_peak("gpu", "offload", sizes) <= free:
            return ""
        t = sizes.transformer
        gguf = (f"a Q8_0 / Q5 / Q4 GGUF transformer is about {gib(int(t.weights * 0.52))} / "
                f"{gib(t.weights * 0.35)} / {gib(t.weights * 0.29)}")
        if not fp8_ok:
            return f"; {facts.kind} cannot hold fp8 weights: {gguf}"
        # fp8 storage keeps the embedders and norms in 16 bits: a little over half of bf16.
        half = ModuleSize(int(t.weights * 0.52), int(t.pinned * 0.52), int(t.streamed * 0.52))
        smaller = ModelSizes(half, sizes.vae, sizes.encoders, True)
        if device_peak("gpu", "offload", smaller) <= free:
            fit = "would stay on the GPU (no streaming)"
        elif device_peak("model_offload", "offload", smaller) <= free:
            fit = "would fit with model offload (moved once per image, not every step)"
        else:
            fit = "would halve what streams every step"
        return f"; precision 'fp8_e4m3fn' (transformer about {gib(half.weights)}) {fit}, and {gguf}"

    def planned(chosen: str, placed: str, reason: str, fits: bool = True) -> MemoryPlan:
        reason += note
        host_bytes, pinned = host_use(chosen, placed, sizes, pins, pin=device.type == "cuda") \
            if on_gpu and not unified else (sizes.total_bytes, 0)   # nothing leaves the host (one pool)
        if chosen != "gpu" and pins is not None:
            reason += f"; at most {gib(pins)} of host RAM page-locked"
        return MemoryPlan(chosen, placed, reason + smaller_weights_hint(), pins,
                          device_peak(chosen, placed, sizes) if on_gpu else 0, host_bytes, pinned, fits)

    if mode != "auto":
        if mode == "gpu" and encoders == "auto":
            needed = device_peak("gpu", "resident", sizes)
            resident = not on_gpu or needed <= free
            return planned("gpu", "resident" if resident else "offload",
                           "encoders fit beside the transformer" if resident else
                           f"encoders streamed: {gib(needed)} needed with them, {gib(free)} free")
        placed = encoders if mode == "gpu" else "offload"
        return planned(mode, "resident" if placed == "auto" else placed, f"memory='{mode}' chosen")
    if not on_gpu:
        return planned("gpu", "resident" if encoders == "auto" else encoders, f"{device.type}: nothing to offload")
    candidates = [("gpu", "resident"), ("gpu", "offload"), ("model_offload", "offload"),
                  ("group_offload", "offload")]
    if unified:
        needed = device_peak("gpu", "resident", sizes)
        return planned("gpu", "resident",
                       f"unified memory: host and device are one pool, {gib(needed)} needed of {gib(free)}",
                       fits=needed <= free)
    state = facts.vram_state if facts is not None else "normal"
    if state == "no":
        candidates = candidates[3:]
    elif state == "low":
        candidates = candidates[2:]
    elif state == "high":
        candidates = candidates[:2]
    if encoders == "offload":
        candidates.remove(("gpu", "resident"))
    if encoders == "resident":
        candidates.remove(("gpu", "offload"))
    for chosen, placed in candidates:
        needed = device_peak(chosen, placed, sizes)
        if needed <= free:
            what = {("gpu", "resident"): "all models fit", ("gpu", "offload"):
                    "transformer + VAE fit; encoders streamed", ("model_offload", "offload"):
                    "transformer and VAE fit one at a time", ("group_offload", "offload"):
                    "transformer streamed block by block"}[(chosen, placed)]
            told = f" (vram state '{state}')" if state in ("no", "low", "high") else ""
            return planned(chosen, placed, f"{what}{told}: {gib(needed)} of {gib(free)} free")
    if state == "high":
        needed = device_peak("gpu", "offload", sizes)
        return planned("gpu", "offload", f"vram state 'high' keeps the models on the device: {gib(needed)} needed, "
                       f"{gib(free)} free", fits=False)
    needed = device_peak("group_offload", "offload", sizes)
    return planned("group_offload", "offload",
                   f"does not fit: even group offload needs {gib(needed)}, {gib(free)} free", fits=False)
