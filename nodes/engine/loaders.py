"""Build each model on the meta device and fill it from its file with `assign=True`.

Tensors are read one at a time, converted and cast on the way, so peak RAM stays near one copy
of the weights. Every loader accepts the layouts its model is published in: BFL single files,
diffusers folders (one file or shards), ComfyUI all-in-one checkpoints, fp8 and scaled fp8, and GGUF
(transformer only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from . import architecture, convert, detect
from .errors import ModelFileError
from .gguf_files import is_quantized
from .projector import StyleProjector
from .fp8 import FP8_DTYPES, enable_fp8_storage, fp8_storable, keep_scaled_fp8, keep_stored_linears, t5_storable
from .scaled_fp8 import DequantizedSource, dequantized
from .weight_files import open_weights
from .weight_source import WeightSource

@dataclass
class Component:
    """Where one model comes from: a file (or folder) and, for all-in-one files, a key prefix."""

    path: str
    prefix: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/\\"))


# ---------------------------------------------------------------------------------------------
# Generic meta-device build + assign
# ---------------------------------------------------------------------------------------------

def _materialize(model: nn.Module, state: dict[str, torch.Tensor], what: str, name: str,
                 optional_prefixes: tuple[str, ...] = ()) -> nn.Module:
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    state = {k: v for k, v in state.items() if k in expected}
    for key, tensor in state.items():
        want = tuple(expected[key].shape)
        have = tuple(tensor.shape) if not is_quantized(tensor) else tuple(tensor.quant_shape)
        if want != have:
            raise ModelFileError(f"{what}: '{name}' has {key} of shape {list(have)} where "
                                 f"{list(want)} was expected; the file does not match its "
                                 "architecture (a different model, or a damaged file).")
    missing = [k for k in expected if k not in state and not k.startswith(optional_prefixes)]
    if missing:
        raise ModelFileError(f"{what}: '{name}' lacks {len(missing)} weights (e.g. "
                             f"{', '.join(missing[:3])}); it is incomplete or not {what}.")
    if unexpected and len(unexpected) > len(expected) // 2:
        raise ModelFileError(f"{what}: '{name}' holds many weights that {what} does not have (e.g. "
                             f"{', '.join(unexpected[:3])}); it is a different model.")
    quantized = {k: v for k, v in state.items() if is_quantized(v)}
    model.load_state_dict({k: v for k, v in state.items() if k not in quantized},
                          strict=False, assign=True)
    for key, tensor in quantized.items():
        # load_state_dict compares the packed byte shape with the logical one; set directly.
        owner_name, _, param_name = key.rpartition(".")
        setattr(model.get_submodule(owner_name), param_name, tensor)
    _fill_meta_buffers(model)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ModelFileError(f"{what}: '{name}' left {len(leftover)} weights unset "
                             f"(e.g. {leftover[0]}).")
    return model.eval().requires_grad_(False)


def _built(what: str, name: str, make) -> nn.Module:
    """The model on the meta device. Its config comes from the file (checked against the shapes in
    architecture.py); whatever the model's own constructor still refuses (diffusers and transformers
    raise many kinds of errors for a bad value) is the file's fault, said so."""
    try:
        with torch.device("meta"):
            return make()
    except Exception as exc:
        raise ModelFileError(f"{what}: '{name}' carries a `config` metadata entry its model cannot be "
                             f"built from ({type(exc).__name__}: {exc}). Re-save the file without its config "
                             "metadata, or download it again.") from exc


def _fill_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (position ids) are not in files; recreate them after assign."""
    for module_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                module.register_buffer(buf_name, torch.arange(buf.shape[-1]).expand(buf.shape),
                                       persistent=False)
            else:
                raise ModelFileError(f"internal: buffer {module_name}.{buf_name} cannot be rebuilt")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if is_quantized(tensor):
        return tensor
    if tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _source(component: Component) -> WeightSource:
    source = open_weights(component.path)
    if component.prefix:
        source = source.with_prefix(component.prefix)
    return dequantized(source)


def _strip_to_model_keys(key: str, model_keys: set[str], prefixes: tuple[str, ...]) -> str:
    """Map a file key onto the model's naming, whichever of the known prefixes either side uses."""
    if key in model_keys:
        return key
    for prefix in prefixes:
        if key.startswith(prefix) and key[len(prefix):] in model_keys:
            return key[len(prefix):]
        if prefix + key in model_keys:
            return prefix + key
    return key


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------

