"""Shared fixtures and helpers for the remote node tests (test_remote_*.py)."""
from __future__ import annotations

import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `import nodes` also under a bare `pytest`
    sys.path.insert(0, _ROOT)

from fake_remote_servers import FakeAiml, FakeFal  # noqa: E402
from nodes.comfyui import bridge  # noqa: E402
from nodes.comfyui.remote_node import USORemoteGenerate  # noqa: E402

ENV_NAMES = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "AIML_API_KEY", "AIMLAPI_KEY", "USO_REMOTE_KEYS_FILE",
             "USO_FAL_QUEUE_URL", "USO_AIML_URL")


class Reports(list):
    """Every progress text the node sent, in order."""

    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture
def remote_env(monkeypatch):
    """No keys or URLs from the machine, fast polls/backoff, captured progress text, clean Cancel."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):  # a machine-wide HTTP(S)_PROXY must not catch the fakes
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setattr(USORemoteGenerate, "POLL_INTERVAL_S", 0.02)
    monkeypatch.setattr(USORemoteGenerate, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr(bridge, "user_directory", lambda: None)
    reports = Reports()
    monkeypatch.setattr(bridge, "send_progress_text", lambda text, node_id: reports.append(text))
    bridge._standalone_interrupt.clear()
    yield reports
    bridge._standalone_interrupt.clear()


@contextmanager
def fal_server(monkeypatch, **scenario):
    with FakeFal(**scenario) as server:
        monkeypatch.setenv("USO_FAL_QUEUE_URL", server.url)
        monkeypatch.setenv("FAL_KEY", server.key)
        yield server


@contextmanager
def aiml_server(monkeypatch, **scenario):
    with FakeAiml(**scenario) as server:
        monkeypatch.setenv("USO_AIML_URL", server.url)
        monkeypatch.setenv("AIML_API_KEY", server.key)
        yield server


def image(batch: int = 1, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, 3, generator=g)


def widget_defaults() -> dict:
    """Each widget's default, as the frontend fills a freshly added node."""
    out = {}
    for name, spec in USORemoteGenerate.INPUT_TYPES()["required"].items():
        kind, opts = spec
        out[name] = opts.get("default", kind[0] if isinstance(kind, list) else None)
    return out


def node_inputs(**overrides) -> dict:
    kwargs = {**widget_defaults(), "width": 256, "height": 256, "unique_id": "9",
              "subject_image": image(), "style_images": image(seed=1)}
    kwargs.update(overrides)
    for optional in ("subject_image", "style_images"):  # None = socket not connected
        if kwargs[optional] is None:
            del kwargs[optional]
    return kwargs


def run_node(**overrides):
    """Call the node the way ComfyUI does: instance, then FUNCTION with the input values."""
    from workflow_runner import run_node as run

    inputs = node_inputs(**overrides)
    return run(USORemoteGenerate, unique_id=inputs.pop("unique_id", None), **inputs)


def press_cancel_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, bridge.request_interrupt)
    timer.daemon = True
    timer.start()
    return timer


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_log_text(caplog) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)
