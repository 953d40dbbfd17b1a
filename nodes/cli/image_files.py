"""Image files for the command line and the Python API: opened the way ComfyUI's Load Image does.

Load Image applies the EXIF orientation, scales 16/32-bit integer images to 8 bits and drops the
alpha channel, so a file gives the same pixels here as in a graph.
"""
from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

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


def probe_image(path: str) -> tuple[int, int]:
    """(width, height) from the file header; raises ValueError with the reason ("does not exist").

    Cheap (no decoding), so a whole manifest can be checked before any model loads. A file whose
    header is fine but whose data is broken fails later, when the job runs.
    """
    if not os.path.exists(path):
        raise ValueError("does not exist")
    if os.path.isdir(path):
        raise ValueError("is a folder, not an image file")
    try:
        with open_image(path) as img:
            return img.size
    except UnidentifiedImageError:
        raise ValueError("is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc})") from None


def load_image(path: str) -> Image.Image:
    """An RGB PIL image, EXIF-rotated, 16-bit scaled to 8-bit, alpha dropped (like Load Image)."""
    try:
        with open_image(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except ValueError as exc:  # over the pixel limit
        raise ValueError(f"'{path}' {exc}") from None
    except (OSError, SyntaxError) as exc:  # truncated or corrupt data behind a valid header
        raise ValueError(f"'{path}' cannot be decoded: {exc}") from None
    return to_8bit(img).convert("RGB")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) images scaled to 8 bits, as ComfyUI's Load Image does (a plain
    convert("RGB") would clip them to white); other modes are returned as they are."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        return img.point(lambda v: v * (1 / 255)).convert("L")
    return img