def transformer_component(path: str) -> tuple[Component, str]:
    """Resolve a transformer choice (file, all-in-one checkpoint, diffusers folder) and its layout."""
    if os.path.isdir(path):
        sub = os.path.join(path, "transformer")
        folder = sub if os.path.isdir(sub) else path
        return Component(folder), "diffusers"
    source = open_weights(path)
    kind = detect.require_kind(source, "transformer", ("flux_bfl", "flux_diffusers", "checkpoint_aio"))
    if kind == "checkpoint_aio":
        return Component(path, detect.AIO_TRANSFORMER_PREFIX), "bfl"
    return Component(path), "bfl" if kind == "flux_bfl" else "diffusers"


def _transformer_on_meta(path: str):
    """(component, layout, source, the FluxTransformer2DModel on the meta device, its config),
    from the file's header alone."""
    from diffusers import FluxTransformer2DModel

    component, layout = transformer_component(path)
    source = _source(component)
    if os.path.isdir(component.path):
        detect.require_kind(source, "transformer", ("flux_diffusers",))
    cfg = architecture.flux_config(source, layout, source.config("transformer"))
    model = _built("transformer", component.name, lambda: FluxTransformer2DModel(**cfg))
    return component, layout, source, model, cfg


def transformer_on_meta(path: str, compute_dtype: torch.dtype, fp8_storage: bool = False) -> nn.Module:
    """The transformer as `load_transformer` would make it, on the meta device: its bytes, without
    reading a weight (what `memory.fit` decides from). Not for GGUF files (quantised blocks)."""
    _component, _layout, source, model, _cfg = _transformer_on_meta(path)
    source.close()
    model = model.to(compute_dtype)
    if fp8_storage:
        enable_fp8_storage(model, compute_dtype)
    return model


def load_transformer(path: str, compute_dtype: torch.dtype, fp8_storage: bool = False):
    """A FluxTransformer2DModel. With fp8_storage, Linear weights are kept in float8_e4m3fn
    (fp8 files stay as they are), upcast per call to `compute_dtype` (`fp8.UpcastLinear`)."""
    component, layout, source, model, cfg = _transformer_on_meta(path)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and fp8_storable(n)}

    def target_dtype(key: str, tensor: torch.Tensor) -> torch.dtype:
        if fp8_storage and key in linear_weights:
            return tensor.dtype if tensor.dtype in FP8_DTYPES else torch.float8_e4m3fn
        return compute_dtype

    # Scaled fp8 with fp8 storage: the fp8-storable Linears keep the file's fp8 weight and its
    # scale (`fp8.keep_scaled_fp8`); dequantizing and casting back to fp8 would round twice.
    scaled = _ScaledFP8Weights(source) if fp8_storage and isinstance(source, DequantizedSource) else None
    reader = scaled if scaled is not None else source
    unknown: list[str] = []
    if layout == "bfl":
        def plan(key):
            targets = convert.flux_bfl_to_diffusers(key, hidden)
            if scaled is not None and targets:
                scaled.rename(key, [new for new, _ in targets])
            return targets
        items = convert.converted_items(reader, plan, unknown.append)
    else:
        if scaled is not None:
            for key in source.keys():
                scaled.rename(key, [key])
        items = ((k, reader.get(k)) for k in source.keys())
    state = {}
    for key, tensor in items:
        if scaled is not None and key in scaled.scales and key not in linear_weights:
            tensor = tensor.to(torch.float32) * scaled.scales.pop(key)   # kept in 16 bits: dequantize
        state[key] = _cast(tensor, target_dtype(key, tensor))
    source.close()
    if any(is_quantized(t) for t in state.values()):
        _use_gguf_linears(model, state, compute_dtype)
    model = _materialize(model, state, "transformer", component.name)
    if scaled is not None:
        for key, scale in scaled.scales.items():
            keep_scaled_fp8(model.get_submodule(key[: -len(".weight")]), scale, compute_dtype)
    return model, cfg


