"""The local nodes called as ComfyUI calls them: schema -> validate_inputs -> execute (V3, on a locked class clone)."""
from __future__ import annotations

import os

import pytest
import torch

from nodes import model_catalog
from nodes.comfyui import NODE_CLASS_MAPPINGS, bridge, load_node, pipeline_cache
from nodes.engine import InputError, USOError
from nodes.model_catalog import FROM_CHECKPOINT
from reliability_helpers import CHECKPOINT_LOADER, node
import workflow_runner as wr

LOADER = CHECKPOINT_LOADER


def image(tiny_models, w, h, seed=0, channels=3):
    from nodes.comfyui.image_convert import pil_to_tensor

    t = pil_to_tensor(tiny_models.make_image(w, h, seed))[None]
    if channels == 1:
        return t.mean(dim=-1, keepdim=True)
    if channels == 4:
        return torch.cat([t, torch.full_like(t[..., :1], 0.5)], dim=-1)
    return t


@pytest.fixture(scope="module")
def model(comfy_folders):
    pipeline_cache.clear()
    (pipe,) = node("USOLoadModels")(**LOADER, unique_id="1")
    return pipe


@pytest.fixture(scope="module")
def encodings(model, comfy_folders):
    (style,) = node("USOEncodeStyle")(model, image(comfy_folders, 64, 40, 1), "reference")
    (subject,) = node("USOEncodeSubject")(model, image(comfy_folders, 80, 64, 2), 64, "mean", 0)
    return style, subject


def run(model, encodings=None, **kw):
    args = dict(prompt="a cat", width=64, height=48, keep_size=False, steps=3, guidance=4.0, seed=1,
                batch_size=1, unique_id="4")
    args.update(kw)
    if encodings:
        args.update(style=encodings[0], subject=encodings[1])
    return node("USOGenerate")(model, **args)


def test_loader_lists_comfyui_model_folders_with_defaults(comfy_folders):
    types = wr.input_types(NODE_CLASS_MAPPINGS["USOLoadModels"])["required"]
    transformers = types["transformer"][0]
    assert "flux1-dev.safetensors" in transformers
    # Plain file names, whichever folder holds them: the frontend matches a workflow's
    # properties.models names against widget values.
    assert "flux1-dev-fp8.safetensors" in transformers and "FLUX.1-dev" in transformers
    assert not [t for t in transformers if t.startswith(("checkpoints/", "diffusers/"))], transformers
    assert "flux1-dev-Q8_0.gguf" in transformers
    assert types["transformer"][1]["default"] == "flux1-dev.safetensors"
    assert types["vae"][0][0] == FROM_CHECKPOINT and "ae.safetensors" in types["vae"][0]
    assert types["t5"][1]["default"] == "t5xxl_fp16.safetensors"
    assert types["siglip"][1]["default"] == "sigclip_vision_patch14_384.safetensors"
    assert "siglip-so400m-patch14-384" in types["siglip"][0]  # HF folder
    assert types["uso_lora"][1]["default"] == "uso-flux1-dit-lora-v1.safetensors"
    assert types["projector"][1]["default"] == "uso-flux1-projector-v1.safetensors"


def test_loader_reuses_the_loaded_model_and_reloads_when_a_file_changes(model, comfy_folders):
    (again,) = node("USOLoadModels")(**LOADER)
    assert again is model
    changed = NODE_CLASS_MAPPINGS["USOLoadModels"].fingerprint_inputs(**LOADER)
    assert "transformer:" in changed and "uso_lora:" in changed


@pytest.mark.parametrize("transformer,parts", [
    ("flux1-dev.safetensors", dict(vae="ae.safetensors", t5="t5xxl_fp16.safetensors", clip_l="clip_l.safetensors")),
    ("diffusers/FLUX.1-dev", dict(vae=FROM_CHECKPOINT, t5=FROM_CHECKPOINT, clip_l=FROM_CHECKPOINT)),
])
def test_loader_takes_separate_files_and_diffusers_folders(comfy_folders, transformer, parts, model):
    (pipe,) = node("USOLoadModels")(**{**LOADER, "transformer": transformer, **parts})
    images, latent = run(pipe)
    assert images.shape == (1, 48, 64, 3)
    pipeline_cache.clear()


def test_from_checkpoint_without_a_checkpoint_says_what_to_pick(comfy_folders):
    with pytest.raises(USOError, match="vae: no file chosen.*pick a vae file"):
        node("USOLoadModels")(**{**LOADER, "transformer": "flux1-dev.safetensors"})


def test_model_names_from_workflows_stay_inside_the_model_folders(comfy_folders):
    for bad in ("../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"):
        with pytest.raises(USOError, match="not a file name inside"):
            node("USOLoadModels")(**{**LOADER, "uso_lora": bad})
    with pytest.raises(USOError, match="was not found in the 'loras' model folder"):
        node("USOLoadModels")(**{**LOADER, "uso_lora": "missing.safetensors"})


