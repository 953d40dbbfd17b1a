"""Style images -> style tokens: SigLIP hidden states of three layers through the projector."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .projector import BRANCH_LAYERS

CROPS = ("reference", "center")


def style_pixels(image: Image.Image, size: int, crop: str = "reference") -> torch.Tensor:
    """(1, 3, size, size) float32 in [-1, 1].

    "reference": squash the whole image to size x size with PIL bicubic (what USO's SigLIP
    processor does). "center": ComfyUI's CLIPVisionEncode: short side to `size` with antialiased
    bicubic, center crop, 8-bit requantisation.
    """
    rgb = image.convert("RGB")
    if crop == "reference":
        resized = rgb.resize((size, size), resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    elif crop == "center":
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        h, w = x.shape[2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            x = torch.nn.functional.interpolate(x, size=(round(scale * h), round(scale * w)),
                                                mode="bicubic", antialias=True)
            top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
            x = x[:, :, top:top + size, left:left + size]
        x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    else:
        raise ValueError(f"crop: '{crop}' is not one of {', '.join(CROPS)}")
    return (x - 0.5) / 0.5


@torch.inference_mode()
def encode_style(siglip, full_layers: int, projector, pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3 * style_tokens, hidden) for one style image.

    `siglip` is truncated after layer full_layers - 2, so HF's hidden_states[-k] of the full
    model is entry full_layers + 1 - k of the truncated one.
    """
    param = next(siglip.parameters())
    states = siglip(pixel_values=pixels.to(param.device, param.dtype),
                    output_hidden_states=True).hidden_states
    picked = {layer: states[full_layers + 1 + layer] for layer in BRANCH_LAYERS.values()}
    proj_param = next(projector.parameters())
    return projector({k: v.to(proj_param.device) for k, v in picked.items()})
