"""The USO DiT LoRA: its original keys mapped onto diffusers modules, fused or unfused.

Fused: W += s * up @ down, computed in fp32 and rounded once (fast; not bit-exact in bf16).
Unfused: the LoRA runs beside the base layer exactly like the reference (the parity path, and
the only correct one over fp8 weights, where fusing loses about half of the delta).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import detect
from .errors import ModelFileError
from .weight_files import open_weights

_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora(1|2)?\.(down|up)\.weight$")


@dataclass
class LoraPart:
    """One low-rank update: the layer gets `scale * up @ down` (down: r x in, up: out x r)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor


def _targets(kind: str, block: str, op: str, stream: str | None) -> list[str]:
    if kind == "double_blocks":
        base = f"transformer_blocks.{block}.attn"
        if op == "qkv":
            names = ("to_q", "to_k", "to_v") if stream == "1" else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [f"{base}.{n}" for n in names]
        return [f"{base}.to_out.0" if stream == "1" else f"{base}.to_add_out"]
    base = f"single_transformer_blocks.{block}"
    if op == "qkv":  # only the q, k, v rows of linear1, never the MLP rows
        return [f"{base}.attn.to_q", f"{base}.attn.to_k", f"{base}.attn.to_v"]
    return [f"{base}.proj_out"]


def load_uso_lora(path: str) -> tuple[list[LoraPart], int]:
    """The LoRA's parts keyed by diffusers module, and its rank (read from the file)."""
    source = open_weights(path)
    detect.require_kind(source, "uso_lora", ("uso_lora",))
    name = os.path.basename(path)
    pairs: dict[tuple, dict[str, torch.Tensor]] = {}
    for key in source.keys():
        bare = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
        m = _KEY.match(bare)
        if not m:
            raise ModelFileError(f"uso_lora: '{name}' holds '{key}', which is not a USO LoRA key; "
                                 "the file is another kind of LoRA.")
        kind, block, op, stream, side = m.groups()
        pairs.setdefault((kind, block, op, stream), {})[side] = source.get(key)
    source.close()
    parts, ranks = [], set()
    for (kind, block, op, stream), tensors in sorted(pairs.items()):
        if set(tensors) != {"down", "up"}:
            raise ModelFileError(f"uso_lora: '{name}' is missing the "
                                 f"{'up' if 'down' in tensors else 'down'} weight of {kind}.{block} "
                                 f"{op}_lora{stream or ''}; the file is incomplete.")
        down, up = tensors["down"], tensors["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ModelFileError(f"uso_lora: '{name}' has a {kind}.{block} {op}_lora{stream or ''} whose down "
                                 f"{list(down.shape)} and up {list(up.shape)} weights do not fit together "
                                 "(different ranks); the file is damaged or not a USO LoRA.")
        ranks.add(down.shape[0])
        targets = _targets(kind, block, op, stream)
        rows = up.shape[0] // len(targets)
        for i, module in enumerate(targets):
            parts.append(LoraPart(module, down, up[i * rows:(i + 1) * rows]))
    if len(ranks) != 1:
        raise ModelFileError(f"uso_lora: '{name}' mixes ranks {sorted(ranks)}; the file is damaged.")
    return parts, ranks.pop()


def check_fits(parts: list[LoraPart], model: nn.Module, name: str) -> None:
    modules = dict(model.named_modules())
    for part in parts:
        layer = modules.get(part.module)
        if layer is None:
            raise ModelFileError(f"uso_lora: '{name}' targets {part.module}, which this transformer "
                                 f"lacks; the LoRA is for a different model. Pick {detect.EXPECTED['uso_lora']}.")
        weight = layer.base.weight if isinstance(layer, LoraLinear) else layer.weight
        out_f, in_f = _logical_shape(weight)
        if part.up.shape[0] != out_f or part.down.shape[1] != in_f:
            raise ModelFileError(
                f"uso_lora: '{name}' does not fit this transformer ({part.module} is {in_f}->{out_f}, "
                f"the LoRA is {part.down.shape[1]}->{part.up.shape[0]}); it is for a different model. "
                f"Pick {detect.EXPECTED['uso_lora']}.")


def _logical_shape(weight: torch.Tensor) -> tuple[int, int]:
    shape = getattr(weight, "quant_shape", weight.shape)
    return int(shape[0]), int(shape[1])


class LoraLinear(nn.Module):
    """A Linear with a low-rank update added to its output, as the reference applies it."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.lora_down = nn.Parameter(down, requires_grad=False)
        self.lora_up = nn.Parameter(up, requires_grad=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = F.linear(F.linear(x.to(self.lora_down.dtype), self.lora_down), self.lora_up)
        delta = delta.to(out.dtype)
        return out + (delta if self.scale == 1.0 else delta * self.scale)


def apply_unfused(model: nn.Module, parts: list[LoraPart], scale: float, dtype: torch.dtype) -> None:
    modules = dict(model.named_modules())
    for part in parts:
        parent_name, _, child = part.module.rpartition(".")
        parent = modules[parent_name]
        base = getattr(parent, child)
        device = next(base.parameters()).device
        setattr(parent, child, LoraLinear(base, part.down.to(device, dtype), part.up.to(device, dtype), scale))


def apply_fused(model: nn.Module, parts: list[LoraPart], scale: float) -> None:
    modules = dict(model.named_modules())
    for part in parts:
        weight = modules[part.module].weight
        delta = part.up.to(weight.device, torch.float32) @ part.down.to(weight.device, torch.float32)
        weight.data = (weight.data.float() + scale * delta).to(weight.dtype)
