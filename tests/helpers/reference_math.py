"""Independent re-statement of the USO reference math (test-only yardstick).

Written from the bytedance/USO reference implementation (its FLUX sampling, position ids,
packing, subject/style preprocessing and style projector) with the same numeric semantics
(op order, dtypes).  It
imports nothing from the pack and nothing from diffusers, so the engine's output
can be measured against it.

Conventions used throughout
---------------------------
* Image sizes are given as ``(width, height)`` in pixels, like ``PIL.Image.size``.
* Packed latents: ``(B, tokens, 64)`` with tokens in row-major order of the
  ``(H/16, W/16)`` token grid, channels ordered ``(c, dy, dx)`` (see ``pack``).
* Position ids: float32 tensors ``(tokens, 3)`` (a leading batch axis is also
  accepted by ``bfl_flux_forward``).  Axis 0 is always 0; axis 1 is the row,
  axis 2 the column.  Text and style tokens have all-zero ids.
* ``sd`` holds BFL Flux names (``img_in.weight``, ``double_blocks.0.img_attn.qkv.weight``,
  ``single_blocks.0.linear1.weight``, ``final_layer.adaLN_modulation.1.weight`` ...).
  Every tensor is used in its own dtype: pass inputs in the model dtype.
* ``cfg``: ``{"hidden", "heads", "depth", "depth_single", "axes_dim", "theta"=10000,
  "mlp_ratio"=4.0, "guidance_embed"}``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "timestep_embedding",
    "rope_tables",
    "bfl_flux_forward",
    "normalize_lora_keys",
    "reference_mu",
    "reference_schedule",
    "reference_noise",
    "reference_ids",
    "pack",
    "unpack",
    "reference_denoise",
    "reference_preprocess_subject",
    "reference_style_pixels",
    "reference_projector",
]

LN_EPS = 1e-6  # LayerNorms of the DiT (no affine)
QK_EPS = 1e-6  # RMSNorm of q and k
PROJ_LN_EPS = 1e-5  # affine LayerNorm of the style projector


# ----------------------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of ``1000 * t`` (cos half, then sin half).

    The ``* 1000`` happens in ``t``'s dtype (bf16 in the reference run); the
    frequencies and the angles are float32; the result is cast back to ``t``'s dtype.
    """
    scaled = t * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -math.log(max_period) / half)
    angles = scaled[:, None].float() * freqs.to(t.device)[None]
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)
    return out.to(t.dtype) if t.is_floating_point() else out


