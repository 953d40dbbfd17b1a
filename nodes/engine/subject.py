"""Subject images -> the pixels the reference encodes (`vae.encode_latents` makes them latents)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .limits import LONG_SIDE


def preprocess_subject(image: Image.Image, long_side: int = LONG_SIDE.default) -> Image.Image:
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
