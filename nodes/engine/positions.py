"""Packing 2x2 latent patches into tokens, and the position ids of every token (UnoPE)."""
from __future__ import annotations

import math

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), C*4), patches in row-major order."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack for an image of height x width pixels."""
    b, _, d = tokens.shape
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    c = d // 4
    x = tokens.reshape(b, h, w, c, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * 2, w * 2)


def grid_ids(h_tokens: int, w_tokens: int, h_offset: int = 0, w_offset: int = 0) -> torch.Tensor:
    """(h*w, 3) ids (0, h_offset + i, w_offset + j) in row-major order."""
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 1] = torch.arange(h_tokens)[:, None] + h_offset
    ids[..., 2] = torch.arange(w_tokens)[None, :] + w_offset
    return ids.reshape(h_tokens * w_tokens, 3)


def subject_ids(noise_tokens_hw: tuple[int, int],
                subject_tokens_hw: list[tuple[int, int]]) -> list[torch.Tensor]:
    """UnoPE: subjects march down the diagonal, starting at the noise grid's far corner.

    The first subject starts at (H/16, W/16); each next one starts where the previous ended,
    advanced by the previous subject's own height and width.
    """
    h_shift, w_shift = noise_tokens_hw
    out = []
    for h, w in subject_tokens_hw:
        out.append(grid_ids(h, w, h_shift, w_shift))
        h_shift += h
        w_shift += w
    return out


class HostPositionEmbedding(torch.nn.Module):
    """FLUX's rotary position embedding (diffusers' `FluxPosEmbed`) computed on the CPU and moved
    to the ids' device. diffusers computes it in float64 everywhere but MPS and NPU; Intel XPUs
    (Arc, integrated) and DirectML have no float64, so there it runs on the CPU, as ComfyUI does.
    The embedding holds no weights: the cost is one small table per step."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor):
        out = self.inner(ids.to("cpu"))
        if isinstance(out, torch.Tensor):
            return out.to(ids.device)
        return tuple(t.to(ids.device) for t in out)


def embed_positions_on_host(transformer: torch.nn.Module) -> None:
    """Compute `transformer.pos_embed` on the CPU from now on (once: a second call changes nothing)."""
    if not isinstance(transformer.pos_embed, HostPositionEmbedding):
        transformer.pos_embed = HostPositionEmbedding(transformer.pos_embed)
