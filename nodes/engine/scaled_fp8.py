"""ComfyUI "scaled fp8" files: fp8 weights that must be multiplied by a per-layer scale.

Two generations exist: a `scaled_fp8` marker key with `<layer>.scale_weight` (and optional
`.scale_input`), and the newer `<layer>.weight_scale` + `<layer>.comfy_quant` (a JSON blob as
uint8) or `_quantization_metadata` in the header. Loaded naively the weights are off by the scale
and the model produces noise, which is what users hit with these files elsewhere.
"""
from __future__ import annotations

import json
import os

import torch

from .errors import ModelFileError
from .weight_source import WeightSource

_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")


def is_scaled_fp8(source: WeightSource) -> bool:
    return ("scaled_fp8" in source or "_quantization_metadata" in source.metadata
            or any(k.endswith(_SCALE_SUFFIXES + (".comfy_quant",)) for k in source.keys()))


class DequantizedSource(WeightSource):
    """The same tensors with every scaled weight multiplied out (returned in float32)."""

    def __init__(self, base: WeightSource):
        self._base = base
        self._scale_of: dict[str, str] = {}
        for key in base.keys():
            for suffix in _SCALE_SUFFIXES:
                if key.endswith(suffix):
                    self._scale_of[key[: -len(suffix)] + ".weight"] = key
        self._check_formats()
        infos = {k: v for k, v in base.infos.items()
                 if k != "scaled_fp8" and not k.endswith(_SCALE_SUFFIXES + _DROPPED_SUFFIXES)}
        for key in self._scale_of:
            if key in infos:
                infos[key] = type(infos[key])(infos[key].shape, torch.float32)
        super().__init__(path=base.path, infos=infos, metadata=base.metadata, prefix=base.prefix)

    def _check_formats(self) -> None:
        formats = set()
        for key in self._base.keys():
            if key.endswith(".comfy_quant"):
                formats.add(_layer_format(self._base, key, _comfy_quant(self._base, key)))
        raw = self._base.metadata.get("_quantization_metadata")
        if raw:
            layers = _json_object(self._base, "_quantization_metadata", raw).get("layers", {})
            if not isinstance(layers, dict):
                raise _damaged(self._base, "_quantization_metadata", "its 'layers' is not an object")
            for layer, conf in layers.items():
                formats.add(_layer_format(self._base, f"_quantization_metadata layer {layer}", conf))
        unsupported = formats - {None, "float8_e4m3fn", "float8_e5m2"}
        if unsupported:
            raise ModelFileError(
                f"{os.path.basename(self._base.path)}: quantisation format "
                f"{', '.join(sorted(map(str, unsupported)))} is not supported. Use a bf16, fp8 "
                "(scaled or not) or GGUF version of this model.")

    def get_scaled(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the fp8 weight as stored, its fp32 scalar scale) for a weight with one per-tensor scale
        (what ComfyUI writes); None for any other key. Keeping both loses nothing, where casting the
        dequantized weight back to fp8 rounds it again, and on the wrong grid."""
        scale_key = self._scale_of.get(key)
        if scale_key is None:
            return None
        scale = self._base.get(scale_key)
        tensor = self._base.get(key)
        if scale.numel() != 1 or tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return None
        return tensor, scale.to(torch.float32).reshape(())

    def get(self, key: str) -> torch.Tensor:
        tensor = self._base.get(key)
        scale_key = self._scale_of.get(key)
        if scale_key is None:
            return tensor
        scale = self._base.get(scale_key).to(torch.float32)
        if scale.ndim == 1 and scale.numel() == tensor.shape[0] and tensor.ndim == 2:
            scale = scale[:, None]
        return tensor.to(torch.float32) * scale

    def close(self) -> None:
        self._base.close()


#: A comfy_quant blob is a few dozen bytes of JSON; anything past this is not one.
COMFY_QUANT_MAX_BYTES = 64 * 1024


def _damaged(source: WeightSource, field: str, what: str) -> ModelFileError:
    return ModelFileError(f"{os.path.basename(source.path)}: {field}: {what}. The file's quantisation "
                          "data is damaged; download it again, or use a bf16, fp8 or GGUF version.")


def _json_object(source: WeightSource, field: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise _damaged(source, field, "not JSON") from None
    if not isinstance(value, dict):
        raise _damaged(source, field, f"JSON {type(value).__name__}, not an object")
    return value


def _comfy_quant(source: WeightSource, key: str) -> dict:
    """The JSON object a `.comfy_quant` tensor holds as UTF-8 bytes, read without a Python list
    and only up to COMFY_QUANT_MAX_BYTES (checked on the header, before the tensor is read)."""
    info = source.infos[key]
    if info.dtype not in (torch.uint8, torch.int8) or len(info.shape) != 1:
        raise _damaged(source, key, f"a {info.dtype} tensor of shape {list(info.shape)}, where a "
                                    "1-dimensional uint8 tensor of JSON text belongs")
    if info.shape[0] > COMFY_QUANT_MAX_BYTES:
        raise _damaged(source, key, f"{info.shape[0]} bytes, more than a comfy_quant entry "
                                    f"holds ({COMFY_QUANT_MAX_BYTES})")
    data = source.get(key).contiguous().view(torch.uint8).numpy().tobytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _damaged(source, key, "not UTF-8 text") from None
    return _json_object(source, key, text)


def _layer_format(source: WeightSource, field: str, conf) -> str | None:
    if not isinstance(conf, dict):
        raise _damaged(source, field, f"JSON {type(conf).__name__}, not an object")
    fmt = conf.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise _damaged(source, field, "its 'format' is not text")
    return fmt


def dequantized(source: WeightSource) -> WeightSource:
    return DequantizedSource(source) if is_scaled_fp8(source) else source