def rope_tables(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0):
    """cos/sin tables ``(..., tokens, head_dim/2)`` for rotating adjacent pairs.

    Angles are computed in float64 from the ids and rounded once to float32.
    The pair frequencies of axis 0 come first, then axis 1, then axis 2.
    """
    pos = ids.to(torch.float64)
    parts = []
    for axis, d in enumerate(axes_dim):
        exponent = torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d
        omega = 1.0 / (float(theta) ** exponent)
        parts.append(pos[..., axis, None] * omega)
    angles = torch.cat(parts, dim=-1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x`` (B, H, L, D) in float32, cast back."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1)
    return out.reshape(x.shape).type_as(x)


# ----------------------------------------------------------------------------- building blocks


def _lin(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _mlp_embed(sd, name, x):
    return _lin(sd, name + ".out_layer", F.silu(_lin(sd, name + ".in_layer", x)))


def _layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS)


def _modulate(x, shift, scale):
    return (1 + scale) * _layer_norm(x) + shift


def _mod_chunks(sd, name, vec, n):
    return _lin(sd, name, F.silu(vec))[:, None, :].chunk(n, dim=-1)


def _rms(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    inv = torch.rsqrt(torch.mean(xf.pow(2), dim=-1, keepdim=True) + QK_EPS)
    return ((xf * inv) * scale.float()).to(x.dtype)


def _split_heads(qkv: torch.Tensor, heads: int):
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D)."""
    b, n, w = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, w // (3 * heads)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _qk_norm(sd, name, q, k, v):
    q = _rms(q, sd[name + ".query_norm.scale"])
    k = _rms(k, sd[name + ".key_norm.scale"])
    return q.to(v), k.to(v)


def _attend(q, k, v, rope):
    cos, sin = rope
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _gelu(x):
    return F.gelu(x, approximate="tanh")


def normalize_lora_keys(lora: Mapping[str, torch.Tensor] | None) -> dict:
    """Strip an optional ``diffusion_model.`` prefix from USO LoRA keys."""
    if not lora:
        return {}
    pre = "diffusion_model."
    return {(k[len(pre):] if k.startswith(pre) else k): v for k, v in lora.items()}


def _lora_add(base, lora, name, x, scale):
    """``base + up(down(x)) * scale`` as the reference adds an unfused LoRA."""
    down = lora.get(name + ".down.weight")
    if down is None:
        return base
    up = lora[name + ".up.weight"]
    delta = F.linear(F.linear(x.to(down.dtype), down), up).to(x.dtype)
    return base + delta * scale


def _double_block(sd, i, img, txt, vec, rope, heads, lora, s):
    p, lp = f"double_blocks.{i}.", f"double_blocks.{i}.processor."
    im = _mod_chunks(sd, p + "img_mod.lin", vec, 6)  # shift, scale, gate, shift2, scale2, gate2
    tm = _mod_chunks(sd, p + "txt_mod.lin", vec, 6)

    img_x = _modulate(img, im[0], im[1])
    img_qkv = _lora_add(_lin(sd, p + "img_attn.qkv", img_x), lora, lp + "qkv_lora1", img_x, s)
    iq, ik, iv = _split_heads(img_qkv, heads)
    iq, ik = _qk_norm(sd, p + "img_attn.norm", iq, ik, iv)

    txt_x = _modulate(txt, tm[0], tm[1])
    txt_qkv = _lora_add(_lin(sd, p + "txt_attn.qkv", txt_x), lora, lp + "qkv_lora2", txt_x, s)
    tq, tk, tv = _split_heads(txt_qkv, heads)
    tq, tk = _qk_norm(sd, p + "txt_attn.norm", tq, tk, tv)

    joint = _attend(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), rope)
    n_txt = txt.shape[1]
    txt_a, img_a = joint[:, :n_txt], joint[:, n_txt:]

    img_o = _lora_add(_lin(sd, p + "img_attn.proj", img_a), lora, lp + "proj_lora1", img_a, s)
    img = img + im[2] * img_o
    h = _lin(sd, p + "img_mlp.0", _modulate(img, im[3], im[4]))
    img = img + im[5] * _lin(sd, p + "img_mlp.2", _gelu(h))

    txt_o = _lora_add(_lin(sd, p + "txt_attn.proj", txt_a), lora, lp + "proj_lora2", txt_a, s)
    txt = txt + tm[2] * txt_o
    h = _lin(sd, p + "txt_mlp.0", _modulate(txt, tm[3], tm[4]))
    txt = txt + tm[5] * _lin(sd, p + "txt_mlp.2", _gelu(h))
    return img, txt


def _single_block(sd, i, x, vec, rope, heads, hidden, lora, s):
    p, lp = f"single_blocks.{i}.", f"single_blocks.{i}.processor."
    shift, scale, gate = _mod_chunks(sd, p + "modulation.lin", vec, 3)
    xm = _modulate(x, shift, scale)
    h = _lin(sd, p + "linear1", xm)
    qkv, mlp = h[..., : 3 * hidden], h[..., 3 * hidden:]
    qkv = _lora_add(qkv, lora, lp + "qkv_lora", xm, s)  # q,k,v slice only
    q, k, v = _split_heads(qkv, heads)
    q, k = _qk_norm(sd, p + "norm", q, k, v)
    both = torch.cat((_attend(q, k, v, rope), _gelu(mlp)), 2)
    out = _lora_add(_lin(sd, p + "linear2", both), lora, lp + "proj_lora", both, s)
    return x + gate * out


def _as_batched_ids(ids: torch.Tensor) -> torch.Tensor:
    return ids[None] if ids.ndim == 2 else ids


def bfl_flux_forward(
    sd: Mapping[str, torch.Tensor],
    cfg: Mapping,
    img: torch.Tensor,
    img_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    timesteps: torch.Tensor,
    y: torch.Tensor,
    guidance: torch.Tensor | None,
    ref_imgs: Sequence[torch.Tensor] = (),
    ref_ids: Sequence[torch.Tensor] = (),
    style_tokens: torch.Tensor | None = None,
    lora: Mapping[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """USO's Flux forward.  Returns the velocity of the noise tokens ``(B, N, in_ch)``.

    img (B, N, in_ch) packed noise; txt (B, T, ctx) raw T5 states; y (B, pooled);
    timesteps, guidance (B,) in [0,1] resp. the guidance value; ref_imgs: packed
    subject latents (B, M_k, in_ch) with ids (M_k, 3); style_tokens (B, S, hidden)
    already projected (prepended to the text stream after txt_in, zero ids).
    """
    heads, hidden = cfg["heads"], cfg["hidden"]
    theta = cfg.get("theta", 10000)
    lora = normalize_lora_keys(lora)
    if len(ref_imgs) != len(ref_ids):
        raise ValueError("ref_imgs and ref_ids must pair up")

    x = _lin(sd, "img_in", img)
    vec = _mlp_embed(sd, "time_in", timestep_embedding(timesteps, 256))
    if cfg.get("guidance_embed", True):
        if guidance is None:
            raise ValueError("guidance-distilled model needs a guidance value")
        vec = vec + _mlp_embed(sd, "guidance_in", timestep_embedding(guidance, 256))
    vec = vec + _mlp_embed(sd, "vector_in", y)

    t = _lin(sd, "txt_in", txt)
    t_ids = _as_batched_ids(txt_ids)
    if style_tokens is not None and style_tokens.shape[1] > 0:
        t = torch.cat((style_tokens.to(t.dtype), t), dim=1)
        zeros = torch.zeros(t_ids.shape[0], style_tokens.shape[1], 3, dtype=t_ids.dtype, device=t_ids.device)
        t_ids = torch.cat((zeros, t_ids), dim=1)

    n_noise = x.shape[1]
    ids = [t_ids, _as_batched_ids(img_ids)]
    if ref_imgs:
        x = torch.cat([x] + [_lin(sd, "img_in", r) for r in ref_imgs], dim=1)
        ids += [_as_batched_ids(r) for r in ref_ids]
    ids = torch.cat([i.to(torch.float32) for i in ids], dim=1)
    cos, sin = rope_tables(ids, cfg["axes_dim"], theta)
    rope = (cos[:, None], sin[:, None])  # broadcast over heads

    for i in range(cfg["depth"]):
        x, t = _double_block(sd, i, x, t, vec, rope, heads, lora, lora_scale)
    n_txt = t.shape[1]
    h = torch.cat((t, x), 1)
    for i in range(cfg["depth_single"]):
        h = _single_block(sd, i, h, vec, rope, heads, hidden, lora, lora_scale)
    h = h[:, n_txt:][:, :n_noise]

    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=1)
    h = (1 + scale[:, None, :]) * _layer_norm(h) + shift[:, None, :]
    return _lin(sd, "final_layer.linear", h)


# ----------------------------------------------------------------------------- sampling


def _floor16(v: int) -> int:
    return 16 * (v // 16)


def reference_mu(width: int, height: int) -> float:
    """Shift mu with the reference's quirk: x = (W//8)*(H//8)//256, line 256->0.5, 4096->1.15."""
    width, height = _floor16(width), _floor16(height)
    x = (width // 8) * (height // 8) // 256
    slope = (1.15 - 0.5) / (4096 - 256)
    return slope * x + (0.5 - slope * 256)


def reference_schedule(num_steps: int, width: int, height: int) -> list[float]:
    """num_steps+1 python floats from 1 to 0, time-shifted in float32."""
    t = torch.linspace(1, 0, num_steps + 1)
    e = math.exp(reference_mu(width, height))
    return (e / (e + (1 / t - 1))).tolist()


def reference_noise(seed: int, width: int, height: int, device="cpu") -> torch.Tensor:
    """bf16 noise (1, 16, 2*ceil(H/16), 2*ceil(W/16)) from a seeded generator on ``device``.

    W and H are first floored to multiples of 16, as the reference pipeline does.
    """
    width, height = _floor16(width), _floor16(height)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (1, 16, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    return torch.randn(shape, dtype=torch.bfloat16, device=device, generator=gen)


def _grid_ids(rows: int, cols: int, row0: int = 0, col0: int = 0) -> torch.Tensor:
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None] + row0
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :] + col0
    return ids.reshape(rows * cols, 3)


def reference_ids(width: int, height: int, ref_sizes: Sequence[tuple[int, int]] = ()):
    """Noise ids and UnoPE ("d") ids of each subject reference.

    width, height: output size in pixels (floored to /16); ref_sizes: (width, height)
    in pixels of each preprocessed subject image (multiples of 16).  Returns
    ``(noise_ids (H/16*W/16, 3), [ref_ids_k (h_k/16*w_k/16, 3), ...])``, float32.
    Refs march down the diagonal: the first starts at (0, H/16, W/16), each next one
    at the previous start plus the previous ref's own token height/width.
    """
    rows, cols = _floor16(height) // 16, _floor16(width) // 16
    noise = _grid_ids(rows, cols)
    refs, r0, c0 = [], rows, cols
    for rw, rh in ref_sizes:
        rr, rc = rh // 16, rw // 16
        refs.append(_grid_ids(rr, rc, r0, c0))
        r0, c0 = r0 + rr, c0 + rc
    return noise, refs


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h*w, C*4): 2x2 patches, channel order (c, dy, dx)."""
    b, c, hh, ww = z.shape
    z = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, h*w, C*4) -> (B, C, 2h, 2w) with h = ceil(height/16), w = ceil(width/16) (pixels)."""
    b, n, ch = x.shape
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    c = ch // 4
    x = x.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 2 * h, 2 * w)


