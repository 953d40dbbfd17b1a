"""Generation parameters in PNG text chunks, and back.

Two chunks: ``uso`` holds the parameters as JSON (what `read_parameters` returns), and
``parameters`` the same in the one-line-per-field text that image tools (A1111, Civitai, ...)
show. The names ``prompt`` and ``workflow`` are left alone: ComfyUI reads those as graphs.

Nothing secret goes in: keys whose name looks like a credential are dropped, whatever a caller
passes.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile

from PIL import Image
from PIL.PngImagePlugin import PngInfo

JSON_CHUNK = "uso"
TEXT_CHUNK = "parameters"
_SECRET_NAME = re.compile(r"((^|_)key($|_)|api[_-]?key|secret|token|password|authorization|credential)", re.I)


def software() -> str:
    """'comfyui-uso <version>' from the pack's pyproject.toml."""
    pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # nodes/files/ -> pack
    path = os.path.join(pack, "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    except OSError:
        match = None
    return f"comfyui-uso {match.group(1) if match else 'unknown'}"


def scrub(value):
    """`value` without any mapping entry whose key names a credential (recursive)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not _SECRET_NAME.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def as_text(parameters: dict) -> str:
    """Prompt on the first line, then 'Name: value' pairs (A1111's layout)."""
    params = scrub(parameters)
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    pairs = []
    for key, value in params.items():
        if key in ("prompt", "negative_prompt") or value in (None, "", [], {}):
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        pairs.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def png_info(parameters: dict) -> PngInfo:
    params = scrub(parameters)
    info = PngInfo()
    info.add_text(JSON_CHUNK, json.dumps(params, ensure_ascii=False, sort_keys=False))
    info.add_text(TEXT_CHUNK, as_text(params))
    info.add_text("Software", str(params.get("software", software())))
    return info


def save_png(image: Image.Image, path: str, parameters: dict) -> None:
    """Write `image` with its parameters; atomically, so an interrupted run never leaves a
    half-written file that a resumed run would take as done. The temporary file is a new one
    (`mkstemp`: random name, created exclusively) in the target folder, renamed into place: a link
    placed in a shared folder cannot redirect the write, and two writers of one path (two Ray
    workers on the same job) never share a temporary file; the last rename wins whole."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(parameters))
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def new_file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp makes 0o600 ones."""
    # The umask can only be read by setting it; set the strict 0o077 for that instant, so a file
    # another thread creates meanwhile is never more open than it should be.
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def read_parameters(path: str) -> dict:
    """The parameters written by `save_png` ({} when the file has none)."""
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(JSON_CHUNK)
    return json.loads(text) if text else {}
