"""ComfyUI IMAGE tensors <-> PIL images.

IMAGE is float32 [B, H, W, C] in 0..1 on the CPU. Sockets sometimes carry [H, W, C], a single
channel (grayscale) or four (RGBA); all are accepted here so no node has to care.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


#: Float values converted per block (rows of one frame): bounds the temporary memory of a large
#: image (an 8000x8000 frame would otherwise take a few full-size float copies, ~0.8 GB each).
_BLOCK_VALUES = 1 << 22


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
    if image.is_complex() or image.dtype == torch.bool:
        raise ValueError(f"{input_name}: expected float pixel values 0..1, got {image.dtype}.")
    _, height, width, channels = image.shape
    used = min(channels, 3)
    rows = max(1, _BLOCK_VALUES // (width * used))
    out = []
    for frame in image.detach():
        as_bytes = np.empty((height, width, used), dtype=np.uint8)
        for top in range(0, height, rows):
            block = frame[top:top + rows, :, :used].to("cpu", torch.float32)
            if not torch.isfinite(torch.stack(torch.aminmax(block))).all():  # one fast pass
                raise ValueError(f"{input_name}: the image contains NaN or infinite values; "
                                 "check the node that produced it.")
            as_bytes[top:top + rows] = block.clamp(0, 1).mul_(255.0).round_().to(torch.uint8).numpy()
        if used == 1:
            as_bytes = np.repeat(as_bytes, 3, axis=2)
        out.append(Image.fromarray(as_bytes, mode="RGB"))
    return out


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
