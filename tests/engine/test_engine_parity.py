"""The engine against an independent implementation of the reference math (tests/helpers/reference_math.py,
written from the spec and checked bit-identical to bytedance/USO): same tensors in, same latents out.
"""
from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionModel

import reference_math as ref
from nodes.engine import EngineOptions, InputError, ModelFiles, USOPipeline, text

REF_CFG = {"hidden": 64, "heads": 4, "depth": 2, "depth_single": 2, "axes_dim": (4, 6, 6),
           "theta": 10000, "mlp_ratio": 4.0, "guidance_embed": True}
W, H, STEPS, SEED = 64, 48, 3, 7
PROMPT = "a photo of a cat wearing a red hat"


def make_pipeline(tiny_models, precision="fp32", lora_mode="unfused", transformer="flux_bfl", **kw):
    p = {k: str(v) for k, v in tiny_models.paths.items()}
    files = ModelFiles(transformer=p[transformer], vae=p["ae"], t5=p["t5_fp16"], clip_l=p["clip_l"],
                       siglip=p["siglip_file"], uso_lora=p["lora_comfy"], projector=p["projector_comfy"],
                       tokenizer_dir=str(tiny_models.paths["tokenizer_t5"].parent))
    return USOPipeline.from_files(files, EngineOptions(precision=precision, lora_mode=lora_mode, device="cpu", **kw))


@pytest.fixture(scope="module")
def pipe32(tiny_models):
    return make_pipeline(tiny_models)


@pytest.fixture(scope="module")
def inputs(tiny_models):
    return {"styles": [tiny_models.make_image(90, 60, 11), tiny_models.make_image(40, 70, 12)],
            "subject": tiny_models.make_image(96, 80, 13)}


def reference_style_tokens(tiny_models, images, dtype):
    siglip = SiglipVisionModel.from_pretrained(str(tiny_models.paths["siglip_dir"])).eval()
    tokens = []
    for image in images:
        pixels = ref.reference_style_pixels(image, tiny_models.siglip_config["image_size"])
        with torch.no_grad():
            hidden = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states
        proj = {k: v.to(dtype) for k, v in tiny_models.projector_state.items()}
        tokens.append(ref.reference_projector(proj, hidden))
    return torch.cat(tokens, dim=1)


def reference_latents(tiny_models, pipe, styles, subject_latents, subject_size, dtype, lora=True,
                      state=None, seed=SEED):
    t5, pooled = pipe.encode_prompt(PROMPT)
    noise = ref.reference_noise(seed, W, H)
    noise_ids, ref_ids = ref.reference_ids(W, H, [subject_size])
    sd = {k: v.to(dtype) for k, v in (state or tiny_models.flux_bfl_state).items()}
    lora_sd = {k: v.to(dtype) for k, v in tiny_models.lora_state.items()} if lora else None
    x = ref.reference_denoise(sd, REF_CFG, ref.pack(noise).to(dtype), noise_ids, t5.to(dtype),
                              torch.zeros(t5.shape[1], 3), pooled.to(dtype),
                              ref.reference_schedule(STEPS, W, H), 4.0,
                              ref_imgs=[ref.pack(subject_latents).to(dtype)], ref_ids=ref_ids,
                              style_tokens=styles.to(dtype), lora=lora_sd)
    return ref.unpack(x, W, H)