class _ScaledFP8Weights:
    """A scaled-fp8 source read for fp8 storage: weights with a per-tensor scale come out as the
    file stores them, and `scales` maps each (converted) model key to its scale."""

    def __init__(self, source: DequantizedSource):
        self._source = source
        self._targets: dict[str, list[str]] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def keys(self):
        return self._source.keys()

    def rename(self, key: str, model_keys: list[str]) -> None:
        self._targets[key] = model_keys

    def get(self, key: str) -> torch.Tensor:
        raw = self._source.get_scaled(key)
        if raw is None:
            return self._source.get(key)
        tensor, scale = raw
        for model_key in self._targets.get(key, [key]):
            self.scales[model_key] = scale
        return tensor


def _use_gguf_linears(model: nn.Module, state: dict, compute_dtype: torch.dtype) -> None:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and is_quantized(state.get(f"{full}.weight", torch.empty(0))):
                with torch.device("meta"):
                    replacement = GGUFLinear(child.in_features, child.out_features,
                                             child.bias is not None, compute_dtype=compute_dtype)
                replacement.requires_grad_(False)
                setattr(module, child_name, replacement)


# ---------------------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------------------

def vae_component(path: str) -> Component:
    if os.path.isdir(path):
        sub = os.path.join(path, "vae")
        return Component(sub if os.path.isdir(sub) else path)
    return Component(path)


def load_vae(component: Component, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    source = _source(component)
    kind = detect.require_kind(source, "vae", ("flux_ae_bfl", "flux_ae_diffusers"))
    layout = "bfl" if kind == "flux_ae_bfl" else "diffusers"
    cfg = architecture.vae_config(source, layout, source.config("vae"))
    model = _built("vae", component.name, lambda: AutoencoderKL(**cfg))
    if layout == "bfl":
        n_up = convert.count_vae_up_blocks(source.keys())
        items = convert.converted_items(source, lambda k: [convert.vae_bfl_to_diffusers(k, n_up)])
    else:
        items = ((k, source.get(k)) for k in source.keys())
    state = {k: _cast(t, dtype) for k, t in items}
    source.close()
    return _materialize(model, state, "vae", component.name)


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------

def _t5_on_meta(component: Component):
    """(source, the T5EncoderModel on the meta device), from the file's header alone."""
    from transformers import T5Config, T5EncoderModel

    source = _source(component)
    detect.require_kind(source, "t5", ("t5",))
    cfg = architecture.t5_config(source, source.config("t5"))
    cfg.pop("model_type", None)
    return source, _built("t5", component.name, lambda: T5EncoderModel(T5Config(**cfg)))


def t5_on_meta(component: Component, dtype: torch.dtype, linear_storage: torch.dtype | None = None) -> nn.Module:
    """T5 as `load_t5` would make it, on the meta device (its bytes, without reading a weight)."""
    source, model = _t5_on_meta(component)
    source.close()
    model = model.to(dtype)
    if linear_storage is not None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and t5_storable(name):
                module.weight.data = module.weight.data.to(linear_storage)
    return model


def load_t5(component: Component, dtype: torch.dtype, linear_storage: torch.dtype | None = None):
    """A T5EncoderModel computing in `dtype`. With `linear_storage`, the Linear weights that
    `fp8.t5_storable` allows are kept in that dtype (an fp8 file's own fp8; a scaled fp8 file's
    weights with their scales) and upcast per layer to `dtype`."""
    source, model = _t5_on_meta(component)
    model_keys = set(model.state_dict())
    storable = {f"{n}.weight" for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and t5_storable(n)} if linear_storage is not None else set()
    keep_fp8 = linear_storage in FP8_DTYPES
    scaled = _ScaledFP8Weights(source) if keep_fp8 and isinstance(source, DequantizedSource) else None
    reader = scaled if scaled is not None else source
    state = {}
    for key in source.keys():
        mapped = _strip_to_model_keys(key, model_keys, ("transformer.",))
        if scaled is not None:
            scaled.rename(key, [mapped])
        tensor = reader.get(key)
        if scaled is not None and mapped in scaled.scales and mapped not in storable:
            tensor = tensor.to(torch.float32) * scaled.scales.pop(mapped)   # kept in `dtype`: dequantize
        if mapped not in storable:
            target = dtype
        else:
            target = tensor.dtype if keep_fp8 and tensor.dtype in FP8_DTYPES else linear_storage
        state[mapped] = _cast(tensor, target)
    # shared.weight and encoder.embed_tokens.weight are one tensor; files hold either name.
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"),
                 ("encoder.embed_tokens.weight", "shared.weight")):
        if a in state and b not in state and b in model_keys:
            state[b] = state[a]
    source.close()
    model = _materialize(model, state, "t5", component.name)
    if scaled is not None:
        for key, scale in scaled.scales.items():
            keep_scaled_fp8(model.get_submodule(key[: -len(".weight")]), scale, dtype)
    if linear_storage is not None:
        keep_stored_linears(model, dtype)
    return model