def reference_denoise(
    sd,
    cfg,
    x: torch.Tensor,
    img_ids: torch.Tensor,
    txt: torch.Tensor,
    txt_ids: torch.Tensor,
    y: torch.Tensor,
    timesteps,
    guidance: float = 4.0,
    ref_imgs: Sequence[torch.Tensor] = (),
    ref_ids: Sequence[torch.Tensor] = (),
    style_tokens: torch.Tensor | None = None,
    lora=None,
    lora_scale: float = 1.0,
) -> torch.Tensor:
    """Reference Euler loop on packed ``x`` (kept in its dtype, bf16 in the reference).

    ``t`` and guidance are (B,) tensors in x's dtype; the step ``t_next - t_cur`` is a
    python float.  No CFG.  Returns packed x after the last step.
    """
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    b = x.shape[0]
    g = torch.full((b,), guidance, dtype=x.dtype, device=x.device)
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        tv = torch.full((b,), t_cur, dtype=x.dtype, device=x.device)
        v = bfl_flux_forward(sd, cfg, x, img_ids, txt, txt_ids, tv, y, g, ref_imgs=ref_imgs,
                             ref_ids=ref_ids, style_tokens=style_tokens, lora=lora, lora_scale=lora_scale)
        x = x + (t_next - t_cur) * v
    return x


