"""Tiny random-weight USO / FLUX stand-ins, written in the real file layouts.

Every test of the pack uses this factory (through the ``tiny_models`` fixture of
``tests/conftest.py``); other test-side code calls :func:`build_tiny_models` directly. (The
command line's ``--tiny`` mode does not use it: it builds its models with
``nodes.engine.random_models``.)

It is deliberately an *independent writer* of the file layouts the loaders accept (BFL single
file, diffusers folders and shards, ComfyUI all-in-one checkpoint, fp8, scaled fp8, GGUF, and the
text/vision encoders' own layouts): it imports nothing from the pack (``nodes/...``) and carries its
own small diffusers -> BFL / LDM key converters (generic in sizes, unlike diffusers' own converters
which hard-code FLUX's 3072 width).  A loader bug in the pack therefore shows up as a mismatch
against the in-memory truth kept here.

Runtime dependencies: torch, diffusers, transformers, safetensors, tokenizers, numpy, pillow.
``gguf`` is imported only by the GGUF writer; without it the GGUF file is skipped and
``TinyModels.skipped`` says why.

Public API
----------
``build_tiny_models(root) -> TinyModels``
``TinyModels`` (frozen dataclass; see its docstring for the fields and ``paths`` keys)
``make_image(w, h, seed=0) -> PIL.Image`` (also ``TinyModels.make_image``)
``diffusers_to_bfl_flux(state)`` / ``diffusers_to_ldm_vae(state)``: the inverse converters
``full_size_bfl_state_on_meta()`` / ``full_size_state_on_meta(kind)``: official shapes, meta device
``TINY_*`` / ``FULL_*`` dicts: the constructor arguments used
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import save_file

__all__ = [
    "TinyModels",
    "build_tiny_models",
    "make_image",
    "diffusers_to_bfl_flux",
    "diffusers_to_ldm_vae",
    "full_size_bfl_state_on_meta",
    "full_size_state_on_meta",
    "TINY_FLUX",
    "TINY_VAE",
    "TINY_T5_DIMS",
    "TINY_CLIP_DIMS",
    "TINY_SIGLIP",
    "TINY_SIGLIP_TEXT",
    "TINY_PROJECTOR",
    "TINY_LORA_RANK",
    "FULL_FLUX",
    "FULL_VAE",
    "FULL_T5",
    "FULL_CLIP_L",
    "FULL_SIGLIP",
    "FULL_PROJECTOR",
    "FULL_LORA_RANK",
    "SEED",
]

SEED = 20250823
F8 = torch.float8_e4m3fn
F8_MAX = 448.0

# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------

TINY_FLUX: Dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    mid_block_add_attention=True, force_upcast=True,
)
TINY_T5_DIMS: Dict[str, Any] = dict(
    d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)
TINY_CLIP_DIMS: Dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32,
)
TINY_SIGLIP: Dict[str, Any] = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
    image_size=56, patch_size=14,
)
TINY_SIGLIP_TEXT: Dict[str, Any] = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=16, projection_size=16, pad_token_id=1, bos_token_id=None,
    eos_token_id=1,
)
TINY_PROJECTOR: Dict[str, Any] = dict(siglip_tokens=16, style_tokens=8, siglip_dim=16, hidden_size=64)
TINY_LORA_RANK = 4

FULL_FLUX: Dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FULL_VAE: Dict[str, Any] = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
    norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
    shift_factor=0.1159, mid_block_add_attention=True, force_upcast=True, sample_size=1024,
)
FULL_T5: Dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, decoder_start_token_id=0,
    pad_token_id=0, eos_token_id=1,
)
FULL_CLIP_L: Dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
FULL_SIGLIP: Dict[str, Any] = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)
FULL_PROJECTOR: Dict[str, Any] = dict(siglip_tokens=729, style_tokens=64, siglip_dim=1152, hidden_size=3072)
FULL_LORA_RANK = 128

# Words of the tiny WordLevel vocabularies (both tokenizers lowercase their input).
_WORDS = (
    "a an the of and in on with at by for to from is are this that photo photograph picture image "
    "painting drawing sketch portrait landscape style styled cat dog bird man woman girl boy person "
    "people face tree forest house city street mountain river sea lake sky sun moon cloud flower "
    "car red green blue yellow orange purple black white gray bright dark soft sharp watercolor oil "
    "ink pencil pixel art anime cartoon realistic vintage modern abstract minimal detailed "
    "background foreground light shadow night day , . ! ? -"
).split()


# --------------------------------------------------------------------------------------------
# The result object
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False)
class TinyModels:
    """What :func:`build_tiny_models` wrote, plus the in-memory truth to compare loaders against.

    Truth tensors are **float32 CPU tensors whose values are exactly representable in bf16 and in
    fp16** (weights are drawn in fp32, rounded to bf16, and magnitudes below 2**-14 are pushed to
    +-2**-14 so fp16 holds them exactly too).  Hence every fp32 / bf16 / fp16 file holds exactly
    these values; fp8 files hold ``truth.to(torch.float8_e4m3fn)``; scaled-fp8 and GGUF files hold
    approximations (see the tests for the tolerances).

    Truth key conventions (the names used *in files*, independent of the library version):

    * ``transformer_state``: diffusers ``FluxTransformer2DModel`` keys; ``flux_bfl_state`` the same
      values under BFL keys (``diffusers_to_bfl_flux``), as in ``flux1-dev.safetensors``.
    * ``vae_state``: diffusers ``AutoencoderKL`` keys; ``ae_state`` the same values under BFL/LDM
      AE keys (``diffusers_to_ldm_vae``), as in ``ae.safetensors``.
    * ``t5_state``: HF ``T5EncoderModel`` file keys (``shared.weight``, ``encoder.*``; the tied
      ``encoder.embed_tokens.weight`` is NOT written, as ``save_pretrained`` does).
    * ``clip_state``: HF ``CLIPTextModel`` file keys ``text_model.*``.  ``clip_extra_state``: the
      ``text_projection.weight`` / ``logit_scale`` that ``clip_l.safetensors`` also carries.
    * ``siglip_state``: HF ``SiglipVisionModel`` file keys ``vision_model.*`` (head included).
      NB transformers 5.x in-memory modules have NO ``text_model.`` / ``vision_model.`` level
      (``CLIPTextModel().state_dict()`` gives ``embeddings.*``); 4.x modules do.  Files use the
      prefixed names; ``from_pretrained`` accepts them in both versions.
    * ``projector_state``: the 18 ``feature_embedder.*`` keys.  ``lora_state``: the original USO
      keys (``double_blocks.N.processor.qkv_lora1.down.weight`` ...), rank 4.

    Configs are plain JSON-able dicts, equal to the ``config`` metadata of the files:
    ``flux_config`` / ``vae_config`` (diffusers config, no ``_`` keys), ``t5_config`` /
    ``clip_config`` / ``siglip_config`` (``PretrainedConfig.to_dict()``; siglip = the vision
    config), ``projector_config``, ``lora_config``.

    ``paths`` keys: flux_bfl, flux_fp8, flux_fp8_scaled, flux_fp8_comfyquant, flux_gguf (absent if
    gguf is missing; see ``skipped``), checkpoint_aio, diffusers_dir, ae, t5_fp16, t5_fp8,
    t5_fp8_scaled, clip_l, siglip_file, siglip_dir, lora_comfy, lora_original, projector_comfy,
    projector_original, tokenizer_clip, tokenizer_t5.
    """

    root: Path
    models_dir: Path
    paths: Dict[str, Path]
    transformer_state: Dict[str, torch.Tensor]
    flux_bfl_state: Dict[str, torch.Tensor]
    vae_state: Dict[str, torch.Tensor]
    ae_state: Dict[str, torch.Tensor]
    t5_state: Dict[str, torch.Tensor]
    clip_state: Dict[str, torch.Tensor]
    clip_extra_state: Dict[str, torch.Tensor]
    siglip_state: Dict[str, torch.Tensor]
    projector_state: Dict[str, torch.Tensor]
    lora_state: Dict[str, torch.Tensor]
    flux_config: Dict[str, Any]
    vae_config: Dict[str, Any]
    t5_config: Dict[str, Any]
    clip_config: Dict[str, Any]
    siglip_config: Dict[str, Any]
    projector_config: Dict[str, Any]
    lora_config: Dict[str, Any]
    build_seconds: float = 0.0
    skipped: Dict[str, str] = field(default_factory=dict)
    #: The user LoRAs (``paths["user_lora_<format>"]``), per format: {"space": "bfl" | "diffusers",
    #: "parts": {module: (down, up, scale)}} -- what a hand merge adds, W[module] += scale * up @ down
    #: (BFL module names for kohya / comfyui / xlabs, diffusers names for diffusers).
    user_loras: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __repr__(self) -> str:  # the default one would print every tensor
        return (f"TinyModels(root={str(self.root)!r}, files={len(self.paths)}, "
                f"build_seconds={self.build_seconds:.2f}, skipped={sorted(self.skipped)})")

    @staticmethod
    def make_image(w: int, h: int, seed: int = 0):
        """Deterministic structured RGB test image (see module-level :func:`make_image`)."""
        return make_image(w, h, seed)


# --------------------------------------------------------------------------------------------
# Deterministic weights
# --------------------------------------------------------------------------------------------

def _snap(t: torch.Tensor) -> torch.Tensor:
    """Round to values exactly representable in bf16 *and* fp16 (float32 result)."""
    t = t.to(torch.bfloat16).float()
    tiny = t.abs() < 2.0 ** -14
    return torch.where(tiny, torch.where(t < 0, -(2.0 ** -14), 2.0 ** -14), t)


_EMBEDDING_SUFFIXES = (
    "token_embedding.weight", "position_embedding.weight", "shared.weight",
    "embed_tokens.weight", "relative_attention_bias.weight",
)


def _value(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """A deterministic, reasonably scaled value for the parameter ``name``."""
    shape = tuple(shape)
    randn = lambda: torch.randn(shape, generator=gen, dtype=torch.float32)  # noqa: E731
    last = name.rsplit(".", 1)[-1]
    if name.endswith("logit_scale"):
        return torch.full(shape, math.log(1 / 0.07))
    if name.endswith("logit_bias"):
        return torch.full(shape, -10.0)
    if name.endswith(_EMBEDDING_SUFFIXES) or last == "probe":
        return 0.5 * randn()
    if len(shape) == 1 and (last in ("weight", "scale")) and "norm" in name:
        return 1.0 + 0.1 * randn()  # RMSNorm / LayerNorm / GroupNorm gains ~1, not exactly 1
    if last in ("bias", "in_proj_bias") or len(shape) == 1:
        return 0.05 * randn()  # nonzero biases
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return min(0.1, 1.0 / math.sqrt(fan_in)) * randn()


def _gen(component: str) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + zlib.crc32(component.encode()))


@torch.no_grad()
def _fill(module: torch.nn.Module, component: str) -> None:
    """Overwrite every parameter of ``module`` deterministically (sorted names, own generator).
    (None of the tiny models has persistent buffers; tied parameters are visited once.)"""
    gen = _gen(component)
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        p.copy_(_snap(_value(name, p.shape, gen)))


def _prefixed(sd: Mapping[str, torch.Tensor], prefix: str, keep: Callable[[str], bool] = lambda k: True):
    """File-format keys: add ``prefix`` unless the (transformers 4.x) module already has it."""
    out = {}
    for k, v in sd.items():
        if not keep(k):
            continue
        out[k if k.startswith(prefix) else prefix + k] = v.detach().clone().float().contiguous()
    return out


def _plain_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """diffusers FrozenDict -> JSON-able dict without private keys (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}))


