"""Shared pytest fixtures for the comfyui-uso test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network (hub lookups would hang or fail on CI machines without internet).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The pack's `nodes` package and the helper modules in tests/helpers (tiny_models,
# reference_math, ...) are imported as top-level modules.
_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE / "helpers")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The nodes are ComfyUI V3 nodes: ComfyUI 0.8.0's comfy_api (only that) from ../shared/vendor.
from comfy_api_source import source_dir as _comfy_api_source  # noqa: E402

sys.path.append(str(_comfy_api_source()))


_REAL_COMFYUI = _HERE / "real_comfyui"
_BROWSER = _HERE / "browser"


def pytest_addoption(parser):
    parser.addoption("--real-comfyui", action="store_true",
                     help="run the real-ComfyUI stage (tests/real_comfyui): ComfyUI 0.8.0 servers started "
                          "through ../shared/tools/comfyui_here.sh")
    parser.addoption("--browser", action="store_true",
                     help="run the browser stage (tests/browser): ComfyUI's web frontend in headless Chromium "
                          "against a real ComfyUI server")


def pytest_ignore_collect(collection_path, config):
    # The real-ComfyUI stage starts ComfyUI servers; it runs only when asked for (the README's test
    # command runs it as a second pytest call), never as part of the plain `pytest` run.
    if collection_path == _REAL_COMFYUI and not config.getoption("--real-comfyui"):
        return True
    if collection_path == _BROWSER and not config.getoption("--browser"):
        return True
    return None


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random-weight models written once per session in every supported file layout.

    Returns a ``tiny_models.TinyModels``: ``.paths[...]`` for the files, ``.models_dir`` (a
    ComfyUI-like ``models/`` folder) and the in-memory truth (``.transformer_state`` ...).
    Treat it as read-only: it is shared by every test of the session.
    """
    from tiny_models import build_tiny_models

    tm = build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    print(f"\n[tiny_models] built in {tm.build_seconds:.2f} s under {tm.root}")
    return tm


@pytest.fixture(scope="session")
def comfy_folders(tiny_models):
    """Point the pack's model folders (what folder_paths gives inside ComfyUI) at the tiny models,
    and the tokenizer search at the tiny tokenizers."""
    from nodes.comfyui import bridge

    folders = ("checkpoints", "diffusion_models", "diffusers", "vae", "text_encoders", "clip_vision", "loras",
               "model_patches")
    saved = dict(bridge.standalone_model_folders)
    saved_env = os.environ.get("USO_TOKENIZER_DIR")
    bridge.standalone_model_folders.clear()
    bridge.standalone_model_folders.update({f: [str(tiny_models.models_dir / f)] for f in folders})
    os.environ["USO_TOKENIZER_DIR"] = str(tiny_models.paths["tokenizer_t5"].parent)
    yield tiny_models
    bridge.standalone_model_folders.clear()
    bridge.standalone_model_folders.update(saved)
    if saved_env is None:
        os.environ.pop("USO_TOKENIZER_DIR", None)
    else:
        os.environ["USO_TOKENIZER_DIR"] = saved_env
