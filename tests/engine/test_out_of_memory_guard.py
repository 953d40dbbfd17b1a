"""The out-of-memory guard on torch 2.4, where `torch.OutOfMemoryError` does not exist yet (it is
an alias of `torch.cuda.OutOfMemoryError` from 2.5): other errors, a cancel included, pass
through unchanged, and a device out-of-memory still becomes the engine's message."""
from __future__ import annotations

import pytest
import torch

from nodes.engine import EngineOptions, OutOfMemoryError, USOPipeline
from nodes.engine.random_models import build_random_models


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def pipe():
    return USOPipeline(build_random_models("tiny"), EngineOptions(device="cpu"))


def _raise(exc):
    def work():
        raise exc
    return work


def test_errors_pass_through_the_guard_on_torch_2_4(pipe, monkeypatch):
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)   # torch 2.4 has no such name
    with pytest.raises(Cancelled):
        pipe._guarded("sampling", _raise(Cancelled()))
    with pytest.raises(ValueError, match="bad"):
        pipe._guarded("sampling", _raise(ValueError("bad")))
    with pytest.raises(OutOfMemoryError, match="Out of memory on cpu sampling"):
        pipe._guarded("sampling", _raise(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    assert pipe._guarded("sampling", lambda: 7) == 7