# ----------------------------------------------------------------------------- images


def reference_preprocess_subject(image: Image.Image, long_side: int = 512) -> Image.Image:
    """Long side -> long_side (short side floored), LANCZOS, center crop to /16, then RGB.

    An image of exactly 16x16 is returned untouched (same object, mode unchanged).
    """
    w, h = image.size
    if w == 16 and h == 16:
        return image
    if w >= h:
        nw, nh = long_side, int((long_side / w) * h)
    else:
        nw, nh = int((long_side / h) * w), long_side
    image = image.resize((nw, nh), resample=Image.LANCZOS)
    tw, th = nw // 16 * 16, nh // 16 * 16
    left, top = (nw - tw) // 2, (nh - th) // 2
    return image.crop((left, top, left + tw, top + th)).convert("RGB")


def reference_style_pixels(image: Image.Image, size: int = 384) -> torch.Tensor:
    """SigLIP input: RGB, PIL bicubic squash to size x size, /255, (x-0.5)/0.5 -> float32 (1,3,S,S)."""
    img = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    arr = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    arr = (arr - half) / half
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def reference_projector(proj_sd: Mapping[str, torch.Tensor], hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """USO SigLIP multi-feature projector -> (B, 3*style_tokens, hidden).

    hidden_states follows HF (index 0 = embeddings, then one per layer).  Branches:
    high <- hs[-2], mid <- hs[-11], low <- hs[-20]; output cat(high, mid, low).
    Each: cast to projector dtype, Linear over tokens + SiLU, affine LayerNorm
    (eps 1e-5) over channels, Linear to hidden.
    """
    pre = "feature_embedder."
    sd = {(k[len(pre):] if k.startswith(pre) else k): v for k, v in proj_sd.items()}
    dtype = sd["high_embedding_linear.0.weight"].dtype
    outs = []
    for branch, idx in (("high", -2), ("mid", -11), ("low", -20)):
        h = hidden_states[idx].to(dtype).transpose(1, 2)
        h = F.silu(_lin(sd, f"{branch}_embedding_linear.0", h)).transpose(1, 2)
        ln_w = sd.get(f"{branch}_layer_norm.weight")
        if ln_w is not None:
            h = F.layer_norm(h, (h.shape[-1],), ln_w, sd[f"{branch}_layer_norm.bias"], eps=PROJ_LN_EPS)
        outs.append(_lin(sd, f"{branch}_projection", h))
    return torch.cat(outs, dim=1)
