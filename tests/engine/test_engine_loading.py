"""Every weight layout loads to the same weights; real files derive the official configs;
a wrong file for a slot fails with a message naming the file and what was expected."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import tiny_models
from nodes.engine import ModelFileError, TokenizerNotFoundError, architecture, loaders, lora, scaled_fp8
from nodes.engine.gguf_files import is_quantized
from nodes.engine.loaders import Component
from nodes.engine.weight_files import open_weights
from nodes.engine.weight_source import StateDictSource


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(tensor) if is_quantized(tensor) else tensor


def _weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        out[key.replace(".base.", ".")] = dequantize(value).float()
    return out


def _max_rel_error(model, truth) -> float:
    loaded = _weights(model)
    worst = 0.0
    for key, expected in truth.items():
        got = loaded[key]
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item())
    return worst


# fp8 e4m3 has 3 mantissa bits: relative rounding error up to 2^-4 of the value.
FP8_REL = 2.0 ** -4 + 1e-3


@pytest.mark.parametrize("key,tolerance", [
    ("flux_bfl", 0.0),
    ("diffusers_dir", 0.0),
    ("checkpoint_aio", FP8_REL),
    ("flux_fp8", FP8_REL),
    ("flux_fp8_scaled", FP8_REL),
    ("flux_fp8_comfyquant", FP8_REL),
    ("flux_gguf", 2e-2),
])
def test_every_transformer_layout_loads_the_same_weights(tiny_models, key, tolerance):
    if key not in tiny_models.paths:
        pytest.skip(tiny_models.skipped.get(key, "not written"))
    model, cfg = loaders.load_transformer(str(tiny_models.paths[key]), torch.float32)
    expected = {k: v for k, v in tiny_models.flux_config.items() if v is not None}
    assert cfg == {**expected, "axes_dims_rope": tuple(expected["axes_dims_rope"])}
    assert _max_rel_error(model, tiny_models.transformer_state) <= tolerance


def test_scaled_fp8_is_dequantized_not_loaded_naively(tiny_models):
    from safetensors.torch import load_file

    naive = load_file(str(tiny_models.paths["flux_fp8_scaled"]))
    w_naive = naive["double_blocks.0.img_attn.proj.weight"].float()
    truth = tiny_models.transformer_state["transformer_blocks.0.attn.to_out.0.weight"]
    assert (w_naive - truth).abs().max() > 10 * truth.abs().max() * FP8_REL  # naive = garbage
    model, _ = loaders.load_transformer(str(tiny_models.paths["flux_fp8_scaled"]), torch.float32)
    got = model.state_dict()["transformer_blocks.0.attn.to_out.0.weight"]
    assert (got - truth).abs().max() <= truth.abs().max() * FP8_REL


def test_gguf_quant_types_diffusers_cannot_run_are_refused_at_load(tiny_models, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from safetensors.torch import load_file

    bfl = load_file(str(tiny_models.paths["flux_bfl"]))
    path = tmp_path / "flux1-dev-Q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_string("comfyui_uso.config", json.dumps(tiny_models.flux_config))
    for key in sorted(bfl):
        a = bfl[key].float().numpy()
        if key == "double_blocks.0.img_attn.proj.weight":
            # Q8_1 blocks (32 values in 40 bytes): a real GGML type that diffusers has no kernel for.
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            raw = np.zeros((a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(key, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        elif a.ndim == 2 and a.shape[-1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, a.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError) as err:
        loaders.load_transformer(str(path), torch.bfloat16)
    message = str(err.value)
    assert "flux1-dev-Q8_1.gguf" in message and "Q8_1 (e.g. double_blocks.0.img_attn.proj.weight)" in message
    assert "Supported:" in message and "Q8_0" in message and "Q4_K" in message


@pytest.mark.parametrize("key", ["flux_fp8_scaled", "flux_fp8_comfyquant"])
def test_scaled_fp8_with_fp8_storage_keeps_the_file_weights_and_their_scale(tiny_models, key):
    from safetensors.torch import load_file

    path = str(tiny_models.paths[key])
    stored = load_file(path)
    exact, _ = loaders.load_transformer(path, torch.float32)          # fp8 x scale, no rounding
    model, _ = loaders.load_transformer(path, torch.bfloat16, fp8_storage=True)
    layer = model.get_submodule("transformer_blocks.0.attn.to_out.0")
    # The fp8 bytes of the file, not a second rounding of the dequantized weight.
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), stored["double_blocks.0.img_attn.proj.weight"].view(torch.uint8))
    # Split tensors (BFL qkv -> to_q/k/v) keep their scale too.
    assert torch.equal(model.get_submodule("transformer_blocks.0.attn.to_k").weight_scale,
                       stored[next(k for k in stored if k.startswith("double_blocks.0.img_attn.qkv.") and "scale" in k)]
                       .float().reshape(()))
    # Run through the casting hook: the weight used is the file's fp8 x scale, in bf16.
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    exact_layer = exact.get_submodule("transformer_blocks.0.attn.to_out.0")
    expected = torch.nn.functional.linear(x, exact_layer.weight.to(torch.bfloat16), exact_layer.bias.to(torch.bfloat16))
    assert torch.equal(layer(x), expected)
    assert layer.weight.dtype == torch.float8_e4m3fn                  # put back after the call
    # Every fp8 Linear, as it runs, is the exactly dequantized file to bf16 rounding (2^-8).
    exact_weights = exact.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn:
            scale = getattr(m, "weight_scale", torch.tensor(1.0))
            used = (m.weight.float() * scale).to(torch.bfloat16).float()
            truth = exact_weights[name + ".weight"]
            assert ((used - truth).abs() <= truth.abs() * 2.0 ** -8).all(), name


def test_fp8_storage_keeps_fp8_files_as_they_are(tiny_models):
    model, _ = loaders.load_transformer(str(tiny_models.paths["flux_fp8"]), torch.bfloat16, fp8_storage=True)
    sd = model.state_dict()
    assert sd["transformer_blocks.0.attn.to_q.weight"].dtype == torch.float8_e4m3fn
    assert sd["transformer_blocks.0.norm1.linear.weight"].dtype == torch.float8_e4m3fn  # modulation too
    assert sd["transformer_blocks.0.attn.norm_q.weight"].dtype == torch.bfloat16
    assert sd["x_embedder.weight"].dtype == torch.bfloat16
    expected = tiny_models.transformer_state["transformer_blocks.0.attn.to_q.weight"].to(torch.float8_e4m3fn)
    assert torch.equal(sd["transformer_blocks.0.attn.to_q.weight"].view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("component", [Component("ae"), Component("checkpoint_aio", "vae."),
                                       Component("diffusers_dir/vae")])
def test_vae_layouts_load_the_same_weights(tiny_models, component):
    path = _resolve(tiny_models, component.path)
    vae = loaders.load_vae(Component(path, component.prefix))
    assert _max_rel_error(vae, tiny_models.vae_state) == 0.0


@pytest.mark.parametrize("key,prefix,tolerance", [
    ("t5_fp16", "", 0.0), ("t5_fp8", "", FP8_REL), ("t5_fp8_scaled", "", FP8_REL),
    ("checkpoint_aio", "text_encoders.t5xxl.transformer.", FP8_REL),
    ("diffusers_dir/text_encoder_2", "", 0.0)])
def test_t5_layouts_load_the_same_weights(tiny_models, key, prefix, tolerance):
    t5 = loaders.load_t5(Component(_resolve(tiny_models, key), prefix), torch.float32)
    truth = {k: v for k, v in tiny_models.t5_state.items()}
    loaded = t5.state_dict()
    for k, v in truth.items():
        assert (loaded[k].float() - v).abs().max() <= tolerance * v.abs().max() + 1e-8, k
    assert torch.equal(loaded["encoder.embed_tokens.weight"], loaded["shared.weight"])


@pytest.mark.parametrize("key,prefix", [("clip_l", ""), ("checkpoint_aio", "text_encoders.clip_l.transformer."),
                                        ("diffusers_dir/text_encoder", "")])
def test_clip_layouts_load_the_same_weights(tiny_models, key, prefix):
    clip = loaders.load_clip(Component(_resolve(tiny_models, key), prefix), torch.float32)
    loaded = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip.state_dict().items()}
    for k, v in tiny_models.clip_state.items():
        assert torch.equal(loaded[k].float(), v), k


@pytest.mark.parametrize("key", ["siglip_file", "siglip_dir"])
def test_siglip_layouts_load_only_the_layers_uso_reads(tiny_models, key):
    model, full_layers = loaders.load_siglip(Component(str(tiny_models.paths[key])))
    assert full_layers == 27
    loaded = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in model.state_dict().items()}
    assert not any(".layers.26." in k for k in loaded)   # the last layer is never read
    for k, v in tiny_models.siglip_state.items():
        if ".layers.26." in k or "head." in k or "post_layernorm" in k:
            continue
        assert torch.equal(loaded[k].float(), v), k


@pytest.mark.parametrize("key", ["projector_comfy", "projector_original"])
def test_projector_names_load_the_same_weights(tiny_models, key):
    model = loaders.load_projector(str(tiny_models.paths[key]), torch.float32)
    for k, v in tiny_models.projector_state.items():
        assert torch.equal(model.state_dict()[k.removeprefix("feature_embedder.")].float(), v), k


@pytest.mark.parametrize("key", ["lora_comfy", "lora_original"])
def test_lora_names_load_the_same_parts_and_rank_is_read_from_the_file(tiny_models, key):
    parts, rank = lora.load_uso_lora(str(tiny_models.paths[key]))
    assert rank == tiny_models.lora_config["rank"] == 4
    n_double, n_single = tiny_models.flux_config["num_layers"], tiny_models.flux_config["num_single_layers"]
    # per double block: 3 + 1 + 3 + 1 modules; per single block: 3 + 1.
    assert len(parts) == 8 * n_double + 4 * n_single
    modules = {p.module for p in parts}
    assert "single_transformer_blocks.0.proj_mlp" not in modules  # qkv_lora never touches the MLP rows
    q = next(p for p in parts if p.module == "transformer_blocks.1.attn.add_k_proj")
    up = tiny_models.lora_state["double_blocks.1.processor.qkv_lora2.up.weight"].float()
    assert torch.equal(q.up.float(), up[64:128])


# --------------------------------------------------------------------------------------------
# Real files: configs derived from shapes (full-size state dicts on the meta device)
# --------------------------------------------------------------------------------------------

def test_full_size_flux_derives_the_official_config():
    source = StateDictSource("flux1-dev.safetensors", tiny_models.full_size_bfl_state_on_meta())
    cfg = architecture.flux_config(source, "bfl", None)
    official = architecture.official("flux1-dev-transformer")
    assert cfg == {**official, "axes_dims_rope": tuple(official["axes_dims_rope"])}


def test_full_size_encoders_derive_the_official_configs():
    ae = architecture.vae_config(StateDictSource("ae.safetensors", tiny_models.full_size_state_on_meta("ae")),
                                 "bfl", None)
    assert ae == architecture.official("flux-vae")
    t5 = architecture.t5_config(StateDictSource("t5xxl_fp16.safetensors",
                                                tiny_models.full_size_state_on_meta("t5")), None)
    assert t5 == architecture.official("t5-v1_1-xxl-encoder")
    clip = architecture.clip_config(StateDictSource("clip_l.safetensors",
                                                    tiny_models.full_size_state_on_meta("clip_l")), None)
    assert clip == architecture.official("clip-l-text")
    siglip = architecture.siglip_config(StateDictSource("sigclip_vision_patch14_384.safetensors",
                                                        tiny_models.full_size_state_on_meta("siglip")), None)
    assert siglip == architecture.official("siglip-so400m-patch14-384-vision")
    assert siglip["image_size"] == 384  # not 27 * 14 = 378
    proj = StateDictSource("projector", tiny_models.full_size_state_on_meta("projector"))
    assert architecture.projector_config(proj.with_prefix("feature_embedder.")) == architecture.official("uso-projector")


def _sparse_safetensors(path, shapes: dict, dtype: str = "BF16", itemsize: int = 2) -> None:
    """A real safetensors file (header, offsets, size) whose data is a hole: no disk blocks are
    used and every value reads as 0. The 478 MB full-size LoRA costs nothing to write."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in sorted(shapes.items()):
        size = itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def test_full_size_uso_lora_loads_with_the_real_loader_and_fits_the_full_transformer(tmp_path):
    from diffusers import FluxTransformer2DModel

    full = tiny_models.FULL_FLUX
    hidden = full["num_attention_heads"] * full["attention_head_dim"]
    shapes = {f"diffusion_model.{k}": s for k, s in tiny_models._lora_shapes(
        full["num_layers"], full["num_single_layers"], hidden, 4 * hidden, 128).items()}
    path = tmp_path / "uso-flux1-dit-lora-v1.safetensors"
    _sparse_safetensors(path, shapes)
    assert os.path.getsize(path) > 470e6            # the real file's 478 MB of bf16
    parts, rank = lora.load_uso_lora(str(path))
    assert rank == 128
    assert len(parts) == 19 * 8 + 38 * 4             # q/k/v split, projections once
    by_module = {p.module: p for p in parts}
    assert by_module["single_transformer_blocks.37.proj_out"].down.shape == (128, 15360)
    assert by_module["transformer_blocks.18.attn.add_v_proj"].up.shape == (3072, 128)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**full)
    lora.check_fits(parts, transformer, path.name)
    with torch.device("meta"):                       # a transformer of another width is refused
        other = FluxTransformer2DModel(**{**full, "num_attention_heads": 20})
    with pytest.raises(ModelFileError, match="does not fit this transformer"):
        lora.check_fits(parts, other, path.name)


