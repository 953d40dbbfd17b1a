"""Image files for the command line and the Python API: opened the way ComfyUI's Load Image does.

Load Image applies the EXIF orientation, scales 16/32-bit integer images to 8 bits and drops the
alpha channel, so a file gives the same pixels here as in a graph.
"""
from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

from ..image_limits import MAX_PIXELS, open_image, too_many_pixels  # noqa: F401 (re-exported)


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
