"""Load the whole USO model set from files: which file feeds which model, and the checks that
the pieces belong together (widths of T5/CLIP/projector against the transformer)."""
from __future__ import annotations

import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import detect, loaders, lora, tokenizers
from .detect import AIO_PREFIXES, EXPECTED, has_prefix
from .errors import ModelFileError
from .loaders import Component
from .fp8 import FP8_DTYPES
from .memory import DeviceFacts, FileStorage, HostMemory, ModelSizes, ModuleSize, Precision, fit, pinned_block_bytes
from .scaled_fp8 import is_scaled_fp8
from .weight_files import open_weights


@dataclass(frozen=True)
class ModelFiles:
    """Paths of the weights. vae / t5 / clip_l may be None when the transformer is a ComfyUI
    all-in-one checkpoint or a diffusers FLUX folder that contains them."""

    transformer: str
    siglip: str
    uso_lora: str
    projector: str
    vae: str | None = None
    t5: str | None = None
    clip_l: str | None = None
    tokenizer_dir: str | None = None


@dataclass
class LoadedModels:
    """Every model USO needs, loaded but not yet placed on a device; the LoRA not yet applied."""

    transformer: nn.Module
    transformer_config: dict
    vae: nn.Module
    t5: nn.Module
    clip: nn.Module
    t5_tokenizer: object
    clip_tokenizer: object
    siglip: nn.Module
    siglip_layers: int                 # layer count of the full SigLIP (the loaded one is shorter)
    projector: nn.Module
    lora_parts: list = field(default_factory=list)
    lora_rank: int = 0
    lora_name: str = "uso_lora"
    style_owner: str = ""              # encodings from models with equal owners are interchangeable
    subject_owner: str = ""
    file_names: dict = field(default_factory=dict)  # slot -> file name, for messages
    precision: Precision | None = None  # what the files were loaded in (None: built, not loaded)

    def _file(self, slot: str) -> str:
        name = self.file_names.get(slot)
        return f"'{name}'" if name else f"the {slot} file"

    @property
    def hidden_size(self) -> int:
        return self.transformer_config["num_attention_heads"] * self.transformer_config["attention_head_dim"]

    def check_consistency(self) -> None:
        cfg = self.transformer_config
        t5_width = self.t5.config.d_model
        if t5_width != cfg["joint_attention_dim"]:
            raise ModelFileError(f"t5: {self._file('t5')} outputs {t5_width}-wide tokens but the transformer "
                                 f"{self._file('transformer')} expects {cfg['joint_attention_dim']}; pick "
                                 f"{EXPECTED['t5']} (the one that goes with FLUX.1-dev).")
        clip_width = self.clip.config.hidden_size
        if clip_width != cfg["pooled_projection_dim"]:
            raise ModelFileError(f"clip_l: {self._file('clip_l')} outputs {clip_width} values but the "
                                 f"transformer {self._file('transformer')} expects "
                                 f"{cfg['pooled_projection_dim']}; pick {EXPECTED['clip_l']}.")
        proj = self.projector
        siglip_tokens = proj.high_embedding_linear[0].in_features
        siglip_dim = proj.high_layer_norm.normalized_shape[0]
        scfg = self.siglip.config
        grid = (scfg.image_size // scfg.patch_size) ** 2
        if (siglip_tokens, siglip_dim) != (grid, scfg.hidden_size):
            raise ModelFileError(
                f"projector: {self._file('projector')} expects SigLIP features of {siglip_tokens} tokens x "
                f"{siglip_dim}, but the SigLIP model {self._file('siglip')} gives {grid} x "
                f"{scfg.hidden_size}; pick {EXPECTED['siglip']} and {EXPECTED['projector']}.")
        if proj.high_projection.out_features != self.hidden_size:
            raise ModelFileError(
                f"projector: {self._file('projector')} makes {proj.high_projection.out_features}-wide "
                f"tokens but the transformer {self._file('transformer')} is {self.hidden_size} wide; the "
                f"projector belongs to another model. Pick {EXPECTED['projector']}.")
        for slot, tokenizer, encoder in (("t5", self.t5_tokenizer, self.t5), ("clip_l", self.clip_tokenizer, self.clip)):
            # A tokenizer from another model makes token ids the encoder has no embedding for.
            vocab = encoder.get_input_embeddings().num_embeddings
            if len(tokenizer) > vocab:
                raise ModelFileError(
                    f"{slot}: its tokenizer knows {len(tokenizer)} tokens but the encoder "
                    f"{self._file(slot)} has embeddings for {vocab}; the tokenizer belongs to another "
                    "model. Use the tokenizer that ships with the encoder (unset USO_TOKENIZER_DIR or "
                    "point it at the right files).")
        lora.check_fits(self.lora_parts, self.transformer, self.lora_name)


def _component(slot: str, explicit: str | None, transformer_path: str, is_aio: bool,
               is_diffusers_folder: bool, diffusers_sub: str) -> Component:
    if explicit:
        if slot == "vae":
            return loaders.vae_component(explicit)
        sub = os.path.join(explicit, diffusers_sub)
        return Component(sub if os.path.isdir(sub) else explicit)
    if is_diffusers_folder:
        return Component(os.path.join(transformer_path, diffusers_sub))
    if is_aio:
        if not has_prefix(open_weights(transformer_path), AIO_PREFIXES[slot]):
            raise ModelFileError(f"{slot}: '{os.path.basename(transformer_path)}' does not contain a "
                                 f"{slot} ('from checkpoint' needs it); pick a separate {slot} file.")
        return Component(transformer_path, AIO_PREFIXES[slot])
    raise ModelFileError(f"{slot}: no file chosen. 'from checkpoint' only works when the transformer "
                         f"is an all-in-one checkpoint or a diffusers folder; pick a {slot} file.")


@contextmanager
def _slot(slot: str):
    """A file error while loading one slot starts with the slot's name: the input to change."""
    try:
        yield
    except ModelFileError as exc:
        if str(exc).startswith(f"{slot}:"):
            raise
        raise type(exc)(f"{slot}: {exc}") from exc


#: What each file slot's loader accepts (detect.classify kinds).
_ACCEPTED = {"vae": ("flux_ae_bfl", "flux_ae_diffusers"), "t5": ("t5",), "clip_l": ("clip_l",),
             "siglip": ("siglip",), "uso_lora": ("uso_lora",), "projector": ("uso_projector",)}


def check_files(files: ModelFiles) -> None:
    """Read only the headers of every chosen file: a missing, truncated or wrong file fails here in
    well under a second, before anything is loaded (or an already loaded model is given up)."""
    path = files.transformer
    with _slot("transformer"):
        component, _layout = loaders.transformer_component(path)
    in_folder, is_aio = os.path.isdir(path), bool(component.prefix)
    for slot, explicit, sub in (("vae", files.vae, "vae"), ("t5", files.t5, "text_encoder_2"),
                                ("clip_l", files.clip_l, "text_encoder")):
        with _slot(slot):
            source = loaders._source(_component(slot, explicit, path, is_aio, in_folder, sub))
            detect.require_kind(source, slot, _ACCEPTED[slot])
    with _slot("siglip"):
        source = loaders._source(Component(files.siglip))
        detect.require_kind(source, "siglip", _ACCEPTED["siglip"])
    for slot, file in (("uso_lora", files.uso_lora), ("projector", files.projector)):
        with _slot(slot):
            detect.require_kind(open_weights(file), slot, _ACCEPTED[slot])


def _stored(component: Component) -> str:
    """What a file stores (`memory.FileStorage`), from its header: the dtype holding most of its
    matrix elements, "scaled_fp8" for ComfyUI's scaled fp8, "gguf" for quantised GGUF."""
    source = open_weights(component.path)
    if component.prefix:
        source = source.with_prefix(component.prefix)
    if is_scaled_fp8(source):
        return "scaled_fp8"
    elements: Counter = Counter()
    for info in source.infos.values():
        if len(info.shape) == 2:
            elements[info.dtype] += info.shape[0] * info.shape[1]
    dtype = elements.most_common(1)[0][0] if elements else torch.bfloat16
    if isinstance(dtype, str):
        return "gguf"
    if dtype in FP8_DTYPES:
        return "fp8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def file_storage(files: ModelFiles) -> FileStorage:
    """What the transformer and T5 files store, read from their headers before loading: the
    precision `auto` picks follows it (fp8 files stay fp8)."""
    path = files.transformer
    with _slot("transformer"):
        component, _layout = loaders.transformer_component(path)
        transformer = _stored(component)
    with _slot("t5"):
        t5 = _stored(_component("t5", files.t5, path, bool(component.prefix), os.path.isdir(path),
                                "text_encoder_2"))
    return FileStorage(transformer, t5)


def _header_size(component: Component, dtype: torch.dtype, only: str = "") -> ModuleSize:
    """A model's bytes once loaded in `dtype`, from its file's header (no weight read): every
    floating tensor cast to `dtype`, each pinned block rounded as the allocator rounds it, and the
    two largest tensors as what streams at once (leaf-level groups are a layer's few tensors).
    `only`: the key prefix the loader keeps (SigLIP's vision tower), if any."""
    source = open_weights(component.path)
    if component.prefix:
        source = source.with_prefix(component.prefix)
    sizes = []
    for key, info in source.infos.items():
        if not key.startswith(only):
            continue
        numel = 1
        for n in info.shape:
            numel *= n
        own = info.dtype if isinstance(info.dtype, torch.dtype) else torch.uint8
        sizes.append(numel * (dtype.itemsize if own.is_floating_point else own.itemsize))
    return ModuleSize(sum(sizes), sum(pinned_block_bytes(n) for n in sizes), sum(sorted(sizes)[-2:]))


_BLOCK = re.compile(r"(?:^|\.)(?:double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _gguf_size(component: Component) -> ModuleSize:
    """A GGUF transformer's bytes: its file (the quantised blocks load as they are stored); two
    blocks' share of it stream at once."""
    size = os.path.getsize(component.path)
    blocks = {m.group(0) for key in open_weights(component.path).keys() if (m := _BLOCK.search(key))}
    return ModuleSize(size, pinned_block_bytes(size), 2 * size // max(1, len(blocks)))


def planned_sizes(files: ModelFiles, precision: Precision, stored: FileStorage) -> ModelSizes:
    """The model set's bytes once loaded in `precision`, counted before any weight is read: the
    transformer and T5 built on the meta device from their headers as the loaders build them,
    the other models from their headers (`_header_size`), the USO LoRA unfused in the compute
    dtype on fp8 or GGUF weights (fused, it adds nothing)."""
    path = files.transformer
    with _slot("transformer"):
        component, _layout = loaders.transformer_component(path)
        gguf = stored.transformer == "gguf"
        if gguf:
            transformer = _gguf_size(component)
        else:
            transformer = ModuleSize.of(loaders.transformer_on_meta(path, precision.compute, precision.fp8_storage),
                                        "block_level")
    in_folder, is_aio = os.path.isdir(path), bool(component.prefix)
    quantized = gguf or precision.fp8_storage
    if quantized:
        with _slot("uso_lora"):
            adapter = _header_size(Component(files.uso_lora), precision.compute)
        transformer = ModuleSize(transformer.weights + adapter.weights, transformer.pinned + adapter.pinned,
                                 transformer.streamed)
    with _slot("t5"):
        t5 = ModuleSize.of(loaders.t5_on_meta(_component("t5", files.t5, path, is_aio, in_folder, "text_encoder_2"),
                                              precision.text, precision.t5_storage))
    with _slot("vae"):
        vae = _header_size(_component("vae", files.vae, path, is_aio, in_folder, "vae"), precision.vae)
    with _slot("clip_l"):
        clip = _header_size(_component("clip_l", files.clip_l, path, is_aio, in_folder, "text_encoder"),
                            precision.text)
    with _slot("siglip"):
        siglip = _header_size(Component(files.siglip), precision.vision, "vision_model.")
    with _slot("projector"):
        projector = _header_size(Component(files.projector), precision.compute)
    return ModelSizes(transformer, vae, (t5, clip, siglip, projector), quantized)


def fitted_precision(files: ModelFiles, asked: str, device: torch.device, free_bytes: int,
                     host: HostMemory | None, encoders: str = "auto", native: bool | None = None,
                     facts: DeviceFacts | None = None) -> fit.Fit:
    """The precision to load `files` in on `device` (`resolve_precision` from what the files
    store; under `auto`, 16-bit weights stored as fp8 where they would fit nowhere otherwise:
    `memory.fit`), decided from the headers before any weight is read. `free_bytes`: the device's
    free memory; `host`: the host RAM now, before loading; `native`, `facts`: as `resolve_precision`."""
    from .memory import resolve_precision

    stored = file_storage(files)
    precision = resolve_precision(asked, device, stored, native, facts)
    return fit.fit_precision(asked, device, precision, lambda p: planned_sizes(files, p, stored), free_bytes, host,
                             encoders, stored.transformer, facts)


def load_models(files: ModelFiles, precision: Precision, comfy_tokenizer_dirs: dict | None = None,
                on_step: Callable[[str], None] | None = None) -> LoadedModels:
    step = on_step or (lambda _what: None)
    path = files.transformer
    with _slot("transformer"):
        component, _layout = loaders.transformer_component(path)
    in_folder, is_aio = os.path.isdir(path), bool(component.prefix)

    step("transformer")
    with _slot("transformer"):
        transformer, cfg = loaders.load_transformer(path, precision.compute, precision.fp8_storage)
    step("uso_lora")
    with _slot("uso_lora"):
        parts, rank = lora.load_uso_lora(files.uso_lora)
    step("vae")
    with _slot("vae"):
        vae = loaders.load_vae(_component("vae", files.vae, path, is_aio, in_folder, "vae"), precision.vae)
    step("t5")
    with _slot("t5"):
        t5 = loaders.load_t5(_component("t5", files.t5, path, is_aio, in_folder, "text_encoder_2"),
                             precision.text, precision.t5_storage)
    step("clip_l")
    with _slot("clip_l"):
        clip = loaders.load_clip(_component("clip_l", files.clip_l, path, is_aio, in_folder, "text_encoder"),
                                 precision.text)
    step("tokenizers")
    diffusers_root = path if in_folder else None
    dirs = comfy_tokenizer_dirs or {}
    t5_tok = tokenizers.load_tokenizer("t5", tokenizers.tokenizer_roots(files.tokenizer_dir, diffusers_root, dirs, "t5"))
    clip_tok = tokenizers.load_tokenizer("clip_l", tokenizers.tokenizer_roots(files.tokenizer_dir, diffusers_root,
                                                                              dirs, "clip_l"))
    step("siglip")
    with _slot("siglip"):
        siglip, siglip_layers = loaders.load_siglip(Component(files.siglip), precision.vision)
    step("projector")
    with _slot("projector"):
        projector = loaders.load_projector(files.projector, precision.compute)
    names = {"transformer": path, "vae": files.vae or path, "t5": files.t5 or path,
             "clip_l": files.clip_l or path, "siglip": files.siglip, "projector": files.projector}
    models = LoadedModels(
        transformer=transformer, transformer_config=cfg, vae=vae, t5=t5, clip=clip,
        t5_tokenizer=t5_tok, clip_tokenizer=clip_tok, siglip=siglip, siglip_layers=siglip_layers,
        projector=projector, lora_parts=parts, lora_rank=rank, lora_name=os.path.basename(files.uso_lora),
        style_owner=f"{os.path.realpath(files.siglip)}|{os.path.realpath(files.projector)}|{precision.compute}",
        subject_owner=f"{os.path.realpath(files.vae or path)}|{precision.vae}",
        file_names={slot: os.path.basename(p.rstrip("/\\")) for slot, p in names.items()},
        precision=precision)
    models.check_consistency()
    return models
