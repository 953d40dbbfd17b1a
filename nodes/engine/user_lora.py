"""The user's own FLUX.1-dev LoRAs: read a file in any of the common layouts and turn it into
low-rank parts on diffusers module names (`lora.LoraPart`), checked against the loaded transformer.

Layouts (detected from the key names):
- kohya / sd-scripts: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`
- ComfyUI / BFL: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` (or `lora_A/B`,
  or without the prefix), `.alpha`
- xlabs: `double_blocks.0.processor.qkv_lora1.down.weight` (diffusers' own xlabs converter)
- diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (alpha from the
  keys or from the `lora_adapter_metadata` diffusers writes)

kohya and ComfyUI name BFL modules; they go through `convert.flux_bfl_to_diffusers`, the same
mapping the transformer loader uses for BFL files, which works at every width. diffusers' kohya
converter hard-codes FLUX.1-dev's 3072 width (so it cannot run on the test models); a test checks
at the real width that both give the same updates.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import convert
from .errors import ModelFileError
from .lora import LoraLinear, LoraPart, _logical_shape, check_pair
from .weight_files import open_weights

FORMATS = ("kohya", "comfyui", "xlabs", "diffusers")

_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.",
                          "text_encoders.", "te.", "te1.", "te2.")
_UNET_MARKERS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")
_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
             (".lora_B.weight", "up"), (".alpha", "alpha"))


@dataclass(frozen=True)
class UserLora:
    """One LoRA file, converted: its parts on diffusers modules and what was left out."""

    name: str                       # the file name, for messages
    identity: str                   # path, size and modification time: equal means the same file
    format: str                     # one of FORMATS
    parts: tuple[LoraPart, ...]
    ignored: tuple[str, ...] = ()   # sentences: what of the file was not applied, and why

    def warning(self) -> str | None:
        if not self.ignored:
            return None
        return f"lora: '{self.name}': " + "; ".join(self.ignored) + "."


def file_identity(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _bfl_modules(cfg: dict) -> dict[str, str]:
    """{kohya name without `lora_unet_`: BFL module name} for every Linear of a FLUX transformer."""
    names = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
             "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
             "final_layer.adaLN_modulation.1"]
    for i in range(cfg["num_layers"]):
        for stream in ("img", "txt"):
            names += [f"double_blocks.{i}.{stream}_attn.qkv", f"double_blocks.{i}.{stream}_attn.proj",
                      f"double_blocks.{i}.{stream}_mlp.0", f"double_blocks.{i}.{stream}_mlp.2",
                      f"double_blocks.{i}.{stream}_mod.lin"]
    for i in range(cfg["num_single_layers"]):
        names += [f"single_blocks.{i}.linear1", f"single_blocks.{i}.linear2", f"single_blocks.{i}.modulation.lin"]
    return {n.replace(".", "_"): n for n in names}


def _split(key: str) -> tuple[str, str] | None:
    for suffix, side in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], side
    return None


def _detect(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys):
        return "xlabs"
    if any(k.startswith(("diffusion_model.", "double_blocks.", "single_blocks.")) for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "transformer_blocks.", "single_transformer_blocks.")) for k in keys):
        return "diffusers"
    return ""


def _alpha_value(t) -> float:
    return float(t.float().item()) if torch.is_tensor(t) else float(t)


def _group(tensors: dict[str, torch.Tensor], strip: str) -> tuple[dict, list[str]]:
    """{module: {"down", "up", "alpha"}} from keys with `strip` removed; keys of another form."""
    groups: dict[str, dict] = {}
    odd = []
    for key, tensor in tensors.items():
        split = _split(key[len(strip):] if key.startswith(strip) else key)
        if split is None:
            odd.append(key)
            continue
        module, side = split
        groups.setdefault(module, {})[side] = tensor
    return groups, odd


def _pair(name: str, module: str, group: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    if "down" not in group or "up" not in group:
        raise ModelFileError(f"lora: '{name}' has only the {'down' if 'down' in group else 'up'} weight of "
                             f"{module}; the file is incomplete.")
    down, up = group["down"], group["up"]
    check_pair(f"lora: '{name}'", module, down, up,
               "a LoCon/LoHa/LoKr or damaged file", "only plain LoRAs are supported")
    scale = _alpha_value(group["alpha"]) / down.shape[0] if "alpha" in group else 1.0
    return down, up, scale


def _bfl_parts(name: str, groups: dict, to_bfl, hidden: int, unknown: list[str]) -> list[LoraPart]:
    parts = []
    for module, group in sorted(groups.items()):
        bfl = to_bfl(module)
        targets = convert.flux_bfl_to_diffusers(f"{bfl}.weight", hidden) if bfl else None
        if not targets:
            unknown.append(module)
            continue
        down, up, scale = _pair(name, module, group)
        for diffusers_key, rows in targets:
            parts.append(LoraPart(diffusers_key[: -len(".weight")], down, rows(up), scale))
    return parts


@dataclass(frozen=True)
class PeftScales:
    """The scales a PEFT LoRA config gives its modules: `lora_alpha / r`, where a module named by a
    key of `rank_pattern` / `alpha_pattern` has that key's rank / alpha instead (`alpha / sqrt(r)`
    with `use_rslora`). The first key that matches wins; a key matches a module when, read as a
    regular expression, it matches the whole module name or a part of it that starts after a dot
    (so `to_q`, `attn.to_q`, `transformer_blocks.0.attn.to_q` and `transformer_blocks\\.\\d+\\.attn\\.to_q`
    all name `transformer_blocks.0.attn.to_q`), which is how PEFT reads them."""

    r: float | None
    lora_alpha: float
    rank_pattern: tuple[tuple[str, float], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    rslora: bool = False

    def scale(self, module: str, rank: int, file_name: str) -> float:
        r = _first_match(self.rank_pattern, module, self.r if self.r is not None else rank)
        alpha = _first_match(self.alpha_pattern, module, self.lora_alpha)
        if r != rank:
            raise ModelFileError(f"lora: '{file_name}': its lora_adapter_metadata gives {module} rank {r:g}, but "
                                 f"its weights have rank {rank}; the metadata does not belong to these weights.")
        return alpha / (rank ** 0.5 if self.rslora else rank)


def _first_match(pattern: tuple[tuple[str, float], ...], module: str, default: float) -> float:
    for key, value in pattern:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


#: PEFT's LoraConfig defaults, which diffusers' loader gets for what the metadata leaves out.
_PEFT_DEFAULT_ALPHA = 8


def peft_scales(name: str, metadata: dict) -> PeftScales | None:
    """The PEFT config in the `lora_adapter_metadata` diffusers writes: keyed `transformer.<field>`
    by `save_lora_weights`, or `<field>` by a model's `save_lora_adapter`. None where the file
    carries no such config; a config that cannot be read is refused naming the field."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None

    def refuse(what: str) -> ModelFileError:
        return ModelFileError(f"lora: '{name}': its lora_adapter_metadata {what}; the file's metadata is "
                              "damaged. Re-save the LoRA, or remove that metadata entry.")

    try:
        meta = json.loads(raw)
        if isinstance(meta, str):  # written JSON-encoded twice by some tools
            meta = json.loads(meta)
    except (ValueError, RecursionError):
        raise refuse("is not JSON") from None
    if not isinstance(meta, dict):
        raise refuse(f"is JSON {type(meta).__name__}, not an object")
    prefixed = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    config = prefixed or meta
    if not any(k in config for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")):
        return None

    def number(field: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise refuse(f"gives {field} = {json.dumps(value)[:60]}, not a positive number")
        return float(value)

    def pattern(field: str) -> tuple[tuple[str, float], ...]:
        value = config.get(field) or {}
        if not isinstance(value, dict):
            raise refuse(f"gives {field} as {type(value).__name__}, not an object of module name: number")
        for key in value:
            try:
                re.compile(key)
            except re.error as exc:
                raise refuse(f"has the {field} key '{key}', which is not a regular expression ({exc})") from None
        return tuple((key, number(f"{field}['{key}']", v)) for key, v in value.items())

    r = number("r", config["r"]) if config.get("r") is not None else None
    alpha = number("lora_alpha", config["lora_alpha"]) if config.get("lora_alpha") is not None else \
        _PEFT_DEFAULT_ALPHA
    return PeftScales(r, alpha, pattern("rank_pattern"), pattern("alpha_pattern"), config.get("use_rslora") is True)


def read_user_lora(path: str, transformer: nn.Module, transformer_config: dict) -> UserLora:
    """The LoRA in `path` as parts on `transformer`'s modules. Text-encoder parts and parts the
    pack cannot apply are left out and listed in `ignored`; a LoRA for another model is refused."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"lora: '{path}' does not exist; pick a file from ComfyUI's loras folder.")
    source = open_weights(path)
    keys = source.keys()
    if not keys:
        raise ModelFileError(f"lora: '{name}' holds no tensors.")
    text_keys = [k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES)]
    dit_keys = [k for k in keys if k not in set(text_keys)]
    if any(m in k for k in dit_keys for m in _UNET_MARKERS):
        raise ModelFileError(f"lora: '{name}' is a LoRA for a Stable Diffusion (UNet) model such as SDXL "
                             f"(keys like '{next(k for k in dit_keys if any(m in k for m in _UNET_MARKERS))}'), "
                             "not FLUX.1-dev; pick a FLUX.1-dev LoRA.")
    fmt = _detect(dit_keys)
    if not fmt:
        what = "only text-encoder parts" if text_keys else f"keys like '{sorted(keys)[0]}'"
        raise ModelFileError(f"lora: '{name}' has {what}, no FLUX transformer LoRA USO can apply; pick a "
                             "FLUX.1-dev LoRA (kohya, ComfyUI, xlabs or diffusers layout).")
    tensors = {k: source.get(k) for k in dit_keys}
    source.close()
    ignored = []
    if text_keys:
        ignored.append(f"its {len(text_keys)} text-encoder tensors were ignored (USO encodes the prompt "
                       "with the loaded T5 and CLIP-L, which this LoRA does not change)")
    hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    unknown: list[str] = []
    odd: list[str] = []
    if fmt == "kohya":
        known = _bfl_modules(transformer_config)
        groups, odd = _group(tensors, "")
        parts = _bfl_parts(name, groups, lambda m: known.get(m[len("lora_unet_"):]) if m.startswith("lora_unet_")
                           else None, hidden, unknown)
    elif fmt == "comfyui":
        groups, odd = _group(tensors, "diffusion_model.")
        parts = _bfl_parts(name, groups, lambda m: m, hidden, unknown)
    elif fmt == "xlabs":
        from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

        try:
            converted = _convert_xlabs_flux_lora_to_diffusers(dict(tensors))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelFileError(f"lora: '{name}' looks like an xlabs LoRA but diffusers cannot convert it "
                                 f"({exc}); the file is damaged or of another kind.") from None
        groups, odd = _group(converted, "transformer.")
        parts = _diffusers_parts(name, groups, None)
    else:
        groups, odd = _group({k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
                              for k, v in tensors.items()}, "transformer.")
        parts = _diffusers_parts(name, groups, peft_scales(name, source.metadata))
    if unknown:
        ignored.append(f"{len(unknown)} parts on modules FLUX.1-dev does not have were ignored "
                       f"(e.g. {', '.join(unknown[:3])})")
    if odd:
        ignored.append(f"{len(odd)} tensors that are not LoRA weights were ignored (e.g. {', '.join(odd[:3])}: "
                       "norm/bias differences, DoRA scales)")
    if not parts:
        raise ModelFileError(f"lora: '{name}' has no part USO can apply to the FLUX transformer"
                             f"{' (' + '; '.join(ignored) + ')' if ignored else ''}; pick a FLUX.1-dev LoRA.")
    _check_fits(name, parts, transformer)
    return UserLora(name, file_identity(path), fmt, tuple(parts), tuple(ignored))


def _diffusers_parts(name: str, groups: dict, scales: PeftScales | None) -> list[LoraPart]:
    """Parts with an `.alpha` key keep it; the others take the file's PEFT config (per module), or
    1.0 without one (diffusers' convention: alpha equals the rank)."""
    parts = []
    for module, group in sorted(groups.items()):
        down, up, scale = _pair(name, module, group)
        if "alpha" not in group and isinstance(scales, PeftScales):
            scale = scales.scale(module, down.shape[0], name)
        parts.append(LoraPart(module, down, up, scale))
    return parts


def _check_fits(name: str, parts: list[LoraPart], transformer: nn.Module) -> None:
    modules = dict(transformer.named_modules())
    for part in parts:
        layer = modules.get(part.module)
        if isinstance(layer, LoraLinear):
            layer = layer.base
        if layer is None or not hasattr(layer, "weight"):
            raise ModelFileError(f"lora: '{name}' targets {part.module}, which this FLUX transformer lacks; "
                                 "the LoRA is for another model. Pick a FLUX.1-dev LoRA.")
        out_f, in_f = _logical_shape(layer.weight)
        if part.up.shape[0] != out_f or part.down.shape[1] != in_f:
            raise ModelFileError(
                f"lora: '{name}' does not fit this transformer ({part.module} is {in_f}->{out_f}, the LoRA "
                f"is {part.down.shape[1]}->{part.up.shape[0]}); it is for a model of another width (not "
                "FLUX.1-dev, e.g. FLUX.1-schnell-lite or FLUX.2). Pick a FLUX.1-dev LoRA.")


_STRENGTH = re.compile(r"^(.*?)(?::(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?$")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` (the command line's --lora and the manifest's `loras` column) -> (file,
    strength); strength 1.0 when left out. A Windows drive letter (C:\\...) is not a strength."""
    text = str(spec).strip()
    m = _STRENGTH.match(text)
    path, strength = (m.group(1), m.group(2)) if m else (text, None)
    if not path:
        raise ValueError(f"lora: '{spec}' names no file; write FILE or FILE:STRENGTH (e.g. style.safetensors:0.8).")
    return path, 1.0 if strength is None else float(strength)
