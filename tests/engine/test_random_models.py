"""The random-weight model sets of the benchmark and `--tiny` (nodes/engine/random_models.py):
built directly in the target dtype, so a full-size bf16 set never passes through fp32 (which
needs about 70 GB of host RAM for the ~24 GB bf16 transformer)."""
from __future__ import annotations

import torch
from torch import nn

from nodes.engine.random_models import build_random_models


def test_models_are_allocated_in_the_target_dtype_with_the_same_values(monkeypatch):
    allocated = []
    original = nn.Module.to_empty

    def recording_to_empty(module, *args, **kwargs):
        # The dtypes the weights get when memory is first taken for them.
        allocated.append((type(module).__name__, {p.dtype for p in module.parameters()}))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to_empty", recording_to_empty)
    models = build_random_models("tiny", dtype=torch.bfloat16)
    dtypes = dict(allocated)
    for name in ("FluxTransformer2DModel", "T5EncoderModel", "CLIPTextModel", "StyleProjector"):
        assert dtypes[name] == {torch.bfloat16}, name
    # SigLIP and the VAE run in fp32 in every precision.
    assert dtypes["SiglipVisionModel"] == {torch.float32} and dtypes["AutoencoderKL"] == {torch.float32}
    assert {p.dtype for p in models.transformer.parameters()} == {torch.bfloat16}

    # The same weights as building in fp32 and casting (what the tests and benchmarks had).
    monkeypatch.setattr(nn.Module, "to_empty", original)
    fp32 = build_random_models("tiny", dtype=torch.float32)
    for mine, theirs in ((models.transformer, fp32.transformer), (models.t5, fp32.t5),
                         (models.projector, fp32.projector)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b.to(a.dtype)), name
