"""What is this weight file? Decided from key names and shapes only (no tensor is read)."""
from __future__ import annotations

import os

from .errors import ModelFileError
from .weight_source import WeightSource

AIO_TRANSFORMER_PREFIX = "model.diffusion_model."
AIO_PREFIXES = {
    "vae": "vae.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}

#: What each slot accepts, in words for error messages.
EXPECTED = {
    "transformer": "a FLUX.1-dev transformer (BFL single file, ComfyUI checkpoint, fp8 / scaled fp8, "
                   "GGUF, or a diffusers FLUX.1-dev folder), e.g. flux1-dev.safetensors",
    "vae": "the FLUX autoencoder, e.g. ae.safetensors",
    "t5": "the T5-XXL text encoder, e.g. t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors",
    "clip_l": "the CLIP-L text encoder, e.g. clip_l.safetensors",
    "siglip": "the SigLIP so400m vision encoder, e.g. sigclip_vision_patch14_384.safetensors",
    "uso_lora": "the USO DiT LoRA, e.g. uso-flux1-dit-lora-v1.safetensors",
    "projector": "the USO style projector, e.g. uso-flux1-projector-v1.safetensors",
}


def _has(source: WeightSource, *keys: str) -> bool:
    return all(k in source for k in keys)


def has_prefix(source: WeightSource, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in source.keys())


def classify(source: WeightSource) -> str:
    """One of: flux_bfl, flux_diffusers, checkpoint_aio, flux_ae_bfl, flux_ae_diffusers, t5,
    clip_l, siglip, uso_lora, uso_projector, or 'other:<description>'."""
    keys = source.keys()
    if has_prefix(source, AIO_TRANSFORMER_PREFIX):
        inner = source.with_prefix(AIO_TRANSFORMER_PREFIX)
        if _is_flux_bfl(inner):
            return "checkpoint_aio"
        if has_prefix(inner, "input_blocks."):
            return "other:a Stable Diffusion (UNet) checkpoint, not FLUX"
        return "other:a ComfyUI checkpoint of another model family"
    if any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys):
        return "uso_lora"
    if _has(source, "feature_embedder.mid_layer_norm.bias") or _has(source, "mid_layer_norm.bias",
                                                                      "high_projection.weight"):
        return "uso_projector"
    if _is_flux_bfl(source):
        return "flux_bfl"
    if _has(source, "x_embedder.weight") and has_prefix(source, "transformer_blocks.0.attn.to_q"):
        return "flux_diffusers"
    if has_prefix(source, "vision_model.encoder.layers."):
        return "siglip" if "vision_model.embeddings.position_embedding.weight" in source and \
            "vision_model.embeddings.class_embedding" not in source else \
            "other:a CLIP vision encoder (not SigLIP)"
    if has_prefix(source, "text_model.encoder.layers."):
        return "clip_l"
    if has_prefix(source, "encoder.block.") and has_prefix(source, "encoder.final_layer_norm"):
        return "t5"
    if "decoder.conv_in.weight" in source:
        shape = source.infos["decoder.conv_in.weight"].shape
        latent = shape[1] if len(shape) == 4 else 0
        if latent != 16:
            return (f"other:an autoencoder with {latent} latent channels (FLUX needs 16; an SD VAE?)" if latent
                    else "other:an autoencoder whose decoder.conv_in.weight is not a convolution (a damaged file)")
        if has_prefix(source, "decoder.up_blocks."):
            return "flux_ae_diffusers"
        return "flux_ae_bfl"
    if any(k.startswith(("lora_unet_", "lora_te", "transformer.")) or ".lora_A." in k or
           ".lora_down." in k for k in keys):
        return "other:a LoRA of another kind (not the USO DiT LoRA)"
    if has_prefix(source, "model.diffusion_model.") or has_prefix(source, "input_blocks."):
        return "other:a Stable Diffusion UNet"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    return f"other:an unrecognised file (first keys: {sample})"


def _is_flux_bfl(source: WeightSource) -> bool:
    return "img_in.weight" in source and has_prefix(source, "double_blocks.0.img_attn.")


DESCRIPTIONS = {
    "flux_bfl": "a FLUX transformer (BFL single file)",
    "flux_diffusers": "a FLUX transformer (diffusers keys)",
    "checkpoint_aio": "a ComfyUI all-in-one FLUX checkpoint",
    "flux_ae_bfl": "the FLUX autoencoder",
    "flux_ae_diffusers": "the FLUX autoencoder (diffusers keys)",
    "t5": "a T5 text encoder",
    "clip_l": "a CLIP text encoder",
    "siglip": "a SigLIP vision encoder",
    "uso_lora": "the USO DiT LoRA",
    "uso_projector": "the USO style projector",
}


def describe(kind: str) -> str:
    return kind[len("other:"):] if kind.startswith("other:") else DESCRIPTIONS.get(kind, kind)


def require_kind(source: WeightSource, slot: str, accepted: tuple[str, ...]) -> str:
    """The file's kind, or a ModelFileError naming the file, what it is and what the slot needs."""
    kind = classify(source)
    if kind not in accepted:
        name = os.path.basename(source.path.rstrip("/\\"))
        raise ModelFileError(
            f"{slot}: '{name}' looks like {describe(kind)}, but this input needs {EXPECTED[slot]}. "
            f"Pick the right file for '{slot}'.")
    return kind
