"""Fit: under `precision=auto`, 16-bit weights that fit nowhere are stored as fp8 instead.

`resolve_precision` keeps what the files store: a bf16 FLUX stays bf16. On a 32 GB host the bf16
split files (transformer 22.2 GiB + T5 8.9 GiB + the rest) do not fit the RAM at all, and on small
cards no memory mode may fit either; the same transformer stored as fp8 (`precision=fp8_e4m3fn`:
fp8 weights, upcast per layer to the compute dtype) takes about half. This module decides, from
the sizes the chosen files would load to (counted before a weight is read: `sizes_of`), whether
the 16-bit storage fits and, if not, the least fp8 storage that does: the transformer first, then
T5 too. An explicitly chosen precision is never changed; when it does not fit, the note says what
`auto` would store instead.

"Fits" is what the memory plan says: the weights fit the host RAM left after loading them, and
some memory mode fits the device (`plan_memory("auto", ...)`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .device_facts import DeviceFacts
from .host import HostMemory
from .plan import _GIB, MemoryPlan, ModelSizes, plan_memory
from .precision import Precision

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Fit:
    precision: Precision            # what to load the files in
    plan: MemoryPlan | None         # the memory plan at that precision; None: not planned (no GPU)
    host_bytes: int = 0             # the weights' bytes in host RAM at that precision
    host_fits: bool = True          # the weights fit the host RAM after loading
    note: str = ""                  # for the log and the plan: fp8 chosen to fit, or what would fit
    stored_fp8: str = ""            # "transformer", "T5" or "transformer and T5": stored as fp8 to fit

    @property
    def fits(self) -> bool:
        return self.host_fits and (self.plan is None or self.plan.fits)


def holds_fp8(device: torch.device, facts: DeviceFacts | None = None) -> bool:
    """Where fp8 storage may be chosen to save memory: NVIDIA and AMD cards (fp8 weights upcast
    per layer run on every card torch supports) that hold float8 tensors (`facts.fp8_storage`;
    not where ComfyUI says the device cannot hold them). Not on a Mac (MPS has no float8 and its
    memory is the host's), not on DirectML or XPU (float8 there is not known to work), not on the
    CPU (it computes in fp32 and has no VRAM to save)."""
    if facts is None:
        return device.type == "cuda"
    return facts.kind in ("cuda", "rocm") and facts.fp8_storage


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def candidates(precision: Precision, transformer_storable: bool = True) -> list[tuple[str, Precision]]:
    """(what is stored as fp8, precision) from the fewest fp8 weights to the most: as resolved,
    then the transformer in fp8 (unless not `transformer_storable`: GGUF), then T5 too (but `wo`,
    as `fp8.t5_storable` says)."""
    out = [("", precision)]
    if not precision.fp8_storage and transformer_storable:
        precision = replace(precision, fp8_storage=True)
        out.append(("transformer", precision))
    if precision.t5_storage != FP8:
        what = "T5" if len(out) == 1 else "transformer and T5"
        out.append((what, replace(precision, t5_storage=FP8)))
    return out


def try_precision(precision: Precision, sizes: ModelSizes, free_bytes: int, host: HostMemory | None,
                  encoders: str = "auto", facts: DeviceFacts | None = None) -> Fit:
    """`precision`'s plan: `host` is the host before the weights are read (None: no figure, the RAM
    is not checked); after loading, `sizes.total_bytes` of it are taken. `facts`: the card's
    reserve and ComfyUI's memory flags, as `plan_memory` reads them."""
    after = None if host is None else HostMemory(host.available - sizes.total_bytes, host.total)
    host_fits = after is None or after.available >= 0
    plan = plan_memory("auto", encoders, torch.device("cuda"), sizes, free_bytes=free_bytes, host=after,
                       facts=facts) if host_fits else None
    return Fit(precision, plan, sizes.total_bytes, host_fits)


def _why(fit: Fit, host: HostMemory | None, free_bytes: int) -> str:
    if not fit.host_fits and host is not None:
        return f"{_gib(host.total)} host RAM ({_gib(fit.host_bytes)} of weights, {_gib(host.available)} available)"
    return f"{_gib(free_bytes)} free VRAM (even group offload needs {_gib(fit.plan.device_peak_bytes)})"


def fit_precision(asked: str, device: torch.device, precision: Precision,
                  sizes_of: Callable[[Precision], ModelSizes], free_bytes: int, host: HostMemory | None,
                  encoders: str = "auto", stored_transformer: str = "bf16",
                  facts: DeviceFacts | None = None) -> Fit:
    """The precision to load in. `asked`: the precision chosen by the user ("auto" may store
    16-bit weights as fp8 to fit; anything else is honoured); `precision`: what `resolve_precision`
    gave for it; `sizes_of`: the loaded sizes at a precision, counted without reading weights;
    `free_bytes`: the device's free memory; `host`: the host's RAM before loading;
    `stored_transformer`: what the transformer file stores (a GGUF transformer has no fp8 storage
    to fall back to); `facts`: the device's abilities and ComfyUI's flags (`DeviceFacts`)."""
    if not holds_fp8(device, facts):
        return Fit(precision, None)
    steps = candidates(precision, stored_transformer != "gguf")
    if len(steps) == 1:  # already fp8 wherever it can be: nothing to choose
        return Fit(precision, None)
    first = try_precision(precision, sizes_of(precision), free_bytes, host, encoders, facts)
    if first.fits:
        return first
    for what, candidate in steps[1:]:
        fit = try_precision(candidate, sizes_of(candidate), free_bytes, host, encoders, facts)
        if not fit.fits:
            continue
        if asked == "auto":
            return replace(fit, note=f"{what} stored as fp8 to fit: {_why(first, host, free_bytes)}",
                           stored_fp8=what)
        return replace(first, note=f"precision='{asked}' does not fit: {_why(first, host, free_bytes)}; "
                                   f"precision 'auto' would store the {what} as fp8 and fit")
    return replace(first, note=f"does not fit, even with fp8 storage: {_why(first, host, free_bytes)}")