def test_generate_gives_comfyui_image_and_latent(model, encodings):
    images, latent = run(model, encodings, batch_size=2)
    assert images.shape == (2, 48, 64, 3) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert latent["samples"].shape == (2, 16, 6, 8)


def test_native_vae_decode_of_the_latent_gives_the_same_picture(model, encodings, comfy_folders):
    # What ComfyUI's VAEDecode does with a FLUX VAE: decode the unscaled latent, (x + 1) / 2, clamp.
    from diffusers import AutoencoderKL

    images, latent = run(model, encodings)
    vae = AutoencoderKL.from_pretrained(str(comfy_folders.paths["diffusers_dir"] / "vae")).eval()
    with torch.no_grad():
        decoded = vae.decode(latent["samples"]).sample
    native = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert (native - images).abs().max() <= 1.5 / 255


@pytest.mark.parametrize("channels,size", [(3, (64, 40)), (4, (33, 57)), (1, (100, 30))])
def test_style_and_subject_accept_rgba_grayscale_and_odd_sizes(model, comfy_folders, channels, size):
    img = image(comfy_folders, *size, seed=5, channels=channels)
    (style,) = node("USOEncodeStyle")(model, img, "center")
    (subject,) = node("USOEncodeSubject")(model, img, 64, "mean", 0)
    assert style.count == 1 and len(subject.latents) == 1
    images, _ = run(model, (style, subject))
    assert images.shape == (1, 48, 64, 3)


def test_a_batch_of_style_images_is_one_style_each_and_chains(model, comfy_folders):
    batch = torch.cat([image(comfy_folders, 64, 40, 1), image(comfy_folders, 64, 40, 2)])
    (two,) = node("USOEncodeStyle")(model, batch, "reference")
    assert two.count == 2
    (three,) = node("USOEncodeStyle")(model, image(comfy_folders, 30, 30, 3), "reference", previous=two)
    assert three.count == 3
    with pytest.raises(InputError, match="style: 3 style images.*extra_references"):
        run(model, style=three)
    images, _ = run(model, style=three, extra_references=True)
    assert images.shape[0] == 1


def test_keep_size_takes_the_size_from_the_subject(model, encodings):
    images, latent = run(model, encodings, keep_size=True, width=1000, height=17)
    # subject encoded at long side 64 from 80x64 -> 64x48 -> output 2x at 1024/64 scale.
    assert images.shape == (1, 768, 1024, 3)


def test_progress_ticks_once_per_step_and_cancel_stops_within_a_step(model, encodings):
    ticks = []
    bridge.Progress.listener = lambda cur, total, nid: ticks.append((cur, total, nid))
    try:
        run(model, encodings, steps=3, batch_size=2)
        assert [t[0] for t in ticks[-6:]] == [1, 2, 3, 4, 5, 6] and ticks[-1][1] == 6 and ticks[-1][2] == "4"

        ticks.clear()

        def cancel_at_two(cur, total, nid):
            ticks.append(cur)
            if cur == 2:
                bridge.request_interrupt()

        bridge.Progress.listener = cancel_at_two
        with pytest.raises(bridge.Cancelled):
            run(model, encodings, steps=5)
        assert max(ticks) == 2  # stopped right after the step during which Cancel came
    finally:
        bridge.Progress.listener = None
    # The model is usable after the cancel and gives the same image as before.
    a, _ = run(model, encodings, seed=9)
    b, _ = run(model, encodings, seed=9)
    assert torch.equal(a, b)


def test_fresh_loader_with_an_all_in_one_checkpoint_takes_all_its_parts_from_it(comfy_folders, monkeypatch):
    # Only the checkpoint as transformer (ComfyUI's USO template's files): vae, t5 and clip_l all
    # default to "(from checkpoint)", not the checkpoint's VAE beside a separate ae.safetensors.
    monkeypatch.setitem(bridge.standalone_model_folders, "diffusion_models", [])
    monkeypatch.setitem(bridge.standalone_model_folders, "diffusers", [])
    required = wr.input_types(NODE_CLASS_MAPPINGS["USOLoadModels"])["required"]
    assert required["transformer"][1]["default"] == "flux1-dev-fp8.safetensors"
    assert [required[slot][1]["default"] for slot in ("vae", "t5", "clip_l")] == [FROM_CHECKPOINT] * 3
    assert "ae.safetensors" in required["vae"][0]  # still offered
    assert required["siglip"][1]["default"] == "sigclip_vision_patch14_384.safetensors"