# --------------------------------------------------------------------------------------------
# Wrong files
# --------------------------------------------------------------------------------------------

WRONG = [
    # (slot loader, file key given to it, words the message must contain)
    ("transformer", "t5_fp16", ["t5xxl_fp16.safetensors", "T5 text encoder", "FLUX.1-dev transformer"]),
    ("transformer", "lora_comfy", ["USO DiT LoRA", "FLUX.1-dev transformer"]),
    ("vae", "clip_l", ["clip_l.safetensors", "CLIP text encoder", "FLUX autoencoder"]),
    ("t5", "ae", ["ae.safetensors", "FLUX autoencoder", "T5-XXL"]),
    ("clip_l", "t5_fp16", ["T5 text encoder", "CLIP-L"]),
    ("siglip", "clip_l", ["CLIP text encoder", "SigLIP"]),
    ("projector", "lora_comfy", ["USO DiT LoRA", "USO style projector"]),
    ("uso_lora", "projector_comfy", ["USO style projector", "USO DiT LoRA"]),
]


def _load_slot(slot: str, path: str):
    if slot == "transformer":
        return loaders.load_transformer(path, torch.float32)
    if slot == "vae":
        return loaders.load_vae(Component(path))
    if slot == "t5":
        return loaders.load_t5(Component(path), torch.float32)
    if slot == "clip_l":
        return loaders.load_clip(Component(path), torch.float32)
    if slot == "siglip":
        return loaders.load_siglip(Component(path))
    if slot == "projector":
        return loaders.load_projector(path, torch.float32)
    return lora.load_uso_lora(path)


