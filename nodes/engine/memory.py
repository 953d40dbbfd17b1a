"""Precision and placement: which dtype each model runs in, and where it lives when idle.

Built on diffusers' own machinery:
- fp8 storage: diffusers' layerwise casting hooks (weights stored in float8, upcast per layer to the
  compute dtype), with our skip list (`fp8.FP8_SKIP_PATTERNS`, `fp8.py`), which unlike diffusers' default
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
- "auto": the fastest of these that fits the free memory with a margin (`plan_memory`).

On a machine without a GPU nothing moves; the offload modes still install their diffusers hooks
(with the CPU as both places), which is how the tests check that they leave the result unchanged.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")
MEMORY_MODES = ("auto", "gpu", "model_offload", "group_offload")
#: Where the encoders (T5, CLIP-L, SigLIP + projector) live in "gpu" mode. The offload modes always
#: stream them. T5-XXL is 9.5 GB in bf16 and runs once per new prompt, so streaming it costs about
#: one PCIe pass over its weights per new prompt and nothing for a cached prompt.
ENCODER_PLACEMENTS = ("auto", "offload", "resident")

_GIB = 1024 ** 3
#: Room kept free beyond the weights: a 1024² USO step's activations (~1 GiB with SDPA), the fp32
#: VAE decode at 1024² (~3 GiB; larger images are decoded in tiles) and allocator slack.
DEFAULT_MARGIN_BYTES = 6 * _GIB


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
# Choosing a mode
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


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------

def _send_to_device(obj, device, non_blocking: bool = False, skip_keys=None):
    """accelerate.utils.send_to_device, for diffusers' group offloading when accelerate is absent."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_send_to_device(o, device, non_blocking, skip_keys) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_send_to_device(o, device, non_blocking, skip_keys) for o in obj)
    if isinstance(obj, dict):
        skip = skip_keys if isinstance(skip_keys, (list, tuple, set)) else ([skip_keys] if skip_keys else [])
        return type(obj)({k: v if k in skip else _send_to_device(v, device, non_blocking, skip_keys)
                          for k, v in obj.items()})
    return obj


def _group_offloading_module():
    """diffusers' group offloading, usable without the accelerate package (it only needs
    accelerate's `send_to_device`, which we provide when accelerate is not installed)."""
    from diffusers.hooks import group_offloading

    if not hasattr(group_offloading, "send_to_device"):
        group_offloading.send_to_device = _send_to_device
    return group_offloading


def has_group_offload(module: nn.Module) -> bool:
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("group_offloading") is not None:
            return True
    return False


@dataclass(frozen=True)
class DeviceHooks:
    """How a host that manages device memory itself (ComfyUI) shares the device with the engine.
    Without hooks (command line, Python API, tests) the engine plans and moves on its own.

    - `before_use(placement, modules)`: the engine is about to put `modules` on the device (placing
      them at load, or running them); the host makes room and records them. It may release any
      module later with `placement.release([module])`; the next use places it again.
    - `available_bytes(device)`: device memory the engine may plan with: what is free plus what the
      host would give up (its own models it can unload). Asked once, when the memory mode is chosen.
    """

    before_use: Callable[["Placement", list[nn.Module]], None] | None = None
    available_bytes: Callable[[torch.device], int] | None = None