def engine_latents(pipe, inputs, seeds=(SEED,), styles=None):
    style = pipe.encode_style(styles or inputs["styles"])
    subject = pipe.encode_subject([inputs["subject"]], long_side=64)
    result = pipe.generate(PROMPT, styles=style, subjects=subject, width=W, height=H, steps=STEPS,
                           seeds=list(seeds))
    scaled = (result.latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return scaled, result, style, subject


def test_style_tokens_match_the_reference_projector(tiny_models, pipe32, inputs):
    ours = torch.cat(pipe32.encode_style(inputs["styles"]).tokens, dim=1)
    theirs = reference_style_tokens(tiny_models, inputs["styles"], torch.float32)
    assert ours.shape == (1, 2 * 24, 64)  # 3 branches x 8 tokens per style image
    assert (ours - theirs).abs().max() < 1e-5


def test_subject_latents_are_the_posterior_mean_of_the_preprocessed_image(tiny_models, pipe32, inputs):
    from diffusers import AutoencoderKL

    enc = pipe32.encode_subject([inputs["subject"]], long_side=64)
    prepared = ref.reference_preprocess_subject(inputs["subject"], 64)
    assert enc.sizes == (prepared.size,) == ((64, 48),)
    vae = AutoencoderKL.from_pretrained(str(tiny_models.paths["diffusers_dir"] / "vae")).eval()
    import numpy as np
    pixels = torch.from_numpy(np.asarray(prepared, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mode()
    expected = (mean - 0.1159) * 0.3611
    assert enc.latents[0].shape == (1, 16, 6, 8)
    assert (enc.latents[0] - expected).abs().max() < 1e-5


def test_fp32_generation_matches_the_reference_loop(tiny_models, pipe32, inputs):
    ours, _, style, subject = engine_latents(pipe32, inputs)
    styles = torch.cat(style.tokens, dim=1)
    theirs = reference_latents(tiny_models, pipe32, styles, subject.latents[0], subject.sizes[0], torch.float32)
    delta = (ours - theirs).abs().max().item()
    print(f"\nfp32 engine (unfused LoRA) vs reference loop: max |d| = {delta:.2e}")
    assert delta < 1e-5


def test_bf16_generation_matches_the_reference_loop(tiny_models, inputs):
    pipe = make_pipeline(tiny_models, precision="bf16", lora_mode="unfused")
    ours, _, style, subject = engine_latents(pipe, inputs)
    styles = torch.cat(style.tokens, dim=1)
    theirs = reference_latents(tiny_models, pipe, styles, subject.latents[0], subject.sizes[0], torch.bfloat16)
    delta = (ours - theirs.float()).abs().max().item()
    print(f"\nbf16 engine (unfused LoRA) vs reference loop: max |d| = {delta:.2e}")
    # Bit for bit: the engine hands out its bf16 latents unscaled in fp32 (x / scale + shift) and
    # `engine_latents` scales them back, an fp32 round trip (~1e-7) that rounding to bf16 undoes.
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(ours.to(torch.bfloat16), theirs)


def _hand_fused_bfl_state(tiny_models):
    """The LoRA written out by hand into the BFL weights: W + up @ down on the rows it touches."""
    sd = {k: v.clone() for k, v in tiny_models.flux_bfl_state.items()}
    lora_sd = tiny_models.lora_state
    targets = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj",
               "qkv_lora2": "txt_attn.qkv", "proj_lora2": "txt_attn.proj"}
    for i in range(2):
        for name, layer in targets.items():
            delta = lora_sd[f"double_blocks.{i}.processor.{name}.up.weight"] @ \
                lora_sd[f"double_blocks.{i}.processor.{name}.down.weight"]
            sd[f"double_blocks.{i}.{layer}.weight"] += delta
        qkv = lora_sd[f"single_blocks.{i}.processor.qkv_lora.up.weight"] @ \
            lora_sd[f"single_blocks.{i}.processor.qkv_lora.down.weight"]
        sd[f"single_blocks.{i}.linear1.weight"][: qkv.shape[0]] += qkv
        sd[f"single_blocks.{i}.linear2.weight"] += lora_sd[f"single_blocks.{i}.processor.proj_lora.up.weight"] @ \
            lora_sd[f"single_blocks.{i}.processor.proj_lora.down.weight"]
    return sd


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-5), ("bf16", 0.05)])
def test_fused_and_unfused_lora_agree_and_match_a_lora_written_by_hand(tiny_models, inputs, precision, tolerance):
    fused = make_pipeline(tiny_models, precision=precision, lora_mode="fused")
    unfused = make_pipeline(tiny_models, precision=precision, lora_mode="unfused")
    a, _, style, subject = engine_latents(fused, inputs)
    b, *_ = engine_latents(unfused, inputs)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    by_hand = reference_latents(tiny_models, fused, torch.cat(style.tokens, 1), subject.latents[0],
                                subject.sizes[0], dtype, lora=False,
                                state=_hand_fused_bfl_state(tiny_models)).float()
    fused_vs_unfused = (a - b).abs().max().item()
    print(f"\n{precision}: fused vs unfused max |d| = {fused_vs_unfused:.2e}; "
          f"fused vs hand {(a - by_hand).abs().max().item():.2e}; unfused vs hand "
          f"{(b - by_hand).abs().max().item():.2e}")
    assert fused_vs_unfused < tolerance
    assert (a - by_hand).abs().max() < tolerance and (b - by_hand).abs().max() < tolerance
    no_lora = reference_latents(tiny_models, fused, torch.cat(style.tokens, 1), subject.latents[0],
                                subject.sizes[0], dtype, lora=False).float()
    lora_effect = (a - no_lora).abs().max().item()
    assert lora_effect > 0.1 and lora_effect > 5 * fused_vs_unfused  # the LoRA really matters