@pytest.mark.parametrize("slot,key,words", WRONG)
def test_a_wrong_file_names_the_file_and_the_expected_kind(tiny_models, slot, key, words):
    with pytest.raises(ModelFileError) as err:
        _load_slot(slot, str(tiny_models.paths[key]))
    message = str(err.value)
    assert message.startswith(slot + ":")
    for word in words:
        assert word in message


def test_truncated_download_is_reported(tiny_models, tmp_path):
    src = tiny_models.paths["flux_bfl"]
    cut = tmp_path / "flux1-dev.safetensors"
    with open(src, "rb") as f:
        data = f.read()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelFileError, match="truncated.*Download it again"):
        loaders.load_transformer(str(cut), torch.float32)


def test_not_a_safetensors_file(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("<html>404 Not Found</html>")
    with pytest.raises(ModelFileError, match="model.safetensors.*not a safetensors"):
        open_weights(str(bogus))


def test_pickle_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "flux1-dev.ckpt"
    ckpt.write_bytes(b"\x80\x04")
    with pytest.raises(ModelFileError, match="pickle.*safetensors"):
        open_weights(str(ckpt))


def test_missing_tokenizer_says_which_files_and_where(tiny_models, tmp_path):
    from nodes.engine import tokenizers

    with pytest.raises(TokenizerNotFoundError) as err:
        tokenizers.load_tokenizer("t5", [str(tmp_path)])
    msg = str(err.value)
    assert "tokenizer.json" in msg and str(tmp_path) in msg and "FLUX.1-dev" in msg


def test_tokenizers_load_from_a_root_with_subfolders(tiny_models):
    from nodes.engine import tokenizers

    root = str(tiny_models.paths["tokenizer_t5"].parent)
    t5 = tokenizers.load_tokenizer("t5", [root])
    clip = tokenizers.load_tokenizer("clip_l", [root])
    assert len(t5("a cat", padding="max_length", max_length=512)["input_ids"]) == 512
    assert len(clip("a cat", padding="max_length", max_length=77)["input_ids"]) == 77


def _resolve(tiny_models, key: str) -> str:
    head, _, tail = key.partition("/")
    base = str(tiny_models.paths[head])
    return os.path.join(base, tail) if tail else base


def test_a_tokenizer_from_another_model_is_refused_at_load_time(tiny_models, tmp_path):
    # A real-size vocabulary against the tiny encoders: ids beyond the embedding table.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nodes.engine import EngineOptions, ModelFiles, USOPipeline

    vocab = {f"w{i}": i for i in range(5000)}
    vocab["<unk>"] = 5000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrong = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<unk>")
    for sub in ("t5", "clip_l"):
        wrong.save_pretrained(tmp_path / sub)
    p = {k: str(v) for k, v in tiny_models.paths.items()}
    files = ModelFiles(transformer=p["flux_bfl"], vae=p["ae"], t5=p["t5_fp16"], clip_l=p["clip_l"],
                       siglip=p["siglip_file"], uso_lora=p["lora_comfy"], projector=p["projector_comfy"],
                       tokenizer_dir=str(tmp_path))
    with pytest.raises(ModelFileError, match="t5: its tokenizer knows 5001 tokens.*belongs to another model"):
        USOPipeline.from_files(files, EngineOptions(precision="fp32", device="cpu"))


# ---------------------------------------------------------------------------------------------
# Metadata of every shape: read, or refused naming the file and the field
# ---------------------------------------------------------------------------------------------

def _rewrite_header(src, dst, edit) -> str:
    """A copy of a safetensors file whose JSON header went through `edit(header)` (raw JSON, so
    values the safetensors writer would not allow can be written)."""
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.setdefault("__metadata__", {})
    edit(header)
    text = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return str(dst)


def _set_config(config):
    def edit(header):
        header["__metadata__"]["config"] = json.dumps(config)
    return edit


def test_a_checkpoint_with_its_config_keyed_by_prefix_loads_each_part_with_its_config(tiny_models, tmp_path):
    tm = tiny_models
    by_prefix = {"model.diffusion_model.": tm.flux_config, "vae.": tm.vae_config,
                 "text_encoders.clip_l.transformer.": tm.clip_config, "text_encoders.t5xxl.transformer.": tm.t5_config}
    path = _rewrite_header(tm.paths["checkpoint_aio"], tmp_path / "flux1-dev-fp8.safetensors", _set_config(by_prefix))
    original = str(tm.paths["checkpoint_aio"])
    transformer, cfg = loaders.load_transformer(path, torch.float32)
    assert cfg["axes_dims_rope"] == tuple(tm.flux_config["axes_dims_rope"])
    assert _weights(transformer).keys() == _weights(loaders.load_transformer(original, torch.float32)[0]).keys()
    for prefix, load in (("vae.", lambda c: loaders.load_vae(c)),
                         ("text_encoders.clip_l.transformer.", lambda c: loaders.load_clip(c, torch.float32)),
                         ("text_encoders.t5xxl.transformer.", lambda c: loaders.load_t5(c, torch.float32))):
        model, truth = load(Component(path, prefix)), load(Component(original, prefix))
        assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(truth).values()))
        assert dict(model.config) == dict(truth.config) if prefix == "vae." else \
            model.config.to_dict() == truth.config.to_dict()
    # What only the stored config can say (shapes alone give 1 CLIP head and 32 VAE norm groups):
    clip = loaders.load_clip(Component(path, "text_encoders.clip_l.transformer."), torch.float32)
    assert clip.config.num_attention_heads == tm.clip_config["num_attention_heads"] == 4
    assert loaders.load_vae(Component(path, "vae.")).config.norm_num_groups == tm.vae_config["norm_num_groups"] == 4


