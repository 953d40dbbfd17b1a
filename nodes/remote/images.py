"""IMAGE frames -> data URIs the providers accept, and result images -> RGB PIL images."""
from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..image_limits import open_image
from .errors import InputError, ProviderError
from .transport import url_problem

MAX_PIXELS = 2048 * 2048  # the cap ComfyUI's own API nodes use before uploading
MAX_ENCODED_BYTES = 2_000_000  # data URIs break at a few MB on fal's side; stay well under
JPEG_QUALITY = 95


def frames(images, input_name: str) -> list[Image.Image]:
    """RGB copies of a list of PIL images (the ComfyUI node converts its IMAGE inputs to such a list;
    the command line's and Python API's image files need not share one size)."""
    if isinstance(images, Image.Image):
        images = [images]
    if not (isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images)):
        raise InputError(f"{input_name}: expected one or more images, got {type(images).__name__}.")
    return [i.convert("RGB") for i in images]


def fit_pixels(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    w, h = img.size
    if w * h <= max_pixels:
        return img
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return img.resize(size, Image.LANCZOS)


def encode_for_upload(img: Image.Image, max_bytes: int = MAX_ENCODED_BYTES) -> tuple[bytes, str]:
    """(bytes, mime): PNG when it fits in max_bytes, else JPEG q95, shrunk until it fits."""
    img = fit_pixels(img.convert("RGB"))
    png = _save(img, "PNG")
    if len(png) <= max_bytes:
        return png, "image/png"
    while True:
        jpeg = _save(img, "JPEG", quality=JPEG_QUALITY)
        if len(jpeg) <= max_bytes or min(img.size) <= 64:
            return jpeg, "image/jpeg"
        scale = math.sqrt(max_bytes / len(jpeg)) * 0.95
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))), Image.LANCZOS)


def to_data_uri(img: Image.Image, max_bytes: int = MAX_ENCODED_BYTES) -> str:
    data, mime = encode_for_upload(img, max_bytes)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:"):
        raise ValueError("not a data URI")
    if header.endswith(";base64"):
        return base64.b64decode(payload, validate=False)
    raise ValueError("data URI is not base64-encoded")


def item_bytes(item: object, download: Callable[[str], bytes]) -> bytes:
    """The bytes of one result entry: {url} (http(s) or data:), {b64_json} or {file_data}."""
    if isinstance(item, str):
        item = {"url": item}
    if not isinstance(item, dict):
        raise ValueError("the result entry is not an object")
    for field in ("b64_json", "file_data"):
        if isinstance(item.get(field), str) and item[field]:
            try:
                return base64.b64decode(item[field], validate=False)
            except (binascii.Error, ValueError):
                raise ValueError(f"'{field}' is not valid base64") from None
    url = item.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("the result entry has no url, b64_json or file_data")
    if url.startswith("data:"):
        try:
            return decode_data_uri(url)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"its data URI cannot be decoded ({exc})") from None
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(f"its url {problem}, so it was not downloaded")
    return download(url)


def to_rgb(data: bytes) -> Image.Image:
    """An RGB image from a result file; refused (ValueError) when its header claims more pixels than
    `image_limits.MAX_PIXELS`, before anything is decoded."""
    try:
        opened = open_image(io.BytesIO(data))
    except ValueError as exc:
        raise ValueError(f"it {exc}") from None
    except UnidentifiedImageError:
        # PIL's own text names a Python object ("<_io.BytesIO object at 0x...>"); say what came.
        head = data[:60].decode("utf-8", "replace")
        printable = head.strip() and all(c.isprintable() or c.isspace() for c in head)
        raise ValueError(f"it is not an image file ({len(data)} bytes"
                         + (f", starting '{' '.join(head.split())}'" if printable else "") + ")") from None
    with opened as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return wide_to_8bit(img).convert("RGB")
        return img.convert("RGB")


#: Pixels converted at a time by `wide_to_8bit`: its working memory, whatever the image's size.
STRIP_PIXELS = 1 << 16


def wide_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) image as 8-bit "L", rounded to the nearest level: 16-bit data
    over 0..65535, 32-bit data over 0..255 when it stays in that range, else over 0..65535.
    Converted a strip of rows at a time, so beside the image itself it needs 1 byte a pixel (the
    result) and a fixed working strip, not a float copy of the whole image."""
    width, height = img.size
    if img.mode.startswith("I;16"):
        peak = 65535
    else:
        peak = 65535 if img.getextrema()[1] > 255 else 255
    out = np.empty((height, width), np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = np.array(img.crop((0, top, width, bottom)), dtype=np.int64)
        strip *= 255   # in place: one working strip, no temporaries
        strip += peak // 2
        strip //= peak
        out[top:bottom] = np.clip(strip, 0, 255, out=strip)
    return Image.fromarray(out)


def decode_results(items: list, download: Callable[[str], bytes], provider: str,
                   request_id: str | None) -> tuple[list[Image.Image], list[str]]:
    """RGB images of one size (later ones resized to the first, with a warning) and warnings."""
    rid = f" (request_id={request_id})" if request_id else ""
    images: list[Image.Image] = []
    warnings: list[str] = []
    for i, item in enumerate(items):
        try:
            images.append(to_rgb(item_bytes(item, download)))
        except (ValueError, OSError, Image.DecompressionBombError) as exc:
            raise ProviderError(f"{provider}: result image {i + 1} of {len(items)} could not be read: "
                                f"{exc}{rid}. Run again; if it repeats, report it to {provider}.") from None
    if images:
        size = images[0].size
        for i, img in enumerate(images[1:], start=2):
            if img.size != size:
                warnings.append(f"result image {i} is {img.width}x{img.height}, image 1 is "
                                f"{size[0]}x{size[1]}; resized it to fit one IMAGE batch")
                images[i - 1] = img.resize(size, Image.LANCZOS)
    return images, warnings