def test_loader_transformer_accepts_the_older_prefixed_label_and_names_a_missing_file(comfy_folders):
    # Workflows saved before the plain labels hold `checkpoints/flux1-dev-fp8.safetensors`.
    loader = NODE_CLASS_MAPPINGS["USOLoadModels"]
    for value in ("flux1-dev-fp8.safetensors", "checkpoints/flux1-dev-fp8.safetensors"):
        assert wr.validation_errors(loader, {"transformer": value}) == []
        path = load_node.resolve("transformer", value)
        assert path.replace(os.sep, "/").endswith("/checkpoints/flux1-dev-fp8.safetensors"), path
    assert load_node.resolve("transformer", "diffusers/FLUX.1-dev") == load_node.resolve("transformer", "FLUX.1-dev")
    errors = wr.validation_errors(loader, {"transformer": "checkpoints/nothing.safetensors"})
    assert [e["input_name"] for e in errors] == ["transformer"], errors
    assert "transformer: 'checkpoints/nothing.safetensors' is not a file" in errors[0]["details"]


def test_transformer_labels_prefix_only_a_name_held_by_two_folders():
    labels = model_catalog.transformer_labels({"diffusion_models": ["a.safetensors", "b.safetensors"],
                                               "checkpoints": ["a.safetensors", "c.safetensors"],
                                               "diffusers": ["D"]})
    assert labels == {"a.safetensors": ("diffusion_models", "a.safetensors"),
                      "b.safetensors": ("diffusion_models", "b.safetensors"),
                      "checkpoints/a.safetensors": ("checkpoints", "a.safetensors"),
                      "c.safetensors": ("checkpoints", "c.safetensors"), "D": ("diffusers", "D")}
    for label, place in labels.items():
        assert model_catalog.parse_choice("transformer", label, labels) == place
    # The older prefixed form, for a file that is now listed plain:
    assert model_catalog.parse_choice("transformer", "checkpoints/c.safetensors", labels) == ("checkpoints", "c.safetensors")


def test_validation_reports_each_problem_once_under_its_input(comfy_folders):
    # ComfyUI 0.8.0 repeats a validate_inputs verdict under every argument of it: width 1000 came
    # back under width, height, steps and batch_size. Ranges are ComfyUI's per-input checks now.
    gen = NODE_CLASS_MAPPINGS["USOGenerate"]
    assert wr.validation_errors(gen, dict(width=1024, height=768, batch_size=4, steps=25)) == []
    for bad in (dict(width=8192), dict(height=8), dict(batch_size=99), dict(steps=0)):
        errors = wr.validation_errors(gen, {**dict(width=1024, height=1024, batch_size=1, steps=25), **bad})
        assert [e["input_name"] for e in errors] == list(bad), errors
    subject = NODE_CLASS_MAPPINGS["USOEncodeSubject"]
    errors = wr.validation_errors(subject, dict(long_side=500, posterior="mean", sample_seed=0))
    assert [e["input_name"] for e in errors] == ["long_side"]
    assert "long_side: 500 is not a multiple of 16" in errors[0]["details"]
    assert subject.validate_inputs(long_side=None) is True  # linked: ComfyUI passes None, checked at run time


def test_run_time_checks_for_linked_values(model):
    with pytest.raises(InputError, match="width: 1000 is not a multiple of 16"):
        run(model, width=1000)
    with pytest.raises(InputError, match="uso_model: expected the output of USO Load Models"):
        node("USOGenerate")("not a model", "x", 64, 64, False, 2, 4.0, 0, 1)
    with pytest.raises(InputError, match="style: expected the output of USO Encode Style"):
        run(model, style=torch.zeros(3))


def test_encodings_from_another_model_are_refused(model, encodings, comfy_folders):
    import dataclasses

    foreign = dataclasses.replace(encodings[0], owner="some other model")
    with pytest.raises(InputError, match="style: it was encoded by a different USO model"):
        run(model, style=foreign)
    foreign_subject = dataclasses.replace(encodings[1], owner="some other model")
    with pytest.raises(InputError, match="subject: it was encoded by a different USO model"):
        run(model, subject=foreign_subject)


def test_loader_passes_speed_and_memory_options_to_the_engine(comfy_folders):
    (pipe,) = node("USOLoadModels")(**{**LOADER, "encoders": "offload", "step_cache": 0.1})
    assert pipe.options.encoders == "offload" and pipe.options.step_cache == 0.1
    images, _ = run(pipe)
    assert images.shape == (1, 48, 64, 3)
    with pytest.raises(InputError, match="attention: 'fastest' is not one of native"):
        node("USOLoadModels")(**{**LOADER, "attention": "fastest"})
    with pytest.raises(InputError, match="step_cache: 2.0 is outside"):
        node("USOLoadModels")(**{**LOADER, "step_cache": 2.0})
    pipeline_cache.clear()