def _hf_config(cfg) -> Dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


# --------------------------------------------------------------------------------------------
# diffusers -> BFL (FLUX DiT) and diffusers -> LDM (FLUX AE) key converters, generic in sizes
# --------------------------------------------------------------------------------------------

def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl_flux(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """diffusers ``FluxTransformer2DModel`` state dict -> BFL single-file keys (any width/depth).

    Works on meta tensors.  q/k/v are concatenated along rows; single blocks' ``linear1`` is
    ``cat(q, k, v, proj_mlp)``; ``norm_out.linear`` (scale, shift) becomes
    ``final_layer.adaLN_modulation.1`` (shift, scale).
    """
    out: Dict[str, torch.Tensor] = {}
    emb = {"timestep": "time_in", "text": "vector_in", "guidance": "guidance_in"}
    simple = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
    for s in ("weight", "bias"):
        for d, b in simple.items():
            out[f"{b}.{s}"] = sd[f"{d}.{s}"]
        for d, b in emb.items():
            if f"time_text_embed.{d}_embedder.linear_1.{s}" in sd:
                out[f"{b}.in_layer.{s}"] = sd[f"time_text_embed.{d}_embedder.linear_1.{s}"]
                out[f"{b}.out_layer.{s}"] = sd[f"time_text_embed.{d}_embedder.linear_2.{s}"]
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap_halves(sd[f"norm_out.linear.{s}"])

    def blocks(prefix):
        return sorted({int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")})

    for i in blocks("transformer_blocks"):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{b}.img_mod.lin.{s}"] = sd[f"{d}.norm1.linear.{s}"]
            out[f"{b}.txt_mod.lin.{s}"] = sd[f"{d}.norm1_context.linear.{s}"]
            out[f"{b}.img_attn.qkv.{s}"] = torch.cat([sd[f"{d}.attn.to_{x}.{s}"] for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{s}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[f"{b}.img_attn.proj.{s}"] = sd[f"{d}.attn.to_out.0.{s}"]
            out[f"{b}.txt_attn.proj.{s}"] = sd[f"{d}.attn.to_add_out.{s}"]
            out[f"{b}.img_mlp.0.{s}"] = sd[f"{d}.ff.net.0.proj.{s}"]
            out[f"{b}.img_mlp.2.{s}"] = sd[f"{d}.ff.net.2.{s}"]
            out[f"{b}.txt_mlp.0.{s}"] = sd[f"{d}.ff_context.net.0.proj.{s}"]
            out[f"{b}.txt_mlp.2.{s}"] = sd[f"{d}.ff_context.net.2.{s}"]
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_added_k.weight"]

    for i in blocks("single_transformer_blocks"):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for s in ("weight", "bias"):
            out[f"{b}.linear1.{s}"] = torch.cat(
                [sd[f"{d}.attn.to_{x}.{s}"] for x in "qkv"] + [sd[f"{d}.proj_mlp.{s}"]])
            out[f"{b}.linear2.{s}"] = sd[f"{d}.proj_out.{s}"]
            out[f"{b}.modulation.lin.{s}"] = sd[f"{d}.norm.linear.{s}"]
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]

    n_in = sum(v.numel() for v in sd.values())
    n_out = sum(v.numel() for v in out.values())
    if n_in != n_out:  # every diffusers tensor must land somewhere exactly once
        raise AssertionError(f"diffusers_to_bfl_flux lost parameters: {n_in} -> {n_out}")
    return out


_VAE_RULES = [
    (re.compile(r"^conv_norm_out\.(.*)"), lambda m, n: f"norm_out.{m[1]}"),
    (re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)"), lambda m, n: f"down.{m[1]}.block.{m[2]}.{m[3]}"),
    (re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)"), lambda m, n: f"down.{m[1]}.downsample.conv.{m[2]}"),
    (re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)"), lambda m, n: f"up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
    (re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)"), lambda m, n: f"up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (re.compile(r"^mid_block\.resnets\.(\d+)\.(.*)"), lambda m, n: f"mid.block_{int(m[1]) + 1}.{m[2]}"),
    (re.compile(r"^mid_block\.attentions\.0\.group_norm\.(.*)"), lambda m, n: f"mid.attn_1.norm.{m[1]}"),
    (re.compile(r"^mid_block\.attentions\.0\.to_([qkv])\.(.*)"), lambda m, n: f"mid.attn_1.{m[1]}.{m[2]}"),
    (re.compile(r"^mid_block\.attentions\.0\.to_out\.0\.(.*)"), lambda m, n: f"mid.attn_1.proj_out.{m[1]}"),
    (re.compile(r"^(conv_in|conv_out)\.(.*)"), lambda m, n: f"{m[1]}.{m[2]}"),
]


def diffusers_to_ldm_vae(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> BFL/LDM ``ae.safetensors`` keys (any size).

    Decoder ``up.{i}`` is reversed relative to diffusers ``up_blocks`` (``up.{n-1-k}`` ==
    ``up_blocks.{k}``); ``conv_shortcut`` -> ``nin_shortcut``; mid attention q/k/v/proj_out become
    1x1 conv weights ``[C, C, 1, 1]``.  No quant_conv (FLUX has none).
    """
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out: Dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        side, rest = key.split(".", 1)
        if side not in ("encoder", "decoder"):
            raise KeyError(f"unexpected VAE key {key!r} (quant_conv is not part of the FLUX AE)")
        for pat, fn in _VAE_RULES:
            m = pat.match(rest)
            if m:
                new = fn(m, n_up)
                break
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[f"{side}.{new}"] = v
    return out


# --------------------------------------------------------------------------------------------
# Model construction (tiny, deterministic) and meta (full size)
# --------------------------------------------------------------------------------------------

def _t5_config(vocab_size: int, dims: Mapping[str, Any]):
    from transformers import T5Config
    return T5Config(vocab_size=vocab_size, **dims)


def _clip_config(vocab_size: int, bos: int, eos: int, dims: Mapping[str, Any]):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **dims)


def _t5_file_state(model) -> Dict[str, torch.Tensor]:
    return _prefixed(model.state_dict(), "", keep=lambda k: k != "encoder.embed_tokens.weight")


def _lora_shapes(n_double: int, n_single: int, hidden: int, mlp_hidden: int, rank: int):
    shapes = {}
    for i in range(n_double):
        for n in ("1", "2"):
            p = f"double_blocks.{i}.processor"
            shapes[f"{p}.qkv_lora{n}.down.weight"] = (rank, hidden)
            shapes[f"{p}.qkv_lora{n}.up.weight"] = (3 * hidden, rank)
            shapes[f"{p}.proj_lora{n}.down.weight"] = (rank, hidden)
            shapes[f"{p}.proj_lora{n}.up.weight"] = (hidden, rank)
    for i in range(n_single):
        p = f"single_blocks.{i}.processor"
        shapes[f"{p}.qkv_lora.down.weight"] = (rank, hidden)
        shapes[f"{p}.qkv_lora.up.weight"] = (3 * hidden, rank)
        shapes[f"{p}.proj_lora.down.weight"] = (rank, hidden + mlp_hidden)
        shapes[f"{p}.proj_lora.up.weight"] = (hidden, rank)
    return shapes


USER_LORA_RANK = 4
#: File names of the tiny user LoRAs in models/loras (the LoRA workflow names the kohya one).
USER_LORA_FILES = {"kohya": "my_flux_lora_kohya.safetensors", "comfyui": "my_flux_lora_comfyui.safetensors",
                   "xlabs": "my_flux_lora_xlabs.safetensors", "diffusers": "my_flux_lora_diffusers.safetensors",
                   "second": "my_second_flux_lora.safetensors"}


def _user_lora_modules(cfg: Mapping[str, Any]) -> Dict[str, tuple]:
    """BFL Linear name -> (in, out) for the modules user LoRAs train (blocks, embedders, final layer)."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mods = {"img_in": (cfg["in_channels"], h), "txt_in": (cfg["joint_attention_dim"], h),
            "final_layer.adaLN_modulation.1": (h, 2 * h)}
    for i in range(cfg["num_layers"]):
        for s in ("img", "txt"):
            mods.update({f"double_blocks.{i}.{s}_attn.qkv": (h, 3 * h), f"double_blocks.{i}.{s}_attn.proj": (h, h),
                         f"double_blocks.{i}.{s}_mlp.0": (h, 4 * h), f"double_blocks.{i}.{s}_mlp.2": (4 * h, h),
                         f"double_blocks.{i}.{s}_mod.lin": (h, 6 * h)})
    for i in range(cfg["num_single_layers"]):
        mods.update({f"single_blocks.{i}.linear1": (h, 3 * h + 4 * h), f"single_blocks.{i}.linear2": (5 * h, h),
                     f"single_blocks.{i}.modulation.lin": (h, 3 * h)})
    return mods


def _diffusers_user_modules(cfg: Mapping[str, Any]) -> Dict[str, tuple]:
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mods = {"x_embedder": (cfg["in_channels"], h), "proj_out": (h, cfg["in_channels"])}
    for i in range(cfg["num_layers"]):
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            mods[f"transformer_blocks.{i}.attn.{n}"] = (h, h)
        mods[f"transformer_blocks.{i}.attn.to_out.0"] = (h, h)
        mods[f"transformer_blocks.{i}.ff.net.2"] = (4 * h, h)
    for i in range(cfg["num_single_layers"]):
        mods.update({f"single_transformer_blocks.{i}.attn.to_q": (h, h),
                     f"single_transformer_blocks.{i}.proj_mlp": (h, 4 * h),
                     f"single_transformer_blocks.{i}.proj_out": (5 * h, h)})
    return mods


def _write_user_loras(loras: Path, cfg: Mapping[str, Any], p: Dict[str, Path]) -> Dict[str, Dict[str, Any]]:
    """Tiny FLUX LoRAs in the layouts users have, written with the real key names, and the
    (down, up, scale) each adds to which module: what a hand merge needs.

    kohya (sd-scripts): ``lora_unet_<bfl name, '.' -> '_'>.lora_down/lora_up.weight`` + ``.alpha``,
    and ``lora_te1_*`` text-encoder parts; ComfyUI: ``diffusion_model.<bfl name>.lora_down/
    lora_up.weight`` (what ComfyUI's LoRA saving writes) with ``.alpha`` on some; xlabs:
    ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (no alpha); diffusers /
    PEFT: ``transformer.<diffusers name>.lora_A/lora_B.weight``, the alpha in the
    ``lora_adapter_metadata`` diffusers writes, plus ``text_encoder.*`` parts.
    """
    r = USER_LORA_RANK
    out: Dict[str, Dict[str, Any]] = {}

    def pair(g, n_in, n_out, magnitude=0.2):
        return (_snap(torch.randn(r, n_in, generator=g) * magnitude), _snap(torch.randn(n_out, r, generator=g) * magnitude))

    def save(name, sd, metadata=None):
        path = loras / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or {"format": "pt"})
        return path

    bfl_mods = _user_lora_modules(cfg)
    for fmt, prefix, down_key, up_key in (("kohya", "lora_unet_", ".lora_down.weight", ".lora_up.weight"),
                                          ("comfyui", "diffusion_model.", ".lora_down.weight", ".lora_up.weight"),
                                          ("second", "lora_unet_", ".lora_down.weight", ".lora_up.weight")):
        g = _gen(f"user_lora_{fmt}")
        sd, parts = {}, {}
        for j, (mod, (n_in, n_out)) in enumerate(sorted(bfl_mods.items())):
            down, up = pair(g, n_in, n_out)
            name = prefix + (mod.replace(".", "_") if prefix == "lora_unet_" else mod)
            sd[name + down_key], sd[name + up_key] = down.to(torch.bfloat16), up.to(torch.bfloat16)
            scale = 1.0
            if fmt != "comfyui" or j % 3 == 0:  # kohya always stores alpha; ComfyUI files sometimes
                alpha = float(r // 2 + j % 3)
                sd[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
                scale = alpha / r
            parts[mod] = (down, up, scale)
        if fmt == "kohya":  # its text-encoder half (CLIP-L), which USO leaves out
            down, up = pair(g, TINY_CLIP_DIMS["hidden_size"], TINY_CLIP_DIMS["hidden_size"])
            te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
            sd[te + ".lora_down.weight"], sd[te + ".lora_up.weight"] = down, up
            sd[te + ".alpha"] = torch.tensor(float(r))
        p[f"user_lora_{fmt}"] = save(USER_LORA_FILES[fmt], sd)
        out[fmt] = {"space": "bfl", "parts": parts}

    g = _gen("user_lora_xlabs")
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    sd, parts = {}, {}
    for i in range(cfg["num_layers"]):
        for n, stream in (("1", "img"), ("2", "txt")):
            for op, n_out, target in (("qkv", 3 * h, f"{stream}_attn.qkv"), ("proj", h, f"{stream}_attn.proj")):
                down, up = pair(g, h, n_out)
                key = f"double_blocks.{i}.processor.{op}_lora{n}"
                sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down.to(torch.bfloat16), up.to(torch.bfloat16)
                parts[f"double_blocks.{i}.{target}"] = (down, up, 1.0)
    p["user_lora_xlabs"] = save(USER_LORA_FILES["xlabs"], sd)
    out["xlabs"] = {"space": "bfl", "parts": parts}

    g = _gen("user_lora_diffusers")
    sd, parts = {}, {}
    alpha = 2 * r
    for mod, (n_in, n_out) in sorted(_diffusers_user_modules(cfg).items()):
        down, up = pair(g, n_in, n_out)
        sd[f"transformer.{mod}.lora_A.weight"], sd[f"transformer.{mod}.lora_B.weight"] = down, up
        parts[mod] = (down, up, alpha / r)
    down, up = pair(g, TINY_CLIP_DIMS["hidden_size"], TINY_CLIP_DIMS["hidden_size"])
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = down
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = up
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": r, "transformer.lora_alpha": alpha,
                                                              "transformer.target_modules": sorted(parts)})}
    p["user_lora_diffusers"] = save(USER_LORA_FILES["diffusers"], sd, meta)
    out["diffusers"] = {"space": "diffusers", "parts": parts}
    return out


def _projector_shapes(cfg: Mapping[str, int]):
    shapes = {}
    for lvl in ("high", "mid", "low"):
        p = f"feature_embedder.{lvl}"
        shapes[f"{p}_embedding_linear.0.weight"] = (cfg["style_tokens"], cfg["siglip_tokens"])
        shapes[f"{p}_embedding_linear.0.bias"] = (cfg["style_tokens"],)
        shapes[f"{p}_layer_norm.weight"] = (cfg["siglip_dim"],)
        shapes[f"{p}_layer_norm.bias"] = (cfg["siglip_dim"],)
        shapes[f"{p}_projection.weight"] = (cfg["hidden_size"], cfg["siglip_dim"])
        shapes[f"{p}_projection.bias"] = (cfg["hidden_size"],)
    return shapes


def full_size_bfl_state_on_meta(dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """BFL-keyed meta tensors with the official FLUX.1-dev shapes (as in flux1-dev.safetensors)."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FULL_FLUX)
    return {k: v.to(dtype) for k, v in diffusers_to_bfl_flux(model.state_dict()).items()}


def full_size_state_on_meta(kind: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Official-shape state dict on the meta device, keyed like the usual single file.

    kind: "ae" (BFL AE keys, fp32), "t5" (HF T5 v1.1 XXL encoder keys, fp16), "clip_l"
    (``text_model.*`` + ``text_projection.weight`` + ``logit_scale``, fp16), "siglip"
    (``vision_model.*`` so400m incl. head, fp16), "projector" (729->64 tokens, 1152 -> 3072, bf16),
    "lora" (USO rank 128 over 19 double / 38 single blocks, bf16), "flux" (same as
    :func:`full_size_bfl_state_on_meta`).  ``dtype`` overrides the default dtype.
    """
    defaults = {"ae": torch.float32, "t5": torch.float16, "clip_l": torch.float16,
                "siglip": torch.float16, "projector": torch.bfloat16, "lora": torch.bfloat16,
                "flux": torch.bfloat16}
    if kind not in defaults:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(defaults)}")
    dt = dtype or defaults[kind]
    if kind == "flux":
        return full_size_bfl_state_on_meta(dt)
    if kind == "projector":
        return {k: torch.empty(s, device="meta", dtype=dt) for k, s in _projector_shapes(FULL_PROJECTOR).items()}
    if kind == "lora":
        hidden = FULL_FLUX["num_attention_heads"] * FULL_FLUX["attention_head_dim"]
        shapes = _lora_shapes(FULL_FLUX["num_layers"], FULL_FLUX["num_single_layers"], hidden, 4 * hidden, FULL_LORA_RANK)
        return {k: torch.empty(s, device="meta", dtype=dt) for k, s in shapes.items()}
    with torch.device("meta"):
        if kind == "ae":
            from diffusers import AutoencoderKL
            sd = diffusers_to_ldm_vae(AutoencoderKL(**FULL_VAE).state_dict())
        elif kind == "t5":
            from transformers import T5Config, T5EncoderModel
            sd = _t5_file_state(T5EncoderModel(T5Config(**FULL_T5)))
            sd = {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}
        elif kind == "clip_l":
            from transformers import CLIPTextConfig, CLIPTextModel
            m = CLIPTextModel(CLIPTextConfig(**FULL_CLIP_L))
            sd = {k: torch.empty(v.shape, device="meta")
                  for k, v in _meta_prefixed(m.state_dict(), "text_model.").items()}
            sd["text_projection.weight"] = torch.empty((FULL_CLIP_L["projection_dim"], FULL_CLIP_L["hidden_size"]), device="meta")
            sd["logit_scale"] = torch.empty((), device="meta")
        else:  # siglip
            from transformers import SiglipVisionConfig, SiglipVisionModel
            m = SiglipVisionModel(SiglipVisionConfig(**FULL_SIGLIP))
            sd = _meta_prefixed(m.state_dict(), "vision_model.")
    return {k: v.to(dt) for k, v in sd.items()}


def _meta_prefixed(sd, prefix):
    return {(k if k.startswith(prefix) else prefix + k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def _words():
    seen, out = set(), []
    for w in _WORDS:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _t5_vocab() -> Dict[str, int]:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _words():
        vocab[w] = len(vocab)
    return vocab


def _clip_vocab() -> Dict[str, int]:
    vocab = {w: i for i, w in enumerate(_words())}
    vocab["<|startoftext|>"] = len(vocab)  # like real CLIP: bos / eos are the two last ids
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _save_tokenizer(tok_obj, out_dir: Path, **kwargs) -> None:
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_obj, padding_side="right", truncation_side="right", **kwargs)
    tok.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; the portable class name
    # loads in both (AutoTokenizer -> PreTrainedTokenizerFast / TokenizersBackend).
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _write_tokenizers(t5_dir: Path, clip_dir: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    def base(vocab, unk):
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return tok

    tv = _t5_vocab()
    t5 = base(tv, "<unk>")
    t5.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tv["</s>"])])
    _save_tokenizer(t5, t5_dir, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512)

    cv = _clip_vocab()
    clip = base(cv, "<|endoftext|>")
    clip.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", cv["<|startoftext|>"]), ("<|endoftext|>", cv["<|endoftext|>"])])
    _save_tokenizer(clip, clip_dir, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                    pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)


# --------------------------------------------------------------------------------------------
# File writers
# --------------------------------------------------------------------------------------------

def _save(sd: Mapping[str, torch.Tensor], path: Path, config: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "config": json.dumps(config)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def _cast(sd: Mapping[str, torch.Tensor], dtype, prefix: str = "") -> Dict[str, torch.Tensor]:
    return {prefix + k: v.to(dtype) for k, v in sd.items()}


def _fp8_2d_else(sd, other_dtype, prefix: str = ""):
    """2-D weights (Linear and embedding matrices) in fp8 e4m3fn, everything else ``other_dtype``."""
    return {prefix + k: v.to(F8) if (v.ndim == 2 and k.endswith("weight")) else v.to(other_dtype)
            for k, v in sd.items()}


def _scaled_fp8(sd, is_linear_weight: Callable[[str, torch.Tensor], bool], other_dtype, comfy_quant: bool):
    """ComfyUI scaled fp8.  Old format: ``scaled_fp8`` marker + ``X.scale_weight``; new format
    (``comfy_quant=True``): ``X.weight_scale`` + ``X.comfy_quant`` (uint8 JSON bytes).  The stored
    fp8 weight is ``W / s`` with ``s = max|W| / 448`` (fp32 scalar), so dequantised W = fp8 * s."""
    out: Dict[str, torch.Tensor] = {}
    if not comfy_quant:
        out["scaled_fp8"] = torch.empty(0, dtype=F8)
    qjson = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")), dtype=torch.uint8)
    for k, v in sd.items():
        if is_linear_weight(k, v):
            s = v.abs().max().float() / F8_MAX
            out[k] = (v.float() / s).clamp(-F8_MAX, F8_MAX).to(F8)
            base = k[: -len(".weight")]
            if comfy_quant:
                out[f"{base}.weight_scale"] = s.reshape(())
                out[f"{base}.comfy_quant"] = qjson.clone()
            else:
                out[f"{base}.scale_weight"] = s.reshape(())
        else:
            out[k] = v.to(other_dtype)
    return out


def _write_gguf(bfl: Mapping[str, torch.Tensor], path: Path, config: Mapping[str, Any]) -> None:
    import gguf  # optional dependency: only this writer needs it

    writer = gguf.GGUFWriter(str(path), arch="flux")
    # (GGUFWriter adds general.architecture itself)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("comfyui_uso.config", json.dumps(config))
    for k in sorted(bfl):
        a = bfl[k].float().numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(k, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif a.ndim >= 2:
            writer.add_tensor(k, a.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            writer.add_tensor(k, a.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _save_sharded_hf(sd: Mapping[str, torch.Tensor], out_dir: Path, n_shards: int = 2) -> None:
    """Write ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` like HF."""
    keys = sorted(sd)
    per = math.ceil(len(keys) / n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_diffusers_dir(d: Path, flux_model, vae_model, clip_cfg, clip_sd, t5_cfg, t5_sd,
                         tok_clip: Path, tok_t5: Path) -> None:
    import shutil

    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    d.mkdir(parents=True, exist_ok=True)
    model_index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        # The real repo names CLIPTokenizer / T5TokenizerFast.  The tiny tokenizers are WordLevel
        # tokenizer.json files, which only the generic fast class loads faithfully (transformers 5
        # CLIPTokenizer rebuilds its own BPE and silently yields garbage ids from them).
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (d / "model_index.json").write_text(json.dumps(model_index, indent=2))
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    ).save_pretrained(str(d / "scheduler"))

    flux_bf16 = flux_model.to(torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in flux_bf16.state_dict().values())
    flux_bf16.save_pretrained(str(d / "transformer"), max_shard_size=int(total * 0.6), safe_serialization=True)
    vae_model.to(torch.float32).save_pretrained(str(d / "vae"), safe_serialization=True)

    # text encoders: written by hand so the files carry the HF hub key names (``text_model.*``)
    # whatever the installed transformers version's save_pretrained would write.
    (d / "text_encoder").mkdir(exist_ok=True)
    clip_cfg.architectures = ["CLIPTextModel"]
    clip_cfg.save_pretrained(str(d / "text_encoder"))
    save_file(_cast(clip_sd, torch.bfloat16), str(d / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    (d / "text_encoder_2").mkdir(exist_ok=True)
    t5_cfg.architectures = ["T5EncoderModel"]
    t5_cfg.save_pretrained(str(d / "text_encoder_2"))
    _save_sharded_hf(_cast(t5_sd, torch.bfloat16), d / "text_encoder_2", n_shards=2)

    for src, name in ((tok_clip, "tokenizer"), (tok_t5, "tokenizer_2")):
        shutil.copytree(src, d / name, dirs_exist_ok=True)


# --------------------------------------------------------------------------------------------
# Test image
# --------------------------------------------------------------------------------------------

def make_image(w: int, h: int, seed: int = 0):
    """Deterministic RGB ``PIL.Image`` of size (w, h) with structure: smooth gradients, a
    sinusoidal band, and a few filled shapes (rectangles, ellipses, a polygon).  Not noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    xs, ys = x / max(w - 1, 1), y / max(h - 1, 1)
    period = max(w, h) / float(rng.integers(2, 5))
    band = 0.5 + 0.5 * np.sin(2 * np.pi * (x * rng.uniform(0.3, 1.0) + y) / period + rng.uniform(0, 2 * np.pi))
    chans = [xs, ys, band]
    order = rng.permutation(3)
    arr = np.stack([chans[i] for i in order], axis=-1)
    arr = (0.15 + 0.7 * arr) * 255.0
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    def box():
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        return [x0, y0, max(x1, x0 + w / 8), max(y1, y0 + h / 8)]

    def colour():
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    draw.rectangle(box(), fill=colour())
    draw.ellipse(box(), fill=colour(), outline=(0, 0, 0))
    draw.polygon([(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(3)], fill=colour())
    draw.ellipse(box(), outline=(255, 255, 255), width=max(1, min(w, h) // 32))
    return img


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------

def build_tiny_models(root) -> TinyModels:
    """Build the tiny random-weight models and write every supported file layout under ``root``.

    Deterministic (fixed seeds, independent of the global torch RNG, which is left untouched).
    """
    t0 = time.perf_counter()
    root = Path(root)
    models = root / "models"
    with torch.random.fork_rng(devices=[]), _quiet_libraries():
        torch.manual_seed(SEED)
        tm = _build(root, models)
    object.__setattr__(tm, "build_seconds", time.perf_counter() - t0)
    return tm


@contextlib.contextmanager
def _quiet_libraries():
    """Silence the libraries' info/warning chatter (progress bars, dtype-cast notes) while
    writing; restores the previous verbosity afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    t_bar = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if t_bar:
            tlog.enable_progress_bar()


def _build(root: Path, models: Path) -> TinyModels:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (CLIPTextModel, SiglipConfig, SiglipModel, SiglipTextConfig,
                              SiglipVisionConfig, SiglipVisionModel, T5EncoderModel)

    p: Dict[str, Path] = {}
    skipped: Dict[str, str] = {}

    # ---- tokenizers (their vocab sizes fix the text encoders' vocab sizes)
    tok_t5, tok_clip = root / "tokenizers" / "t5", root / "tokenizers" / "clip_l"
    tok_t5.mkdir(parents=True, exist_ok=True)
    tok_clip.mkdir(parents=True, exist_ok=True)
    _write_tokenizers(tok_t5, tok_clip)
    p["tokenizer_t5"], p["tokenizer_clip"] = tok_t5, tok_clip
    t5_vocab, clip_vocab = _t5_vocab(), _clip_vocab()

    # ---- models with deterministic weights
    flux = FluxTransformer2DModel(**TINY_FLUX)
    _fill(flux, "flux")
    flux_config = _plain_config(flux.config)
    transformer_state = {k: v.detach().clone() for k, v in flux.state_dict().items()}
    flux_bfl_state = diffusers_to_bfl_flux(transformer_state)

    vae = AutoencoderKL(**TINY_VAE)
    _fill(vae, "vae")
    vae_config = _plain_config(vae.config)
    vae_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    ae_state = diffusers_to_ldm_vae(vae_state)

    t5_cfg = _t5_config(len(t5_vocab), TINY_T5_DIMS)
    t5 = T5EncoderModel(t5_cfg)
    _fill(t5, "t5")
    t5_config = _hf_config(t5.config)
    t5_state = _t5_file_state(t5)

    clip_cfg = _clip_config(len(clip_vocab), clip_vocab["<|startoftext|>"], clip_vocab["<|endoftext|>"], TINY_CLIP_DIMS)
    clip = CLIPTextModel(clip_cfg)
    _fill(clip, "clip_l")
    clip_config = _hf_config(clip.config)
    clip_state = _prefixed(clip.state_dict(), "text_model.")
    g = _gen("clip_l_extra")
    clip_extra_state = {
        "text_projection.weight": _snap(_value("text_projection.weight", (clip_cfg.projection_dim, clip_cfg.hidden_size), g)),
        "logit_scale": _snap(_value("logit_scale", (), g)),
    }

    sig_vcfg = SiglipVisionConfig(**TINY_SIGLIP)
    siglip = SiglipVisionModel(sig_vcfg)
    _fill(siglip, "siglip")
    siglip_config = _hf_config(siglip.config)
    siglip_state = _prefixed(siglip.state_dict(), "vision_model.")

    projector_config = dict(TINY_PROJECTOR)
    g = _gen("projector")
    projector_state = {k: _snap(_value(k, s, g)) for k, s in _projector_shapes(projector_config).items()}

    hidden = TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]
    lora_config = {"rank": TINY_LORA_RANK}
    g = _gen("lora")
    lora_state = {k: _snap(0.1 * torch.randn(s, generator=g))
                  for k, s in _lora_shapes(TINY_FLUX["num_layers"], TINY_FLUX["num_single_layers"],
                                           hidden, 4 * hidden, TINY_LORA_RANK).items()}

    # ---- diffusion_models/
    dm = models / "diffusion_models"
    p["flux_bfl"] = _save(_cast(flux_bfl_state, torch.bfloat16), dm / "flux1-dev.safetensors", flux_config)
    p["flux_fp8"] = _save(_cast(flux_bfl_state, F8), dm / "flux1-dev-fp8-e4m3fn.safetensors", flux_config)
    is_lin = lambda k, v: v.ndim == 2 and k.endswith(".weight")  # noqa: E731  (all 2-D DiT tensors are Linears)
    p["flux_fp8_scaled"] = _save(_scaled_fp8(flux_bfl_state, is_lin, torch.bfloat16, comfy_quant=False),
                                 dm / "flux1-dev-fp8-scaled.safetensors", flux_config)
    p["flux_fp8_comfyquant"] = _save(_scaled_fp8(flux_bfl_state, is_lin, torch.bfloat16, comfy_quant=True),
                                     dm / "flux1-dev-fp8-comfyquant.safetensors", flux_config)
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        skipped["flux_gguf"] = f"gguf package not installed ({e}); flux1-dev-Q8_0.gguf not written"
    else:
        _write_gguf(flux_bfl_state, dm / "flux1-dev-Q8_0.gguf", flux_config)
        p["flux_gguf"] = dm / "flux1-dev-Q8_0.gguf"

    # ---- checkpoints/ (ComfyUI all-in-one)
    aio: Dict[str, torch.Tensor] = {}
    aio.update(_cast(flux_bfl_state, F8, "model.diffusion_model."))
    aio.update(_cast(ae_state, torch.bfloat16, "vae."))
    aio.update(_cast(clip_state, torch.float16, "text_encoders.clip_l.transformer."))
    aio.update(_fp8_2d_else(t5_state, torch.float16, "text_encoders.t5xxl.transformer."))
    p["checkpoint_aio"] = _save(aio, models / "checkpoints" / "flux1-dev-fp8.safetensors",
                                {"transformer": flux_config, "vae": vae_config, "clip_l": clip_config, "t5": t5_config})

    # ---- vae/
    p["ae"] = _save(_cast(ae_state, torch.float32), models / "vae" / "ae.safetensors", vae_config)

    # ---- text_encoders/
    te = models / "text_encoders"
    t5_linear = {n + ".weight" for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    p["t5_fp16"] = _save(_cast(t5_state, torch.float16), te / "t5xxl_fp16.safetensors", t5_config)
    p["t5_fp8"] = _save(_fp8_2d_else(t5_state, torch.float16), te / "t5xxl_fp8_e4m3fn.safetensors", t5_config)
    p["t5_fp8_scaled"] = _save(_scaled_fp8(t5_state, lambda k, v: k in t5_linear, torch.float16, comfy_quant=False),
                               te / "t5xxl_fp8_e4m3fn_scaled.safetensors", t5_config)
    clip_file = _cast(clip_state, torch.float16)
    clip_file.update(_cast(clip_extra_state, torch.float16))
    p["clip_l"] = _save(clip_file, te / "clip_l.safetensors", clip_config)

    # ---- clip_vision/
    cv = models / "clip_vision"
    p["siglip_file"] = _save(_cast(siglip_state, torch.float16), cv / "sigclip_vision_patch14_384.safetensors", siglip_config)
    sdir = cv / "siglip-so400m-patch14-384"
    sdir.mkdir(parents=True, exist_ok=True)
    full_cfg = SiglipConfig(text_config=SiglipTextConfig(**TINY_SIGLIP_TEXT).to_dict(), vision_config=sig_vcfg.to_dict())
    full_cfg.architectures = ["SiglipModel"]
    full = SiglipModel(full_cfg)
    g = _gen("siglip_text")
    full_sd: Dict[str, torch.Tensor] = {}
    for k in sorted(full.state_dict()):
        shape = full.state_dict()[k].shape
        full_sd[k] = siglip_state[k] if k.startswith("vision_model.") else _snap(_value(k, shape, g))
    missing = set(siglip_state) - set(full_sd)
    if missing:
        raise AssertionError(f"SiglipModel lacks vision keys {sorted(missing)[:3]}")
    full_cfg.save_pretrained(str(sdir))
    save_file(_cast(full_sd, torch.float32), str(sdir / "model.safetensors"), metadata={"format": "pt"})
    size = TINY_SIGLIP["image_size"]
    (sdir / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}, indent=2))
    p["siglip_dir"] = sdir

    # ---- loras/ and model_patches/
    p["lora_comfy"] = _save(_cast(lora_state, torch.bfloat16, "diffusion_model."),
                            models / "loras" / "uso-flux1-dit-lora-v1.safetensors", lora_config)
    p["lora_original"] = _save(_cast(lora_state, torch.bfloat16),
                               models / "loras" / "uso_flux_v1.0" / "dit_lora.safetensors", lora_config)
    p["projector_comfy"] = _save(_cast(projector_state, torch.bfloat16),
                                 models / "model_patches" / "uso-flux1-projector-v1.safetensors", projector_config)
    p["projector_original"] = _save(_cast(projector_state, torch.bfloat16),
                                    models / "model_patches" / "uso_flux_v1.0" / "projector.safetensors", projector_config)

    user_loras = _write_user_loras(models / "loras", TINY_FLUX, p)

    # ---- diffusers/FLUX.1-dev/ (last: it converts the flux module to bf16 in place)
    p["diffusers_dir"] = models / "diffusers" / "FLUX.1-dev"
    _write_diffusers_dir(p["diffusers_dir"], flux, vae, clip_cfg, clip_state, t5_cfg, t5_state, tok_clip, tok_t5)

    return TinyModels(
        root=root, models_dir=models, paths=p,
        transformer_state=transformer_state, flux_bfl_state=flux_bfl_state,
        vae_state=vae_state, ae_state=ae_state, t5_state=t5_state, clip_state=clip_state,
        clip_extra_state=clip_extra_state, siglip_state=siglip_state,
        projector_state=projector_state, lora_state=lora_state,
        flux_config=flux_config, vae_config=vae_config, t5_config=t5_config, clip_config=clip_config,
        siglip_config=siglip_config, projector_config=projector_config, lora_config=lora_config,
        skipped=skipped, user_loras=user_loras,
    )


if __name__ == "__main__":  # quick manual run: python tests/helpers/tiny_models.py [root]
    import sys
    import tempfile

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tiny_models_"))
    tm = build_tiny_models(out)
    print(f"built in {tm.build_seconds:.2f} s under {tm.root}")
    for k, v in sorted(tm.paths.items()):
        print(f"  {k:22s} {v.relative_to(tm.root)}")
    for k, why in tm.skipped.items():
        print(f"  skipped {k}: {why}")