def test_a_t5_config_claiming_2000_layers_is_refused_before_a_model_is_built(tiny_models, tmp_path, monkeypatch):
    config = {**tiny_models.t5_config, "num_layers": 2000}
    path = _rewrite_header(tiny_models.paths["t5_fp16"], tmp_path / "t5xxl_fp16.safetensors", _set_config(config))
    built = []
    monkeypatch.setattr(loaders, "_built", lambda *args: built.append(args))
    with pytest.raises(ModelFileError, match=r"t5: 't5xxl_fp16.safetensors' .*'num_layers' is 2000, but its "
                                             r"tensors say 2"):
        loaders.load_t5(Component(path), torch.float32)
    assert built == []


def test_a_config_that_is_not_a_json_object_falls_back_to_the_shapes(tiny_models, tmp_path):
    truth = _weights(loaders.load_t5(Component(str(tiny_models.paths["t5_fp16"])), torch.float32))
    for i, config in enumerate(([1, 2], 7, "text", None)):
        path = _rewrite_header(tiny_models.paths["t5_fp16"], tmp_path / f"t5_{i}.safetensors", _set_config(config))
        model = loaders.load_t5(Component(path), torch.float32)
        assert _weights(model).keys() == truth.keys()
        assert all(torch.equal(a, truth[k]) for k, a in _weights(model).items())


