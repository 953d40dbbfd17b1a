"""Prompt -> T5 token embeddings and the CLIP-L pooled vector, as the reference computes them."""
from __future__ import annotations

import torch

T5_LENGTH = 512
CLIP_LENGTH = 77


def _token_ids(tokenizer, prompt: str, length: int) -> torch.Tensor:
    # A lone surrogate (JSON allows "\ud800") is not text the tokenizers accept: it becomes '?'.
    prompt = prompt.encode("utf-8", "replace").decode("utf-8")
    batch = tokenizer([prompt], max_length=length, padding="max_length", truncation=True,
                      return_tensors="pt")
    return batch["input_ids"]


@torch.inference_mode()
def encode_t5(t5, tokenizer, prompt: str, device) -> torch.Tensor:
    """(1, 512, d_model); pads are attended (no attention mask), like the reference."""
    ids = _token_ids(tokenizer, prompt, T5_LENGTH).to(device)
    return t5(input_ids=ids, attention_mask=None).last_hidden_state


@torch.inference_mode()
def encode_clip(clip, tokenizer, prompt: str, device) -> torch.Tensor:
    """(1, hidden) pooled output."""
    ids = _token_ids(tokenizer, prompt, CLIP_LENGTH).to(device)
    return clip(input_ids=ids, attention_mask=None).pooler_output
