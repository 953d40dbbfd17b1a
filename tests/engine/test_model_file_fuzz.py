"""Property-based (hypothesis): weight files whose header or metadata is random or mutated are
either loaded or refused with a ModelFileError; no other exception reaches the user.

The tiny models' files are the seeds: their safetensors header (tensor entries, `__metadata__`,
the `config` JSON, comfy_quant blobs, `_quantization_metadata`) and their GGUF header (bytes,
the stored config) are changed, and the loader of the file's slot is called on the result.

`USO_FUZZ_EXAMPLES` sets the number of examples per test (default 200 safetensors + 100 GGUF,
about a minute on 2 cores); e.g. `USO_FUZZ_EXAMPLES=5000` for a long local run.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nodes.engine import loaders, lora
from nodes.engine.errors import ModelFileError
from nodes.engine.loaders import Component

EXAMPLES = int(os.environ.get("USO_FUZZ_EXAMPLES", "0"))
FUZZ = dict(deadline=None, derandomize=False, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                   HealthCheck.data_too_large])

#: slot -> (tiny_models path key, key prefix inside the file, the loader for that slot)
SLOTS = {
    "t5": ("t5_fp16", "", lambda path, prefix: loaders.load_t5(Component(path, prefix), torch.float32)),
    "t5 scaled fp8": ("t5_fp8_scaled", "",
                      lambda path, prefix: loaders.load_t5(Component(path, prefix), torch.float32)),
    "clip_l": ("clip_l", "", lambda path, prefix: loaders.load_clip(Component(path, prefix), torch.float32)),
    "vae": ("ae", "", lambda path, prefix: loaders.load_vae(Component(path, prefix))),
    "siglip": ("siglip_file", "", lambda path, prefix: loaders.load_siglip(Component(path, prefix))),
    "transformer": ("flux_bfl", "", lambda path, prefix: loaders.load_transformer(path, torch.float32)),
    "transformer comfy_quant": ("flux_fp8_comfyquant", "",
                                lambda path, prefix: loaders.load_transformer(path, torch.float32)),
    "projector": ("projector_comfy", "", lambda path, prefix: loaders.load_projector(path, torch.float32)),
    "uso_lora": ("lora_comfy", "", lambda path, prefix: lora.load_uso_lora(path)),
    "checkpoint vae": ("checkpoint_aio", "vae.", lambda path, prefix: loaders.load_vae(Component(path, prefix))),
    "checkpoint t5": ("checkpoint_aio", "text_encoders.t5xxl.transformer.",
                      lambda path, prefix: loaders.load_t5(Component(path, prefix), torch.float32)),
}
#: Keys of the `config` metadata whose values are sizes, tried with other numbers.
SIZE_KEYS = ["num_layers", "num_hidden_layers", "num_heads", "num_attention_heads", "d_model", "d_kv", "d_ff",
             "hidden_size", "intermediate_size", "vocab_size", "image_size", "patch_size", "layers_per_block",
             "latent_channels", "block_out_channels", "attention_head_dim", "axes_dims_rope",
             "max_position_embeddings", "relative_attention_num_buckets", "norm_num_groups"]
PREFIXES = ["model.diffusion_model.", "vae.", "text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.",
            "text_encoders.clip_l.transformer.", "", "x."]
DTYPES = ["F32", "F16", "BF16", "F8_E4M3", "U8", "I64", "BOOL", "F4", "Q8_0", 7, None]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
sizes = st.one_of(st.integers(-3, 3000), st.sampled_from([2, 4, 8, 16, 32, 64, 128, 2000]),
                  st.lists(st.integers(-2, 300), max_size=5), json_values)


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def mutations(draw, header: dict):
    """One change to a parsed safetensors header, made in place: (what changed, data edit or None)."""
    if not isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = {}
    meta = header["__metadata__"]
    try:
        config = json.loads(meta.get("config", "{}"))
    except (TypeError, ValueError, RecursionError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    tensors = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from([
        "config value", "config size", "config json", "config text", "config by prefix", "config by part",
        "metadata value", "metadata table", "quantization metadata", "tensor entry", "tensor gone",
        "comfy_quant bytes"]))
    if kind == "config value" and config:
        key = draw(st.sampled_from(sorted(config)))
        part = config[key]
        if isinstance(part, dict) and part:  # a multi-part config: change a value inside one part
            config[key] = {**part, draw(st.sampled_from(sorted(part))): draw(json_values)}
        else:
            config[key] = draw(json_values)
        meta["config"] = json.dumps(config)
    elif kind == "config size":
        target = config
        if config and all(isinstance(v, dict) for v in config.values()):
            target = config[draw(st.sampled_from(sorted(config)))]
        target[draw(st.sampled_from(SIZE_KEYS))] = draw(sizes)
        meta["config"] = json.dumps(config)
    elif kind == "config json":
        meta["config"] = json.dumps(draw(json_values))
    elif kind == "config text":
        meta["config"] = draw(st.text(max_size=40)) + draw(st.sampled_from(["", "[" * 5000, "{\"a\":" * 3000]))
    elif kind == "config by prefix":
        parts = config.values() if config and all(isinstance(v, dict) for v in config.values()) else [config]
        meta["config"] = json.dumps({draw(st.sampled_from(PREFIXES)): part for part in parts})
    elif kind == "config by part":
        meta["config"] = json.dumps({draw(st.sampled_from(["transformer", "vae", "t5", "clip_l", "siglip"])):
                                     draw(json_values | st.just(config))})
    elif kind == "metadata value":
        meta[draw(st.sampled_from(["config", "format", "_quantization_metadata", "lora_adapter_metadata"]))] = \
            draw(json_values.filter(lambda v: not isinstance(v, str)))
    elif kind == "metadata table":
        header["__metadata__"] = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    elif kind == "quantization metadata":
        meta["_quantization_metadata"] = json.dumps(draw(
            json_values | st.fixed_dictionaries({"layers": json_values})
            | st.fixed_dictionaries({"layers": st.dictionaries(st.sampled_from(tensors), json_values, max_size=3)})))
    elif kind == "tensor entry":
        key = draw(st.sampled_from(tensors))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]))
        value = {"dtype": st.sampled_from(DTYPES), "shape": st.lists(st.integers(-1, 70), max_size=5),
                 "data_offsets": st.lists(st.integers(-1, 2**20), max_size=3), "entry": json_values}[field]
        if field == "entry":
            header[key] = draw(value)
        else:
            header[key] = {**header[key], field: draw(value)}
    elif kind == "tensor gone":
        for key in draw(st.lists(st.sampled_from(tensors), min_size=1, max_size=3, unique=True)):
            header.pop(key)
    elif kind == "comfy_quant bytes":
        blobs = [k for k in tensors if k.endswith(".comfy_quant")]
        if blobs:
            key = draw(st.sampled_from(blobs))
            start, end = header[key]["data_offsets"]
            return kind, (start, draw(st.binary(min_size=end - start, max_size=end - start)))
    return kind, None


def _seed_files(tiny_models) -> dict[str, tuple[bytes, str]]:
    out = {}
    for slot, (key, prefix, _) in SLOTS.items():
        out[slot] = (Path(tiny_models.paths[key]).read_bytes(), prefix)
    return out


def _outcome(load, path: str, prefix: str) -> str:
    try:
        load(path, prefix)
    except ModelFileError as exc:
        assert os.path.basename(path) in str(exc), f"the message does not name the file: {exc}"
        return "refused"
    return "loaded"


@pytest.fixture(scope="module")
def seeds(tiny_models):
    return _seed_files(tiny_models)


@given(data=st.data())
@settings(max_examples=EXAMPLES or 200, **FUZZ)
def test_mutated_safetensors_headers_load_or_raise_model_file_error(seeds, tmp_path_factory, data):
    slot = data.draw(st.sampled_from(sorted(SLOTS)), label="slot")
    raw, prefix = seeds[slot]
    header, body = _split(raw)
    changes = data.draw(st.integers(1, 3), label="changes")
    for _ in range(changes):
        _, edit = data.draw(mutations(header), label="mutation")
        if edit is not None:
            start, blob = edit
            body = body[:start] + blob + body[start + len(blob):]
    blob = _join(header, body)
    if data.draw(st.booleans(), label="cut or flip raw bytes"):
        at = data.draw(st.integers(0, len(blob) - 1), label="at")
        blob = blob[:at] if data.draw(st.booleans(), label="cut") else \
            blob[:at] + bytes([blob[at] ^ data.draw(st.integers(1, 255))]) + blob[at + 1:]
    path = tmp_path_factory.mktemp("fuzz") / "mutated.safetensors"
    path.write_bytes(blob)
    event(f"{slot}: {_outcome(SLOTS[slot][2], str(path), prefix)}")


def _gguf_config_span(raw: bytes) -> tuple[int, int]:
    """(offset of the length field, end) of the string value under comfyui_uso.config."""
    key = b"comfyui_uso.config"
    at = raw.index(key) + len(key) + 4  # the key, then the value type (uint32)
    (n,) = struct.unpack("<Q", raw[at:at + 8])
    return at, at + 8 + n


@given(data=st.data())
@settings(max_examples=EXAMPLES or 100, **FUZZ)
def test_mutated_gguf_headers_load_or_raise_model_file_error(tiny_models, tmp_path_factory, data):
    pytest.importorskip("gguf")
    raw = Path(tiny_models.paths["flux_gguf"]).read_bytes()
    start, end = _gguf_config_span(raw)
    how = data.draw(st.sampled_from(["flip header bytes", "cut", "config"]), label="how")
    if how == "flip header bytes":
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            at = data.draw(st.integers(0, min(len(raw), 8192) - 1), label="at")
            raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
    elif how == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut at")]
    else:
        config = json.loads(raw[start + 8:end])
        new = data.draw(st.one_of(
            st.builds(json.dumps, json_values),
            st.builds(lambda key, value: json.dumps({**config, key: value}), st.sampled_from(SIZE_KEYS), sizes),
            st.builds(lambda prefix: json.dumps({prefix: config}), st.sampled_from(PREFIXES)),
        ), label="config").encode() if data.draw(st.booleans()) else data.draw(st.binary(max_size=64))
        # Keep the tensor data where it was: grow the string to the same length modulo the alignment.
        new += b" " * ((len(raw[start + 8:end]) - len(new)) % 32)
        raw = raw[:start] + struct.pack("<Q", len(new)) + new + raw[end:]
    path = tmp_path_factory.mktemp("fuzz") / "mutated.gguf"
    path.write_bytes(raw)
    event(f"gguf {how}: {_outcome(lambda p, _: loaders.load_transformer(p, torch.float32), str(path), '')}")
