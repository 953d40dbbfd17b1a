"""Chaining with ComfyUI's native types and the user's LoRAs, through the nodes as ComfyUI calls
them: USO Load LoRA, USO Generate's LATENT + denoise (against the img2img formula), and USO Style
From CLIP Vision fed what ComfyUI's CLIP Vision Encode gives for a SigLIP model."""
from __future__ import annotations

import pytest
import torch

from nodes.comfyui import NODE_CLASS_MAPPINGS, pipeline_cache
from nodes.engine import InputError, USOError, USOPipeline, positions, sampler, schedule, style
from reliability_helpers import CHECKPOINT_LOADER, node
import workflow_runner as wr

LOADER = CHECKPOINT_LOADER


@pytest.fixture(scope="module")
def model(comfy_folders):
    pipeline_cache.clear()
    (pipe,) = node("USOLoadModels")(**LOADER, unique_id="1")
    yield pipe
    pipeline_cache.clear()


def generate(model, **kw):
    args = dict(prompt="a cat", width=64, height=48, keep_size=False, steps=4, guidance=4.0, seed=1,
                batch_size=1, unique_id="4")
    args.update(kw)
    return node("USOGenerate")(model, **args)


# -- USO Load LoRA --------------------------------------------------------------------------------

def test_lora_node_lists_the_loras_folder_and_chains(model, comfy_folders):
    names = wr.input_types(NODE_CLASS_MAPPINGS["USOLoraLoader"])["required"]["lora_name"][0]
    assert "my_flux_lora_kohya.safetensors" in names and "my_flux_lora_diffusers.safetensors" in names
    (one,) = node("USOLoraLoader")(model, "my_flux_lora_kohya.safetensors", 0.7)
    (two,) = node("USOLoraLoader")(one, "my_flux_lora_xlabs.safetensors", 1.0)
    assert isinstance(two, USOPipeline) and len(two.user_loras) == 2 and model.user_loras == ()
    plain = generate(model)[1]["samples"]
    chained = generate(two)[1]["samples"]
    assert (chained - plain).abs().max() > 1e-3
    assert torch.equal(generate(model)[1]["samples"], plain)  # the unchained model is unchanged by its views


def test_lora_node_names_a_missing_or_foreign_file(model, comfy_folders):
    with pytest.raises(USOError, match="lora_name: .*not found"):
        node("USOLoraLoader")(model, "nope.safetensors", 1.0)
    with pytest.raises(USOError, match="lora_name: .*not a file name"):
        node("USOLoraLoader")(model, "../vae/ae.safetensors", 1.0)


def test_lora_node_refuses_the_uso_lora_itself(model, comfy_folders):
    # USO Load Models already applies it; as a user LoRA it would apply USO a second time.
    for name in ("uso-flux1-dit-lora-v1.safetensors", "uso_flux_v1.0/dit_lora.safetensors"):
        with pytest.raises(InputError, match=f"lora_name: '{name}' is the USO LoRA itself, which USO Load Models "
                                             "already applies"):
            node("USOLoraLoader")(model, name, 1.0)
    assert model.user_loras == ()
    (view,) = node("USOLoraLoader")(model, "my_flux_lora_xlabs.safetensors", 1.0)  # same key layout, not USO
    assert len(view.user_loras) == 1


# -- image to image -------------------------------------------------------------------------------

def test_denoise_one_without_a_latent_is_todays_image(model):
    today = generate(model)
    assert torch.equal(generate(model, denoise=1.0)[0], today[0])
    # a latent at denoise 1.0 starts from the noise itself: the same image at the latent's size
    latent = {"samples": torch.randn(1, 16, 6, 8)}
    assert torch.equal(generate(model, latent=latent, denoise=1.0)[1]["samples"], today[1]["samples"])


def test_img2img_starts_from_the_noised_latent_part_way_down_the_same_schedule(model):
    steps, denoise, seed = 4, 0.5, 7
    init = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def capture(_module, _args, kwargs):
        calls.append((kwargs["hidden_states"][:, : 12].clone(), float(kwargs["timestep"][0])))

    handle = model.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        images, latent = generate(model, latent={"samples": init}, denoise=denoise, steps=steps, seed=seed)
    finally:
        handle.remove()
    ts = schedule.timesteps(steps, 64, 48, "reference")
    first = schedule.first_step(steps, denoise)
    assert first == 2 and len(calls) == steps - first
    assert [t for _x, t in calls] == pytest.approx(ts[first:-1])
    vae = model.vae.config
    x0 = (init - vae.shift_factor) * vae.scaling_factor
    noise = sampler.initial_noise(seed, 64, 48, "cpu").float()
    expected = positions.pack((1 - ts[first]) * x0 + ts[first] * noise)
    assert torch.equal(calls[0][0], expected)
    assert images.shape == (1, 48, 64, 3) and latent["samples"].shape == (1, 16, 6, 8)


