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


def _name(source: WeightSource) -> str:
    return os.path.basename(source.path.rstrip("/\\"))


def _count(source: WeightSource, pattern: str) -> int:
    """How many numbered blocks the keys hold; a gap in the numbering is a damaged file."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in source.keys() if (m := rx.match(k))}
    if not found:
        return 0
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise ModelFileError(f"'{_name(source)}' numbers its blocks up to {max(found)} but lacks "
                             f"{len(missing)} of them (block {missing[0]} first); the file is damaged or "
                             "incomplete. Download it again.")
    return max(found) + 1


def _shape(source: WeightSource, key: str, ndim: int) -> tuple[int, ...]:
    """The shape of a tensor the architecture is read from; a missing or misshapen one is a file
    that is not the model it looks like (or is damaged)."""
    info = source.infos.get(key)
    if info is None:
        raise ModelFileError(f"'{_name(source)}' lacks the tensor {key}; it is incomplete or a different "
                             "model. Download it again, or pick the right file.")
    if len(info.shape) != ndim or not all(d > 0 for d in info.shape):
        raise ModelFileError(f"'{_name(source)}' has {key} of shape {list(info.shape)}, where a "
                             f"{ndim}-dimensional tensor was expected; the file is damaged or a different "
                             "model.")
    return info.shape


_DIFFUSERS_PRIVATE = re.compile(r"^_")


def _clean(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not _DIFFUSERS_PRIVATE.match(k)}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), "null")


def _fits(value, like) -> bool:
    """Whether a stored value has the JSON type of the official value it replaces."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(like, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    if isinstance(like, list):
        return isinstance(value, list) and all(_fits(v, like[0]) for v in value) if like else isinstance(value, list)
    return isinstance(value, type(like))


def _merged(what: str, source: WeightSource, official_cfg: dict, stored: dict, derived: dict,
            only_known: bool = False) -> dict:
    """The official config updated by the stored one. A stored value must have the JSON type of the
    official value it replaces, and a size the shapes tell (`derived`) must equal it: a config that
    disagrees with the tensors is refused here, before a model is built from it."""
    name = _name(source)
    cfg = dict(official_cfg)
    for key, value in _clean(stored).items():
        if only_known and key not in official_cfg:
            continue
        like = official_cfg.get(key)
        if like is not None and not _fits(value, like):
            raise ModelFileError(
                f"{what}: '{name}' has a `config` metadata entry whose '{key}' is "
                f"{json.dumps(value)[:80]} ({_kind(value)}) where {_kind(like)} like "
                f"{json.dumps(like)} belongs. The metadata is damaged; re-save the file without its "
                "config metadata, or download it again.")
        cfg[key] = value
    for key, truth in derived.items():
        if key in stored and stored[key] != truth:
            raise ModelFileError(
                f"{what}: '{name}' has a `config` metadata entry whose '{key}' is "
                f"{json.dumps(stored[key])[:80]}, but its tensors say {json.dumps(truth)}. The metadata "
                "does not describe this file; re-save it without its config metadata, or download it "
                "again.")
        cfg[key] = truth
    return cfg


