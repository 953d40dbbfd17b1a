"""Parity bridge: diffusers' FluxTransformer2DModel, driven the way the engine drives it,
against the independent reference math in tests/helpers/reference_math.py (BFL layout).

A tiny random diffusers model is converted to BFL keys by a small converter written
here (spec section 2.2 inverted).  Style tokens are injected with a forward hook on
``context_embedder`` (prepended, zero ids), subject tokens are concatenated to
``hidden_states`` and the output is cut to the noise tokens.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_math as R  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

N_DOUBLE, N_SINGLE, HIDDEN, HEADS = 2, 2, 64, 4
MLP = 4 * HIDDEN
CFG = dict(hidden=HIDDEN, heads=HEADS, depth=N_DOUBLE, depth_single=N_SINGLE, axes_dim=(4, 6, 6),
           theta=10000, mlp_ratio=4.0, guidance_embed=True)
FP32_TOL = 1e-5
# Measured bit-identical (0) on CPU.  One bf16 ulp of the largest output (|v| ~ 2.3) is 0.0156, so
# allow ~3 ulps for machines whose split q/k/v GEMMs round differently from the fused qkv GEMM.
BF16_TOL = 0.05


def tiny_diffusers_flux(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=N_DOUBLE, num_single_layers=N_SINGLE,
        attention_head_dim=16, num_attention_heads=HEADS, joint_attention_dim=48,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))  # exercise the learned QK scales
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def diffusers_to_bfl(dsd):
    """diffusers Flux names -> BFL names (q/k/v rows concatenated, norm_out halves swapped)."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return dsd[key]

    def copy(src, dst, bias=True):
        out[dst + ".weight"] = take(src + ".weight")
        if bias:
            out[dst + ".bias"] = take(src + ".bias")

    def concat(srcs, dst):
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = torch.cat([take(f"{s}.{kind}") for s in srcs], 0)

    copy("x_embedder", "img_in")
    copy("context_embedder", "txt_in")
    for d, b in (("timestep", "time_in"), ("guidance", "guidance_in"), ("text", "vector_in")):
        copy(f"time_text_embed.{d}_embedder.linear_1", f"{b}.in_layer")
        copy(f"time_text_embed.{d}_embedder.linear_2", f"{b}.out_layer")
    copy("proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{kind}").chunk(2, 0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale], 0)

    for i in range(N_DOUBLE):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        copy(s + "norm1.linear", d + "img_mod.lin")
        copy(s + "norm1_context.linear", d + "txt_mod.lin")
        concat([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v"], d + "img_attn.qkv")
        concat([s + "attn.add_q_proj", s + "attn.add_k_proj", s + "attn.add_v_proj"], d + "txt_attn.qkv")
        out[d + "img_attn.norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "img_attn.norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
        out[d + "txt_attn.norm.query_norm.scale"] = take(s + "attn.norm_added_q.weight")
        out[d + "txt_attn.norm.key_norm.scale"] = take(s + "attn.norm_added_k.weight")
        copy(s + "attn.to_out.0", d + "img_attn.proj")
        copy(s + "attn.to_add_out", d + "txt_attn.proj")
        copy(s + "ff.net.0.proj", d + "img_mlp.0")
        copy(s + "ff.net.2", d + "img_mlp.2")
        copy(s + "ff_context.net.0.proj", d + "txt_mlp.0")
        copy(s + "ff_context.net.2", d + "txt_mlp.2")
    for i in range(N_SINGLE):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        concat([s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"], d + "linear1")
        copy(s + "proj_out", d + "linear2")
        out[d + "norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
        copy(s + "norm.linear", d + "modulation.lin")
    missed = set(dsd) - used
    assert not missed, f"converter left diffusers keys unmapped: {sorted(missed)}"
    return out


def tiny_uso_lora(seed=5, rank=4):
    g = torch.Generator().manual_seed(seed)
    lora = {}

    def pair(name, out_f, in_f):
        lora[f"diffusion_model.{name}.down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        lora[f"diffusion_model.{name}.up.weight"] = 0.3 * torch.randn(out_f, rank, generator=g)

    for i in range(N_DOUBLE):
        for n in ("1", "2"):
            pair(f"double_blocks.{i}.processor.qkv_lora{n}", 3 * HIDDEN, HIDDEN)
            pair(f"double_blocks.{i}.processor.proj_lora{n}", HIDDEN, HIDDEN)
    for i in range(N_SINGLE):
        pair(f"single_blocks.{i}.processor.qkv_lora", 3 * HIDDEN, HIDDEN)
        pair(f"single_blocks.{i}.processor.proj_lora", HIDDEN, HIDDEN + MLP)
    return lora


def lora_targets(lora):
    """USO LoRA -> [(diffusers module name, down, up rows)] per spec section 2.3 (A shared, B split)."""
    lora = R.normalize_lora_keys(lora)
    qkv = {"qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v")}
    proj = {"proj_lora1": "attn.to_out.0", "proj_lora2": "attn.to_add_out", "proj_lora": "proj_out"}
    out = []
    for key in sorted(lora):
        if not key.endswith(".down.weight"):
            continue
        base = key[: -len(".down.weight")]
        block, _, name = base.partition(".processor.")
        kind, idx = block.split(".")
        prefix = ("transformer_blocks." if kind == "double_blocks" else "single_transformer_blocks.") + idx + "."
        down, up = lora[key], lora[base + ".up.weight"]
        if name in qkv:
            for mod, rows in zip(qkv[name], up.chunk(3, 0)):
                out.append((prefix + mod, down, rows))
        else:
            out.append((prefix + proj[name], down, up))
    return out


def attach_unfused_lora(model, lora, scale=1.0):
    """Forward hooks adding up(down(x)) * scale after each target Linear (the reference's way)."""
    modules = dict(model.named_modules())
    handles = []
    for name, down, up in lora_targets(lora):
        def hook(mod, args, output, down=down, up=up):
            x = args[0]
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(down.dtype), down), up)
            return output + delta.to(x.dtype) * scale
        handles.append(modules[name].register_forward_hook(hook))
    return handles


def fuse_lora_into(model, lora, scale=1.0):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, down, up in lora_targets(lora):
            w = modules[name].weight
            w.copy_((w.float() + scale * (up.float() @ down.float())).to(w.dtype))


def make_inputs(dtype, seed=7, n_style=5, n_txt=7):
    """64x64 px output (4x4 tokens), one 48x32 px subject (2x3 tokens), styles, text."""
    g = torch.Generator().manual_seed(seed)
    noise_ids, (ref_ids,) = R.reference_ids(64, 64, [(48, 32)])
    return dict(
        x=torch.randn(1, 16, 64, generator=g).to(dtype),
        ref=torch.randn(1, 6, 64, generator=g).to(dtype),
        noise_ids=noise_ids, ref_ids=ref_ids,
        txt=torch.randn(1, n_txt, 48, generator=g).to(dtype),
        y=torch.randn(1, 32, generator=g).to(dtype),
        style=torch.randn(1, n_style, HIDDEN, generator=g).to(dtype),
    )


def diffusers_velocity(model, inp, x, t, guidance):
    """One DiT call the engine's way: 2-D ids, style via a context_embedder hook, refs appended."""
    dtype = x.dtype
    style = inp["style"]
    hook = model.context_embedder.register_forward_hook(
        lambda mod, args, out: torch.cat([style.to(out.dtype), out], 1))
    try:
        out = model(
            hidden_states=torch.cat([x, inp["ref"]], 1),
            encoder_hidden_states=inp["txt"],
            pooled_projections=inp["y"],
            timestep=torch.full((1,), t, dtype=dtype),
            img_ids=torch.cat([inp["noise_ids"], inp["ref_ids"]], 0),
            txt_ids=torch.zeros(style.shape[1] + inp["txt"].shape[1], 3),
            guidance=torch.full((1,), guidance, dtype=dtype),
            return_dict=False,
        )[0]
    finally:
        hook.remove()
    return out[:, : x.shape[1]]


def reference_velocity(sd, inp, x, t, guidance, lora=None):
    dtype = x.dtype
    return R.bfl_flux_forward(
        sd, CFG, x, inp["noise_ids"], inp["txt"], torch.zeros(inp["txt"].shape[1], 3),
        torch.full((1,), t, dtype=dtype), inp["y"], torch.full((1,), guidance, dtype=dtype),
        ref_imgs=[inp["ref"]], ref_ids=[inp["ref_ids"]], style_tokens=inp["style"], lora=lora)


@pytest.fixture(scope="module")
def model32():
    return tiny_diffusers_flux()


def _measure(model, dtype, lora=None, t=0.7):
    model = model.to(dtype)
    sd = diffusers_to_bfl(model.state_dict())
    inp = make_inputs(dtype)
    handles = attach_unfused_lora(model, lora) if lora else []
    try:
        with torch.no_grad():
            a = diffusers_velocity(model, inp, inp["x"], t, 4.0)
            b = reference_velocity(sd, inp, inp["x"], t, 4.0, lora=lora)
    finally:
        for h in handles:
            h.remove()
    assert a.shape == b.shape == (1, 16, 64) and a.dtype == b.dtype == dtype
    return (a.float() - b.float()).abs().max().item(), b


def test_converter_round_trip_shapes(model32):
    sd = diffusers_to_bfl(model32.state_dict())
    assert sd["single_blocks.0.linear1.weight"].shape == (3 * HIDDEN + MLP, HIDDEN)
    assert sd["single_blocks.0.linear2.weight"].shape == (HIDDEN, HIDDEN + MLP)
    assert sd["double_blocks.1.img_attn.qkv.weight"].shape == (3 * HIDDEN, HIDDEN)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (2 * HIDDEN, HIDDEN)


@pytest.mark.parametrize("t", [1.0, 0.7, 0.05])
def test_fp32_forward_matches(model32, t):
    delta, out = _measure(model32, torch.float32, t=t)
    print(f"fp32 diffusers vs reference, t={t}: max|d| = {delta:.3g}")
    assert out.abs().max() > 0.1
    assert delta < FP32_TOL


def test_fp32_unfused_lora_matches(model32):
    lora = tiny_uso_lora()
    delta, out = _measure(model32, torch.float32, lora=lora)
    base, _ = _measure(model32, torch.float32)
    print(f"fp32 diffusers+LoRA hooks vs reference LoRA: max|d| = {delta:.3g}")
    assert delta < FP32_TOL
    # and the LoRA matters here
    sd = diffusers_to_bfl(model32.state_dict())
    inp = make_inputs(torch.float32)
    with torch.no_grad():
        plain = reference_velocity(sd, inp, inp["x"], 0.7, 4.0)
    assert (out - plain).abs().max() > 1e-2


def test_fp32_fused_lora_matches_unfused_reference():
    model = tiny_diffusers_flux()
    sd = diffusers_to_bfl({k: v.clone() for k, v in model.state_dict().items()})
    lora = tiny_uso_lora()
    fuse_lora_into(model, lora)
    inp = make_inputs(torch.float32)
    with torch.no_grad():
        a = diffusers_velocity(model, inp, inp["x"], 0.7, 4.0)
        b = reference_velocity(sd, inp, inp["x"], 0.7, 4.0, lora=lora)
    delta = (a - b).abs().max().item()
    print(f"fp32 diffusers fused LoRA vs reference unfused: max|d| = {delta:.3g}")
    assert delta < FP32_TOL


def test_fp32_euler_loop_matches(model32):
    model = model32.to(torch.float32)
    sd = diffusers_to_bfl(model.state_dict())
    inp = make_inputs(torch.float32)
    ts = R.reference_schedule(3, 64, 64)
    with torch.no_grad():
        x = inp["x"]
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t_cur) * diffusers_velocity(model, inp, x, t_cur, 4.0)
        ref = R.reference_denoise(sd, CFG, inp["x"], inp["noise_ids"], inp["txt"], torch.zeros(7, 3), inp["y"],
                                  ts, 4.0, ref_imgs=[inp["ref"]], ref_ids=[inp["ref_ids"]],
                                  style_tokens=inp["style"])
    delta = (x - ref).abs().max().item()
    print(f"fp32 3-step Euler diffusers vs reference: max|d| = {delta:.3g}")
    assert delta < FP32_TOL


def test_bf16_forward_close():
    model = tiny_diffusers_flux()
    delta, _ = _measure(model, torch.bfloat16)
    delta_lora, _ = _measure(model, torch.bfloat16, lora={k: v.to(torch.bfloat16) for k, v in tiny_uso_lora().items()})
    print(f"bf16 diffusers vs reference: max|d| = {delta:.3g}; with unfused LoRA: {delta_lora:.3g}")
    assert delta < BF16_TOL and delta_lora < BF16_TOL
