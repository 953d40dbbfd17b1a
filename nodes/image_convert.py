"""ComfyUI IMAGE tensors <-> PIL images.

IMAGE is float32 [B, H, W, C] in 0..1 on the CPU. Sockets sometimes carry [H, W, C], a single
channel (grayscale) or four (RGBA); all are accepted here so no node has to care.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_batch_to_pils(image: torch.Tensor, input_name: str = "image") -> list[Image.Image]:
    """One RGB PIL image per batch element. Alpha is dropped (as PIL's RGBA->RGB does)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{input_name}: expected an IMAGE tensor, got {type(image).__name__}. "
                        "Connect an IMAGE output (e.g. Load Image) to this input.")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or image.shape[0] == 0:
        raise ValueError(f"{input_name}: expected an IMAGE of shape [batch, height, width, 1|3|4], "
                         f"got {list(image.shape)}. Connect an IMAGE output (e.g. Load Image).")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{input_name}: the image is empty ({list(image.shape)}).")
    pixels = image.detach().to("cpu", torch.float32)
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{input_name}: the image contains NaN or infinite values; "
                         "check the node that produced it.")
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(*pixels.shape[:-1], 3)
    pixels = pixels[..., :3]
    as_bytes = (pixels.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(frame), mode="RGB") for frame in as_bytes]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """[H, W, 3] float32 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def pils_to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """[B, H, W, 3] float32 0..1; every image must have the size of the first."""
    if not images:
        raise ValueError("no images to return")
    size = images[0].size
    for i, img in enumerate(images):
        if img.size != size:
            raise ValueError(f"image {i} is {img.size[0]}x{img.size[1]}, but image 0 is "
                             f"{size[0]}x{size[1]}; a batch needs one size")
    return torch.stack([pil_to_tensor(img) for img in images])