def _positive(what: str, source: WeightSource, cfg: dict, key: str) -> None:
    if not isinstance(cfg.get(key), int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
        raise ModelFileError(f"{what}: '{_name(source)}' has a `config` metadata entry whose '{key}' is "
                             f"{json.dumps(cfg.get(key))[:80]}; it must be a positive whole number. Re-save "
                             "the file without its config metadata, or download it again.")


def _part(stored: dict | None, key: str) -> dict | None:
    """A transformers config nested under `key` (a full CLIP/SigLIP config), or the config itself."""
    if not stored:
        return None
    inner = stored.get(key, stored)
    return inner if isinstance(inner, dict) else None


def flux_config(source: WeightSource, layout: str, stored: dict | None) -> dict:
    """diffusers FluxTransformer2DModel kwargs. `layout` is 'bfl' or 'diffusers'."""
    if layout == "bfl":
        hidden, in_channels = _shape(source, "img_in.weight", 2)
        head_dim = _shape(source, "double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
        cfg = {
            "patch_size": 1,
            "in_channels": in_channels,
            "num_layers": _count(source, r"^double_blocks\.(\d+)\."),
            "num_single_layers": _count(source, r"^single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": _shape(source, "txt_in.weight", 2)[1],
            "pooled_projection_dim": _shape(source, "vector_in.in_layer.weight", 2)[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in source,
        }
        mlp_hidden = _shape(source, "double_blocks.0.img_mlp.0.weight", 2)[0]
    else:
        hidden, in_channels = _shape(source, "x_embedder.weight", 2)
        head_dim = _shape(source, "transformer_blocks.0.attn.norm_q.weight", 1)[0]
        cfg = {
            "patch_size": 1,
            "in_channels": in_channels,
            "num_layers": _count(source, r"^transformer_blocks\.(\d+)\."),
            "num_single_layers": _count(source, r"^single_transformer_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": _shape(source, "context_embedder.weight", 2)[1],
            "pooled_projection_dim": _shape(source, "time_text_embed.text_embedder.linear_1.weight", 2)[1],
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in source,
        }
        mlp_hidden = _shape(source, "transformer_blocks.0.ff.net.0.proj.weight", 2)[0]
    name = _name(source)
    if not cfg["guidance_embeds"]:
        raise ModelFileError(f"transformer: '{name}' is FLUX.1-schnell (no guidance embedding). "
                             "USO is trained on FLUX.1-dev; pick a FLUX.1-dev transformer.")
    if in_channels != 64:
        raise ModelFileError(f"transformer: '{name}' takes {in_channels} input channels (a FLUX Fill/"
                             "Depth/Canny variant?). USO needs plain FLUX.1-dev (64 channels).")
    if mlp_hidden != 4 * hidden or hidden % head_dim:
        raise ModelFileError(f"transformer: '{name}' has an MLP width of {mlp_hidden} and a head size of "
                             f"{head_dim} for width {hidden}; this is not a FLUX.1 transformer.")
    axes = stored.get("axes_dims_rope") if stored else None
    if axes:
        if not (isinstance(axes, list) and len(axes) == 3 and all(_fits(a, 1) and a > 0 for a in axes)
                and sum(axes) == head_dim):
            raise ModelFileError(
                f"transformer: '{name}' has a `config` metadata entry whose 'axes_dims_rope' is "
                f"{json.dumps(axes)[:80]}; it must be three positive whole numbers adding up to the head "
                f"size {head_dim}. Re-save the file without its config metadata, or download it again.")
        cfg["axes_dims_rope"] = tuple(axes)
    elif head_dim == 128:
        cfg["axes_dims_rope"] = tuple(official("flux1-dev-transformer")["axes_dims_rope"])
    else:
        raise ModelFileError(f"transformer: '{name}' has a head size of {head_dim}; its RoPE axes "
                             "cannot be derived from shapes and the file carries no config.")
    return cfg


def vae_config(source: WeightSource, layout: str, stored: dict | None) -> dict:
    if layout == "bfl":
        n = _count(source, r"^encoder\.down\.(\d+)\.")
        channels = [_shape(source, f"encoder.down.{i}.block.0.conv2.weight", 4)[0] for i in range(max(n, 1))]
        layers = _count(source, r"^encoder\.down\.0\.block\.(\d+)\.")
    else:
        n = _count(source, r"^encoder\.down_blocks\.(\d+)\.")
        channels = [_shape(source, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", 4)[0]
                    for i in range(max(n, 1))]
        layers = _count(source, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    derived = {"block_out_channels": channels, "layers_per_block": layers,
               "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
               "latent_channels": _shape(source, "decoder.conv_in.weight", 4)[1]}
    # AutoencoderKL takes no keys but its own: the stored config is read for those only.
    return _merged("vae", source, official("flux-vae"), stored or {}, derived, only_known=True)


def t5_config(source: WeightSource, stored: dict | None) -> dict:
    embed = "shared.weight" if "shared.weight" in source else "encoder.embed_tokens.weight"
    vocab, d_model = _shape(source, embed, 2)
    buckets, heads = _shape(source, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 2)
    inner = _shape(source, "encoder.block.0.layer.0.SelfAttention.q.weight", 2)[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in source
    wi = "wi_0" if gated else "wi"
    derived = {"vocab_size": vocab, "d_model": d_model, "num_layers": _count(source, r"^encoder\.block\.(\d+)\."),
               "relative_attention_num_buckets": buckets, "num_heads": heads, "d_kv": inner // heads,
               "d_ff": _shape(source, f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight", 2)[0]}
    cfg = _merged("t5", source, official("t5-v1_1-xxl-encoder"), stored or {}, derived)
    if not stored or "feed_forward_proj" not in stored:
        cfg["feed_forward_proj"] = "gated-gelu" if gated else "relu"
    elif cfg["feed_forward_proj"].startswith("gated-") != gated:
        raise ModelFileError(
            f"t5: '{_name(source)}' has a `config` metadata entry whose 'feed_forward_proj' is "
            f"{json.dumps(cfg['feed_forward_proj'])[:80]}, but its feed-forward layers are "
            f"{'' if gated else 'not '}gated. Re-save the file without its config metadata, or download it again.")
    return cfg


def clip_config(source: WeightSource, stored: dict | None) -> dict:
    official_cfg = official("clip-l-text")
    vocab, hidden = _shape(source, "text_model.embeddings.token_embedding.weight", 2)
    derived = {"vocab_size": vocab, "hidden_size": hidden,
               "max_position_embeddings": _shape(source, "text_model.embeddings.position_embedding.weight", 2)[0],
               "num_hidden_layers": _count(source, r"^text_model\.encoder\.layers\.(\d+)\."),
               "intermediate_size": _shape(source, "text_model.encoder.layers.0.mlp.fc1.weight", 2)[0]}
    stored = _part(stored, "text_config")
    if not stored:
        derived["projection_dim"] = hidden
        if hidden != official_cfg["hidden_size"]:
            derived["num_attention_heads"] = max(1, hidden // 64)
    cfg = _merged("clip_l", source, official_cfg, stored or {}, derived)
    _positive("clip_l", source, cfg, "num_attention_heads")
    return cfg


def siglip_config(source: WeightSource, stored: dict | None) -> dict:
    official_cfg = official("siglip-so400m-patch14-384-vision")
    hidden, _, patch, _ = _shape(source, "vision_model.embeddings.patch_embedding.weight", 4)
    positions = _shape(source, "vision_model.embeddings.position_embedding.weight", 2)[0]
    side = int(round(positions ** 0.5))
    derived = {"hidden_size": hidden, "patch_size": patch,
               "num_hidden_layers": _count(source, r"^vision_model\.encoder\.layers\.(\d+)\."),
               "intermediate_size": _shape(source, "vision_model.encoder.layers.0.mlp.fc1.weight", 2)[0]}
    stored = _part(stored, "vision_config")
    if not stored:
        if hidden != official_cfg["hidden_size"]:
            derived["num_attention_heads"] = max(1, hidden // 72)
        # so400m has 27x27 positions from 384 px (the patch conv floors 384/14); 27*14 = 378 is wrong.
        official_grid = official_cfg["image_size"] // official_cfg["patch_size"]
        derived["image_size"] = official_cfg["image_size"] if (side == official_grid and patch == official_cfg[
            "patch_size"]) else side * patch
    cfg = _merged("siglip", source, official_cfg, stored or {}, derived)
    _positive("siglip", source, cfg, "num_attention_heads")
    _positive("siglip", source, cfg, "image_size")
    if cfg["image_size"] // patch != side:
        raise ModelFileError(
            f"siglip: '{_name(source)}' has a `config` metadata entry whose 'image_size' is "
            f"{cfg['image_size']}, but its {positions} position embeddings fit {side * patch} px "
            f"({side}x{side} patches of {patch} px). Re-save the file without its config metadata, or "
            "download it again.")
    cfg["model_type"] = "siglip_vision_model"
    return cfg


def projector_config(source: WeightSource) -> dict:
    style_tokens, siglip_tokens = _shape(source, "high_embedding_linear.0.weight", 2)
    hidden, siglip_dim = _shape(source, "high_projection.weight", 2)
    return {"siglip_tokens": siglip_tokens, "style_tokens": style_tokens,
            "siglip_dim": siglip_dim, "hidden_size": hidden}
