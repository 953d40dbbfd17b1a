"""The USO denoising loop on a diffusers FLUX transformer.

Our own loop, not FluxPipeline's: the reference keeps x in bf16 and rounds the Euler product and
sum separately, uses its own timestep schedule, appends subject tokens after the noise tokens with
UnoPE ids, and prepends style tokens to the projected text tokens.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import positions


@dataclass
class SubjectTokens:
    tokens: torch.Tensor            # (1, n, 64) packed latents
    grid: tuple[int, int]           # token grid (h/16, w/16) of the subject image


@contextmanager
def style_injection(transformer, style_tokens: torch.Tensor | None):
    """Prepend style tokens to the output of the transformer's text projection (context_embedder)."""
    if style_tokens is None or style_tokens.shape[1] == 0:
        yield
        return

    def prepend(_module, _inputs, output):
        style = style_tokens.to(output.device, output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([style, output], dim=1)

    handle = transformer.context_embedder.register_forward_hook(prepend)
    try:
        yield
    finally:
        handle.remove()


def initial_noise(seed: int, width: int, height: int, device) -> torch.Tensor:
    """The starting noise of `seed`: bf16 from a seeded generator on the CPU, then moved to the run
    device. On the CPU this is the reference's noise exactly (it draws on the run device); on a GPU
    the reference's CUDA draw is given up so that a seed starts from the same noise on every device
    (MPS, XPU and DirectML included: DirectML has no generator of its own, and bf16 randn raises on
    macOS 13's MPS)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (1, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, dtype=torch.bfloat16, generator=generator).to(device)


def noised_latent(x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """Image to image: the scaled latent x0 moved to timestep t along the flow,
    x_t = (1 - t) x0 + t noise (FLUX's rectified flow; diffusers' `scale_noise`), in float32."""
    return (1.0 - t) * x0.float() + t * noise.float()


@torch.inference_mode()
def denoise(transformer, noise: torch.Tensor, t5_embeds: torch.Tensor, pooled: torch.Tensor,
            style_tokens: torch.Tensor | None, subjects: list[SubjectTokens],
            timesteps: list[float], guidance: float, dtype: torch.dtype,
            on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Euler from noise to image latents (1, 16, H/8, W/8) in `dtype`, still scaled.

    `on_step(done, total)` runs after every step; raising from it stops the loop (Cancel).
    """
    device = noise.device
    _, _, lat_h, lat_w = noise.shape
    x = positions.pack(noise.to(dtype))
    n_noise = x.shape[1]
    grid = (lat_h // 2, lat_w // 2)
    img_ids = torch.cat([positions.grid_ids(*grid),
                         *positions.subject_ids(grid, [s.grid for s in subjects])]).to(device)
    refs = [s.tokens.to(device, dtype) for s in subjects]
    n_style = 0 if style_tokens is None else style_tokens.shape[1]
    txt_ids = torch.zeros(n_style + t5_embeds.shape[1], 3, device=device)
    t5_embeds = t5_embeds.to(device, dtype)
    if style_tokens is not None:
        # Once per image: `style_injection`'s .to is then a no-op, not a blocking copy from
        # pageable host memory in every step.
        style_tokens = style_tokens.to(device, dtype)
    pooled = pooled.to(device, dtype)
    guidance_vec = torch.full((1,), guidance, device=device, dtype=dtype)
    total = len(timesteps) - 1
    with style_injection(transformer, style_tokens):
        for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            t_vec = torch.full((1,), t_cur, device=device, dtype=dtype)
            hidden = torch.cat([x, *refs], dim=1) if refs else x
            velocity = transformer(hidden_states=hidden, encoder_hidden_states=t5_embeds,
                                   pooled_projections=pooled, timestep=t_vec, img_ids=img_ids,
                                   txt_ids=txt_ids, guidance=guidance_vec, return_dict=False)[0]
            x = x + (t_next - t_cur) * velocity[:, :n_noise]
            if on_step is not None:
                on_step(i + 1, total)
    return positions.unpack(x, lat_h * 8, lat_w * 8)
