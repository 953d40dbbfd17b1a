"""GGUF transformer files (city96-style FLUX quantisations), read with the `gguf` package.

Quantised tensors come back as diffusers' GGUFParameter, so they stay quantised in memory and
diffusers' GGUFLinear dequantises them layer by layer at run time.
"""
from __future__ import annotations

import os

import torch

from .errors import ModelFileError
from .weight_source import TensorInfo, WeightSource

_PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16}


class GGUFSource(WeightSource):
    def __init__(self, path: str, reader):
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        infos = {}
        for name, t in self._tensors.items():
            kind = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            infos[name] = TensorInfo(shape, _PLAIN_TYPES.get(kind, kind))
        super().__init__(path=path, infos=infos, metadata=_string_fields(reader))

    def get(self, key: str) -> torch.Tensor:
        from diffusers.quantizers.gguf.utils import GGUFParameter

        t = self._tensors[key]
        try:
            data = torch.from_numpy(t.data.copy())
        except Exception as exc:  # numpy/gguf errors for data that does not fit its header
            raise ModelFileError(f"{os.path.basename(self.path)}: its tensor {key} cannot be read ({exc}). "
                                 "The file may be damaged; download it again.") from exc
        if t.tensor_type.name in _PLAIN_TYPES:
            return data
        return GGUFParameter(data, quant_type=t.tensor_type)

    def close(self) -> None:
        # The reader memory-maps the file; each tensor above is a copy, so the map can go now
        # (Windows refuses to overwrite, rename or delete a mapped file).
        self._tensors.clear()
        self._reader = None


def _refuse_unsupported_quant_types(name: str, reader) -> None:
    """diffusers dequantizes only some GGUF types; any other would fail at the first step that
    reaches its layer, so a file holding one is refused here, before anything is loaded."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    runnable = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | set(_PLAIN_TYPES)
    found: dict[str, str] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in runnable:
            found.setdefault(kind, t.name)
    if found:
        listed = ", ".join(f"{kind} (e.g. {tensor})" for kind, tensor in sorted(found.items()))
        supported = ", ".join(sorted(runnable - set(_PLAIN_TYPES))) + ", F16, F32"
        raise ModelFileError(
            f"{name}: holds GGUF quantisation type(s) that diffusers cannot run: {listed}. "
            f"Supported: {supported}. Pick a GGUF file in one of those (Q8_0, Q5_K or Q4_K "
            "are common for FLUX.1-dev), or a .safetensors transformer.")


def _string_fields(reader) -> dict[str, str]:
    out = {}
    for name, fld in reader.fields.items():
        try:
            value = fld.contents()
        except Exception:
            continue
        if isinstance(value, str):
            key = name.split(".", 1)[1] if name.startswith("comfyui_uso.") else name
            out[key] = value
    return out


def open_gguf(path: str) -> WeightSource:
    name = os.path.basename(path)
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelFileError(
            f"{name}: GGUF files need the 'gguf' package. Install it into ComfyUI's Python with "
            "`pip install gguf`, or pick a .safetensors transformer.") from exc
    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise ModelFileError(f"{name}: cannot be read as GGUF ({exc}). The file may be truncated; "
                             "download it again.") from exc
    _refuse_unsupported_quant_types(name, reader)
    return GGUFSource(path, reader)


def is_quantized(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "quant_type")
