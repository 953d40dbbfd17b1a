"""Facts of the USO reference math checked on tests/helpers/reference_math.py.

Independent of the pack: nothing from nodes/ and nothing from diffusers is imported.
"""

from __future__ import annotations

import os
import sys

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_math as R  # noqa: E402

CFG = dict(hidden=64, heads=4, depth=2, depth_single=2, axes_dim=(4, 6, 6), theta=10000,
           mlp_ratio=4.0, guidance_embed=True)
IN_CH, CTX, POOLED = 64, 48, 32


def tiny_bfl_state_dict(seed=0, hidden=64, depth=2, depth_single=2, mlp_ratio=4.0, head_dim=16):
    """Random BFL-keyed Flux weights: hidden 64, 4 heads x 16, joint dim 48, pooled 32, in 64."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def lin(name, out_f, in_f, bias=True):
        sd[name + ".weight"] = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        if bias:
            sd[name + ".bias"] = 0.05 * torch.randn(out_f, generator=g)

    def scale(name):
        sd[name] = 1 + 0.2 * torch.randn(head_dim, generator=g)

    mlp = int(hidden * mlp_ratio)
    lin("img_in", hidden, IN_CH)
    lin("txt_in", hidden, CTX)
    for emb, fan_in in (("time_in", 256), ("guidance_in", 256), ("vector_in", POOLED)):
        lin(f"{emb}.in_layer", hidden, fan_in)
        lin(f"{emb}.out_layer", hidden, hidden)
    for i in range(depth):
        p = f"double_blocks.{i}."
        for s in ("img", "txt"):
            lin(p + f"{s}_mod.lin", 6 * hidden, hidden)
            lin(p + f"{s}_attn.qkv", 3 * hidden, hidden)
            scale(p + f"{s}_attn.norm.query_norm.scale")
            scale(p + f"{s}_attn.norm.key_norm.scale")
            lin(p + f"{s}_attn.proj", hidden, hidden)
            lin(p + f"{s}_mlp.0", mlp, hidden)
            lin(p + f"{s}_mlp.2", hidden, mlp)
    for i in range(depth_single):
        p = f"single_blocks.{i}."
        lin(p + "linear1", 3 * hidden + mlp, hidden)
        lin(p + "linear2", hidden, hidden + mlp)
        scale(p + "norm.query_norm.scale")
        scale(p + "norm.key_norm.scale")
        lin(p + "modulation.lin", 3 * hidden, hidden)
    lin("final_layer.linear", IN_CH, hidden)
    lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return sd


def tiny_uso_lora(seed=1, rank=4, hidden=64, mlp=256, depth=2, depth_single=2, zero_up=False):
    """USO-format LoRA keys (down = A (r x in), up = B (out x r))."""
    g = torch.Generator().manual_seed(seed)
    lora = {}

    def pair(name, out_f, in_f):
        lora[name + ".down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        up = 0.3 * torch.randn(out_f, rank, generator=g)
        lora[name + ".up.weight"] = torch.zeros_like(up) if zero_up else up

    for i in range(depth):
        p = f"double_blocks.{i}.processor."
        for n in ("1", "2"):
            pair(p + f"qkv_lora{n}", 3 * hidden, hidden)
            pair(p + f"proj_lora{n}", hidden, hidden)
    for i in range(depth_single):
        p = f"single_blocks.{i}.processor."
        pair(p + "qkv_lora", 3 * hidden, hidden)
        pair(p + "proj_lora", hidden, hidden + mlp)
    return lora


def fuse_lora(sd, lora, scale=1.0):
    """Fold the LoRA into a copy of the BFL weights (qkv_lora of single blocks: first 3*hidden rows)."""
    out = dict(sd)
    lora = R.normalize_lora_keys(lora)
    targets = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
               "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj",
               "qkv_lora": "linear1", "proj_lora": "linear2"}
    for key in lora:
        if not key.endswith(".down.weight"):
            continue
        base = key[: -len(".down.weight")]
        block, _, name = base.partition(".processor.")
        delta = scale * (lora[base + ".up.weight"] @ lora[key])
        w = out[f"{block}.{targets[name]}.weight"].clone()
        w[: delta.shape[0]] += delta
        out[f"{block}.{targets[name]}.weight"] = w
    return out


def tiny_inputs(seed=2, n_style=6, n_txt=7, dtype=torch.float32):
    """64x64 px output (4x4 tokens), one 48x32 px subject (2x3 tokens), styles, text."""
    g = torch.Generator().manual_seed(seed)
    noise_ids, (ref_ids,) = R.reference_ids(64, 64, [(48, 32)])
    return dict(
        img=torch.randn(1, 16, IN_CH, generator=g).to(dtype),
        img_ids=noise_ids,
        txt=torch.randn(1, n_txt, CTX, generator=g).to(dtype),
        txt_ids=torch.zeros(n_txt, 3),
        timesteps=torch.full((1,), 0.7, dtype=dtype),
        y=torch.randn(1, POOLED, generator=g).to(dtype),
        guidance=torch.full((1,), 4.0, dtype=dtype),
        ref_imgs=[torch.randn(1, 6, IN_CH, generator=g).to(dtype)],
        ref_ids=[ref_ids],
        style_tokens=torch.randn(1, n_style, CFG["hidden"], generator=g).to(dtype),
    )


@pytest.fixture(scope="module")
def sd():
    return tiny_bfl_state_dict()


# ----------------------------------------------------------------------------- schedule


def test_schedule_golden_values_25_steps_1024():
    t = R.reference_schedule(25, 1024, 1024)
    assert len(t) == 26 and t[0] == 1.0 and t[-1] == 0.0
    assert all(a > b for a, b in zip(t, t[1:]))
    for idx, want in ((1, 0.9746), (2, 0.9483), (3, 0.9213), (12, 0.6336)):
        assert abs(t[idx] - want) < 1e-4, (idx, t[idx])


def test_mu_quirk_uses_latent_area_over_256():
    assert abs(R.reference_mu(1024, 1024) - 0.4675) < 1e-4
    # x = (W//8)*(H//8)//256 stays tiny at every usual size -> mu stays near 0.46-0.48, far below 1.15
    for (w, h), want in (((512, 512), 0.459375), ((768, 1344), 0.46733), ((1344, 768), 0.46733),
                         ((1536, 1536), 0.48104)):
        assert abs(R.reference_mu(w, h) - want) < 1e-5
    # sizes are floored to /16 first
    assert R.reference_mu(1031, 1030) == R.reference_mu(1024, 1024)


# ----------------------------------------------------------------------------- ids, shapes


def _grid(rows, cols, r0=0, c0=0):
    return torch.tensor([(0.0, r0 + i, c0 + j) for i in range(rows) for j in range(cols)])


def test_noise_and_subject_ids_1024_with_512_subject():
    noise, (ref,) = R.reference_ids(1024, 1024, [(512, 512)])
    assert noise.dtype == ref.dtype == torch.float32
    assert noise.shape == (4096, 3) and ref.shape == (1024, 3)
    assert torch.equal(noise, _grid(64, 64))
    assert torch.equal(ref, _grid(32, 32, 64, 64))


def test_second_subject_starts_at_96_and_refs_march_down_the_diagonal():
    _, (r1, r2) = R.reference_ids(1024, 1024, [(512, 512), (512, 512)])
    assert torch.equal(r2, _grid(32, 32, 96, 96))
    # non-square refs advance each axis by their own size: (w, h) = (512, 304) -> 19 rows x 32 cols
    _, (a, b) = R.reference_ids(1024, 768, [(512, 304), (256, 512)])
    assert torch.equal(a, _grid(19, 32, 48, 64))
    assert torch.equal(b, _grid(32, 16, 48 + 19, 64 + 32))


def test_token_counts_of_spec_1_7():
    noise = R.reference_noise(0, 1024, 1024)
    assert noise.shape == (1, 16, 128, 128) and noise.dtype == torch.bfloat16
    packed = R.pack(noise)
    assert packed.shape == (1, 4096, 64)
    assert torch.equal(R.unpack(packed, 1024, 1024), noise)
    subject = R.pack(torch.zeros(1, 16, 64, 64, dtype=torch.bfloat16))
    assert subject.shape == (1, 1024, 64)
    assert packed.shape[1] + subject.shape[1] == 5120
    # two style images at full projector size -> 2 x 192 tokens of width 3072
    proj = _projector_sd(tokens_in=729, tokens_out=64, dims=1152, hidden=3072, fill_zero=True)
    hs = (torch.zeros(1, 729, 1152),) * 28
    style = torch.cat([R.reference_projector(proj, hs)] * 2, 1)
    assert style.shape == (1, 384, 3072)
    n_txt = style.shape[1] + 512
    assert n_txt == 896 and n_txt + 5120 == 6016
    assert len(R.reference_schedule(25, 1024, 1024)) - 1 == 25


def test_noise_is_seeded_bf16_and_matches_fp32_randn_on_cpu():
    a, b = R.reference_noise(3407, 1000, 760), R.reference_noise(3407, 1000, 760)
    assert a.shape == (1, 16, 2 * 47, 2 * 62) and torch.equal(a, b)
    f32 = torch.randn(a.shape, generator=torch.Generator().manual_seed(3407)).to(torch.bfloat16)
    assert torch.equal(a, f32)


def test_pack_layout_channel_order():
    z = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    p = R.pack(z)
    assert p.shape == (1, 6, 8)
    # token 0 = top-left 2x2 patch; channels ordered (c, dy, dx)
    assert p[0, 0].tolist() == [0, 1, 6, 7, 24, 25, 30, 31]
    assert torch.equal(R.unpack(p, 48, 32), z)


# ----------------------------------------------------------------------------- DiT properties


def test_forward_shape_and_dtype(sd):
    inp = tiny_inputs()
    out = R.bfl_flux_forward(sd, CFG, **inp)
    assert out.shape == (1, 16, IN_CH) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # ref tokens and styles are real inputs: removing either changes the result
    no_ref = R.bfl_flux_forward(sd, CFG, **{**inp, "ref_imgs": (), "ref_ids": ()})
    no_style = R.bfl_flux_forward(sd, CFG, **{**inp, "style_tokens": None})
    assert (out - no_ref).abs().max() > 1e-3 and (out - no_style).abs().max() > 1e-3


def test_style_token_order_is_irrelevant(sd):
    inp = tiny_inputs(n_style=6)
    base = R.bfl_flux_forward(sd, CFG, **inp)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = R.bfl_flux_forward(sd, CFG, **{**inp, "style_tokens": inp["style_tokens"][:, perm]})
    assert (base - permuted).abs().max().item() < 1e-5
    # style images given in the other order (two blocks of 3 swapped) also give the same output
    s = inp["style_tokens"]
    swapped = R.bfl_flux_forward(sd, CFG, **{**inp, "style_tokens": torch.cat([s[:, 3:], s[:, :3]], 1)})
    assert (base - swapped).abs().max().item() < 1e-5


def test_rope_is_relative_global_id_shift_is_invisible(sd):
    inp = tiny_inputs()
    base = R.bfl_flux_forward(sd, CFG, **inp)
    shift = torch.tensor([2.0, 3.0, 5.0])
    moved = R.bfl_flux_forward(sd, CFG, **{**inp, "img_ids": inp["img_ids"] + shift,
                                           "ref_ids": [inp["ref_ids"][0] + shift],
                                           "txt_ids": inp["txt_ids"] + shift,
                                           "style_tokens": None})
    # style tokens get zero ids internally, so compare without them
    ref = R.bfl_flux_forward(sd, CFG, **{**inp, "style_tokens": None})
    assert (moved - ref).abs().max().item() < 1e-5
    assert (base - ref).abs().max().item() > 1e-3


def test_zero_up_lora_equals_no_lora_exactly(sd):
    inp = tiny_inputs()
    plain = R.bfl_flux_forward(sd, CFG, **inp)
    zero = R.bfl_flux_forward(sd, CFG, **inp, lora=tiny_uso_lora(zero_up=True))
    assert torch.equal(plain, zero)


def test_unfused_lora_equals_fused_weights(sd):
    inp = tiny_inputs()
    lora = tiny_uso_lora()
    unfused = R.bfl_flux_forward(sd, CFG, **inp, lora=lora)
    plain = R.bfl_flux_forward(sd, CFG, **inp)
    assert (unfused - plain).abs().max() > 1e-2  # the LoRA does something
    fused = R.bfl_flux_forward(fuse_lora(sd, lora), CFG, **inp)
    assert (unfused - fused).abs().max().item() < 1e-5
    half = R.bfl_flux_forward(sd, CFG, **inp, lora=lora, lora_scale=0.5)
    assert (half - R.bfl_flux_forward(fuse_lora(sd, lora, 0.5), CFG, **inp)).abs().max().item() < 1e-5
    # the optional "diffusion_model." prefix is stripped
    prefixed = {"diffusion_model." + k: v for k, v in lora.items()}
    assert torch.equal(R.bfl_flux_forward(sd, CFG, **inp, lora=prefixed), unfused)


def test_single_block_qkv_lora_does_not_touch_mlp_slice(sd):
    """Single-block qkv_lora acts like a delta on linear1's first 3*hidden rows (q, k, v) only."""
    lora = {k: v for k, v in tiny_uso_lora().items() if k.startswith("single_blocks.0.processor.qkv_lora")}
    assert lora["single_blocks.0.processor.qkv_lora.up.weight"].shape[0] == 3 * CFG["hidden"]
    inp = tiny_inputs()
    out = R.bfl_flux_forward(sd, CFG, **inp, lora=lora)
    assert (out - R.bfl_flux_forward(fuse_lora(sd, lora), CFG, **inp)).abs().max().item() < 1e-5


