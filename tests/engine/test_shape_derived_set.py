"""A whole model set without `config` metadata -- the path real files take, architectures derived
from tensor shapes -- loads and generates the same image as the same tensors with their configs."""
from __future__ import annotations

import pytest
import torch

from shape_derived_models import build_shape_derived_set
from nodes.engine import EngineOptions, USOPipeline
from nodes.engine.model_set import ModelFiles
from nodes.engine.weight_files import open_weights


@pytest.fixture(scope="module")
def derived_set(tmp_path_factory):
    return build_shape_derived_set(tmp_path_factory.mktemp("shape_derived"))


def _pipeline(paths, tokenizer_dir) -> USOPipeline:
    files = ModelFiles(transformer=str(paths["transformer"]), vae=str(paths["vae"]), t5=str(paths["t5"]),
                       clip_l=str(paths["clip_l"]), siglip=str(paths["siglip"]), uso_lora=str(paths["uso_lora"]),
                       projector=str(paths["projector"]), tokenizer_dir=str(tokenizer_dir))
    return USOPipeline.from_files(files, EngineOptions(device="cpu", precision="fp32"))


def test_a_set_without_config_metadata_generates_the_same_image(derived_set):
    for path in derived_set.without_config.values():
        assert "config" not in open_weights(str(path)).metadata
    with_config = _pipeline(derived_set.with_config, derived_set.tokenizer_dir)
    derived = _pipeline(derived_set.without_config, derived_set.tokenizer_dir)
    # The derived architectures are the ones the models were built with.
    assert derived.transformer_config == with_config.transformer_config
    assert derived.transformer_config["axes_dims_rope"] == (16, 56, 56)
    for name in ("vae", "t5", "clip", "siglip"):
        assert _config(getattr(derived, name)) == _config(getattr(with_config, name)), name

    results = []
    for pipe in (with_config, derived):
        style = pipe.encode_style([pipe_image(60, 60, 1)])
        subject = pipe.encode_subject([pipe_image(64, 48, 2)], long_side=64)
        results.append(pipe.generate("a red fox in a snowy forest", styles=style, subjects=subject,
                                     width=64, height=64, steps=2, seeds=[5]))
    assert results[0].images.std() > 0
    assert torch.equal(results[0].latents, results[1].latents)
    assert torch.equal(results[0].images, results[1].images)


def _config(model) -> dict:
    cfg = model.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") and not isinstance(cfg, dict) else dict(cfg)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype",
                                                                                "torch_dtype")}


def pipe_image(w, h, seed):
    import tiny_models

    return tiny_models.make_image(w, h, seed)