def test_img2img_sizes_follow_the_latent_and_keep_its_content(model):
    (_img, source) = generate(model, width=96, height=64, steps=3)
    close = generate(model, latent=source, denoise=0.2, steps=10, width=16, height=16, seed=99)[1]["samples"]
    far = generate(model, width=96, height=64, steps=3, seed=99)[1]["samples"]
    assert close.shape == (1, 16, 8, 12)
    # at low denoise the result stays near the input latent; a fresh seed alone lands elsewhere
    assert (close - source["samples"]).abs().mean() < 0.5 * (far - source["samples"]).abs().mean()


def test_latent_batch_sets_the_image_count(model):
    batch = {"samples": torch.randn(2, 16, 6, 8)}
    images, latent = generate(model, latent=batch, denoise=0.5)
    assert images.shape[0] == 2 and latent["samples"].shape[0] == 2


@pytest.mark.parametrize("latent, denoise, message", [
    (None, 0.5, "denoise: 0.5 needs a latent"),
    ({"samples": torch.zeros(1, 4, 8, 8)}, 0.5, "latent: has 4 channels"),
    ({"samples": torch.zeros(1, 16, 8, 8), "noise_mask": torch.ones(1, 64, 64)}, 0.5, "noise mask"),
    ({"samples": torch.zeros(3, 16, 8, 8)}, 0.5, "3 latents for 2 images"),
    ({"samples": torch.full((1, 16, 8, 8), float("nan"))}, 0.5, "NaN"),
    ({"samples": torch.zeros(1, 16, 8, 8)}, 0.0, "leaves no step"),
])
def test_bad_latents_and_denoise_get_messages(model, latent, denoise, message):
    with pytest.raises(InputError, match=message):
        generate(model, latent=latent, denoise=denoise, steps=4,
                 batch_size=2 if latent is not None and latent["samples"].shape[0] == 3 else 1)


# -- CLIP_VISION_OUTPUT ------------------------------------------------------------------------

class ComfyOutput:
    """ComfyUI's clip_vision.Output: item access reads attributes."""

    def __getitem__(self, key):
        return getattr(self, key)


def _clip_vision_output(tm, pixels):
    """What CLIP Vision Encode returns for a SigLIP: every encoder layer's output (no embeddings)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = {k: v for k, v in tm.siglip_config.items() if k in SiglipVisionConfig().to_dict()}
    full = SiglipVisionModel(SiglipVisionConfig(**cfg)).eval()
    state = {k[len("vision_model."):] if not any(n.startswith("vision_model.") for n, _ in full.named_parameters())
             else k: v for k, v in tm.siglip_state.items()}
    full.load_state_dict(state, strict=False)
    with torch.inference_mode():
        hidden = full(pixel_values=pixels, output_hidden_states=True).hidden_states
    out = ComfyOutput()
    out.all_hidden_states = torch.stack(hidden[1:], dim=1)
    out.penultimate_hidden_states = hidden[-2]
    out.last_hidden_state = hidden[-1]
    return out


def test_style_from_clip_vision_equals_uso_encode_style(model, comfy_folders):
    from nodes.comfyui.image_convert import pil_to_tensor

    picture = comfy_folders.make_image(80, 64, 5)
    pixels = style.style_pixels(picture, model.style_size, "center")
    (from_native,) = node("USOStyleFromClipVision")(model, _clip_vision_output(comfy_folders, pixels))
    (ours,) = node("USOEncodeStyle")(model, pil_to_tensor(picture)[None], "center")
    assert from_native.count == 1 and from_native.owner == ours.owner
    assert torch.allclose(from_native.tokens[0], ours.tokens[0], atol=1e-5, rtol=1e-5)
    chained = node("USOStyleFromClipVision")(model, _clip_vision_output(comfy_folders, pixels), ours)[0]
    assert chained.count == 2
    generate(model, style=chained, steps=1)


def test_clip_vision_output_without_siglip_layers_is_refused(model, comfy_folders):
    clip_like = ComfyOutput()
    clip_like.last_hidden_state = torch.zeros(1, 257, 1024)
    with pytest.raises(InputError, match="clip_vision_output: carries no per-layer hidden states"):
        node("USOStyleFromClipVision")(model, clip_like)
    wrong = ComfyOutput()
    wrong.all_hidden_states = torch.zeros(1, 24, 16, 16)  # another SigLIP depth / size
    with pytest.raises(InputError, match="24 layers"):
        node("USOStyleFromClipVision")(model, wrong)
