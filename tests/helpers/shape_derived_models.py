"""A tiny USO model set whose architecture the loaders can derive from tensor shapes alone, written
twice with the same weights: with `config` metadata (as every file of tests/helpers/tiny_models.py) and without
(as the real FLUX / T5 / CLIP / SigLIP / AE / USO files are). Loading the second takes the
shape-derivation path of `nodes/engine/architecture.py` end to end.

Shapes cannot say everything, so the loaders fill the rest from the official configs; the models
here are built from those same official configs with only shape-visible sizes changed, and with
the sizes the derivation assumes: FLUX head size 128 (RoPE axes 16/56/56), one CLIP head per 64
channels, one SigLIP head per 72, VAE widths in multiples of its 32 norm groups.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import tiny_models as tm

FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
            joint_attention_dim=32, pooled_projection_dim=64)
T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
            projection_dim=64)
SIGLIP = dict(hidden_size=72, intermediate_size=144, num_attention_heads=1, image_size=56, patch_size=14)
VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
PROJECTOR_STYLE_TOKENS = 8
LORA_RANK = 4


@dataclass(frozen=True)
class ShapeDerivedSet:
    with_config: dict        # slot -> path; files carrying `config` metadata
    without_config: dict     # slot -> path; the same tensors, no `config`
    tokenizer_dir: Path
    configs: dict            # slot -> the config each model was built from


def _official(name: str) -> dict:
    from nodes.engine.architecture import official

    cfg = official(name)
    cfg.pop("model_type", None)
    return cfg


def _write(sd: dict, folder: Path, name: str, config, dtype) -> tuple[Path, Path]:
    tensors = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    paths = []
    for sub, meta in (("with_config", {"format": "pt", "config": json.dumps(config)}),
                      ("without_config", {"format": "pt"})):
        path = folder / sub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        paths.append(path)
    return paths[0], paths[1]


def build_shape_derived_set(root: Path) -> ShapeDerivedSet:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config, \
        T5EncoderModel

    root = Path(root)
    tok_t5, tok_clip = root / "tokenizers" / "t5", root / "tokenizers" / "clip_l"
    tok_t5.mkdir(parents=True, exist_ok=True)
    tok_clip.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), tm._quiet_libraries():
        tm._write_tokenizers(tok_t5, tok_clip)
        paths, configs = {}, {}

        flux_cfg = {**_official("flux1-dev-transformer"), **FLUX}
        flux = FluxTransformer2DModel(**flux_cfg)
        tm._fill(flux, "derived_flux")
        configs["transformer"] = tm._plain_config(flux.config)
        paths["transformer"] = _write(tm.diffusers_to_bfl_flux(flux.state_dict()), root, "flux1-dev.safetensors",
                                      configs["transformer"], torch.bfloat16)

        vae = AutoencoderKL(**{**_official("flux-vae"), **VAE})
        tm._fill(vae, "derived_vae")
        configs["vae"] = tm._plain_config(vae.config)
        paths["vae"] = _write(tm.diffusers_to_ldm_vae(vae.state_dict()), root, "ae.safetensors", configs["vae"],
                              torch.float32)

        t5 = T5EncoderModel(T5Config(**{**_official("t5-v1_1-xxl-encoder"), **T5,
                                         "vocab_size": len(tm._t5_vocab())}))
        tm._fill(t5, "derived_t5")
        configs["t5"] = tm._hf_config(t5.config)
        paths["t5"] = _write(tm._t5_file_state(t5), root, "t5xxl_fp16.safetensors", configs["t5"], torch.float16)

        clip = CLIPTextModel(CLIPTextConfig(**{**_official("clip-l-text"), **CLIP,
                                               "vocab_size": len(tm._clip_vocab())}))
        tm._fill(clip, "derived_clip")
        configs["clip_l"] = tm._hf_config(clip.config)
        paths["clip_l"] = _write(tm._prefixed(clip.state_dict(), "text_model."), root, "clip_l.safetensors",
                                 configs["clip_l"], torch.float16)

        siglip = SiglipVisionModel(SiglipVisionConfig(**{**_official("siglip-so400m-patch14-384-vision"), **SIGLIP}))
        tm._fill(siglip, "derived_siglip")
        configs["siglip"] = tm._hf_config(siglip.config)
        paths["siglip"] = _write(tm._prefixed(siglip.state_dict(), "vision_model."), root,
                                 "sigclip_vision_patch14_384.safetensors", configs["siglip"], torch.float16)

        hidden = FLUX["num_attention_heads"] * FLUX["attention_head_dim"]
        grid = (SIGLIP["image_size"] // SIGLIP["patch_size"]) ** 2
        configs["projector"] = dict(siglip_tokens=grid, style_tokens=PROJECTOR_STYLE_TOKENS,
                                    siglip_dim=SIGLIP["hidden_size"], hidden_size=hidden)
        g = tm._gen("derived_projector")
        projector = {k: tm._snap(tm._value(k, s, g)) for k, s in tm._projector_shapes(configs["projector"]).items()}
        paths["projector"] = _write(projector, root, "uso-flux1-projector-v1.safetensors", configs["projector"],
                                    torch.bfloat16)

        g = tm._gen("derived_lora")
        lora = {f"diffusion_model.{k}": tm._snap(0.1 * torch.randn(s, generator=g))
                for k, s in tm._lora_shapes(FLUX["num_layers"], FLUX["num_single_layers"], hidden, 4 * hidden,
                                            LORA_RANK).items()}
        configs["uso_lora"] = {"rank": LORA_RANK}
        paths["uso_lora"] = _write(lora, root, "uso-flux1-dit-lora-v1.safetensors", configs["uso_lora"],
                                   torch.bfloat16)
    return ShapeDerivedSet({k: v[0] for k, v in paths.items()}, {k: v[1] for k, v in paths.items()},
                           root / "tokenizers", configs)
