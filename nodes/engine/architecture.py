"""Model architectures: from a file's `config` metadata, or derived from tensor shapes.

Shapes do not tell everything (head counts, activation functions, the SigLIP image size), so the
official values fill in what shapes cannot say. Real FLUX/USO files carry no config metadata and
derive the official configs; the tiny test files carry theirs.
"""
from __future__ import annotations

import json
import os
import re

from .errors import ModelFileError
from .weight_source import WeightSource

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def official(name: str) -> dict:
    with open(os.path.join(_CONFIG_DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def _count(source: WeightSource, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in source.keys() if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _shape(source: WeightSource, key: str) -> tuple[int, ...]:
    return source.infos[key].shape


def _name(source: WeightSource) -> str:
    return os.path.basename(source.path.rstrip("/\\"))


_DIFFUSERS_PRIVATE = re.compile(r"^_")


def _clean(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not _DIFFUSERS_PRIVATE.match(k)}


def flux_config(source: WeightSource, layout: str, stored: dict | None) -> dict:
    """diffusers FluxTransformer2DModel kwargs. `layout` is 'bfl' or 'diffusers'."""
    if layout == "bfl":
        hidden, in_channels = _shape(source, "img_in.weight")
        head_dim = _shape(source, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
        cfg = {
            "patch_size": 1,
            "in_channels": in_channels,
            "num_layers": _count(source, r"^double_blocks\.(\d+)\."),
            "num_single_layers": _count(source, r"^single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": _shape(source, "txt_in.weight")[1],
            "pooled_projection_dim": _shape(source, "vector_in.in_layer.weight")[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in source,
        }
        mlp_hidden = _shape(source, "double_blocks.0.img_mlp.0.weight")[0]
    else:
        hidden, in_channels = _shape(source, "x_embedder.weight")
        head_dim = _shape(source, "transformer_blocks.0.attn.norm_q.weight")[0]
        cfg = {
            "patch_size": 1,
            "in_channels": in_channels,
            "num_layers": _count(source, r"^transformer_blocks\.(\d+)\."),
            "num_single_layers": _count(source, r"^single_transformer_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": _shape(source, "context_embedder.weight")[1],
            "pooled_projection_dim": _shape(source, "time_text_embed.text_embedder.linear_1.weight")[1],
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in source,
        }
        mlp_hidden = _shape(source, "transformer_blocks.0.ff.net.0.proj.weight")[0]
    name = _name(source)
    if not cfg["guidance_embeds"]:
        raise ModelFileError(f"transformer: '{name}' is FLUX.1-schnell (no guidance embedding). "
                             "USO is trained on FLUX.1-dev; pick a FLUX.1-dev transformer.")
    if in_channels != 64:
        raise ModelFileError(f"transformer: '{name}' takes {in_channels} input channels (a FLUX Fill/"
                             "Depth/Canny variant?). USO needs plain FLUX.1-dev (64 channels).")
    if mlp_hidden != 4 * hidden:
        raise ModelFileError(f"transformer: '{name}' has an MLP width of {mlp_hidden} for width "
                             f"{hidden}; this is not a FLUX.1 transformer.")
    if stored and stored.get("axes_dims_rope"):
        cfg["axes_dims_rope"] = tuple(stored["axes_dims_rope"])
    elif head_dim == 128:
        cfg["axes_dims_rope"] = tuple(official("flux1-dev-transformer")["axes_dims_rope"])
    else:
        raise ModelFileError(f"transformer: '{name}' has a head size of {head_dim}; its RoPE axes "
                             "cannot be derived from shapes and the file carries no config.")
    return cfg


def vae_config(source: WeightSource, layout: str, stored: dict | None) -> dict:
    cfg = official("flux-vae")
    if stored:
        cfg.update(_clean(stored))
        return cfg
    if layout == "bfl":
        n = _count(source, r"^encoder\.down\.(\d+)\.")
        channels = [_shape(source, f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(n)]
        layers = _count(source, r"^encoder\.down\.0\.block\.(\d+)\.")
    else:
        n = _count(source, r"^encoder\.down_blocks\.(\d+)\.")
        channels = [_shape(source, f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(n)]
        layers = _count(source, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    cfg.update(block_out_channels=channels, layers_per_block=layers,
               down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
               latent_channels=_shape(source, "decoder.conv_in.weight")[1])
    return cfg


def t5_config(source: WeightSource, stored: dict | None) -> dict:
    cfg = official("t5-v1_1-xxl-encoder")
    if stored:
        cfg.update(_clean(stored))
        return cfg
    embed = "shared.weight" if "shared.weight" in source else "encoder.embed_tokens.weight"
    vocab, d_model = _shape(source, embed)
    bias = _shape(source, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = _shape(source, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in source
    wi = "wi_0" if gated else "wi"
    cfg.update(vocab_size=vocab, d_model=d_model, num_layers=_count(source, r"^encoder\.block\.(\d+)\."),
               relative_attention_num_buckets=bias[0], num_heads=bias[1], d_kv=inner // bias[1],
               d_ff=_shape(source, f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0],
               feed_forward_proj="gated-gelu" if gated else "relu")
    return cfg


def clip_config(source: WeightSource, stored: dict | None) -> dict:
    cfg = official("clip-l-text")
    if stored:
        cfg.update(_clean(stored.get("text_config", stored)))
        return cfg
    vocab, hidden = _shape(source, "text_model.embeddings.token_embedding.weight")
    if hidden != cfg["hidden_size"]:
        cfg["num_attention_heads"] = max(1, hidden // 64)
    cfg.update(vocab_size=vocab, hidden_size=hidden,
               max_position_embeddings=_shape(source, "text_model.embeddings.position_embedding.weight")[0],
               num_hidden_layers=_count(source, r"^text_model\.encoder\.layers\.(\d+)\."),
               intermediate_size=_shape(source, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
               projection_dim=hidden)
    return cfg


def siglip_config(source: WeightSource, stored: dict | None) -> dict:
    cfg = official("siglip-so400m-patch14-384-vision")
    if stored:
        cfg.update(_clean(stored.get("vision_config", stored)))
        cfg["model_type"] = "siglip_vision_model"
        return cfg
    hidden, _, patch, _ = _shape(source, "vision_model.embeddings.patch_embedding.weight")
    positions = _shape(source, "vision_model.embeddings.position_embedding.weight")[0]
    side = int(round(positions ** 0.5))
    if hidden != cfg["hidden_size"]:
        cfg["num_attention_heads"] = max(1, hidden // 72)
    # so400m has 27x27 positions from 384 px (the patch conv floors 384/14); 27*14 = 378 is wrong.
    official_grid = cfg["image_size"] // cfg["patch_size"]
    image_size = cfg["image_size"] if (side == official_grid and patch == cfg["patch_size"]) else side * patch
    cfg.update(hidden_size=hidden, patch_size=patch, image_size=image_size,
               num_hidden_layers=_count(source, r"^vision_model\.encoder\.layers\.(\d+)\."),
               intermediate_size=_shape(source, "vision_model.encoder.layers.0.mlp.fc1.weight")[0])
    return cfg


def projector_config(source: WeightSource) -> dict:
    style_tokens, siglip_tokens = _shape(source, "high_embedding_linear.0.weight")
    hidden, siglip_dim = _shape(source, "high_projection.weight")
    return {"siglip_tokens": siglip_tokens, "style_tokens": style_tokens,
            "siglip_dim": siglip_dim, "hidden_size": hidden}
