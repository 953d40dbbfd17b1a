"""The USO style projector: SigLIP hidden states of three layers -> style tokens for the DiT.

Parameter names match the released file after its `feature_embedder.` prefix is removed.
"""
from __future__ import annotations

import torch
from torch import nn

#: Hidden-state indices (HF convention: index 0 = embeddings, -1 = last layer) per branch.
BRANCH_LAYERS = {"high": -2, "mid": -11, "low": -20}


class StyleProjector(nn.Module):
    def __init__(self, siglip_tokens: int, style_tokens: int, siglip_dim: int, hidden_size: int):
        super().__init__()
        for branch in BRANCH_LAYERS:
            setattr(self, f"{branch}_embedding_linear",
                    nn.Sequential(nn.Linear(siglip_tokens, style_tokens), nn.SiLU()))
            setattr(self, f"{branch}_layer_norm", nn.LayerNorm(siglip_dim))
            setattr(self, f"{branch}_projection", nn.Linear(siglip_dim, hidden_size))
        self.style_tokens = style_tokens

    def forward(self, hidden_states: dict[int, torch.Tensor]) -> torch.Tensor:
        """`hidden_states[i]` for i in BRANCH_LAYERS' indices -> (B, 3 * style_tokens, hidden)."""
        dtype = self.high_projection.weight.dtype
        outs = []
        for branch, layer in BRANCH_LAYERS.items():
            x = hidden_states[layer].to(dtype).transpose(1, 2)           # (B, dim, tokens)
            x = getattr(self, f"{branch}_embedding_linear")(x).transpose(1, 2)  # (B, style, dim)
            x = getattr(self, f"{branch}_layer_norm")(x)
            outs.append(getattr(self, f"{branch}_projection")(x))
        return torch.cat(outs, dim=1)
