"""A pack cloned into custom_nodes without `pip install -r requirements.txt` (the most common
install mistake) still loads: at import time the nodes need only what ComfyUI itself runs on
(torch, numpy, Pillow, safetensors, transformers, requests). The loader node checks the pack's
requirements before loading and names what is missing and the exact command for the Python
ComfyUI runs in, instead of "No module named 'diffusers'".
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from ..engine import USOError

#: The pack's requirements.txt (one definition: what pip installs is what is checked).
REQUIREMENTS_FILE = Path(__file__).resolve().parents[2] / "requirements.txt"
#: Import names that differ from the distribution names in requirements.txt.
_IMPORT_NAMES = {"pillow": "PIL"}


class MissingPackageError(USOError):
    """A package of requirements.txt is not importable in ComfyUI's Python."""


def required_distributions() -> list[str]:
    """The distribution names requirements.txt lists, in its order."""
    names = []
    for line in REQUIREMENTS_FILE.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            names.append(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])
    return names


def missing_distributions() -> list[str]:
    """The required distributions whose module does not import here."""
    missing = []
    for name in required_distributions():
        try:
            importlib.import_module(_IMPORT_NAMES.get(name.lower(), name.replace("-", "_")))
        except ImportError:
            missing.append(name)
    return missing


def install_command() -> str:
    """`<this Python> -m pip install -r <the pack's requirements.txt>`, paths quoted when needed.

    On Windows a quoted executable gets PowerShell's call operator, `& "C:\\...\\python.exe" ...`:
    PowerShell (ComfyUI Desktop's terminal) reads a leading quoted string as text, not a command."""
    def quoted(path: str) -> str:
        return f'"{path}"' if any(c.isspace() for c in path) else path

    exe = quoted(sys.executable)
    if os.name == "nt" and exe.startswith('"'):
        exe = f"& {exe}"
    return f"{exe} -m pip install -r {quoted(str(REQUIREMENTS_FILE))}"


def require_installed() -> None:
    """Raise MissingPackageError naming the missing packages and the command that installs them."""
    missing = missing_distributions()
    if missing:
        plural = len(missing) > 1
        raise MissingPackageError(
            f"The USO nodes need the Python package{'s' if plural else ''} {', '.join(missing)}, which "
            f"{'are' if plural else 'is'} not installed in the Python ComfyUI runs in (the pack's "
            "requirements were not installed). Install them with that Python, then restart ComfyUI:\n"
            f"{install_command()}")
