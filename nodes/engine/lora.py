"""LoRAs on the transformer: the USO DiT LoRA (applied once) and the user's own LoRAs on top
(swapped as often as asked), fused or unfused.

Fused: W += s * up @ down, computed in fp32 and rounded once (fast; not bit-exact in bf16).
Unfused: the LoRA runs beside the base layer exactly like the reference (the parity path, and
the only correct one over fp8 weights, where fusing loses about half of the delta).

What is applied to a transformer is recorded on the transformer itself (`LoraState`), so the USO
LoRA can never be fused twice, whichever pipelines or LoadedModels wrap the same module, and the
user LoRAs can be changed without reloading: fused user deltas are taken out again exactly (the
few elements whose rounding would not come back are kept aside), unfused adapters are swapped.
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
    scale: float = 1.0      # alpha / rank of formats that store an alpha; 1.0 for the USO LoRA


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


def check_pair(owner: str, module: str, down: torch.Tensor, up: torch.Tensor, why: str, advice: str) -> None:
    """A LoRA's down (rank x in) and up (out x rank) weights must be matrices of one rank."""
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ModelFileError(f"{owner} has a {module} whose down {list(down.shape)} and up {list(up.shape)} "
                             f"weights do not fit together ({why}); {advice}.")


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
        check_pair(f"uso_lora: '{name}'", f"{kind}.{block} {op}_lora{stream or ''}", down, up,
                   "different ranks", "the file is damaged or not a USO LoRA")
        ranks.add(down.shape[0])
        targets = _targets(kind, block, op, stream)
        rows = up.shape[0] // len(targets)
        for i, module in enumerate(targets):
            parts.append(LoraPart(module, down, up[i * rows:(i + 1) * rows]))
    if len(ranks) != 1:
        raise ModelFileError(f"uso_lora: '{name}' mixes ranks {sorted(ranks)}; the file is damaged.")
    return parts, ranks.pop()


def holds_uso_lora(path: str, parts: list[LoraPart]) -> bool:
    """Whether the file at `path` is the USO LoRA whose `parts` a pipeline applies (keys all in the
    USO LoRA's layout, and its first down weight equal to the loaded one): offered again as a user
    LoRA, it would apply USO twice. Reads the header and one tensor."""
    loaded = {part.module: part for part in parts}
    try:
        source = open_weights(path)
    except ModelFileError:
        return False  # the user-LoRA reader names what is wrong with the file
    first = None
    for key in source.keys():
        m = _KEY.match(key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key)
        if not m:
            return False
        if first is None and m.group(5) == "down":
            first = key, _targets(*m.groups()[:4])[0]
    if first is None or first[1] not in loaded:
        return False
    mine = loaded[first[1]].down
    theirs = source.get(first[0])
    source.close()
    return theirs.shape == mine.shape and torch.equal(theirs.to(mine.dtype), mine)


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
    """A Linear with low-rank updates added to its output, as the reference applies them: the USO
    LoRA (`lora_down`/`lora_up`, None where USO has no part) and the user's unfused LoRAs
    (`adapters`, plain tensors swapped by `LoraState`, not parameters of the model)."""

    def __init__(self, base: nn.Module, down: torch.Tensor | None, up: torch.Tensor | None, scale: float):
        super().__init__()
        self.base = base
        self.lora_down = None if down is None else nn.Parameter(down, requires_grad=False)
        self.lora_up = None if up is None else nn.Parameter(up, requires_grad=False)
        self.scale = scale
        # (down, up, scale): the scale is a 0-dim fp32 tensor on the CPU, not a Python float, so a
        # compiled block does not guard on its value (a new strength would recompile, and after 8
        # recompiles torch.compile falls back to eager for good); a CPU scalar multiplies in fp32
        # on any device, as the float did.
        self.adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.lora_down is not None:
            delta = F.linear(F.linear(x.to(self.lora_down.dtype), self.lora_down), self.lora_up)
            delta = delta.to(out.dtype)
            out = out + (delta if self.scale == 1.0 else delta * self.scale)
        for down, up, scale in self.adapters:
            if down.device != x.device:  # a released model: correct, if slower, until placed again
                down, up = down.to(x.device), up.to(x.device)
            delta = F.linear(F.linear(x.to(down.dtype), down), up)
            out = out + (delta * scale).to(out.dtype)
        return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _base_linear(model: nn.Module, name: str) -> nn.Module:
    layer = model.get_submodule(name)
    return layer.base if isinstance(layer, LoraLinear) else layer


def apply_unfused(model: nn.Module, parts: list[LoraPart], scale: float, dtype: torch.dtype) -> None:
    for part in parts:
        parent, child = _parent(model, part.module)
        base = getattr(parent, child)
        device = next(base.parameters()).device
        setattr(parent, child, LoraLinear(base, part.down.to(device, dtype), part.up.to(device, dtype),
                                          scale * part.scale))


def apply_fused(model: nn.Module, parts: list[LoraPart], scale: float) -> None:
    modules = dict(model.named_modules())
    for part in parts:
        weight = modules[part.module].weight
        delta = part.up.to(weight.device, torch.float32) @ part.down.to(weight.device, torch.float32)
        weight.data = (weight.data.float() + (scale * part.scale) * delta).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# What is applied to one transformer
# ---------------------------------------------------------------------------------------------

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class _Fused:
    """One weight with user deltas fused in: the elements whose value would not come back by
    subtracting the delta again (rounding), kept aside exactly."""

    module: str
    index: torch.Tensor
    values: torch.Tensor


