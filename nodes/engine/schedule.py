"""Sampling timesteps: the reference USO shift, and FLUX's standard one as an option."""
from __future__ import annotations

import math

import torch

SHIFTS = ("reference", "flux")


def _mu(seq_len: float, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * seq_len + (base_shift - slope * 256)


def timesteps(steps: int, width: int, height: int, shift: str = "reference") -> list[float]:
    """steps + 1 values from 1 to 0.

    "reference" reproduces bytedance/USO: mu comes from (W//8)*(H//8)//256 (64 at 1024^2, not the
    4096 image tokens), so the shift is much weaker than FLUX's. "flux" uses the token count,
    which is what FLUX.1-dev itself does (mu = 1.15 at 1024^2).
    """
    if shift == "reference":
        mu = _mu((width // 8) * (height // 8) // 256)
    elif shift == "flux":
        mu = _mu((width // 16) * (height // 16))
    else:
        raise ValueError(f"shift: '{shift}' is not one of {', '.join(SHIFTS)}")
    t = torch.linspace(1, 0, steps + 1)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return shifted.tolist()


def first_step(steps: int, denoise: float) -> int:
    """Image to image: how many of the `steps` steps are skipped, so that about denoise x steps
    run from the latent noised to that step's timestep. diffusers' FluxImg2ImgPipeline formula
    (`strength`): int(steps - min(steps * denoise, steps)); 0 at denoise 1.0."""
    return int(max(steps - min(steps * denoise, steps), 0))
