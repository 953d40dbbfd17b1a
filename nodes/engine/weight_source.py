"""What a weight file holds, as the loaders see it: key names, shapes and dtypes first, tensors one
at a time. The readers of each file format (weight_files.py for safetensors and folders,
gguf_files.py) make these; this module reads no file format itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .errors import ModelFileError


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
    #: The key prefix this view was cut at in its file ("" for a whole file).
    prefix: str = ""

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
        try:
            # A copy in the process's own memory: safetensors' tensor shares the file's memory map,
            # which would then live as long as the loaded model, and Windows refuses to overwrite,
            # rename or delete a mapped file (a LoRA trainer re-saving, a re-download). The map
            # goes with the handle once the loader closes the source.
            return handle.get_tensor(key).clone()
        except Exception as exc:  # safetensors raises its own error type for a damaged tensor
            raise ModelFileError(f"{os.path.basename(file)}: its tensor {key} cannot be read ({exc}). "
                                 "The file may be damaged; download it again.") from exc

    def close(self) -> None:
        self._handles.clear()

    def with_prefix(self, prefix: str) -> "WeightSource":
        """A view on the keys that start with `prefix`, with the prefix removed."""
        return _PrefixedSource(self, prefix)

    def config(self, component: str | None = None) -> dict | None:
        """The architecture stored in the `config` metadata entry, if the file carries one.

        Three shapes are read: one config for the file; one per model part, keyed by the part's
        name (`{"transformer": {...}, "vae": {...}}`); and one per part keyed by the part's key
        prefix, as all-in-one checkpoints carry it (`{"model.diffusion_model.": {...}, "vae.":
        {...}}`), where a view made by `with_prefix` gets its own part. Anything else (not JSON,
        not a JSON object, no part for this view) is no config: the loaders derive the
        architecture from the tensor shapes, which every file has."""
        raw = self.metadata.get("config")
        if not raw:
            return None
        try:
            cfg = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(cfg, dict):
            return None
        if _keyed_by(cfg, lambda key: key.endswith(".")):
            owners = [key for key in cfg if self.prefix.startswith(key)]
            return cfg[max(owners, key=len)] if owners else None
        if _keyed_by(cfg, lambda key: key in PART_NAMES):
            part = cfg.get(component)
            return part if isinstance(part, dict) else None
        return cfg


#: The names a multi-part `config` metadata entry may key its parts by.
PART_NAMES = ("transformer", "vae", "t5", "clip_l", "siglip")


def _keyed_by(cfg: dict, is_part_key) -> bool:
    return bool(cfg) and all(is_part_key(k) and isinstance(v, dict) for k, v in cfg.items())


class _PrefixedSource(WeightSource):
    def __init__(self, base: WeightSource, prefix: str):
        infos = {k[len(prefix):]: v for k, v in base.infos.items() if k.startswith(prefix)}
        super().__init__(path=base.path, infos=infos, metadata=base.metadata, prefix=base.prefix + prefix)
        self._base = base
        self._prefix = prefix

    def get(self, key: str) -> torch.Tensor:
        return self._base.get(self._prefix + key)

    def close(self) -> None:
        self._base.close()


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