def test_style_token_order_does_not_matter(pipe32, inputs):
    a, *_ = engine_latents(pipe32, inputs, styles=inputs["styles"])
    b, *_ = engine_latents(pipe32, inputs, styles=list(reversed(inputs["styles"])))
    assert (a - b).abs().max() < 1e-5


def test_same_seed_same_image_different_seed_different_image(pipe32, inputs):
    _, r1, *_ = engine_latents(pipe32, inputs, seeds=(5,))
    _, r2, *_ = engine_latents(pipe32, inputs, seeds=(5,))
    _, r3, *_ = engine_latents(pipe32, inputs, seeds=(6,))
    assert torch.equal(r1.images, r2.images) and torch.equal(r1.latents, r2.latents)
    assert (r1.images - r3.images).abs().max() > 0.1


def test_batch_image_i_equals_a_single_run_with_its_seed(pipe32, inputs):
    _, batch, *_ = engine_latents(pipe32, inputs, seeds=(3, 4, 5))
    assert batch.images.shape == (3, H, W, 3) and batch.seeds == [3, 4, 5]
    for i, seed in enumerate((3, 4, 5)):
        _, single, *_ = engine_latents(pipe32, inputs, seeds=(seed,))
        assert torch.equal(batch.images[i], single.images[0])


def test_a_new_seed_reruns_only_sampling(tiny_models, inputs, monkeypatch):
    pipe = make_pipeline(tiny_models)
    calls = {"t5": 0, "siglip": 0, "vae_encode": 0}
    original_t5 = text.encode_t5
    monkeypatch.setattr(text, "encode_t5", lambda *a, **k: (calls.__setitem__("t5", calls["t5"] + 1),
                                                             original_t5(*a, **k))[1])
    pipe.siglip.register_forward_hook(lambda *a: calls.__setitem__("siglip", calls["siglip"] + 1))
    original_encode = pipe.vae.encode

    def counting_encode(*a, **k):
        calls["vae_encode"] += 1
        return original_encode(*a, **k)

    pipe.vae.encode = counting_encode
    for seed in (1, 2, 3):
        style = pipe.encode_style([inputs["styles"][0]])
        subject = pipe.encode_subject([inputs["subject"]], long_side=64)
        pipe.generate(PROMPT, styles=style, subjects=subject, width=W, height=H, steps=2, seeds=[seed])
    assert calls == {"t5": 1, "siglip": 1, "vae_encode": 1}
    # The cache is keyed by content: the same pixels in a new image object hit it too.
    pipe.encode_style([inputs["styles"][0].copy()])
    assert calls["siglip"] == 1
    pipe.encode_style([inputs["styles"][1]])
    assert calls["siglip"] == 2


def test_seeded_vae_sampling_is_an_option_and_reproducible(pipe32, inputs):
    mean = pipe32.encode_subject([inputs["subject"]], long_side=64).latents[0]
    s1 = pipe32.encode_subject([inputs["subject"]], long_side=64, sample_seed=1).latents[0]
    s1b = pipe32.encode_subject([inputs["subject"]], long_side=64, sample_seed=1).latents[0]
    s2 = pipe32.encode_subject([inputs["subject"]], long_side=64, sample_seed=2).latents[0]
    assert torch.equal(s1, s1b) and not torch.equal(s1, s2) and not torch.equal(mean, s1)


def test_several_subjects_and_keep_size(pipe32, inputs, tiny_models):
    subjects = pipe32.encode_subject([inputs["subject"], tiny_models.make_image(50, 100, 3)], long_side=64)
    assert subjects.sizes == ((64, 48), (32, 64))
    with pytest.raises(InputError, match="extra_references"):
        pipe32.generate(PROMPT, subjects=subjects, width=W, height=H, steps=1, seeds=[0])
    result = pipe32.generate(PROMPT, subjects=subjects, keep_size=True, steps=2, seeds=[0], extra_references=True)
    # keep_size: 2x the first preprocessed subject at long side 512 -> scale 1024/64 here.
    assert (result.width, result.height) == (1024, 768)
    assert result.images.shape == (1, 768, 1024, 3)
