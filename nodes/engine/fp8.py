"""fp8 weight storage: which transformer Linears are stored in float8 and the diffusers hooks that
upcast them per layer to the compute dtype. One policy, used by the loader (fp8 files are kept as
they are) and by the precision setup (bf16 files are cast)."""
from __future__ import annotations

import re

import torch
from torch import nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

#: Modules kept in the compute dtype when the transformer is stored in fp8: tiny, precision-
#: critical, or per-call LoRA weights. Unlike diffusers' defaults, the AdaLN modulation Linears
#: (`norm*.linear`, 3.2 B of 11.9 B parameters) are stored in fp8 too.
FP8_SKIP_PATTERNS = (r"pos_embed", r"norm_q$", r"norm_k$", r"norm_added_q$", r"norm_added_k$",
                     r"^proj_out$", r"^x_embedder$", r"^context_embedder$", r"time_text_embed")


def _scaled_fp8_casting_hook(compute: torch.dtype):
    """Layerwise casting for a Linear whose fp8 weight comes with a per-tensor scale (ComfyUI's
    scaled fp8 files): the weight stays as the file stored it; `weight_scale` (an fp32 scalar
    buffer, so it moves with the module under every memory mode) multiplies it in when the layer
    runs, and the stored fp8 tensor is put back afterwards."""
    from diffusers.hooks import ModelHook

    class ScaledFP8CastingHook(ModelHook):
        _is_stateful = False

        def __init__(self):
            super().__init__()
            self.compute_dtype = compute
            self.stored: torch.Tensor | None = None

        def pre_forward(self, module, *args, **kwargs):
            self.stored = module.weight.data
            module.weight.data = (self.stored.to(torch.float32) * module.weight_scale).to(self.compute_dtype)
            return args, kwargs

        def post_forward(self, module, output):
            module.weight.data, self.stored = self.stored, None
            return output

    return ScaledFP8CastingHook()


def keep_scaled_fp8(linear: nn.Linear, scale: torch.Tensor, compute: torch.dtype) -> None:
    """Store `linear`'s fp8 weight with its per-tensor `scale` and upcast it (times the scale) to
    `compute` per call. Registered under diffusers' layerwise-casting name, so that
    `enable_fp8_storage` leaves the layer as it is."""
    from diffusers.hooks import HookRegistry

    linear.register_buffer("weight_scale", scale.to(torch.float32).reshape(()))
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.to(compute)
    HookRegistry.check_if_exists_or_initialize(linear).register_hook(
        _scaled_fp8_casting_hook(compute), "layerwise_casting")


def fp8_storable(module_name: str) -> bool:
    return not any(re.search(p, module_name) for p in FP8_SKIP_PATTERNS)


def enable_fp8_storage(transformer: nn.Module, compute: torch.dtype) -> int:
    """Store every Linear weight whose module `fp8_storable` allows in float8 (fp8 files keep
    their own fp8 dtype, other weights become float8_e4m3fn, saturating at +-448) and upcast it to
    `compute` per layer at run time, with diffusers' layerwise casting hook. The LoRA of an unfused
    `LoraLinear` is not a Linear and stays in `compute`. Returns how many layers are stored in fp8."""
    from diffusers.hooks import apply_layerwise_casting_hook

    count = 0
    for name, module in transformer.named_modules():
        if type(module) is not nn.Linear or not fp8_storable(name):
            continue
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            continue
        storage = module.weight.dtype if module.weight.dtype in FP8_DTYPES else torch.float8_e4m3fn
        apply_layerwise_casting_hook(module, storage, compute, non_blocking=False)
        count += 1
    return count


def fp8_layers(transformer: nn.Module) -> list[str]:
    """Names of the Linears stored in fp8 (for tests and the benchmark)."""
    return [n for n, m in transformer.named_modules()
            if type(m) is nn.Linear and m.weight.dtype in FP8_DTYPES]


def t5_storable(module_name: str) -> bool:
    """T5's Linears that may be stored in another dtype than they compute in: all but the
    feed-forward output `wo`, whose input transformers' T5 casts to `wo.weight.dtype` before the
    call (it keeps `wo` in fp32 for the same reason): stored in fp8 that would make the input fp8."""
    return not module_name.endswith(".wo")


def keep_stored_linears(model: nn.Module, compute: torch.dtype) -> int:
    """Upcast to `compute` per layer, with diffusers' layerwise casting hook, every Linear of
    `model` whose weight is stored in another dtype (T5 kept in fp8, or in 16 bits computing in
    fp32). Layers already hooked (scaled fp8) stay as they are. Returns how many were hooked."""
    from diffusers.hooks import apply_layerwise_casting_hook

    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.dtype == compute:
            continue
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            continue
        apply_layerwise_casting_hook(module, module.weight.dtype, compute, non_blocking=False)
        count += 1
    return count
