"""The autoencoder both ways: pixels -> scaled latents (subject references), latents -> the image."""
from __future__ import annotations

import torch


@torch.inference_mode()
def encode_latents(vae, pixels: torch.Tensor, sample_seed: int | None = None) -> torch.Tensor:
    """Scaled latents (z - shift) * scale. The posterior mean by default; with a seed, a sample.

    (The reference samples with the unseeded global RNG, which cannot be reproduced.)
    """
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    if sample_seed is None:
        z = dist.mode()
    else:
        # A CPU generator (diffusers draws on it and moves the sample): DirectML has none of its own.
        generator = torch.Generator(device="cpu").manual_seed(int(sample_seed))
        z = dist.sample(generator=generator)
    return scale(vae, z)


def scale(vae, latents: torch.Tensor) -> torch.Tensor:
    """What the VAE encodes -> what the transformer sees: (z - shift) * scale."""
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def unscale(vae, latents: torch.Tensor) -> torch.Tensor:
    """What the transformer makes -> what the VAE decodes (and a LATENT holds), in float32."""
    return latents.float() / vae.config.scaling_factor + vae.config.shift_factor


@torch.inference_mode()
def decode_latents(vae, latents_unscaled: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Unscaled latents -> (B, H, W, 3) float 0..1 on the CPU, quantised to 8 bits like the
    reference's image (127.5 * (x + 1) truncated)."""
    param = next(vae.parameters())
    z = latents_unscaled.to(param.device, param.dtype)
    x = vae.tiled_decode(z).sample if tiled else vae.decode(z).sample
    x = x.float().clamp(-1, 1)
    as_bytes = (127.5 * (x + 1.0)).to(torch.uint8)
    return (as_bytes.float() / 255.0).permute(0, 2, 3, 1).cpu()
