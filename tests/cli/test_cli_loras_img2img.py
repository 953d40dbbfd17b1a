"""The command line, manifests and the Python API take the same user LoRAs and image-to-image
inputs as the nodes: --lora FILE[:STRENGTH] (repeatable), a `loras` column, --init-image and
--denoise; the same LoRAs give the same image everywhere."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nodes import api
from nodes.cli import command as cli
from nodes.files import png_info


def _model_flags(tm):
    p = tm.paths
    return ["--transformer", p["flux_bfl"], "--vae", p["ae"], "--t5", p["t5_fp16"], "--clip-l", p["clip_l"],
            "--siglip", p["siglip_file"], "--uso-lora", p["lora_comfy"], "--projector", p["projector_comfy"],
            "--tokenizers", p["tokenizer_t5"].parent, "--precision", "fp32", "--device", "cpu"]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def uso(tiny_models):
    p = tiny_models.paths
    return api.load(transformer=p["flux_bfl"], vae=p["ae"], t5=p["t5_fp16"], clip_l=p["clip_l"], siglip=p["siglip_file"],
                    uso_lora=p["lora_comfy"], projector=p["projector_comfy"], tokenizers=p["tokenizer_t5"].parent,
                    precision="fp32", device="cpu")


def test_cli_loras_equal_the_python_api_and_the_node_view(tiny_models, tmp_path, capsys, uso):
    kohya, xlabs = tiny_models.paths["user_lora_kohya"], tiny_models.paths["user_lora_xlabs"]
    code = cli.main([str(a) for a in _model_flags(tiny_models) + [
        "--prompt", "a cat", "--width", 32, "--height", 32, "--steps", 2, "--seed", 5,
        "--lora", f"{kohya}:0.7", "--lora", xlabs, "--out", tmp_path, "--output", "cat.png"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning: lora: 'my_flux_lora_kohya.safetensors': its 3 text-encoder tensors were ignored" in out + err
    params = png_info.read_parameters(str(tmp_path / "cat.png"))
    assert params["loras"] == [["my_flux_lora_kohya.safetensors", 0.7], ["my_flux_lora_xlabs.safetensors", 1.0]]
    out = uso.generate("a cat", width=32, height=32, steps=2, seed=5, loras=[(xlabs, 1.0), f"{kohya}:0.7"])
    assert np.array_equal(np.asarray(out.images[0], dtype=np.int16), _pixels(tmp_path / "cat.png"))
    plain = uso.generate("a cat", width=32, height=32, steps=2, seed=5)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(out.images[0]))
    view = uso.pipeline.with_lora(str(kohya), 0.7).with_lora(str(xlabs), 1.0)
    latents = view.generate("a cat", width=32, height=32, steps=2, seeds=[5]).latents
    assert torch.equal(latents, out.latents)


def test_manifest_loras_column_and_problems(tiny_models, tmp_path, capsys):
    kohya = tiny_models.paths["user_lora_kohya"]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "a cat", "loras": [f"{kohya}:0.5"], "output": "a.png"},
        {"prompt": "a dog", "loras": f"{kohya}:0.5", "output": "b.png"},
        {"prompt": "a cow", "loras": ["missing.safetensors"], "output": "c.png"},
        {"prompt": "a fox", "denoise": 0.5, "output": "d.png"},
    ]) + "\n")
    flags = [str(a) for a in _model_flags(tiny_models) + ["--width", 32, "--height", 32, "--steps", 1]]
    code = cli.main(flags + ["--manifest", str(manifest), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "jobs.jsonl line 3: lora 'missing.safetensors' does not exist" in err
    assert "jobs.jsonl line 4: denoise 0.5 needs an init_image" in err
    manifest.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "a cat", "loras": [f"{kohya}:0.5"], "output": "a.png"},
        {"prompt": "a cat", "loras": f"{kohya}:0.5", "output": "b.png"}]) + "\n")
    code = cli.main(flags + ["--manifest", str(manifest), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(_pixels(tmp_path / "out" / "a.png"), _pixels(tmp_path / "out" / "b.png"))


def test_cli_init_image_and_denoise(tiny_models, tmp_path, capsys, uso):
    photo = tmp_path / "photo.png"
    tiny_models.make_image(72, 40, 3).save(photo)
    code = cli.main([str(a) for a in _model_flags(tiny_models) + [
        "--prompt", "", "--init-image", photo, "--denoise", 0.6, "--steps", 5, "--seed", 2,
        "--out", tmp_path, "--output", "restyled.png"]])
    assert code == 0, capsys.readouterr().err
    image = Image.open(tmp_path / "restyled.png")
    assert image.size == (64, 32)  # the photo's size, cropped to multiples of 16
    params = png_info.read_parameters(str(tmp_path / "restyled.png"))
    assert params["denoise"] == 0.6 and params["init_image"].endswith("photo.png")
    same = uso.generate("", init_image=photo, denoise=0.6, steps=5, seed=2)
    assert np.array_equal(np.asarray(same.images[0], dtype=np.int16), _pixels(tmp_path / "restyled.png"))
    code = cli.main([str(a) for a in _model_flags(tiny_models) + ["--prompt", "x", "--denoise", 0.5,
                                                                   "--out", tmp_path]])
    assert code == 2 and "denoise 0.5 needs an init_image" in capsys.readouterr().err
