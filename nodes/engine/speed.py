"""Speed options for the transformer, each off (or the safe default) unless asked for:

- attention backend: diffusers' attention dispatcher ("native" = torch SDPA, as the reference);
- regional compile: `torch.compile` of the repeated FLUX blocks (diffusers `compile_repeated_blocks`);
- step cache: diffusers' First Block Cache; `threshold` is the quality knob (0 = off; higher skips
  more steps' remaining blocks and changes the image more).

Nothing here downloads anything: backends that fetch kernels from a hub at run time are refused.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError

#: Friendly name -> diffusers AttentionBackendName value. The first is the default.
ATTENTION_BACKENDS = {
    "native": "native",                  # torch SDPA, kernel picked by torch (the reference's choice)
    "sdpa_flash": "_native_flash",       # torch SDPA forced to its flash kernel
    "sdpa_cudnn": "_native_cudnn",       # torch SDPA forced to cuDNN attention (fast on H100)
    "sdpa_efficient": "_native_efficient",
    "sdpa_math": "_native_math",         # torch SDPA math kernel (slow; a correctness baseline)
    "flash": "flash",                    # flash-attn 2 package
    "flash3": "_flash_3",                # flash-attn 3 (Hopper) package
    "sage": "sage",                      # sageattention package
    "xformers": "xformers",              # xformers package
}
ATTENTION_CHOICES = tuple(ATTENTION_BACKENDS)

_PACKAGE_HINTS = {
    "flash": "the flash-attn package (pip install flash-attn)",
    "flash_varlen": "the flash-attn package (pip install flash-attn)",
    "_flash_3": "flash-attn 3 (flash_attn_interface, built from the flash-attention repo's hopper/ folder)",
    "_flash_varlen_3": "flash-attn 3 (flash_attn_interface, built from the flash-attention repo's hopper/ folder)",
    "sage": "the sageattention package (pip install sageattention)",
    "sage_varlen": "the sageattention package (pip install sageattention)",
    "xformers": "the xformers package (pip install xformers)",
}
#: Backends that only run on an NVIDIA (or ROCm) GPU.
_GPU_ONLY = {"_native_cudnn", "_native_efficient", "flash", "flash_varlen", "_flash_3", "_flash_varlen_3",
             "sage", "sage_varlen", "xformers", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90",
             "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton"}

STEP_CACHE_MAX = 1.0


@dataclass(frozen=True)
class SpeedSettings:
    attention: str = "native"     # friendly name or diffusers backend name
    compile: bool = False
    step_cache: float = 0.0       # 0 = off; else First Block Cache threshold


def resolve_attention(name: str) -> str:
    """The diffusers backend name for `name` (a friendly name or a diffusers name)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    if not isinstance(name, str):
        raise InputError(f"attention: expected a backend name, got {type(name).__name__}.")
    key = name.strip().lower()
    value = ATTENTION_BACKENDS.get(key, key)
    known = {b.value for b in AttentionBackendName}
    if value not in known:
        raise InputError(f"attention: '{name}' is not an attention backend; pick one of "
                         f"{', '.join(ATTENTION_CHOICES)}.")
    if value.endswith("_hub"):
        raise InputError(f"attention: '{name}' downloads its kernels from a hub at run time, which this "
                         f"pack never does; pick one of {', '.join(ATTENTION_CHOICES)}.")
    return value