class LoraState:
    """The LoRAs applied to one transformer, kept on the transformer (`state_of`)."""

    def __init__(self):
        self.uso: tuple[str, float] | None = None       # (mode, strength) once the USO LoRA is applied
        self.user_key: tuple = ()                       # what `user` holds, to skip no-op changes
        self.user: list[tuple[LoraPart, float]] = []    # (part, strength x part scale), canonical order
        self.user_fused = False
        self._fused: list[_Fused] = []
        self._wrapped: list[str] = []                   # modules wrapped only for user adapters
        self._adapted: list[str] = []                   # modules whose `adapters` are set


def state_of(transformer: nn.Module) -> LoraState:
    state = transformer.__dict__.get("_uso_lora_state")
    if state is None:
        state = LoraState()
        transformer.__dict__["_uso_lora_state"] = state
    return state


def apply_uso(transformer: nn.Module, parts: list[LoraPart], mode: str, strength: float,
              dtype: torch.dtype) -> bool:
    """Apply the USO LoRA once. Again with the same mode and strength: nothing happens (False);
    with others: refused, since taking a fused LoRA back out is not exact."""
    from .errors import InputError

    state = state_of(transformer)
    wanted = (mode, float(strength))
    if state.uso is not None:
        if state.uso == wanted:
            return False
        raise InputError(f"lora_mode: these loaded models already carry the USO LoRA ({state.uso[0]}, strength "
                         f"{state.uso[1]}); another pipeline over them cannot use {mode} at strength "
                         f"{strength}. Load the models again for that.")
    if mode == "fused":
        apply_fused(transformer, parts, strength)
    else:
        apply_unfused(transformer, parts, strength, dtype)
    state.uso = wanted
    return True


def _combined_delta(entries: list[tuple[LoraPart, float]], device) -> torch.Tensor:
    total = None
    for part, scale in entries:  # always the same order: the same delta to add and to take out
        delta = scale * (part.up.to(device, torch.float32) @ part.down.to(device, torch.float32))
        total = delta if total is None else total + delta
    return total


def _by_module(entries: list[tuple[LoraPart, float]]) -> dict[str, list[tuple[LoraPart, float]]]:
    grouped: dict[str, list] = {}
    for part, scale in entries:
        grouped.setdefault(part.module, []).append((part, scale))
    return grouped


def set_user_loras(transformer: nn.Module, key: tuple, entries: list[tuple[LoraPart, float]], fused: bool,
                   device: torch.device, dtype: torch.dtype) -> bool:
    """Make the user LoRAs on `transformer` exactly `entries` ((part, scale) in a canonical order,
    identified by `key`). Whatever was applied before is taken out first, so the result equals
    applying `entries` to freshly loaded weights. Returns whether anything changed."""
    state = state_of(transformer)
    if state.user_key == (key, fused):
        return False
    _remove_user(transformer, state)
    if entries:
        if fused:
            _fuse_user(transformer, state, entries)
        else:
            _adapt_user(transformer, state, entries, device, dtype)
    state.user, state.user_fused, state.user_key = list(entries), fused, (key, fused)
    return True


@torch.inference_mode()  # also when the weights were placed inside inference mode
def _fuse_user(transformer: nn.Module, state: LoraState, entries) -> None:
    for module, group in _by_module(entries).items():
        weight = _base_linear(transformer, module).weight
        delta = _combined_delta(group, weight.device)
        fused = (weight.float() + delta).to(weight.dtype)
        back = (fused.float() - delta).to(weight.dtype)
        as_int = _INT_VIEW[weight.element_size()]
        lost = (back.view(as_int) != weight.view(as_int)).flatten().nonzero().squeeze(1).to(torch.int32)
        state._fused.append(_Fused(module, lost, weight.flatten()[lost].clone()))
        weight.copy_(fused)  # in place: placement keeps references to these very tensors


def _adapt_user(transformer: nn.Module, state: LoraState, entries, device, dtype) -> None:
    for module, group in _by_module(entries).items():
        parent, child = _parent(transformer, module)
        layer = getattr(parent, child)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer, None, None, 1.0)
            setattr(parent, child, layer)
            state._wrapped.append(module)
        layer.adapters = [(part.down.to(device, dtype), part.up.to(device, dtype), scale_tensor(scale))
                          for part, scale in group]
        state._adapted.append(module)


def scale_tensor(scale: float) -> torch.Tensor:
    """A LoRA scale as `LoraLinear.adapters` holds it."""
    return torch.tensor(float(scale), dtype=torch.float32)


@torch.inference_mode()
def _remove_user(transformer: nn.Module, state: LoraState) -> None:
    if state.user_fused:
        grouped = _by_module(state.user)
        for record in state._fused:
            weight = _base_linear(transformer, record.module).weight
            delta = _combined_delta(grouped[record.module], weight.device)
            back = (weight.float() - delta).to(weight.dtype)
            back.view(-1)[record.index.to(back.device, torch.long)] = record.values.to(back.device)
            weight.copy_(back)
    for module in state._adapted:
        transformer.get_submodule(module).adapters = []
    for module in state._wrapped:
        parent, child = _parent(transformer, module)
        setattr(parent, child, getattr(parent, child).base)
    state._fused, state._wrapped, state._adapted = [], [], []
    state.user, state.user_key, state.user_fused = [], (), False


def place_adapters(transformer: nn.Module, device: torch.device) -> None:
    """Move the user adapters (not parameters, so placement does not move them) to `device`."""
    for module in state_of(transformer)._adapted:
        layer = transformer.get_submodule(module)
        layer.adapters = [(d.to(device), u.to(device), s) for d, u, s in layer.adapters]