ODD_METADATA = [
    # (file, how the header changes, words the message must hold)
    ("t5_fp16", lambda h: h["__metadata__"].update(config=5), ["metadata field 'config'", "int, not text"]),
    ("t5_fp16", lambda h: h.update(__metadata__=["config"]), ["metadata (__metadata__) is list"]),
    ("clip_l", lambda h: h["__metadata__"].update(config=json.dumps({**json.loads(h["__metadata__"]["config"]),
                                                                       "num_attention_heads": None})),
     ["clip_l: 'clip_l.safetensors'", "'num_attention_heads' is null"]),
    ("t5_fp16", lambda h: h["__metadata__"].update(config=json.dumps({**json.loads(h["__metadata__"]["config"]),
                                                                       "d_model": "48"})),
     ["'d_model' is \"48\" (text) where a number"]),
    ("flux_fp8_comfyquant", lambda h: h["__metadata__"].update(_quantization_metadata=json.dumps([1, 2])),
     ["_quantization_metadata: JSON list, not an object"]),
    ("flux_fp8_comfyquant", lambda h: h["__metadata__"].update(
        _quantization_metadata=json.dumps({"layers": {"img_in": ["float8_e4m3fn"]}})),
     ["_quantization_metadata layer img_in: JSON list, not an object"]),
]


