"""Read weight files lazily: key names, shapes and dtypes first, tensors one at a time.

Reading the header alone tells what a file is (see detect.py) without touching gigabytes, and
loading tensor by tensor keeps peak RAM near one copy of the weights.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import torch

from .errors import ModelFileError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # a torch dtype, or a GGUF quantisation name such as "Q8_0"


@dataclass
class WeightSource:
    """The tensors of one weight file (or one sharded folder), read on demand."""

    path: str
    infos: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    _files: dict[str, str] = field(default_factory=dict)  # key -> file holding it
    _handles: dict = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._files.get(key, self.path)
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except Exception as exc:
                raise ModelFileError(f"{os.path.basename(file)}: cannot be read ({exc}). "
                                     "The file may be damaged; download it again.") from exc
            self._handles[file] = handle
        return handle.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def with_prefix(self, prefix: str) -> "WeightSource":
        """A view on the keys that start with `prefix`, with the prefix removed."""
        return _PrefixedSource(self, prefix)

    def config(self, component: str | None = None) -> dict | None:
        """The architecture stored in the `config` metadata entry, if the file carries one."""
        raw = self.metadata.get("config")
        if not raw:
            return None
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if component is not None and isinstance(cfg, dict) and component in cfg:
            return cfg[component]
        return cfg


class _PrefixedSource(WeightSource):
    def __init__(self, base: WeightSource, prefix: str):
        infos = {k[len(prefix):]: v for k, v in base.infos.items() if k.startswith(prefix)}
        super().__init__(path=base.path, infos=infos, metadata=base.metadata)
        self._base = base
        self._prefix = prefix

    def get(self, key: str) -> torch.Tensor:
        return self._base.get(self._prefix + key)

    def close(self) -> None:
        self._base.close()


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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{name}: this is not a safetensors file (its header is not JSON). "
                             "Pick a .safetensors weight file.") from exc
    not_safetensors = ModelFileError(f"{name}: this is not a safetensors file (its header does not list "
                                     "tensors). Pick a .safetensors weight file, or download it again.")
    if not isinstance(header, dict):
        raise not_safetensors
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            end = int(entry["data_offsets"][1])
        except (TypeError, KeyError, IndexError, ValueError):
            raise not_safetensors from None
        infos[key] = TensorInfo(shape, dtype)
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        missing_mb = (8 + header_len + data_end - size) / 2**20
        raise ModelFileError(
            f"{name}: the file is truncated ({missing_mb:.1f} MB missing; a half-finished "
            "download?). Download it again.")
    return infos, metadata


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
        from .gguf_files import open_gguf

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
        with open(config_path, encoding="utf-8") as f:
            metadata.setdefault("config", f.read())
    return WeightSource(path=path, infos=infos, metadata=metadata, _files=owners)


class StateDictSource(WeightSource):
    """A WeightSource over tensors already in memory (random full-size models, tests)."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], config: dict | None = None):
        infos = {k: TensorInfo(tuple(getattr(v, "quant_shape", v.shape)), v.dtype)
                 for k, v in tensors.items()}
        metadata = {"config": json.dumps(config)} if config is not None else {}
        super().__init__(path=name, infos=infos, metadata=metadata)
        self._tensors = tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]