class Placement:
    """Where each model lives, per memory mode, and moving it there when it runs.

    `setup` once; `using(modules)` around every run of modules; `release` when the host (ComfyUI)
    wants the memory back; `restore` (or simply the next `use`) puts things back.
    """

    def __init__(self, mode: str, device: torch.device, encoders: str = "resident",
                 pin_budget_bytes: int | None = None,
                 before_use: Callable[["Placement", list[nn.Module]], None] | None = None):
        if mode not in MEMORY_MODES[1:]:
            raise InputError(f"memory: '{mode}' must be resolved to one of {', '.join(MEMORY_MODES[1:])}.")
        self.mode = mode
        self.device = torch.device(device)
        self.encoders = encoders
        self.pin_budget_bytes = pin_budget_bytes   # None: no bound
        self.pinned_bytes = 0                       # host copies page-locked so far
        self._offload_device = torch.device("cpu")
        self._streamed: dict[int, str] = {}        # id -> offload type, modules under group offloading
        self.before_use = before_use                # DeviceHooks.before_use, or None
        #: Called with the modules `release` moved off the device, for tensors the owner keeps
        #: outside their parameters (the pipeline's user-LoRA adapters on the transformer).
        self.on_release: Callable[[list[nn.Module]], None] | None = None
        self._resident: list[nn.Module] = []      # kept on the device in "gpu" mode
        self._host: dict[int, list] = {}           # model_offload: host copies of the tensors
        self._onloaded: nn.Module | None = None    # model_offload: the one model on the device

    @property
    def moves(self) -> bool:
        """Whether models actually change device (False on a CPU-only run)."""
        return self.device.type != "cpu"

    @property
    def use_stream(self) -> bool:
        return self.device.type == "cuda"

    # -- setup -----------------------------------------------------------------------------

    def setup(self, transformer: nn.Module, others: list[nn.Module],
              encoders: list[nn.Module] | None = None) -> None:
        """Install the mode. `encoders` (a subset of `others`) are streamed unless this is "gpu"
        mode with resident encoders."""
        others = [m for m in others if m is not None]
        stream_encoders = self.mode != "gpu" or self.encoders == "offload"
        streamed = [m for m in (encoders or []) if m is not None] if stream_encoders else []
        if self.mode == "group_offload":
            self._stream(transformer, "block_level")
        for module in streamed:
            self._stream(module, "leaf_level")
        placed = [m for m in [transformer, *others] if id(m) not in self._streamed]
        if self.mode in ("gpu", "group_offload"):
            self._announce(placed)
        if self.mode == "gpu":
            self._resident = placed
            if self.moves:
                for m in placed:
                    m.to(self.device)
        elif self.mode == "model_offload":
            if self.moves:
                for m in placed:
                    self._keep_host_copy(m)
        elif self.mode == "group_offload":
            # The VAE (and the encoders if asked to stay) are small next to the streamed transformer.
            self._resident = placed
            if self.moves:
                for m in placed:
                    m.to(self.device)

    def _stream(self, module: nn.Module, offload_type: str) -> None:
        if id(module) in self._streamed or has_group_offload(module):
            self._streamed.setdefault(id(module), offload_type)
            return
        group_offloading = _group_offloading_module()
        # With a CUDA stream diffusers keeps a pinned *copy* of every weight (low_cpu_mem_usage
        # False); past the pin budget it pins each group only while it is transferred instead.
        pinned = self.use_stream and self._take_pin_budget(module_bytes(module))
        kwargs = dict(onload_device=self.device, offload_device=self._offload_device,
                      offload_type=offload_type, use_stream=self.use_stream,
                      record_stream=self.use_stream, non_blocking=self.use_stream,
                      low_cpu_mem_usage=not pinned)
        if offload_type == "block_level":
            kwargs["num_blocks_per_group"] = 1
        group_offloading.apply_group_offloading(module, **kwargs)
        self._streamed[id(module)] = offload_type

    def _keep_host_copy(self, module: nn.Module) -> None:
        """Pinned host copies of a module's tensors: onloading is one fast copy each way in, and
        offloading only points the tensors back at them (inference never writes weights)."""
        tensors = []
        pin = self.device.type == "cuda" and self._take_pin_budget(module_bytes(module))
        for t in [*module.parameters(), *module.buffers()]:
            data = t.data.to(self._offload_device)
            if pin:
                try:
                    data = data.pin_memory()
                except RuntimeError:
                    pass
            t.data = data
            tensors.append((t, data))
        self._host[id(module)] = tensors

    def _take_pin_budget(self, nbytes: int) -> bool:
        """Whether a module's host copies may be page-locked (whole modules: a module is either
        fast to move or not), counting them against the budget when they may."""
        if self.pin_budget_bytes is not None and self.pinned_bytes + nbytes > self.pin_budget_bytes:
            return False
        self.pinned_bytes += nbytes
        return True

    # -- running ---------------------------------------------------------------------------

    def is_streamed(self, module: nn.Module) -> bool:
        return id(module) in self._streamed

    def on_device(self, module: nn.Module) -> bool:
        # Every tensor, not the first: a move cut short (out of memory) leaves a module split.
        return all(t.device.type == self.device.type for t in [*module.parameters(), *module.buffers()])

    def _announce(self, modules: list[nn.Module]) -> None:
        if self.before_use is not None and modules:
            self.before_use(self, modules)

    @contextmanager
    def using(self, *modules: nn.Module, keep: bool = False):
        """Run `modules` (one step of the work: the text encoders, the transformer, ...) on the
        device: the host hook hears of them once, together, then each is `use`d."""
        modules = [m for m in modules if m is not None]
        self._announce(modules)
        with ExitStack() as stack:
            for m in modules:
                stack.enter_context(self.use(m, keep))
            yield

    def device_bytes(self, module: nn.Module) -> int:
        """Bytes `module` needs on the device while it runs: all its weights, or for a streamed
        module its two largest groups (the one running and the one prefetched)."""
        kind = self._streamed.get(id(module))
        if kind is None:
            return module_bytes(module)
        if kind == "block_level":
            blocks = [b for child in module.children() if isinstance(child, (nn.ModuleList, nn.Sequential))
                      for b in child]
            in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
            rest = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                       if id(t) not in in_blocks)
            groups = [module_bytes(b) for b in blocks] + [rest]
        else:  # leaf_level: every module holding tensors of its own is a group
            groups = [sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False),
                                                                 *m.buffers(recurse=False)])
                      for m in module.modules()]
        return sum(sorted(groups)[-2:])

    def bytes_on_device(self, module: nn.Module) -> int:
        """Bytes of `module`'s weights on the device now (a streamed module between runs: none)."""
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                   if t.device.type == self.device.type)

    @contextmanager
    def use(self, module: nn.Module, keep: bool = False):
        """Run `module` on the device. Streamed modules move themselves; in "gpu" mode a module
        that was released is put back and stays; in "model_offload" every other model leaves the
        device first, and `module` stays there after the run when `keep`, else leaves at once."""
        if not self.moves or self.is_streamed(module):
            yield module
            return
        if self.mode == "model_offload":
            self._onload_exclusive(module)
            try:
                yield module
            finally:
                if not keep:
                    self._offload(module)
            return
        if not self.on_device(module):
            module.to(self.device)
        yield module

    def _onload_exclusive(self, module: nn.Module) -> None:
        if self._onloaded is module and self.on_device(module):
            return
        if self._onloaded is not None:
            self._offload(self._onloaded)
        self._onload_tensors(module)
        self._onloaded = module

    def _offload(self, module: nn.Module) -> None:
        self._offload_tensors(module)
        if self._onloaded is module:
            self._onloaded = None
        self._empty_cache()

    def _onload_tensors(self, module: nn.Module) -> None:
        if id(module) not in self._host:
            self._keep_host_copy(module)
        for t, data in self._host[id(module)]:
            t.data = data.to(self.device, non_blocking=data.is_pinned())

    def _offload_tensors(self, module: nn.Module) -> None:
        host = self._host.get(id(module))
        if host is None:
            module.to(self._offload_device)
            return
        for t, data in host:
            t.data = data

    def release(self, modules: list[nn.Module]) -> None:
        """These modules off the GPU (the host asked for the memory back, or out of memory)."""
        if not self.moves:
            return
        for m in modules:
            if m is None or self.is_streamed(m):
                continue
            if id(m) in self._host:
                # Also a module whose onload was cut short and never became `_onloaded`.
                self._offload_tensors(m)
            else:
                m.to(self._offload_device)
            if m is self._onloaded:
                self._onloaded = None
        if self.on_release is not None:
            self.on_release([m for m in modules if m is not None])
        self._empty_cache()

    def restore(self, transformer: nn.Module, others: list[nn.Module]) -> None:
        """Put released models back where the mode keeps them (offload modes onload lazily)."""
        if not self.moves or self.mode == "model_offload":
            return
        back = [m for m in [transformer, *others]
                if m is not None and not self.is_streamed(m) and not self.on_device(m) and
                (not self._resident or any(m is r for r in self._resident))]
        self._announce(back)
        for m in back:
            m.to(self.device)

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> str:
        return f"memory={self.mode}, encoders={'offload' if self.mode != 'gpu' else self.encoders}"