def load_clip(component: Component, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    source = _source(component)
    detect.require_kind(source, "clip_l", ("clip_l",))
    cfg = architecture.clip_config(source, source.config("clip_l"))
    cfg.pop("model_type", None)
    model = _built("clip_l", component.name, lambda: CLIPTextModel(CLIPTextConfig(**cfg)))
    model_keys = set(model.state_dict())
    state = {}
    for key in source.keys():
        mapped = _strip_to_model_keys(key, model_keys, ("text_model.",))
        if mapped in model_keys:
            state[mapped] = _cast(source.get(key), dtype)
    source.close()
    return _materialize(model, state, "clip_l", component.name)


# ---------------------------------------------------------------------------------------------
# SigLIP (only the layers USO reads) and the projector
# ---------------------------------------------------------------------------------------------

def load_siglip(component: Component, dtype: torch.dtype = torch.float32):
    """SigLIP vision tower truncated after the second-to-last layer (the deepest one USO reads).

    Returns (model, full_layer_count)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    source = _source(component)
    detect.require_kind(source, "siglip", ("siglip",))
    stored = source.config("siglip")
    cfg = architecture.siglip_config(source, stored)
    full_layers = cfg["num_hidden_layers"]
    if full_layers < 20:
        raise ModelFileError(f"siglip: '{component.name}' has {full_layers} layers; USO reads layers "
                             "-20, -11 and -2 and needs the 27-layer SigLIP so400m.")
    cfg.pop("model_type", None)
    cfg.update(num_hidden_layers=full_layers - 1, vision_use_head=False)
    model = _built("siglip", component.name, lambda: SiglipVisionModel(SiglipVisionConfig(**cfg)))
    _drop_post_layernorm(model)
    model_keys = set(model.state_dict())
    state = {}
    for key in source.keys():
        if not key.startswith("vision_model."):
            continue  # HF folders also hold the text tower
        mapped = _strip_to_model_keys(key, model_keys, ("vision_model.",))
        if mapped in model_keys:
            state[mapped] = _cast(source.get(key), dtype)
    source.close()
    return _materialize(model, state, "siglip", component.name), full_layers


def _drop_post_layernorm(model: nn.Module) -> None:
    # USO uses hidden states before the final norm; the norm's output is never read.
    owner = getattr(model, "vision_model", model)
    if hasattr(owner, "post_layernorm"):
        owner.post_layernorm = nn.Identity()


def load_projector(path: str, dtype: torch.dtype) -> StyleProjector:
    source = open_weights(path)
    detect.require_kind(source, "projector", ("uso_projector",))
    if any(k.startswith("feature_embedder.") for k in source.keys()):
        source = source.with_prefix("feature_embedder.")
    cfg = architecture.projector_config(source)
    with torch.device("meta"):
        model = StyleProjector(**cfg)
    state = {k: _cast(source.get(k), dtype) for k in source.keys()}
    source.close()
    return _materialize(model, state, "projector", os.path.basename(path))
