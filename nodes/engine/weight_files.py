"""Read weight files lazily: key names, shapes and dtypes first, tensors one at a time.

Reading the header alone tells what a file is (see detect.py) without touching gigabytes, and
loading tensor by tensor keeps peak RAM near one copy of the weights.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from .errors import ModelFileError
from .gguf_files import open_gguf
from .weight_source import TensorInfo, WeightSource

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the JSON header of a safetensors file; a truncated or foreign file gets a clear error."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{name}: the file is empty or truncated ({size} bytes). "
                                     "Download it again.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 1 or header_len > 100 * 1024 * 1024 or 8 + header_len > size:
                raise ModelFileError(f"{name}: this is not a safetensors file, or its download was "
                                     "cut off before the header ended. Download it again.")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise ModelFileError(f"{name}: cannot be read ({exc.strerror or exc}).") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{name}: this is not a safetensors file (its header is not JSON). "
                             "Pick a .safetensors weight file.") from exc
    not_safetensors = ModelFileError(f"{name}: this is not a safetensors file (its header does not list "
                                     "tensors). Pick a .safetensors weight file, or download it again.")
    if not isinstance(header, dict):
        raise not_safetensors
    metadata = header.pop("__metadata__", None) or {}
    # safetensors keeps text under text keys there (its own reader refuses anything else).
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{name}: its metadata (__metadata__) is {type(metadata).__name__}, not a "
                             "table of texts; the file is damaged or was not written by a safetensors "
                             "writer. Download it again, or re-save it.")
    for field_name, value in metadata.items():
        if not isinstance(value, str):
            raise ModelFileError(f"{name}: its metadata field '{field_name}' holds "
                                 f"{type(value).__name__}, not text; the file is damaged or was not "
                                 "written by a safetensors writer. Download it again, or re-save it.")
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and _whole_numbers(entry.get("shape")) and _whole_numbers(entry.get("data_offsets"))
                and len(entry["data_offsets"]) == 2 and entry["data_offsets"][0] <= entry["data_offsets"][1]):
            raise not_safetensors
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
        shape = tuple(entry["shape"])
        end = entry["data_offsets"][1]
        infos[key] = TensorInfo(shape, dtype)
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        missing_mb = (8 + header_len + data_end - size) / 2**20
        raise ModelFileError(
            f"{name}: the file is truncated ({missing_mb:.1f} MB missing; a half-finished "
            "download?). Download it again.")
    return infos, metadata


def _whole_numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                           for d in value)


def open_weights(path: str) -> WeightSource:
    """A WeightSource for a .safetensors file, a .gguf file, or a diffusers component folder."""
    name = os.path.basename(path.rstrip("/\\"))
    if not os.path.exists(path):
        raise ModelFileError(f"{name}: file not found at {path}.")
    if os.path.isdir(path):
        return _open_folder(path)
    lower = path.lower()
    if lower.endswith(_PICKLE_EXTENSIONS):
        raise ModelFileError(
            f"{name}: pickle checkpoints ({os.path.splitext(name)[1]}) can run code when loaded and "
            "are not accepted. Use the .safetensors (or .gguf) version of this model.")
    if lower.endswith(".gguf"):
        return open_gguf(path)
    infos, metadata = read_safetensors_header(path)
    return WeightSource(path=path, infos=infos, metadata=metadata)


def _open_folder(path: str) -> WeightSource:
    """A diffusers/HF component folder: one safetensors file or shards listed in an index."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickles = [f for f in os.listdir(path) if f.endswith(_PICKLE_EXTENSIONS)]
        hint = (" It only holds pickle files (" + ", ".join(pickles[:3]) + "), which are not "
                "accepted; use the safetensors version.") if pickles else ""
        raise ModelFileError(f"{os.path.basename(path)}: no .safetensors weights in {path}.{hint}")
    infos: dict[str, TensorInfo] = {}
    owners: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for f in files:
        full = os.path.join(path, f)
        file_infos, file_meta = read_safetensors_header(full)
        metadata.update(file_meta)
        for k, v in file_infos.items():
            infos[k] = v
            owners[k] = full
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                metadata.setdefault("config", f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{config_path}: cannot be read as text ({exc}). Download the "
                                 "folder's config.json again.") from exc
    return WeightSource(path=path, infos=infos, metadata=metadata, _files=owners)
