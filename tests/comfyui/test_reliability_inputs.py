"""Bad inputs to every node: each gives a USOError naming the input and the fix, nothing crashes,
and the loaded model stays usable (issue 8).

Run with `-s` to see the table of inputs tried and the message each gave.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import (assert_clean, loaded_with_reference, comfy_load_image, encode_style, encode_subject, generate, image,
                                 load, node, single_thread, write_png16)
from remote_helpers import remote_env, run_node  # noqa: F401  (fixture)
from safetensors.torch import load_file, save_file

from nodes.comfyui import NODE_CLASS_MAPPINGS, bridge, pipeline_cache
from nodes.engine import InputError, ModelFileError, USOError
from nodes.remote import KeyProblem


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


def report(what: str, message: str) -> None:
    print(f"\n[bad input] {what} -> {message}")


# ---------------------------------------------------------------------------------------------
# Model files: a models folder with the tiny models linked in, plus wrong and damaged files
# ---------------------------------------------------------------------------------------------

def _write_bad_files(models, src) -> None:
    def copy(from_path, folder, name):
        shutil.copy(from_path, models / folder / name)

    def cut(from_path, folder, name, fraction=0.5):
        data = from_path.read_bytes()
        (models / folder / name).write_bytes(data[: int(len(data) * fraction)])

    def raw_header(folder, name, header: bytes, tail: bytes = b""):
        (models / folder / name).write_bytes(struct.pack("<Q", len(header)) + header + tail)

    # transformer slot
    copy(src.paths["t5_fp16"], "diffusion_models", "t5-as-transformer.safetensors")
    copy(src.paths["clip_l"], "diffusion_models", "clip-as-transformer.safetensors")
    cut(src.paths["flux_bfl"], "diffusion_models", "flux-half.safetensors")
    cut(src.paths["flux_bfl"], "diffusion_models", "flux-header-cut.safetensors", fraction=0.002)
    (models / "diffusion_models" / "empty.safetensors").write_bytes(b"")
    (models / "diffusion_models" / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    (models / "diffusion_models" / "html.safetensors").write_text("<html>404 Not Found</html>")
    raw_header("diffusion_models", "list-header.safetensors", b"[1, 2, 3]")
    raw_header("diffusion_models", "odd-entries.safetensors", b'{"a": 5}')
    raw_header("diffusion_models", "no-tensors.safetensors", b"{}")
    (models / "diffusion_models" / "flux1-dev.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    if "flux_gguf" in src.paths:
        cut(src.paths["flux_gguf"], "diffusion_models", "flux-half.gguf")
    (models / "diffusion_models" / "random.gguf").write_bytes(np.random.default_rng(1).bytes(4096))
    # text encoders, vae, siglip
    cut(src.paths["t5_fp16"], "text_encoders", "t5-half.safetensors")
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModel

    sd_vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                           norm_num_groups=4)
    save_file({k: v.contiguous() for k, v in sd_vae.state_dict().items()}, models / "vae" / "sd-vae.safetensors")
    cut(src.paths["ae"], "vae", "ae-half.safetensors")
    clip_vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=28, patch_size=14))
    state = {k if k.startswith("vision_model.") else "vision_model." + k: v.contiguous()
             for k, v in clip_vision.state_dict().items()}
    save_file(state, models / "clip_vision" / "clip-vision-h.safetensors")
    copy(src.paths["clip_l"], "clip_vision", "clip-text.safetensors")
    cut(src.paths["siglip_file"], "clip_vision", "siglip-half.safetensors")
    # LoRAs
    lora = load_file(str(src.paths["lora_comfy"]))
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)},
              models / "loras" / "kohya-flux-lora.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              models / "loras" / "peft-lora.safetensors")
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "down" in k else torch.zeros(2 * v.shape[0], v.shape[1])
            for k, v in lora.items()}
    save_file(wide, models / "loras" / "lora-for-wider-model.safetensors")
    deeper = dict(lora)
    deeper["diffusion_model.double_blocks.7.processor.proj_lora1.down.weight"] = torch.zeros(4, 64)
    deeper["diffusion_model.double_blocks.7.processor.proj_lora1.up.weight"] = torch.zeros(64, 4)
    save_file(deeper, models / "loras" / "lora-for-deeper-model.safetensors")
    up_key = next(k for k in lora if k.endswith("up.weight"))
    save_file({**lora, up_key: torch.zeros(lora[up_key].shape[0], 8)},
              models / "loras" / "lora-rank-mismatch.safetensors")
    down_key = next(k for k in lora if k.endswith("down.weight"))
    mixed = {**lora, down_key: torch.zeros(8, lora[down_key].shape[1]),
             down_key.replace("down", "up"): torch.zeros(lora[down_key.replace("down", "up")].shape[0], 8)}
    save_file(mixed, models / "loras" / "lora-mixed-ranks.safetensors")
    cut(src.paths["lora_comfy"], "loras", "lora-half.safetensors")
    copy(src.paths["projector_comfy"], "loras", "projector-as-lora.safetensors")
    # projectors
    proj = load_file(str(src.paths["projector_comfy"]))
    save_file({k: v[:32].contiguous() if "projection" in k else v for k, v in proj.items()},
              models / "model_patches" / "projector-hidden-32.safetensors")
    save_file({k: torch.zeros(v.shape[0], 20) if "embedding_linear.0.weight" in k else v for k, v in proj.items()},
              models / "model_patches" / "projector-other-siglip.safetensors")
    cut(src.paths["projector_comfy"], "model_patches", "projector-half.safetensors")
    copy(src.paths["lora_comfy"], "model_patches", "lora-as-projector.safetensors")


@pytest.fixture(scope="module")
def bad_models(comfy_folders, tmp_path_factory):
    """The tiny models' folders (linked) plus the bad files, as ComfyUI's model folders."""
    src = comfy_folders
    models = tmp_path_factory.mktemp("bad_models")
    for folder in sorted(os.listdir(src.models_dir)):
        (models / folder).mkdir()
        for entry in os.listdir(src.models_dir / folder):
            os.symlink(src.models_dir / folder / entry, models / folder / entry)
    _write_bad_files(models, src)
    saved = dict(bridge.standalone_model_folders)
    bridge.standalone_model_folders.update({f: [str(models / f)] for f in os.listdir(models)})
    yield models
    bridge.standalone_model_folders.clear()
    bridge.standalone_model_folders.update(saved)


@pytest.fixture(scope="module")
def good(bad_models):
    """The right files loaded through the node, and a reference image made with them."""
    return loaded_with_reference(seed=7)


# (slot, file given to it, words the message must contain besides the slot and the file name)
BAD_FILES = [
    ("transformer", "t5-as-transformer.safetensors", ["looks like a T5 text encoder", "FLUX.1-dev transformer"]),
    ("transformer", "clip-as-transformer.safetensors", ["looks like a CLIP text encoder", "FLUX.1-dev transformer"]),
    ("transformer", "ae.safetensors", []),  # not in diffusion_models: a missing file
    ("transformer", "flux-half.safetensors", ["truncated", "Download it again"]),
    ("transformer", "flux-header-cut.safetensors", ["cut off before the header ended", "Download it again"]),
    ("transformer", "empty.safetensors", ["empty or truncated (0 bytes)", "Download it again"]),
    ("transformer", "random.safetensors", ["not a safetensors file"]),
    ("transformer", "html.safetensors", ["not a safetensors file"]),
    ("transformer", "list-header.safetensors", ["not a safetensors file", "does not list tensors"]),
    ("transformer", "odd-entries.safetensors", ["not a safetensors file", "does not list tensors"]),
    ("transformer", "no-tensors.safetensors", ["unrecognised file (first keys: no tensors)"]),
    ("transformer", "flux1-dev.ckpt", ["pickle checkpoints (.ckpt) can run code", ".safetensors"]),
    ("transformer", "flux-half.gguf", ["cannot be read as GGUF", "truncated"]),
    ("transformer", "random.gguf", ["cannot be read as GGUF"]),
    ("t5", "clip_l.safetensors", ["looks like a CLIP text encoder", "T5-XXL text encoder"]),
    ("t5", "t5-half.safetensors", ["truncated"]),
    ("clip_l", "t5xxl_fp16.safetensors", ["looks like a T5 text encoder", "CLIP-L text encoder"]),
    ("vae", "sd-vae.safetensors", ["4 latent channels", "FLUX autoencoder"]),
    ("vae", "ae-half.safetensors", ["truncated"]),
    ("siglip", "clip-text.safetensors", ["looks like a CLIP text encoder", "SigLIP so400m"]),
    ("siglip", "clip-vision-h.safetensors", ["a CLIP vision encoder (not SigLIP)", "SigLIP so400m"]),
    ("siglip", "siglip-half.safetensors", ["truncated"]),
    ("uso_lora", "kohya-flux-lora.safetensors", ["a LoRA of another kind", "USO DiT LoRA"]),
    ("uso_lora", "peft-lora.safetensors", ["a LoRA of another kind", "USO DiT LoRA"]),
    ("uso_lora", "projector-as-lora.safetensors", ["USO style projector", "USO DiT LoRA"]),
    ("uso_lora", "lora-half.safetensors", ["truncated"]),
    ("uso_lora", "lora-rank-mismatch.safetensors", ["do not fit together (different ranks)"]),
    ("uso_lora", "lora-mixed-ranks.safetensors", ["mixes ranks [4, 8]"]),
    ("uso_lora", "lora-for-wider-model.safetensors", ["does not fit this transformer", "different model",
                                                      "USO DiT LoRA"]),
    ("uso_lora", "lora-for-deeper-model.safetensors", ["this transformer lacks", "different model"]),
    ("projector", "lora-as-projector.safetensors", ["USO DiT LoRA", "USO style projector"]),
    ("projector", "projector-half.safetensors", ["truncated"]),
    ("projector", "projector-hidden-32.safetensors", ["32-wide tokens", "64 wide", "another model",
                                                      "'flux1-dev.safetensors'"]),
    ("projector", "projector-other-siglip.safetensors", ["20 tokens x 16", "16 x 16",
                                                         "'sigclip_vision_patch14_384.safetensors'"]),
    ("uso_lora", "../../etc/passwd", ["not a file name inside"]),
    ("uso_lora", "/etc/passwd", ["not a file name inside"]),
]


@pytest.mark.parametrize("slot,name,words", BAD_FILES, ids=[f"{s}<-{n}" for s, n, _ in BAD_FILES])
def test_a_wrong_or_damaged_model_file_names_the_slot_the_file_and_the_fix(good, slot, name, words):
    model, style, subject, reference = good
    if name.endswith(".gguf"):
        pytest.importorskip("gguf")
    cached = pipeline_cache._current
    started = time.perf_counter()
    with pytest.raises(USOError) as err:
        load(**{slot: name})
    message = str(err.value)
    report(f"{slot} <- {name}", message)
    assert message.startswith(f"{slot}:"), message
    assert os.path.basename(name) in message
    for word in words:
        assert word in message, (word, message)
    assert "Traceback" not in message
    if not any(w in message for w in ("different model", "another model", "do not fit", "mixes ranks",
                                      "16 x 16")):
        # Found from the headers alone: fast, and the loaded model was not given up for it.
        assert time.perf_counter() - started < 5
        assert pipeline_cache._current is cached
    # ComfyUI keeps running and the model loaded before is still usable, unchanged.
    assert_clean(model)
    assert torch.equal(generate(model, style=style, subject=subject, seed=7)[0], reference)


def test_after_a_failed_load_the_right_files_load_and_give_the_same_image(good):
    model, style, subject, reference = good
    with pytest.raises(ModelFileError):
        load(uso_lora="lora-for-wider-model.safetensors")  # fails after loading the transformer
    assert pipeline_cache._current is None                  # no half-loaded entry
    again = load()
    assert again is not model
    assert torch.equal(generate(again, style=style, subject=subject, seed=7)[0], reference)
    assert load() is again                                   # cached again


def test_a_header_level_failure_keeps_the_loaded_model_cached(good):
    current = load()
    with pytest.raises(ModelFileError, match="transformer: 't5-as-transformer.safetensors' looks like"):
        load(transformer="t5-as-transformer.safetensors")
    assert load() is current  # no reload


def test_bad_option_values_from_an_api_workflow(good):
    with pytest.raises(InputError, match="precision: 'fp64' is not one of"):
        load(precision="fp64")
    with pytest.raises(InputError, match="memory: 'cpu_only' is not one of"):
        load(memory="cpu_only")
    with pytest.raises(InputError, match="lora_mode: 'half' is not one of"):
        load(lora_mode="half")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

BAD_IMAGES = [
    ("2 channels", lambda: torch.rand(1, 20, 30, 2), "expected an IMAGE of shape [batch, height, width, 1|3|4]"),
    ("channels first [1,3,H,W]", lambda: torch.rand(1, 3, 20, 30), "got [1, 3, 20, 30]"),
    ("rank 2 [H,W]", lambda: torch.rand(20, 30), "got [20, 30]"),
    ("rank 5", lambda: torch.rand(1, 1, 20, 30, 3), "got [1, 1, 20, 30, 3]"),
    ("empty batch", lambda: torch.rand(0, 8, 8, 3), "got [0, 8, 8, 3]"),
    ("zero width", lambda: torch.rand(1, 8, 0, 3), "the image is empty"),
    ("NaN pixels", lambda: torch.full((1, 8, 8, 3), float("nan")), "NaN or infinite"),
    ("one inf pixel", lambda: torch.rand(1, 8, 8, 3).index_put_((torch.tensor([0]), torch.tensor([7]),
                                                                  torch.tensor([7])), torch.tensor(float("inf"))),
     "NaN or infinite"),
    ("a list", lambda: [torch.rand(8, 8, 3)], "expected an IMAGE tensor, got list"),
    ("None", lambda: None, "expected an IMAGE tensor, got NoneType"),
    ("complex", lambda: torch.rand(1, 8, 8, 3, dtype=torch.complex64), "expected float pixel values"),
]


@pytest.mark.parametrize("what,make,words", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
@pytest.mark.parametrize("node_id", ["USOEncodeStyle", "USOEncodeSubject"])
def test_an_unusable_image_names_the_input(good, node_id, what, make, words):
    model = good[0]
    with pytest.raises(InputError) as err:
        if node_id == "USOEncodeStyle":
            encode_style(model, make())
        else:
            encode_subject(model, make())
    assert str(err.value).startswith("image: ") and words in str(err.value)
    report(f"{node_id} image = {what}", str(err.value))
    assert_clean(model)


ODD_IMAGES = [
    ("RGBA", lambda: image(33, 57, 3, channels=4)),
    ("grayscale [B,H,W,1]", lambda: image(40, 30, 4, channels=1)),
    ("[H,W,3] without batch", lambda: image(40, 30, 5)[0]),
    ("1x1", lambda: image(1, 1, 6)),
    ("1x200 sliver (style)", lambda: torch.rand(1, 200, 1, 3)),
    ("float16", lambda: image(40, 30, 7).half()),
    ("values 0..255 (clamped)", lambda: image(40, 30, 8) * 255),
    ("negative values (clamped)", lambda: image(40, 30, 9) - 0.5),
]


@pytest.mark.parametrize("what,make", ODD_IMAGES, ids=[o[0] for o in ODD_IMAGES])
def test_odd_but_valid_style_images_encode_and_generate(good, what, make):
    model = good[0]
    style = encode_style(model, make())
    images, _ = generate(model, style=style, steps=1)
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


@pytest.mark.parametrize("what,make", [o for o in ODD_IMAGES if "sliver" not in o[0]],
                         ids=[o[0] for o in ODD_IMAGES if "sliver" not in o[0]])
def test_odd_but_valid_subject_images_encode_and_generate(good, what, make):
    model = good[0]
    subject = encode_subject(model, make())
    images, _ = generate(model, subject=subject, steps=1)
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_a_1x1_subject_is_upscaled_to_the_long_side(good):
    model = good[0]
    subject = encode_subject(model, image(1, 1, 3), long_side=64)
    assert subject.sizes == ((64, 64),)
    assert model.output_size(32, 32, True, subject) == (1024, 1024)  # keep_size: 2x at the 1024 scale
    images, _ = generate(model, subject=subject, steps=1)
    assert images.shape == (1, 32, 32, 3)


def test_a_subject_too_narrow_for_16px_patches_says_so(good):
    with pytest.raises(InputError) as err:
        encode_subject(good[0], torch.rand(1, 500, 3, 3), long_side=512)
    report("USOEncodeSubject image = 3x500 sliver, long_side 512", str(err.value))
    assert "subject: subject image 3x500 is too narrow" in str(err.value)
    assert "Crop it closer" in str(err.value)


@pytest.mark.parametrize("kind", ["rgb", "gray"])
def test_16_bit_pngs_loaded_like_comfyui_load_image(good, tmp_path, kind):
    rng = np.random.default_rng(3)
    shape = (48, 40, 3) if kind == "rgb" else (48, 40)
    pixels = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    img = comfy_load_image(write_png16(tmp_path / f"{kind}16.png", pixels))
    assert img.dtype == torch.float32 and img.shape == (1, 48, 40, 3)
    style = encode_style(good[0], img)
    subject = encode_subject(good[0], img)
    images, _ = generate(good[0], style=style, subject=subject, steps=1)
    assert torch.isfinite(images).all()


def test_16_bit_float_values_are_not_rejected(good):
    """What a 16-bit source gives after float conversion: values between the 8-bit steps."""
    img = torch.randint(0, 65536, (1, 30, 40, 3)) / 65535.0
    assert encode_style(good[0], img).count == 1
    assert len(encode_subject(good[0], img).latents) == 1


def test_an_8000x8000_image_is_reduced_without_full_size_float_copies(good):
    """8000x8000 as a float IMAGE is 768 MB; the input here is an expanded view (no memory of its
    own), so the time measured is the conversion and downsizing, which work in row blocks."""
    model = good[0]
    row = torch.rand(1, 1, 8000, 3)
    big = row.expand(1, 8000, 8000, 3)
    started = time.perf_counter()
    style = encode_style(model, big)
    subject = encode_subject(model, big, long_side=512)
    elapsed = time.perf_counter() - started
    print(f"\n[8000x8000] style + subject encode: {elapsed:.1f} s")
    assert style.count == 1 and subject.sizes == ((512, 512),)
    assert elapsed < 60


def test_the_image_conversion_memory_stays_small_for_a_huge_image():
    """The conversion to 8-bit works in blocks: its temporary float memory is bounded (a few MB),
    not several copies of the frame."""
    import subprocess
    import sys
    import textwrap

    import comfy_api_source

    code = textwrap.dedent(f"""
        import sys, threading, time, torch
        sys.path[:0] = [".", r"{comfy_api_source.source_dir()}"]  # the pack; ComfyUI's comfy_api
        from nodes.comfyui.image_convert import image_batch_to_pils

        def rss():
            with open("/proc/self/status") as f:
                return int(f.read().split("VmRSS:")[1].split()[0]) // 1024

        big = torch.rand(1, 1, 6000, 3).expand(1, 6000, 6000, 3)
        image_batch_to_pils(torch.rand(1, 64, 64, 3))  # warm up
        base, peak, done = rss(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        (pil,) = image_batch_to_pils(big)
        done.set()
        sampler.join()
        print(max(peak[0], rss()) - base)
    """)
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth_mb = int(out.stdout.strip().splitlines()[-1])
    print(f"\n[6000x6000 conversion] peak RSS growth {growth_mb} MB (the 8-bit result alone is 103 MB; "
          "plus its PIL copy; one float copy of the frame would be 412 MB)")
    assert growth_mb < 350  # one float copy of the frame alone would be 412 MB


# ---------------------------------------------------------------------------------------------
# Prompts, sizes, batch, encodings
# ---------------------------------------------------------------------------------------------

def test_an_empty_prompt_restyles_the_subject_layout(good):
    model, style, subject, _ = good
    images, latent = generate(model, prompt="", style=style, subject=subject, keep_size=True, steps=1)
    assert images.shape == (1, 768, 1024, 3)  # subject 48x40 -> 64x48 at long side 64 -> 2x at the 1024 scale
    assert torch.isfinite(images).all()


def test_a_10000_character_prompt_is_truncated_like_t5_and_is_not_slow(good):
    model = good[0]
    long_prompt = "a cat " * 1667          # 10,002 characters, 3,334 words
    assert len(long_prompt) >= 10000
    started = time.perf_counter()
    images, _ = generate(model, prompt=long_prompt, seed=3)
    elapsed = time.perf_counter() - started
    print(f"\n[10,000-character prompt] {elapsed:.2f} s")
    same, _ = generate(model, prompt="a cat " * 300, seed=3)  # 600 words: past both limits already
    assert torch.equal(images, same)
    assert elapsed < 20


@pytest.mark.parametrize("prompt", ["un chat 🐱 日本語 Ünïcödé", "line\nbreak\ttab", "\x00nul",
                                    "lone \ud800 surrogate", "\u202eright-to-left"])
def test_unusual_characters_in_the_prompt(good, prompt):
    images, _ = generate(good[0], prompt=prompt, steps=1)
    assert torch.isfinite(images).all()


BAD_GENERATE = [
    ("prompt None", dict(prompt=None), "prompt: expected text, got NoneType."),
    ("prompt 20,001 characters", dict(prompt="x" * 20001), "prompt: 20001 characters is more than 20000"),
    ("width 33", dict(width=33), "width: 33 is not a multiple of 16"),
    ("height 8", dict(height=8), "height: 8 is outside 16..4096"),
    ("width 8192", dict(width=8192), "width: 8192 is outside 16..4096"),
    ("width -16", dict(width=-16), "width: -16 is outside 16..4096"),
    ("width 32.5", dict(width=32.5), "width: expected a whole number, got 32.5"),
    ("batch_size 17", dict(batch_size=17), "batch_size: 17 is outside 1..16"),
    ("batch_size 0", dict(batch_size=0), "batch_size: 0 is outside 1..16"),
    ("batch_size 10**12", dict(batch_size=10 ** 12), "batch_size: 1000000000000 is outside 1..16"),
    ("steps 0", dict(steps=0), "steps: 0 is outside 1..200"),
    ("steps 201", dict(steps=201), "steps: 201 is outside 1..200"),
    ("guidance NaN", dict(guidance=float("nan")), "guidance: nan is not a number"),
    ("shift 'comfy'", dict(shift="comfy"), "shift: 'comfy' is not one of reference, flux"),
    ("keep_size without subject", dict(keep_size=True), "keep_size: needs a subject"),
    ("style = a tensor", dict(style=torch.zeros(3)), "style: expected the output of USO Encode Style"),
    ("subject = a string", dict(subject="x"), "subject: expected the output of USO Encode Subject"),
    ("uso_model = None", dict(uso_model=None), "uso_model: expected the output of USO Load Models"),
]


@pytest.mark.parametrize("what,kw,words", BAD_GENERATE, ids=[b[0] for b in BAD_GENERATE])
def test_bad_generate_inputs_are_refused_before_any_work(good, what, kw, words):
    model = good[0]
    kw = dict(kw)
    target = kw.pop("uso_model", model)
    started = time.perf_counter()
    with pytest.raises(InputError) as err:
        generate(target, **kw)
    assert words in str(err.value), str(err.value)
    assert time.perf_counter() - started < 2
    report(f"USOGenerate {what}", str(err.value))
    assert_clean(model)


def test_validate_inputs_catches_widget_values_before_the_run(good):
    import workflow_runner as wr

    gen = NODE_CLASS_MAPPINGS["USOGenerate"]
    base = dict(width=1024, height=1024, batch_size=1, steps=25)
    for kw in [dict(height=4), dict(width=4112), dict(batch_size=17), dict(steps=0)]:
        errors = wr.validation_errors(gen, {**base, **kw})
        assert [e["input_name"] for e in errors] == list(kw), errors
        report(f"USOGenerate validation {kw}", errors[0]["details"])
    errors = wr.validation_errors(NODE_CLASS_MAPPINGS["USOEncodeSubject"], dict(long_side=500))
    report("USOEncodeSubject validation long_side=500", errors[0]["details"])
    assert [e["input_name"] for e in errors] == ["long_side"] and "long_side: 500" in errors[0]["details"]


def test_encodings_from_a_different_loaded_model_are_refused(good, bad_models):
    model, style, subject, reference = good
    other = load(transformer="checkpoints/flux1-dev-fp8.safetensors", vae="(from checkpoint)",
                 t5="(from checkpoint)", clip_l="(from checkpoint)",
                 projector="uso_flux_v1.0/projector.safetensors")
    assert other is not model
    for kw, words in ((dict(style=style), "style: it was encoded by a different USO model"),
                      (dict(subject=subject), "subject: it was encoded by a different USO model")):
        with pytest.raises(InputError) as err:
            generate(other, **kw)
        assert words in str(err.value) and "same USO Load Models output" in str(err.value)
        report(f"USOGenerate {next(iter(kw))} encoded by another loaded model", str(err.value))
    other_style = encode_style(other, image(40, 30, 1))
    with pytest.raises(InputError) as err:
        encode_style(model, image(20, 20, 2), previous=other_style)
    report("USOEncodeStyle previous = a style of another loaded model", str(err.value))
    assert "style: the chained styles were encoded by different USO models" in str(err.value)
    other_subject = encode_subject(other, image(40, 30, 1))
    with pytest.raises(InputError, match="subject: the chained subjects were encoded by different"):
        encode_subject(model, image(20, 20, 2), previous=other_subject)
    # Both models still work, each with its own encodings.
    assert generate(other, style=other_style, subject=other_subject, steps=1)[0].shape == (1, 32, 32, 3)
    assert torch.equal(generate(model, style=style, subject=subject, seed=7)[0], reference)
    assert_clean(model)


def test_style_tokens_of_another_width_are_refused(good):
    model, style, _, _ = good
    wide = dataclasses.replace(style, tokens=(torch.zeros(1, 24, 32),))
    with pytest.raises(InputError, match="style: its tokens do not fit this transformer"):
        generate(model, style=wide)


def test_bad_long_side_and_posterior_at_run_time(good):
    model = good[0]
    with pytest.raises(InputError, match="long_side: 500 is not a multiple of 16"):
        encode_subject(model, image(40, 30), long_side=500)
    with pytest.raises(InputError, match="posterior: 'random' is not one of mean, sample"):
        node("USOEncodeSubject")(model, image(40, 30), 64, "random", 0)
    with pytest.raises(InputError, match="crop: 'square' is not one of reference, center"):
        encode_style(model, image(40, 30), crop="square")


# ---------------------------------------------------------------------------------------------
# Remote keys (cross-check; the remote tests cover the details)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider,env,value,words", [
    ("fal", None, None, "fal: no API key found. Set the environment variable FAL_KEY"),
    ("fal", "FAL_KEY", "justonepartwithoutcolon", "fal: the API key from the environment variable FAL_KEY "
                                                  "is malformed"),
    ("aiml", None, None, "AIML: no API key found. Set the environment variable AIML_API_KEY"),
    ("aiml", "AIML_API_KEY", "Bearer abc def", "AIML: the API key from the environment variable AIML_API_KEY "
                                               "is malformed"),
])

def test_remote_key_missing_or_malformed(remote_env, monkeypatch, provider, env, value, words):  # noqa: F811
    if env:
        monkeypatch.setenv(env, value)
    with pytest.raises(KeyProblem) as err:
        run_node(provider=provider)
    message = str(err.value)
    report(f"USORemoteGenerate {provider} key {'missing' if not env else repr(value)}", message)
    assert message.startswith(words)
    if value:
        assert value not in message
