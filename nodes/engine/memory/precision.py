"""Precision: which dtypes each model is stored and computed in, for the chosen device and what
the chosen files store."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .device_facts import DeviceFacts, mac_bf16, mac_version, rocm_native_bf16

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn")
#: What a weight file stores (`FileStorage`), read from its header before loading.
FP8_KINDS = ("fp8", "scaled_fp8")
_SIXTEEN_BIT = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FileStorage:
    """What the chosen transformer and T5 files store: "fp8", "scaled_fp8", "gguf" (transformer
    only), "bf16", "fp16" or "fp32"."""

    transformer: str = "bf16"
    t5: str = "bf16"


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype          # the DiT's compute dtype (and x's dtype while sampling)
    fp8_storage: bool             # DiT Linear weights stored as float8_e4m3fn
    text: torch.dtype             # T5 / CLIP-L compute
    vision: torch.dtype           # SigLIP + projector input side
    vae: torch.dtype
    #: T5's Linear weights (but `wo`, `fp8.t5_storable`) stored in this dtype and upcast per layer
    #: to `text`: an fp8 file's own fp8, or the file's 16 bits where T5 computes in fp32.
    #: None: stored in `text`.
    t5_storage: torch.dtype | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or for None / "auto" the first of CUDA (ROCm included), Apple's MPS, Intel's XPU
    that this torch has, else the CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 in hardware. `torch.cuda.is_bf16_supported()` also counts the
    emulated bf16 of pre-Ampere cards (T4, RTX 20xx, V100: compute capability < 8.0), which runs far
    slower than their fp16, and it asks about the current device, not the chosen one."""
    if device.type == "cpu":
        return True
    if device.type == "mps":
        return mac_bf16(mac_version())
    if device.type == "xpu":
        return bool(torch.xpu.is_bf16_supported())
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return rocm_native_bf16(torch.cuda.get_device_properties(device).gcnArchName)
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


_FORCED = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.float32: "fp32"}


def resolve_precision(precision: str, device: torch.device, stored: FileStorage | None = None,
                      native: bool | None = None, facts: DeviceFacts | None = None) -> Precision:
    """The dtypes for `precision` on `device`. "auto": fp32 on the CPU; on a GPU an fp8 or scaled
    fp8 file keeps fp8 storage (transformer and T5) and 16-bit files stay 16-bit, computing in bf16
    where the card has it natively, else in fp16. T5 never computes in fp16 (its activations
    overflow there): on fp16 cards it computes in fp32 from weights stored as the file has them.
    `native`: whether the card runs bf16 natively, for a card that is only simulated (the plan
    table); None asks `device`.

    `facts` (`DeviceFacts`): the device's abilities and what the user forced (inside ComfyUI its
    flags). Under "auto" a forced transformer dtype (`--bf16-unet`, `--fp8_e4m3fn-unet`,
    `--force-fp32` ...) wins over the file's; a forced text or VAE dtype replaces ours. Where the
    device cannot hold float8 tensors (MPS, DirectML) an fp8 file is upcast as it loads, and an
    explicit 'fp8_e4m3fn' is refused. Where fp16 attention fails (`facts.fp16_attention_fails`:
    MPS on macOS 14.5+, where it gives black images) and bf16 runs, the transformer computes in
    bf16 instead of a forced fp16, and an explicit 'fp16' is refused."""
    if precision not in PRECISIONS:
        raise InputError(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}.")
    stored = stored or FileStorage()
    if facts is not None and native is None:
        native = facts.native_bf16
    fp8_ok = facts is None or facts.fp8_storage
    if precision == "fp8_e4m3fn" and not fp8_ok:
        raise InputError(f"precision: 'fp8_e4m3fn' stores weights as float8, which PyTorch cannot hold on "
                         f"{facts.kind} ({facts.device}); choose precision 'auto' (an fp8 file is then upcast to "
                         f"16 bits as it loads) or 'bf16' / 'fp16', or a GGUF transformer to save memory.")
    forced = precision == "auto" and facts is not None and facts.unet_dtype in _FORCED
    if forced:
        precision = _FORCED[facts.unet_dtype]
        if precision == "fp8_e4m3fn" and not fp8_ok:
            precision = "auto"
    asked = precision
    bf16_ok = native_bf16(device) if native is None else native
    if precision == "auto":
        if device.type == "cpu":
            precision = "fp32"
        elif stored.transformer in FP8_KINDS and fp8_ok:
            precision = "fp8_e4m3fn"
        else:
            precision = "bf16" if bf16_ok else "fp16"
    elif precision == "bf16" and not bf16_ok and device.type == "cuda":
        # Named explicitly: emulated bf16 is slow but it is what was asked for, where it runs at all.
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=True)
    elif precision == "bf16" and not bf16_ok and (device.type == "cpu" or (forced and device.type != "mps")):
        # The CPU runs bf16 (slowly: ComfyUI's should_use_bf16 says no there), and --bf16-unet is an order;
        # MPS before macOS 14 cannot, whatever is asked.
        bf16_ok = True
    if precision == "fp32":
        return _forced(Precision(torch.float32, False, torch.float32, torch.float32, torch.float32), facts)
    black_fp16 = facts is not None and facts.fp16_attention_fails and bf16_ok
    if precision == "fp16" and black_fp16 and not forced:
        raise InputError(f"precision: 'fp16' attention gives black images on {facts.kind} ({facts.device}), "
                         "where ComfyUI computes it in fp32 (macOS 14.5 or newer, or --force-upcast-attention); "
                         "choose precision 'auto' or 'bf16' (bf16 runs here).")
    # fp8 storage computes in fp16 where bf16 is only emulated (upcasting fp8 to fp16 is exact too).
    compute = torch.bfloat16 if bf16_ok and (precision != "fp16" or black_fp16) else torch.float16
    text = torch.bfloat16 if compute == torch.bfloat16 else torch.float32
    if stored.t5 in FP8_KINDS and asked in ("auto", "fp8_e4m3fn") and fp8_ok:
        t5_storage = torch.float8_e4m3fn
    elif text == torch.float32:
        t5_storage = _SIXTEEN_BIT.get(stored.t5)
    else:
        t5_storage = None
    return _forced(Precision(compute, precision == "fp8_e4m3fn", text, torch.float32, torch.float32, t5_storage),
                   facts)


def _forced(chosen: Precision, facts: DeviceFacts | None) -> Precision:
    """`chosen` with the text encoders' and the VAE's dtypes the user (or the device's host) forced."""
    if facts is None:
        return chosen
    text, vae = chosen.text, chosen.vae
    t5_storage = chosen.t5_storage
    if facts.text_dtype is not None:
        if facts.text_dtype == torch.float8_e4m3fn:
            if facts.fp8_storage:
                t5_storage = torch.float8_e4m3fn
        else:
            text = facts.text_dtype
            t5_storage = None if t5_storage != torch.float8_e4m3fn or not facts.fp8_storage else t5_storage
    if facts.vae_dtype is not None:
        vae = facts.vae_dtype
    return Precision(chosen.compute, chosen.fp8_storage, text, chosen.vision, vae, t5_storage)
