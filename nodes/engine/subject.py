"""Subject images -> reference latents, exactly as the reference prepares them."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def preprocess_subject(image: Image.Image, long_side: int = 512) -> Image.Image:
    """Long side to `long_side` (LANCZOS, short side floored), center crop to multiples of 16.

    A 16x16 image passes through untouched, and RGB conversion happens after resizing (so RGBA
    is resized in its own mode), both as in the reference.
    """
    w, h = image.size
    if w == h == 16:
        return image.convert("RGB")
    if w >= h:
        new_w, new_h = long_side, int(long_side / w * h)
    else:
        new_w, new_h = int(long_side / h * w), long_side
    if new_w < 16 or new_h < 16:
        raise ValueError(f"subject image {w}x{h} is too narrow: at a long side of {long_side} its "
                         f"short side would be {min(new_w, new_h)} px (< 16). Crop it closer to "
                         "the subject.")
    resized = image.resize((new_w, new_h), resample=Image.LANCZOS)
    target_w, target_h = new_w // 16 * 16, new_h // 16 * 16
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return resized.crop((left, top, left + target_w, top + target_h)).convert("RGB")


def subject_pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, h, w) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return x.permute(2, 0, 1)[None] * 2.0 - 1.0


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
        generator = torch.Generator(device=param.device).manual_seed(int(sample_seed))
        z = dist.sample(generator=generator)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


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