@pytest.mark.parametrize("key,edit,words", ODD_METADATA)
def test_odd_metadata_is_refused_naming_the_file_and_the_field(tiny_models, tmp_path, key, edit, words):
    name = os.path.basename(tiny_models.paths[key])
    path = _rewrite_header(tiny_models.paths[key], tmp_path / name, edit)
    with pytest.raises(ModelFileError) as err:
        _load_slot({"t5_fp16": "t5", "clip_l": "clip_l"}.get(key, "transformer"), path)
    assert name in str(err.value)
    for word in words:
        assert word in str(err.value)


def _with_comfy_quant_data(tiny_models, tmp_path, data_for) -> str:
    """The comfy_quant transformer with one `.comfy_quant` blob's bytes replaced (same length) or the
    blob's header entry grown to `size` bytes of zeros appended to the file."""
    src = tiny_models.paths["flux_fp8_comfyquant"]
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])
    key = sorted(k for k in header if k.endswith(".comfy_quant"))[0]
    start, end = header[key]["data_offsets"]
    blob = data_for(bytes(body[start:end]))
    if len(blob) == end - start:
        body[start:end] = blob
    else:
        header[key] = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [len(body), len(body) + len(blob)]}
        body += blob
    text = json.dumps(header).encode()
    dst = tmp_path / "flux1-dev-fp8-comfyquant.safetensors"
    dst.write_bytes(struct.pack("<Q", len(text)) + text + bytes(body))
    return str(dst)


