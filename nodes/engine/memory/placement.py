"""Placement: moving the models between host and device per memory mode (gpu, model offload,
group offload) and page-locking their host copies within the plan's budget."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from .plan import (DECODE_WORK_BYTES, ENCODE_WORK_BYTES, MEMORY_MODES, SAMPLING_WORK_BYTES, module_bytes,
                   pinned_bytes, streamed_bytes)

#: The device's out-of-memory error. `torch.OutOfMemoryError` is an alias of it only from torch 2.5;
#: the pack runs on torch 2.4, where naming that alias in an `except` clause would turn any error
#: (a cancel included) into an AttributeError.
OUT_OF_MEMORY = torch.cuda.OutOfMemoryError
#: How the other backends say it: a plain RuntimeError ("MPS backend out of memory (MPS allocated:
#: ...)", "XPU out of memory").
_OTHER_OUT_OF_MEMORY = ("MPS backend out of memory", "XPU out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the device running out of memory, on CUDA, ROCm, MPS or XPU."""
    return isinstance(exc, OUT_OF_MEMORY) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OTHER_OUT_OF_MEMORY))


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
                 before_use: Callable[["Placement", list[nn.Module]], None] | None = None,
                 unified: bool = False):
        """`unified`: the device shares the host's RAM (a Mac): a model sent to the device keeps no
        host copy (it would be a second copy in the same RAM)."""
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
        self._work: dict[int, int] = {}            # id -> working memory of its job (`work_bytes`)
        self.unified = unified
        #: Modules that always run on the host (ComfyUI's text encoder device or --cpu-vae).
        self._on_host: set[int] = set()

    @property
    def moves(self) -> bool:
        """Whether models actually change device (False on a CPU-only run)."""
        return self.device.type != "cpu"

    @property
    def use_stream(self) -> bool:
        return self.device.type == "cuda"

    # -- setup -----------------------------------------------------------------------------

    def setup(self, transformer: nn.Module, others: list[nn.Module],
              encoders: list[nn.Module] | None = None, on_host: list[nn.Module] | None = None) -> None:
        """Install the mode. `encoders` (a subset of `others`) are streamed unless this is "gpu"
        mode with resident encoders. `on_host` (a subset of `others`) stay on the CPU and run there."""
        self._on_host = {id(m) for m in (on_host or []) if m is not None}
        others = [m for m in others if m is not None and id(m) not in self._on_host]
        encoders = [m for m in (encoders or []) if m is not None and id(m) not in self._on_host]
        # The working memory of each module's job; the rest of `others` is the VAE (decode).
        self._work = {id(m): ENCODE_WORK_BYTES for m in (encoders or []) if m is not None}
        self._work[id(transformer)] = SAMPLING_WORK_BYTES
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
        pinned = self.use_stream and self._take_pin_budget(pinned_bytes(module))
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
        if self.unified:
            return   # moved whole (`_onload_tensors`): one pool, no second copy
        tensors = []
        pin = self.device.type == "cuda" and self._take_pin_budget(pinned_bytes(module))
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
        fast to move or not), counting them (`nbytes`: as the allocator rounds them) against the
        budget when they may."""
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
        return module_bytes(module) if kind is None else streamed_bytes(module, kind)

    def work_bytes(self, modules: list[nn.Module]) -> int:
        """Device memory the job running `modules` needs beyond their weights: sampling (the
        transformer), the VAE decode, or an encoder pass; what a host should keep free for it."""
        return max((self._work.get(id(m), DECODE_WORK_BYTES) for m in modules), default=0)

    def bytes_on_device(self, module: nn.Module) -> int:
        """Bytes of `module`'s weights on the device now (a streamed module between runs: none)."""
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                   if t.device.type == self.device.type)

    @contextmanager
    def use(self, module: nn.Module, keep: bool = False):
        """Run `module` on the device. Streamed modules move themselves; in "gpu" mode a module
        that was released is put back and stays; in "model_offload" every other model leaves the
        device first, and `module` stays there after the run when `keep`, else leaves at once."""
        if not self.moves or self.is_streamed(module) or id(module) in self._on_host:
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
        if self.unified:
            module.to(self.device)
            return
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
                if m is not None and not self.is_streamed(m) and id(m) not in self._on_host and
                not self.on_device(m) and
                (not self._resident or any(m is r for r in self._resident))]
        self._announce(back)
        for m in back:
            m.to(self.device)

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def describe(self) -> str:
        return f"memory={self.mode}, encoders={'offload' if self.mode != 'gpu' else self.encoders}"
