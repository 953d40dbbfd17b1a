"""Key conversion from the original (BFL) layouts to diffusers module names.

Generic in every size, so full-size files and the tiny test models take the same path
(diffusers' own FLUX converter hard-codes a width of 3072).
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]

_FLUX_RENAMES = [
    (r"^img_in\.", "x_embedder."),
    (r"^txt_in\.", "context_embedder."),
    (r"^time_in\.in_layer\.", "time_text_embed.timestep_embedder.linear_1."),
    (r"^time_in\.out_layer\.", "time_text_embed.timestep_embedder.linear_2."),
    (r"^vector_in\.in_layer\.", "time_text_embed.text_embedder.linear_1."),
    (r"^vector_in\.out_layer\.", "time_text_embed.text_embedder.linear_2."),
    (r"^guidance_in\.in_layer\.", "time_text_embed.guidance_embedder.linear_1."),
    (r"^guidance_in\.out_layer\.", "time_text_embed.guidance_embedder.linear_2."),
    (r"^final_layer\.linear\.", "proj_out."),
    (r"^double_blocks\.(\d+)\.img_mod\.lin\.", r"transformer_blocks.\1.norm1.linear."),
    (r"^double_blocks\.(\d+)\.txt_mod\.lin\.", r"transformer_blocks.\1.norm1_context.linear."),
    (r"^double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"^double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"^double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"^double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"^double_blocks\.(\d+)\.img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
    (r"^double_blocks\.(\d+)\.txt_attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
    (r"^double_blocks\.(\d+)\.img_mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^double_blocks\.(\d+)\.img_mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^double_blocks\.(\d+)\.txt_mlp\.0\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
    (r"^double_blocks\.(\d+)\.txt_mlp\.2\.", r"transformer_blocks.\1.ff_context.net.2."),
    (r"^single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.proj_out."),
    (r"^single_blocks\.(\d+)\.norm\.query_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"^single_blocks\.(\d+)\.norm\.key_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"^single_blocks\.(\d+)\.modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear."),
]
_FLUX_RENAMES = [(re.compile(p), r) for p, r in _FLUX_RENAMES]
_DOUBLE_QKV = re.compile(r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)$")
_SINGLE_LINEAR1 = re.compile(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$")
_FINAL_ADALN = re.compile(r"^final_layer\.adaLN_modulation\.1\.(weight|bias)$")


def _rows(start: int, end: int | None) -> Transform:
    return lambda t: t[start:end]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    # BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift).
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def flux_bfl_to_diffusers(key: str, hidden: int) -> list[tuple[str, Transform]] | None:
    """The diffusers keys (with row slicing) that one BFL transformer key becomes; None if unknown."""
    m = _DOUBLE_QKV.match(key)
    if m:
        block, stream, kind = m.groups()
        names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
        return [(f"transformer_blocks.{block}.attn.{n}.{kind}", _rows(i * hidden, (i + 1) * hidden))
                for i, n in enumerate(names)]
    m = _SINGLE_LINEAR1.match(key)
    if m:
        block, kind = m.groups()
        prefix = f"single_transformer_blocks.{block}"
        return [(f"{prefix}.attn.to_q.{kind}", _rows(0, hidden)),
                (f"{prefix}.attn.to_k.{kind}", _rows(hidden, 2 * hidden)),
                (f"{prefix}.attn.to_v.{kind}", _rows(2 * hidden, 3 * hidden)),
                (f"{prefix}.proj_mlp.{kind}", _rows(3 * hidden, None))]
    m = _FINAL_ADALN.match(key)
    if m:
        return [(f"norm_out.linear.{m.group(1)}", _swap_halves)]
    for pattern, replacement in _FLUX_RENAMES:
        if pattern.search(key):
            return [(pattern.sub(replacement, key), _identity)]
    return None


_VAE_RULES = [
    (re.compile(r"^(encoder|decoder)\.mid\.block_1\."), r"\1.mid_block.resnets.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_2\."), r"\1.mid_block.resnets.1."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.norm\."), r"\1.mid_block.attentions.0.group_norm."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.q\."), r"\1.mid_block.attentions.0.to_q."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.k\."), r"\1.mid_block.attentions.0.to_k."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.v\."), r"\1.mid_block.attentions.0.to_v."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.proj_out\."), r"\1.mid_block.attentions.0.to_out.0."),
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), r"encoder.down_blocks.\1.resnets.\2."),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\."), r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (re.compile(r"^(encoder|decoder)\.norm_out\."), r"\1.conv_norm_out."),
]
_VAE_UP_BLOCK = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.")
_VAE_UPSAMPLE = re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.")


def _squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    # LDM attention uses 1x1 convolutions where diffusers uses Linear layers.
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def vae_bfl_to_diffusers(key: str, num_up_blocks: int) -> tuple[str, Transform]:
    """The diffusers AutoencoderKL key for one BFL/LDM autoencoder key."""
    new = key.replace(".nin_shortcut.", ".conv_shortcut.")
    m = _VAE_UP_BLOCK.match(new)
    if m:
        # LDM numbers decoder blocks from the highest resolution; diffusers from the lowest.
        block = num_up_blocks - 1 - int(m.group(1))
        new = _VAE_UP_BLOCK.sub(f"decoder.up_blocks.{block}.resnets.{m.group(2)}.", new)
    m = _VAE_UPSAMPLE.match(new)
    if m:
        block = num_up_blocks - 1 - int(m.group(1))
        new = _VAE_UPSAMPLE.sub(f"decoder.up_blocks.{block}.upsamplers.0.conv.", new)
    for pattern, replacement in _VAE_RULES:
        new = pattern.sub(replacement, new)
    transform = _squeeze_1x1 if ".mid_block.attentions.0.to_" in new and new.endswith("weight") else _identity
    return new, transform


def count_vae_up_blocks(keys) -> int:
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"^decoder\.up\.(\d+)\.", k))}
    return max(blocks) + 1 if blocks else 0


def converted_items(source, plan: Callable[[str], list[tuple[str, Transform]] | None],
                    on_unknown: Callable[[str], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (diffusers key, tensor) reading each source tensor once."""
    for key in source.keys():
        targets = plan(key)
        if targets is None:
            if on_unknown is not None:
                on_unknown(key)
            continue
        tensor = source.get(key)
        for new_key, transform in targets:
            yield new_key, transform(tensor)
