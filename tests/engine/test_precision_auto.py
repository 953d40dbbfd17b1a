"""What `precision=auto` keeps for each kind of file on each kind of card (nodes/engine/memory/
precision.py), and that T5 kept in its file's fp8 or 16 bits computes the same numbers as T5
upcast at load (the upcast is exact), on tiny files in the real layouts."""
from __future__ import annotations

import pytest
import torch

from nodes.engine import loaders, memory
from nodes.engine.loaders import Component
from nodes.engine.model_set import ModelFiles, file_storage

F8 = torch.float8_e4m3fn
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def cards(monkeypatch):
    """cuda:0 an Ampere (8.6), cuda:1 a Turing T4 (7.5) whose bf16 is only emulated."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: {0: (8, 6), 1: (7, 5)}[torch.device(d).index])
    return {"ampere": torch.device("cuda:0"), "t4": torch.device("cuda:1"), "cpu": torch.device("cpu")}


def _files(tm, transformer, t5=None):
    p = tm.paths
    return ModelFiles(transformer=str(p[transformer]), siglip=str(p["siglip_file"]), uso_lora=str(p["lora_comfy"]),
                      projector=str(p["projector_comfy"]), vae=None if t5 is None else str(p["ae"]),
                      t5=None if t5 is None else str(p[t5]), clip_l=None if t5 is None else str(p["clip_l"]))


def test_file_storage_is_read_from_the_headers(tiny_models):
    assert file_storage(_files(tiny_models, "checkpoint_aio")) == memory.FileStorage("fp8", "fp8")
    assert file_storage(_files(tiny_models, "flux_bfl", "t5_fp16")) == memory.FileStorage("bf16", "fp16")
    assert file_storage(_files(tiny_models, "flux_fp8_scaled", "t5_fp8_scaled")) == \
        memory.FileStorage("scaled_fp8", "scaled_fp8")
    if "flux_gguf" in tiny_models.paths:
        assert file_storage(_files(tiny_models, "flux_gguf", "t5_fp8")).transformer == "gguf"


#: (transformer file, T5 file) -> card -> (compute, fp8 storage, T5 compute, T5 storage): the README's `auto` table.
AUTO = {
    ("fp8", "fp8"): {"ampere": (BF16, True, BF16, F8), "t4": (FP16, True, FP32, F8), "cpu": (FP32, False, FP32, None)},
    ("scaled_fp8", "scaled_fp8"): {"ampere": (BF16, True, BF16, F8), "t4": (FP16, True, FP32, F8),
                                   "cpu": (FP32, False, FP32, None)},
    ("bf16", "fp16"): {"ampere": (BF16, False, BF16, None), "t4": (FP16, False, FP32, FP16),
                       "cpu": (FP32, False, FP32, None)},
    ("bf16", "bf16"): {"ampere": (BF16, False, BF16, None), "t4": (FP16, False, FP32, BF16),
                       "cpu": (FP32, False, FP32, None)},
    ("gguf", "fp8"): {"ampere": (BF16, False, BF16, F8), "t4": (FP16, False, FP32, F8), "cpu": (FP32, False, FP32, None)},
}


@pytest.mark.parametrize("kinds", list(AUTO))
def test_auto_keeps_what_the_files_store(cards, kinds):
    for card, expected in AUTO[kinds].items():
        p = memory.resolve_precision("auto", cards[card], memory.FileStorage(*kinds))
        assert (p.compute, p.fp8_storage, p.text, p.t5_storage) == expected, card


def test_fp8_storage_computes_in_fp16_where_bf16_is_only_emulated(cards, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    p = memory.resolve_precision("fp8_e4m3fn", cards["t4"])
    assert p.fp8_storage and p.compute == FP16       # was emulated bf16
    # bf16 named explicitly is still honoured (emulated), and it upcasts an fp8 T5 as asked.
    explicit = memory.resolve_precision("bf16", cards["t4"], memory.FileStorage("fp8", "fp8"))
    assert explicit.compute == BF16 and not explicit.fp8_storage and explicit.t5_storage is None


def _t5_out(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).last_hidden_state.float()


@pytest.mark.parametrize("file,storage,compute", [("t5_fp8", F8, BF16), ("t5_fp8_scaled", F8, BF16),
                                                  ("t5_fp16", FP16, FP32)])
def test_t5_kept_as_stored_encodes_exactly_as_upcast_at_load(tiny_models, file, storage, compute):
    component = Component(str(tiny_models.paths[file]))
    upcast = loaders.load_t5(component, compute)
    kept = loaders.load_t5(component, compute, storage)
    linears = {n: m for n, m in kept.named_modules() if isinstance(m, torch.nn.Linear)}
    stored = [n for n, m in linears.items() if m.weight.dtype == storage]
    assert stored and all(n.endswith(".wo") for n in set(linears) - set(stored))
    assert all(linears[n].weight.dtype == compute for n in linears if n.endswith(".wo"))
    assert memory.module_bytes(kept) < memory.module_bytes(upcast)
    ids = torch.randint(0, kept.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_t5_out(kept, ids), _t5_out(upcast, ids))


def test_t5_kept_in_fp8_streams_under_group_offloading(tiny_models):
    # The offload modes stream T5 leaf by leaf (diffusers' group offloading); its layerwise casting
    # hooks run inside that (on the CPU both places are the CPU: the hooks, not the transfers).
    component = Component(str(tiny_models.paths["t5_fp8"]))
    upcast = loaders.load_t5(component, BF16)
    kept = loaders.load_t5(component, BF16, F8)
    placement = memory.Placement("group_offload", torch.device("cpu"), "offload")
    placement.setup(torch.nn.Linear(2, 2), [kept], encoders=[kept])
    assert placement.is_streamed(kept) and memory.has_group_offload(kept)
    ids = torch.randint(0, kept.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_t5_out(kept, ids), _t5_out(upcast, ids))
