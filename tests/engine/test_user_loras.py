"""The user's own FLUX LoRAs on top of the USO LoRA: every file layout against the LoRA merged by
hand into the base weights, changing LoRAs without reloading, order independence, strength 0, the
USO LoRA never fused twice, and clear refusals for LoRAs of other models."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from nodes.engine import EngineOptions, InputError, ModelFileError, USOPipeline, loaders, lora, user_lora
from nodes.engine.model_set import ModelFiles, load_models
from nodes.engine.memory import resolve_precision

FORMATS = ("kohya", "comfyui", "xlabs", "diffusers")
STRENGTH = 0.8
#: Measured differences, printed as the report's table (pytest -s).
MEASURED: dict = {}


def _hand_merged(tm, fmt: str, strength: float, tmp_path):
    """The transformer with the LoRA merged by hand: W += strength * scale * up @ down on the base
    file's own weights (BFL keys for kohya / ComfyUI / xlabs, loaded through the transformer loader;
    diffusers keys added to the loaded model directly)."""
    truth = tm.user_loras[fmt]
    if truth["space"] == "bfl":
        merged = {k: v.clone() for k, v in tm.flux_bfl_state.items()}
        for module, (down, up, scale) in truth["parts"].items():
            merged[f"{module}.weight"] += strength * scale * (up @ down)
        path = tmp_path / f"merged_{fmt}.safetensors"
        save_file(merged, str(path), metadata={"config": json.dumps(tm.flux_config)})
        return loaders.load_transformer(str(path), torch.float32)[0]
    model = loaders.load_transformer(str(tm.paths["flux_bfl"]), torch.float32)[0]
    state = model.state_dict()
    with torch.no_grad():
        for module, (down, up, scale) in truth["parts"].items():
            state[f"{module}.weight"] += strength * scale * (up @ down)
    return model


def _apply(tm, fmt: str, strength: float, fused: bool):
    model, cfg = loaders.load_transformer(str(tm.paths["flux_bfl"]), torch.float32)
    loaded = user_lora.read_user_lora(str(tm.paths[f"user_lora_{fmt}"]), model, cfg)
    assert loaded.format == fmt
    entries = [(p, strength * p.scale) for p in loaded.parts]
    lora.set_user_loras(model, (loaded.identity, strength), entries, fused, torch.device("cpu"), torch.float32)
    return model


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    hidden = torch.randn(1, 16, cfg.in_channels, generator=g)
    text = torch.randn(1, 5, cfg.joint_attention_dim, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    with torch.inference_mode():
        return model(hidden_states=hidden, encoder_hidden_states=text,
                     pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([0.7]), img_ids=ids, txt_ids=torch.zeros(5, 3),
                     guidance=torch.tensor([4.0]), return_dict=False)[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_equals_the_lora_merged_by_hand(tiny_models, fmt, tmp_path):
    reference = _hand_merged(tiny_models, fmt, STRENGTH, tmp_path)
    fused = _apply(tiny_models, fmt, STRENGTH, fused=True)
    ref_state, fused_state = reference.state_dict(), fused.state_dict()
    assert ref_state.keys() == fused_state.keys()
    weight_diff = max((ref_state[k] - fused_state[k]).abs().max().item() for k in ref_state)
    changed = sum(not torch.equal(fused_state[k], v) for k, v in
                  loaders.load_transformer(str(tiny_models.paths["flux_bfl"]), torch.float32)[0].state_dict().items())
    unfused = _apply(tiny_models, fmt, STRENGTH, fused=False)
    expected = _forward(reference)
    out_diff = (_forward(unfused) - expected).abs().max().item()
    fused_out_diff = (_forward(fused) - expected).abs().max().item()
    MEASURED[fmt] = (weight_diff, fused_out_diff, out_diff, changed, expected.abs().max().item())
    print(f"\n[lora {fmt}] fused weights max|diff| {weight_diff:.3g}; output max|diff| fused {fused_out_diff:.3g}, "
          f"unfused {out_diff:.3g} (output max {expected.abs().max().item():.3g}); {changed} weights changed")
    assert changed >= len(tiny_models.user_loras[fmt]["parts"])  # the LoRA reached every module it names
    assert weight_diff <= 1e-6
    assert fused_out_diff <= 1e-5 * max(1.0, expected.abs().max().item())
    assert out_diff <= 1e-5 * max(1.0, expected.abs().max().item())


def test_kohya_layout_matches_diffusers_own_converter_at_full_width(tmp_path):
    """diffusers' kohya converter hard-codes FLUX.1-dev's widths, so it is compared here at the
    real width (rank 2, one block of each kind, factors only: no full-size weights)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from tiny_models import FULL_FLUX

    cfg = dict(FULL_FLUX, num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    h = 3072
    shapes = {"double_blocks_0_img_attn_qkv": (h, 3 * h), "double_blocks_0_txt_attn_proj": (h, h),
              "double_blocks_0_img_mlp_0": (h, 4 * h), "double_blocks_0_txt_mod_lin": (h, 6 * h),
              "single_blocks_0_linear1": (h, 7 * h), "single_blocks_0_linear2": (5 * h, h),
              "single_blocks_0_modulation_lin": (h, 3 * h)}
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i, (name, (n_in, n_out)) in enumerate(shapes.items()):
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, n_in, generator=g)
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n_out, 2, generator=g)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(1 + i % 3))
    path = tmp_path / "kohya_full.safetensors"
    save_file(sd, str(path))
    ours = user_lora.read_user_lora(str(path), model, cfg)
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    probe = {}
    for part in ours.parts:
        v = torch.randn(part.down.shape[1], generator=torch.Generator().manual_seed(len(part.module)))
        probe[part.module] = v
    modules = {p.module for p in ours.parts}
    assert {k[len("transformer."):-len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")} == modules
    worst = 0.0
    for module in modules:
        v = probe[module]
        mine = sum(p.scale * (p.up @ (p.down @ v)) for p in ours.parts if p.module == module)
        a, b = theirs[f"transformer.{module}.lora_A.weight"], theirs[f"transformer.{module}.lora_B.weight"]
        ref = b @ (a @ v)
        worst = max(worst, ((mine - ref).abs().max() / ref.abs().max()).item())
    MEASURED["kohya vs diffusers converter"] = worst
    assert worst <= 1e-5  # fp32: diffusers folds alpha into the factors, we scale the product


# -- through the pipeline -----------------------------------------------------------------------

def _files(tm):
    p = tm.paths
    return ModelFiles(transformer=str(p["flux_bfl"]), vae=str(p["ae"]), t5=str(p["t5_fp16"]), clip_l=str(p["clip_l"]),
                      siglip=str(p["siglip_file"]), uso_lora=str(p["lora_comfy"]), projector=str(p["projector_comfy"]),
                      tokenizer_dir=str(p["tokenizer_t5"].parent))


def _pipeline(tm, **options):
    opts = EngineOptions(precision="fp32", device="cpu", **options)
    return USOPipeline.from_files(_files(tm), opts)


def _latents(pipe, seed=3):
    return pipe.generate("a photo of a cat", width=32, height=32, steps=2, seeds=[seed]).latents


@pytest.fixture(scope="module")
def fused_pipe(tiny_models):
    return _pipeline(tiny_models)


def test_strength_zero_is_the_image_without_the_lora(tiny_models, fused_pipe):
    plain = _latents(fused_pipe)
    assert torch.equal(_latents(fused_pipe.with_lora(str(tiny_models.paths["user_lora_kohya"]), 0.0)), plain)
    with_lora = _latents(fused_pipe.with_lora(str(tiny_models.paths["user_lora_kohya"]), 0.7))
    assert (with_lora - plain).abs().max() > 1e-3  # the LoRA does change the image


def test_stacking_order_does_not_change_the_image(tiny_models, fused_pipe):
    a, b = str(tiny_models.paths["user_lora_kohya"]), str(tiny_models.paths["user_lora_diffusers"])
    ab = _latents(fused_pipe.with_lora(a, 0.6).with_lora(b, 0.9))
    ba = _latents(fused_pipe.with_lora(b, 0.9).with_lora(a, 0.6))
    assert torch.equal(ab, ba)
    only_a = _latents(fused_pipe.with_lora(a, 0.6))
    assert (ab - only_a).abs().max() > 1e-3


@pytest.mark.parametrize("lora_mode", ["fused", "unfused"])
def test_changing_loras_reuses_the_weights_and_equals_loading_from_scratch(tiny_models, lora_mode, monkeypatch):
    pipe = _pipeline(tiny_models, lora_mode=lora_mode)
    base_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    kohya, xlabs = str(tiny_models.paths["user_lora_kohya"]), str(tiny_models.paths["user_lora_xlabs"])
    real_open = user_lora.open_weights

    def only_lora_files(path):  # the transformer file is never read again
        assert "my_flux_lora" in str(path), path
        return real_open(path)

    monkeypatch.setattr(user_lora, "open_weights", only_lora_files)
    monkeypatch.setattr(loaders, "load_transformer", lambda *a, **k: pytest.fail("transformer reloaded"))
    first = _latents(pipe.with_lora(kohya, 0.8))
    _latents(pipe.with_lora(kohya, 0.3).with_lora(xlabs, 1.2))
    _latents(pipe)  # every user LoRA taken out again
    monkeypatch.undo()
    assert pipe.transformer.state_dict().keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in pipe.transformer.state_dict().items())
    again = _latents(pipe.with_lora(kohya, 0.8))
    assert torch.equal(first, again)
    changed = _latents(pipe.with_lora(kohya, 0.3).with_lora(xlabs, 1.2))
    fresh = _latents(_pipeline(tiny_models, lora_mode=lora_mode).with_lora(kohya, 0.3).with_lora(xlabs, 1.2))
    assert torch.equal(changed, fresh)
    state = lora.state_of(pipe.transformer)
    assert state.user_fused == (lora_mode == "fused")


def test_fused_changes_are_exactly_reversible_in_bf16(tiny_models):
    """bf16 rounding would lose the base weights a little at every change; the elements that
    would not come back are kept aside, so many changes leave the weights bit for bit."""
    model, cfg = loaders.load_transformer(str(tiny_models.paths["flux_bfl"]), torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = [user_lora.read_user_lora(str(tiny_models.paths[f"user_lora_{f}"]), model, cfg) for f in FORMATS]

    def put(one, strength):
        lora.set_user_loras(model, (one.identity, strength), [(p, strength * p.scale) for p in one.parts], True,
                            torch.device("cpu"), torch.bfloat16)

    for i in range(28):
        put(loaded[i % len(loaded)], 0.05 + (i % 7) * 0.4)
    lora.set_user_loras(model, (), [], True, torch.device("cpu"), torch.bfloat16)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    # What is kept aside grows with the update's size; at a typical LoRA's (about 1% of the weight's
    # norm) it is about 1% of the touched elements (6 bytes each), not a second copy of them.
    put(loaded[0], 0.01)
    state = lora.state_of(model)
    relative = max((lora._combined_delta(group, "cpu").norm() / model.get_submodule(m).weight.float().norm()).item()
                   for m, group in lora._by_module(state.user).items())
    kept = sum(r.index.numel() for r in state._fused) / sum(model.get_submodule(r.module).weight.numel()
                                                            for r in state._fused)
    MEASURED["bf16: largest relative update, fraction of touched elements kept aside"] = (relative, kept)
    assert relative < 0.02 and kept < 0.02


def test_a_second_pipeline_over_the_same_models_does_not_fuse_the_uso_lora_again(tiny_models):
    precision = resolve_precision("fp32", torch.device("cpu"))
    models = load_models(_files(tiny_models), precision)
    first = USOPipeline(models, EngineOptions(precision="fp32", device="cpu"))
    fused_once = {k: v.clone() for k, v in models.transformer.state_dict().items()}
    image = _latents(first)
    second = USOPipeline(models, EngineOptions(precision="fp32", device="cpu"))
    assert all(torch.equal(v, fused_once[k]) for k, v in models.transformer.state_dict().items())
    assert torch.equal(_latents(second), image)
    with pytest.raises(InputError, match="already carry the USO LoRA"):
        USOPipeline(models, EngineOptions(precision="fp32", device="cpu", lora_strength=0.5))


def test_fp8_weights_take_user_loras_unfused(tiny_models):
    pipe = _pipeline(tiny_models, lora_mode="auto")
    fp8 = USOPipeline.from_files(replace(_files(tiny_models), transformer=str(tiny_models.paths["flux_fp8"])),
                                 EngineOptions(precision="fp8_e4m3fn", device="cpu"))
    assert pipe.lora_mode == "fused" and fp8.lora_mode == "unfused"
    plain = _latents(fp8)
    lora_image = _latents(fp8.with_lora(str(tiny_models.paths["user_lora_comfyui"]), 1.0))
    assert not lora.state_of(fp8.transformer).user_fused
    assert (lora_image - plain).abs().max() > 1e-3


def test_gguf_weights_take_user_loras_unfused(tiny_models):
    if "flux_gguf" not in tiny_models.paths:
        pytest.skip(tiny_models.skipped["flux_gguf"])
    gguf = USOPipeline.from_files(replace(_files(tiny_models), transformer=str(tiny_models.paths["flux_gguf"])),
                                  EngineOptions(precision="fp32", device="cpu"))
    assert gguf.lora_mode == "unfused"
    plain = _latents(gguf)
    with_lora = _latents(gguf.with_lora(str(tiny_models.paths["user_lora_diffusers"]), 1.0))
    assert not lora.state_of(gguf.transformer).user_fused
    assert (with_lora - plain).abs().max() > 1e-3
    assert torch.equal(_latents(gguf), plain)  # swapped out again


@pytest.mark.parametrize("steps, denoise, skipped", [(25, 1.0, 0), (25, 0.6, 10), (25, 0.8, 5), (4, 0.5, 2),
                                                      (25, 0.0, 25), (28, 0.75, 7)])
def test_img2img_skips_the_steps_diffusers_strength_skips(steps, denoise, skipped):
    from nodes.engine import schedule

    # FluxImg2ImgPipeline.get_timesteps: init = min(steps * strength, steps); t_start = int(max(steps - init, 0))
    assert schedule.first_step(steps, denoise) == skipped == int(max(steps - min(steps * denoise, steps), 0))


def test_group_offload_takes_user_loras_unfused_with_the_same_image(tiny_models, fused_pipe):
    path = str(tiny_models.paths["user_lora_kohya"])
    streamed = _pipeline(tiny_models, memory="group_offload", lora_mode="unfused")
    resident = _pipeline(tiny_models, lora_mode="unfused")
    a, b = _latents(streamed.with_lora(path, 0.9)), _latents(resident.with_lora(path, 0.9))
    assert not lora.state_of(streamed.transformer).user_fused
    assert torch.equal(a, b)


# -- LoRAs for other models ----------------------------------------------------------------------

def _write(tmp_path, name, sd):
    path = tmp_path / name
    save_file(sd, str(path))
    return str(path)


def test_loras_for_other_models_are_refused_naming_the_file(tiny_models, fused_pipe, tmp_path):
    sdxl = _write(tmp_path, "sdxl_style.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)})
    with pytest.raises(ModelFileError, match=r"sdxl_style\.safetensors.*Stable Diffusion"):
        fused_pipe.with_lora(sdxl)
    narrow = _write(tmp_path, "other_width.safetensors", {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(ModelFileError, match=r"other_width\.safetensors.*does not fit.*32->32"):
        fused_pipe.with_lora(narrow)
    text_only = _write(tmp_path, "clip_only.safetensors", {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4)})
    with pytest.raises(ModelFileError, match=r"clip_only\.safetensors.*only text-encoder parts"):
        fused_pipe.with_lora(text_only)
    with pytest.raises(ModelFileError, match="does not exist"):
        fused_pipe.with_lora(str(tmp_path / "missing.safetensors"))


def test_text_encoder_parts_are_named_as_ignored(tiny_models, fused_pipe):
    view = fused_pipe.with_lora(str(tiny_models.paths["user_lora_kohya"]))
    [warning] = view.lora_warnings
    assert "my_flux_lora_kohya.safetensors" in warning and "3 text-encoder tensors were ignored" in warning
    assert fused_pipe.with_lora(str(tiny_models.paths["user_lora_xlabs"])).lora_warnings == []


@pytest.mark.parametrize("spec, expected", [("a.safetensors", ("a.safetensors", 1.0)),
                                            ("a.safetensors:0.75", ("a.safetensors", 0.75)),
                                            ("dir/b.safetensors:-1", ("dir/b.safetensors", -1.0)),
                                            (r"C:\loras\c.safetensors", (r"C:\loras\c.safetensors", 1.0)),
                                            (r"C:\loras\c.safetensors:2", (r"C:\loras\c.safetensors", 2.0))])
def test_lora_spec_file_and_strength(spec, expected):
    assert user_lora.parse_lora_spec(spec) == expected


def teardown_module():
    if MEASURED:
        print("\n[user LoRA measurements]", json.dumps(MEASURED, indent=1, default=str))


# -- PEFT per-module ranks and alphas (rank_pattern / alpha_pattern), against diffusers' own loader --

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out", "proj_mlp", "ff.net.2"]
#: Each form of pattern key PEFT accepts and writes back as given: (rank_pattern, alpha_pattern, use_rslora).
PEFT_PATTERNS = {
    "exact names": ({"transformer_blocks.0.attn.to_k": 2, "single_transformer_blocks.1.proj_out": 6},
                    {"transformer_blocks.1.attn.to_q": 3, "single_transformer_blocks.0.proj_mlp": 12}, False),
    "name endings": ({"to_k": 2, "ff.net.2": 6}, {"attn.to_v": 5, "proj_mlp": 2}, False),
    "regular expressions": ({r"single_transformer_blocks\.\d+\.proj_out": 6, r"transformer_blocks\.[01]\.attn\.to_(k|v)": 2},
                            {r".*\.ff\.net\.2": 16, r"transformer_blocks\.1\..*": 1}, False),
    "first key wins": ({"to_k": 2, r"transformer_blocks\.0\.attn\.to_k": 6}, {"attn.to_q": 3, "to_q": 32}, False),
    "rslora": ({"to_k": 2}, {"proj_out": 3}, True),
}


def _peft_lora_file(base, cfg, patterns, writer: str, out_dir) -> str:
    """A LoRA written by diffusers from a PEFT adapter with per-module ranks and alphas:
    `save_lora_weights` (metadata keyed `transformer.<field>`) or `save_lora_adapter` (unprefixed)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    rank_pattern, alpha_pattern, rslora = patterns
    model = FluxTransformer2DModel(**cfg)
    model.load_state_dict(base.state_dict())
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, rank_pattern=rank_pattern,
                                 alpha_pattern=alpha_pattern, use_rslora=rslora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    if writer == "pipeline":
        FluxPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(model),
                                       transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
                                       weight_name="peft_lora.safetensors")
    else:
        model.save_lora_adapter(str(out_dir), weight_name="peft_lora.safetensors")
    return str(out_dir / "peft_lora.safetensors")


@pytest.mark.parametrize("writer", ["pipeline", "model"])
@pytest.mark.parametrize("form", sorted(PEFT_PATTERNS))
def test_peft_rank_and_alpha_patterns_equal_diffusers_own_loader(tiny_models, tmp_path, form, writer):
    pytest.importorskip("peft")
    from diffusers import FluxTransformer2DModel

    base, cfg = loaders.load_transformer(str(tiny_models.paths["flux_bfl"]), torch.float32)
    path = _peft_lora_file(base, cfg, PEFT_PATTERNS[form], writer, tmp_path)
    reference = FluxTransformer2DModel(**cfg)
    reference.load_state_dict(base.state_dict())
    reference.load_lora_adapter(str(tmp_path), weight_name="peft_lora.safetensors",
                                prefix="transformer" if writer == "pipeline" else None, adapter_name="peft")
    peft_scales = {n: m.scaling["peft"] for n, m in reference.named_modules() if hasattr(m, "scaling")}
    reference.fuse_lora(lora_scale=1.0)
    reference.unload_lora()

    ours = FluxTransformer2DModel(**cfg)
    ours.load_state_dict(base.state_dict())
    loaded = user_lora.read_user_lora(path, ours, cfg)
    lora.set_user_loras(ours, (loaded.identity, 1.0), [(p, p.scale) for p in loaded.parts], True,
                        torch.device("cpu"), torch.float32)
    # The patterns give these modules scales of their own (otherwise the test would not tell).
    assert len(set(peft_scales.values())) >= 3
    assert {p.module: p.scale for p in loaded.parts} == pytest.approx(peft_scales, rel=1e-12)
    want, have, plain = reference.state_dict(), ours.state_dict(), base.state_dict()
    assert want.keys() == have.keys()
    assert max((want[k] - have[k]).abs().max().item() for k in want) <= 1e-6
    assert sum(not torch.equal(want[k], plain[k]) for k in want) == len(peft_scales)


@pytest.mark.parametrize("meta,words", [
    ('{"transformer.r": 4, "transformer.rank_pattern": [1, 2]}', "gives rank_pattern as list"),
    ('{"r": 4, "alpha_pattern": {"to_(q": 2}}', "alpha_pattern key 'to_(q', which is not a regular expression"),
    ('{"r": 4, "lora_alpha": "eight"}', 'lora_alpha = "eight", not a positive number'),
    ('{"r": 4, "rank_pattern": {"to_q": 3}}', "attn.to_q rank 3, but its weights have rank 4"),
    ('[4, 8]', "is JSON list, not an object"),
])
def test_an_unreadable_peft_config_is_refused_naming_the_field(tiny_models, tmp_path, meta, words):
    from safetensors import safe_open

    base, cfg = loaders.load_transformer(str(tiny_models.paths["flux_bfl"]), torch.float32)
    with safe_open(str(tiny_models.paths["user_lora_diffusers"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "my_flux_lora_diffusers.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": meta})
    with pytest.raises(ModelFileError) as err:
        user_lora.read_user_lora(str(path), base, cfg)
    assert "'my_flux_lora_diffusers.safetensors'" in str(err.value) and words in str(err.value)