def test_denoise_keeps_bf16_and_is_euler(sd):
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    inp = tiny_inputs(dtype=torch.bfloat16)
    common = dict(img_ids=inp["img_ids"], txt=inp["txt"], txt_ids=inp["txt_ids"], y=inp["y"],
                  ref_imgs=inp["ref_imgs"], ref_ids=inp["ref_ids"], style_tokens=inp["style_tokens"])
    ts = R.reference_schedule(3, 64, 64)
    x = R.reference_denoise(sd16, CFG, inp["img"], timesteps=ts, guidance=4.0, **common)
    assert x.dtype == torch.bfloat16 and x.shape == inp["img"].shape
    # one step by hand: x + (t1 - t0) * v(x, t0) with t, guidance as bf16 tensors
    t0 = torch.full((1,), ts[0], dtype=torch.bfloat16)
    v = R.bfl_flux_forward(sd16, CFG, inp["img"], timesteps=t0, guidance=torch.full((1,), 4.0, dtype=torch.bfloat16),
                           **common)
    one = R.reference_denoise(sd16, CFG, inp["img"], timesteps=ts[:2], guidance=4.0, **common)
    assert torch.equal(one, inp["img"] + (ts[1] - ts[0]) * v)


def test_timestep_embedding_cos_first_and_scaled_by_1000():
    e = R.timestep_embedding(torch.tensor([0.0, 0.5]), 256)
    assert e.shape == (2, 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    # highest frequency is 1 -> cos(1000 * 0.5)
    assert abs(e[1, 0].item() - np.cos(500.0)) < 1e-4 and abs(e[1, 128].item() - np.sin(500.0)) < 1e-4
    # bf16 input: the * 1000 happens in bf16: 0.7 -> 0.69921875, * 1000 -> 699.21875 -> 700.0 in bf16
    # (an fp32 multiply would keep 699.21875, whose cosine is far from cos(700))
    tb = torch.tensor([0.7], dtype=torch.bfloat16)
    eb = R.timestep_embedding(tb, 256)
    assert eb.dtype == torch.bfloat16
    assert eb[0, 0].item() == torch.cos(torch.tensor(700.0)).to(torch.bfloat16).item()
    assert eb[0, 0].item() != torch.cos(torch.tensor(699.21875)).to(torch.bfloat16).item()


# ----------------------------------------------------------------------------- projector


def _projector_sd(tokens_in=9, tokens_out=4, dims=16, hidden=64, seed=3, fill_zero=False):
    g = torch.Generator().manual_seed(seed)
    mk = (lambda *s: torch.zeros(*s)) if fill_zero else (lambda *s: torch.randn(*s, generator=g) * 0.3)
    sd = {}
    for b in ("high", "mid", "low"):
        sd[f"feature_embedder.{b}_embedding_linear.0.weight"] = mk(tokens_out, tokens_in)
        sd[f"feature_embedder.{b}_embedding_linear.0.bias"] = mk(tokens_out)
        sd[f"feature_embedder.{b}_layer_norm.weight"] = 1 + mk(dims)
        sd[f"feature_embedder.{b}_layer_norm.bias"] = mk(dims)
        sd[f"feature_embedder.{b}_projection.weight"] = mk(hidden, dims)
        sd[f"feature_embedder.{b}_projection.bias"] = mk(hidden)
    return sd


def test_projector_shape_and_branch_layers():
    proj = _projector_sd()
    g = torch.Generator().manual_seed(4)
    hs = [torch.randn(2, 9, 16, generator=g) for _ in range(28)]
    out = R.reference_projector(proj, hs)
    assert out.shape == (2, 3 * 4, 64) and out.dtype == torch.float32
    # unprefixed keys work the same
    plain = {k[len("feature_embedder."):]: v for k, v in proj.items()}
    assert torch.equal(R.reference_projector(plain, hs), out)
    # high <- hs[-2] (first 4 tokens), mid <- hs[-11], low <- hs[-20]; no other layer is read
    for idx, part in ((-2, 0), (-11, 1), (-20, 2)):
        changed = list(hs)
        changed[idx] = changed[idx] + 1.0
        d = (R.reference_projector(proj, changed) - out).abs().amax(dim=(0, 2))
        assert (d[4 * part: 4 * part + 4] > 1e-4).all()
        assert torch.equal(d[torch.arange(12) // 4 != part], torch.zeros(8))
    for idx in set(range(28)) - {26, 17, 8}:
        changed = list(hs)
        changed[idx] = changed[idx] + 1.0
        assert torch.equal(R.reference_projector(proj, changed), out)


def test_projector_casts_hidden_states_to_its_dtype():
    proj = {k: v.to(torch.bfloat16) for k, v in _projector_sd().items()}
    hs = [torch.randn(1, 9, 16) for _ in range(28)]
    assert R.reference_projector(proj, hs).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- images


def _noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")


@pytest.mark.parametrize("size,mode,want", [
    ((1000, 600), "RGB", (512, 304)),    # 600*512/1000 = 307.2 -> 307 -> crop 304
    ((600, 1000), "RGBA", (304, 512)),
    ((333, 777), "RGB", (208, 512)),     # 333*512/777 = 219.4 -> 219 -> crop 208
    ((2048, 2048), "RGB", (512, 512)),
])
def test_preprocess_subject_sizes_and_rgb(size, mode, want):
    out = R.reference_preprocess_subject(_noise_image(*size, mode=mode), 512)
    assert out.size == want and out.mode == "RGB"


def test_preprocess_subject_center_crop_offsets():
    img = _noise_image(1000, 600)
    out = R.reference_preprocess_subject(img, 512)
    resized = np.asarray(img.resize((512, 307), resample=Image.LANCZOS))
    assert np.array_equal(np.asarray(out), resized[1:305])  # top = (307 - 304) // 2 = 1


def test_preprocess_subject_16x16_passthrough_and_512_noop():
    tiny = _noise_image(16, 16, mode="RGBA")
    assert R.reference_preprocess_subject(tiny) is tiny
    img = _noise_image(512, 512)
    assert np.array_equal(np.asarray(R.reference_preprocess_subject(img)), np.asarray(img))


def test_style_pixels():
    img = Image.new("RGB", (300, 500), (255, 0, 128))
    px = R.reference_style_pixels(img, 384)
    assert px.shape == (1, 3, 384, 384) and px.dtype == torch.float32
    v128 = (np.float32(128 * (1 / 255)) - np.float32(0.5)) / np.float32(0.5)
    assert torch.equal(px[0, 0], torch.ones(384, 384))
    assert torch.equal(px[0, 1], -torch.ones(384, 384))
    assert torch.equal(px[0, 2], torch.full((384, 384), float(v128)))
    # squash, no crop: a left/right split image keeps its split at the middle column
    split = Image.new("RGB", (200, 50), (0, 0, 0))
    split.paste((255, 255, 255), (100, 0, 200, 50))
    sp = R.reference_style_pixels(split, 64)
    assert (sp[0, :, :, :30] == -1).all() and (sp[0, :, :, 34:] == 1).all()
    assert R.reference_style_pixels(_noise_image(40, 30, "RGBA"), 32).shape == (1, 3, 32, 32)


def test_all_combinations_of_refs_have_disjoint_ids():
    noise, refs = R.reference_ids(512, 768, [(256, 256), (512, 304), (128, 512)])
    seen = {tuple(r) for r in noise.tolist()}
    for ids in refs:
        rows = {tuple(r) for r in ids.tolist()}
        assert not (rows & seen)
        seen |= rows
    assert sum(len(i) for i in itertools.chain([noise], refs)) == len(seen)