def set_attention(transformer: nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Route every attention of `transformer` through backend `name` (diffusers' dispatcher).

    Checks first that the backend's package is installed and that it runs on this device and
    dtype (one small probe call), so a bad choice fails at load time with a clear message instead
    of in the middle of sampling. Unlike `ModelMixin.set_attention_backend`, the process-wide
    default backend is left alone (other models in the process keep theirs)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import (AttentionBackendName,
                                                     _check_attention_backend_requirements,
                                                     dispatch_attention_fn)
    from diffusers.models.attention_processor import Attention

    value = resolve_attention(name)
    backend = AttentionBackendName(value)
    if value in _GPU_ONLY and device.type != "cuda":
        raise InputError(f"attention: '{name}' needs an NVIDIA GPU; this run is on {device.type}. "
                         "Use 'native'.")
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as exc:
        hint = _PACKAGE_HINTS.get(value, "its package")
        raise InputError(f"attention: '{name}' needs {hint}, which is not installed or too old "
                         f"({exc}). Install it or use 'native'.") from exc
    heads, head_dim = _attention_shape(transformer)
    probe = torch.randn(1, 8, heads, head_dim, device=device, dtype=dtype)
    try:
        with torch.inference_mode():
            dispatch_attention_fn(probe, probe, probe, backend=backend)
    except Exception as exc:  # noqa: BLE001 - any failure means the backend is unusable here
        raise InputError(f"attention: '{name}' does not run here ({device.type}, {str(dtype).replace('torch.', '')}): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                         "Use 'native'.") from exc
    count = 0
    for module in transformer.modules():
        if isinstance(module, (Attention, AttentionModuleMixin)):
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = backend
                count += 1
    if count == 0:
        raise InputError("attention: this transformer has no attention that diffusers can dispatch.")
    return value


def attention_backend_of(transformer: nn.Module) -> str | None:
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            return getattr(backend, "value", str(backend))
    return None


def _attention_shape(transformer: nn.Module) -> tuple[int, int]:
    cfg = getattr(transformer, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 2) or 2)
    head_dim = int(getattr(cfg, "attention_head_dim", 64) or 64)
    return heads, head_dim


# ---------------------------------------------------------------------------------------------
# Regional compile
# ---------------------------------------------------------------------------------------------

def compile_available(device: torch.device) -> str | None:
    """None when torch.compile's default backend can run on `device`, else why not."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on a GPU needs the triton package (it ships with Linux CUDA torch builds)"
        return None
    cxx = os.environ.get("CXX")
    # Windows: torch's inductor builds with MSVC's cl.exe (on PATH in a "Developer Command Prompt").
    compilers = ("cl", "clang-cl", "g++", "clang++") if sys.platform == "win32" else ("g++", "c++", "clang++")
    if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in compilers):
        if sys.platform == "win32":
            return ("torch.compile on the CPU needs a C++ compiler: MSVC's cl.exe (Visual Studio Build Tools, "
                    "run from a Developer Command Prompt so cl is on PATH)")
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++)"
    return None


def enable_regional_compile(transformer: nn.Module, device: torch.device, **compile_kwargs) -> int:
    """`torch.compile` each repeated FLUX block (diffusers' regional compilation: the 57 blocks
    share 2 compiled graphs, so a cold compile takes seconds, not a minute). The first run at a
    new size compiles; later runs reuse it. Returns how many blocks were compiled."""
    why_not = None if compile_kwargs.get("backend") not in (None, "inductor") else compile_available(device)
    if why_not:
        raise InputError(f"compile: {why_not}. Turn compile off.")
    compile_kwargs.setdefault("fullgraph", False)
    transformer.compile_repeated_blocks(**compile_kwargs)
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return sum(1 for m in transformer.modules() if type(m).__name__ in names)


# ---------------------------------------------------------------------------------------------
# Step cache (First Block Cache)
# ---------------------------------------------------------------------------------------------

def check_step_cache(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError) as exc:
        raise InputError(f"step_cache: '{threshold}' is not a number; use 0 (off) or a threshold "
                         "such as 0.05-0.15.") from exc
    if not 0.0 <= value <= STEP_CACHE_MAX or value != value:
        raise InputError(f"step_cache: {threshold} is outside 0..{STEP_CACHE_MAX}; 0 is off, "
                         "0.05-0.15 is the useful range.")
    return value


def enable_step_cache(transformer: nn.Module, threshold: float) -> bool:
    """diffusers' First Block Cache: every step runs the first block; when its output changed
    less than `threshold` (relative mean) since the last full step, the other blocks are skipped
    and their cached residual is reused. Returns whether it is on."""
    from diffusers.hooks import FirstBlockCacheConfig

    threshold = check_step_cache(threshold)
    if threshold == 0.0:
        return False
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    from .context_parallel import share_step_cache_decision

    share_step_cache_decision(transformer)  # split over ranks: one decision for all of them
    return True


def step_cache_enabled(transformer: nn.Module) -> bool:
    return bool(getattr(transformer, "is_cache_enabled", False))


@contextmanager
def step_cache_run(transformer: nn.Module, name: str = "uso"):
    """One image's denoising: fresh cache state before it and dropped after it, so image i of a
    batch equals a single run with its seed and no run sees another's residuals."""
    if not step_cache_enabled(transformer):
        yield
        return
    transformer._reset_stateful_cache()
    try:
        with transformer.cache_context(name):
            yield
    finally:
        transformer._reset_stateful_cache()


class StepCounter:
    """Counts the steps whose last block really ran (for the benchmark: with the step cache on,
    the other steps reused the cached residual). Hooks a layer inside the last block, because the
    cache skips the block's body but not the call to the block itself."""

    def __init__(self, transformer: nn.Module):
        blocks = list(getattr(transformer, "single_transformer_blocks", []))
        self.block = getattr(blocks[-1], "norm", blocks[-1]) if blocks else None
        self.calls = 0
        self._handle = None

    def __enter__(self):
        if self.block is not None:
            def count(_module, _inputs, _output):
                self.calls += 1
            self._handle = self.block.register_forward_hook(count)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()


def apply(transformer: nn.Module, settings: SpeedSettings, device: torch.device,
          dtype: torch.dtype) -> dict:
    """All speed options, in the order they have to go on: attention, step cache, compile (last,
    so the compiled blocks include the cache hooks). Returns what was applied."""
    applied = {"attention": set_attention(transformer, settings.attention, device, dtype),
               "step_cache": 0.0, "compile": False}
    threshold = check_step_cache(settings.step_cache)
    if not isinstance(settings.compile, bool):
        raise InputError(f"compile: expected true or false, got {settings.compile!r}.")
    if settings.compile:
        why_not = compile_available(device)
        if why_not:
            raise InputError(f"compile: {why_not}. Turn compile off.")
    if enable_step_cache(transformer, threshold):
        applied["step_cache"] = threshold
    if settings.compile:
        enable_regional_compile(transformer, device)
        applied["compile"] = True
    return applied
