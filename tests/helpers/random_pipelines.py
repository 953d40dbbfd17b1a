"""Tiny random-weight pipelines (no files) and one USO run on them, for the engine option tests."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nodes.engine import EngineOptions, USOPipeline
from nodes.engine.random_models import build_random_models

W, H = 64, 48
_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_pipeline(dtype: torch.dtype, **options) -> USOPipeline:
    models = build_random_models("tiny", dtype=dtype)
    return USOPipeline(models, EngineOptions(device="cpu", **{"precision": _PRECISION[dtype], **options}))


def run(pipe: USOPipeline, seeds=(3,), steps: int = 3) -> torch.Tensor:
    """Latents of one subject + one style generation at W x H."""
    style = pipe.encode_style([noise_image(60, 60, 1)])
    subject = pipe.encode_subject([noise_image(64, 64, 2)], long_side=64)
    return pipe.generate("a photo of a cat", styles=style, subjects=subject, width=W, height=H,
                         steps=steps, seeds=list(seeds)).latents
