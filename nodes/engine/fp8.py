"""fp8 weight storage: which transformer Linears are stored in float8 and the Linear that upcasts
them per call to the compute dtype. One policy, used by the loader (fp8 files are kept as
they are) and by the precision setup (bf16 files are cast)."""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

#: Modules kept in the compute dtype when the transformer is stored in fp8: tiny, precision-
#: critical, or per-call LoRA weights. Unlike diffusers' defaults, the AdaLN modulation Linears
#: (`norm*.linear`, 3.2 B of 11.9 B parameters) are stored in fp8 too.
FP8_SKIP_PATTERNS = (r"pos_embed", r"norm_q$", r"norm_k$", r"norm_added_q$", r"norm_added_k$",
                     r"^proj_out$", r"^x_embedder$", r"^context_embedder$", r"time_text_embed")


class UpcastLinear(nn.Linear):
    """A Linear whose weight is stored in float8 (or, in T5, in another dtype than it computes in)
    and upcast to `compute_dtype` inside `forward`
    (times `weight_scale`, an fp32 scalar buffer, for ComfyUI's scaled fp8 files; a buffer, so it
    moves with the module under every memory mode). The bias stays in the compute dtype.

    Plain tensor operations in `forward`, so `torch.compile` traces the upcast into the compiled
    block: diffusers' layerwise-casting hook swaps `weight.data` before and after each call, which
    dynamo cannot trace (one graph break per fp8 Linear). The scaled upcast is one cast to the
    compute dtype and one multiply by the fp32 scale (computed in fp32, rounded once: the same
    bits as dequantizing in fp32 and rounding), not a round trip through two fp32 temporaries."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype)
        if self.weight_scale is not None:
            weight = weight * self.weight_scale
        return F.linear(x, weight, self.bias)


def _upcast_per_call(linear: nn.Linear, storage: torch.dtype, compute: torch.dtype) -> None:
    """Turn `linear` (in place: whoever holds it keeps the same module) into an UpcastLinear."""
    linear.weight.data = linear.weight.data.to(storage)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.to(compute)
    if "weight_scale" not in linear._buffers:
        linear.register_buffer("weight_scale", None)
    linear.__class__ = UpcastLinear
    linear.compute_dtype = compute


def keep_scaled_fp8(linear: nn.Linear, scale: torch.Tensor, compute: torch.dtype) -> None:
    """Store `linear`'s fp8 weight with its per-tensor `scale` and upcast it (times the scale) to
    `compute` per call; `enable_fp8_storage` then leaves the layer as it is."""
    linear.register_buffer("weight_scale", scale.to(torch.float32).reshape(()))
    _upcast_per_call(linear, linear.weight.dtype, compute)


def fp8_storable(module_name: str) -> bool:
    return not any(re.search(p, module_name) for p in FP8_SKIP_PATTERNS)


def enable_fp8_storage(transformer: nn.Module, compute: torch.dtype) -> int:
    """Store every Linear weight whose module `fp8_storable` allows in float8 (fp8 files keep
    their own fp8 dtype, other weights become float8_e4m3fn, saturating at +-448) and upcast it to
    `compute` per layer at run time (`UpcastLinear`). Biases stay in `compute`. The LoRA of an unfused
    `LoraLinear` is not a Linear and stays in `compute`. Returns how many layers are stored in fp8."""
    count = 0
    for name, module in transformer.named_modules():
        if type(module) is not nn.Linear or not fp8_storable(name):
            continue
        storage = module.weight.dtype if module.weight.dtype in FP8_DTYPES else torch.float8_e4m3fn
        _upcast_per_call(module, storage, compute)
        count += 1
    return count


def fp8_layers(transformer: nn.Module) -> list[str]:
    """Names of the Linears stored in fp8 (for tests and the benchmark)."""
    return [n for n, m in transformer.named_modules()
            if isinstance(m, nn.Linear) and m.weight.dtype in FP8_DTYPES]


def t5_storable(module_name: str) -> bool:
    """T5's Linears that may be stored in another dtype than they compute in: all but the
    feed-forward output `wo`, whose input transformers' T5 casts to `wo.weight.dtype` before the
    call (it keeps `wo` in fp32 for the same reason): stored in fp8 that would make the input fp8."""
    return not module_name.endswith(".wo")


def keep_stored_linears(model: nn.Module, compute: torch.dtype) -> int:
    """Upcast to `compute` per call (`UpcastLinear`) every Linear of `model` whose weight is stored
    in another dtype (T5 kept in fp8, or in 16 bits computing in fp32). Layers already converted
    (scaled fp8) are no plain Linear and stay as they are. Returns how many were converted."""
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.dtype == compute:
            continue
        _upcast_per_call(module, module.weight.dtype, compute)
        count += 1
    return count