def test_comfy_quant_blobs_that_are_not_utf8_json_or_too_large_are_refused_by_name(tiny_models, tmp_path):
    not_utf8 = _with_comfy_quant_data(tiny_models, tmp_path, lambda blob: b"\xff" * len(blob))
    with pytest.raises(ModelFileError, match=r"flux1-dev-fp8-comfyquant.safetensors: .*\.comfy_quant: not UTF-8 text"):
        loaders.load_transformer(not_utf8, torch.float32)
    huge = _with_comfy_quant_data(tiny_models, tmp_path, lambda blob: b" " * (scaled_fp8.COMFY_QUANT_MAX_BYTES + 1))
    with pytest.raises(ModelFileError, match=r"\.comfy_quant: 65537 bytes, more than a comfy_quant entry holds"):
        loaders.load_transformer(huge, torch.float32)


def test_the_command_line_ends_a_bad_model_file_with_a_message_and_an_exit_code(tiny_models, tmp_path):
    p = tiny_models.paths
    bad_t5 = _rewrite_header(p["t5_fp16"], tmp_path / "t5xxl_fp16.safetensors",
                             _set_config({**tiny_models.t5_config, "num_layers": 2000}))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "nodes.cli", "--transformer", str(p["flux_bfl"]), "--vae", str(p["ae"]),
         "--t5", bad_t5, "--clip-l", str(p["clip_l"]), "--siglip", str(p["siglip_file"]),
         "--uso-lora", str(p["lora_comfy"]), "--projector", str(p["projector_comfy"]),
         "--tokenizers", str(p["tokenizer_t5"].parent), "--prompt", "a cat", "--width", "32", "--height", "32",
         "--steps", "1", "--out", str(tmp_path / "out")],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "t5xxl_fp16.safetensors" in proc.stderr and "'num_layers' is 2000" in proc.stderr


def test_a_part_of_a_scaled_fp8_checkpoint_keeps_its_prefix_keyed_config(tiny_models, tmp_path):
    from nodes.engine.scaled_fp8 import DequantizedSource

    by_prefix = {"vae.": tiny_models.vae_config, "model.diffusion_model.": tiny_models.flux_config}
    path = _rewrite_header(tiny_models.paths["checkpoint_aio"], tmp_path / "flux1-dev-fp8.safetensors",
                           _set_config(by_prefix))
    vae_part = DequantizedSource(open_weights(path).with_prefix("vae."))
    assert vae_part.config("vae") == tiny_models.vae_config
    assert DequantizedSource(open_weights(path)).config("vae") is None  # the whole file is no one part
