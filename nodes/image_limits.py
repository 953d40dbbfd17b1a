"""The pixel cap of every image the pack decodes (input files, provider results): checked from the
header, before any pixel is decoded, without touching PIL's process-wide limit.

It sits below files and remote (it imports only PIL), so both read images under the same cap.
"""
from __future__ import annotations

from PIL import Image

#: The most pixels an image may have to be read here: 8192 x 8192 (67 MP, 201 MB as RGB). USO works
#: at 512 to 4096 pixels a side (2048 on fal/AIML) and scales every input image down to that, so this
#: leaves room for any camera photo, while a file whose header claims more (a decompression bomb, or a
#: scan far beyond what USO can use) is refused before its pixels are decoded. It lies below PIL's own
#: process-wide limit (89 MP), which the pack leaves as the process has it.
MAX_PIXELS = 8192 * 8192


def too_many_pixels(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of `size` (width, height) is not read, or None: more than `max_pixels`."""
    width, height = size
    if width * height <= max_pixels:
        return None
    return (f"is {width}x{height} pixels ({width * height / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP "
            f"({_side(max_pixels)}) an image may have here; scale it down (USO uses at most 4096 pixels a side)")


def _side(pixels: int) -> str:
    side = int(pixels ** 0.5)
    return f"{side}x{side}" if side * side == pixels else f"{pixels} pixels"


def open_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`Image.open(source)`: the header only, nothing decoded yet. ValueError with the reason (to
    follow the input's name) when the header's size is over `max_pixels`."""
    try:
        img = Image.open(source)
    except Image.DecompressionBombError:  # over twice PIL's own limit, so over ours too
        raise ValueError(f"is over the {max_pixels / 1e6:.1f} MP ({_side(max_pixels)}) an image may have here "
                         "(its header claims far more); scale it down") from None
    problem = too_many_pixels(img.size, max_pixels)
    if problem is not None:
        img.close()
        raise ValueError(problem)
    return img
