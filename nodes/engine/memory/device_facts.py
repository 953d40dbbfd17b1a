"""What the run device can do and what the user forced for it: the one input precision
(`precision.resolve_precision`) and the memory plan (`plan.plan_memory`) read about the device.

Outside ComfyUI `DeviceFacts.probe(device)` reads torch's own facts; inside ComfyUI the bridge
builds the same record from comfy.model_management's decisions and its command-line flags
(`bridge.device_facts`), so `--force-fp32`, `--bf16-unet`, `--cpu-vae`, `--lowvram`,
`--reserve-vram` ... mean for USO what they mean for ComfyUI's own nodes. The per-kind rules
(`DeviceFacts.of_kind`) serve both and the tests, which imitate a device by its kind.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace

import torch

from .host import host_memory

DEVICE_KINDS = ("cuda", "rocm", "mps", "xpu", "directml", "cpu")
#: ComfyUI's memory states (`comfy.model_management.VRAMState`), lower-cased.
VRAM_STATES = ("normal", "low", "no", "high", "shared", "disabled")
#: AMD architectures with bf16 in hardware: CDNA2 and newer (gfx90a, gfx94x, gfx95x), RDNA3 and
#: newer (gfx11xx, gfx12xx). RDNA2 and older (gfx1030, gfx1010, gfx906 ...) only emulate it.
ROCM_BF16_PREFIXES = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")
#: What a Mac's unified RAM keeps besides the weights: the OS, the window server and other
#: programs (4 GiB), the Python process with torch (2 GiB). Planning uses the rest as one pool for
#: the weights on the device and on the host.
UNIFIED_SYSTEM_BYTES = 6 * 1024 ** 3


def rocm_native_bf16(arch: str) -> bool:
    """Whether an AMD architecture (torch's `gcnArchName`, e.g. "gfx1100", "gfx90a:sramecc+:xnack-")
    runs bf16 in hardware."""
    return arch.split(":")[0].startswith(ROCM_BF16_PREFIXES)


def mac_bf16(version: tuple[int, ...] | None) -> bool:
    """Whether PyTorch's MPS backend runs bf16 on this macOS: from macOS 14 (Sonoma) on, as
    ComfyUI's `should_use_bf16` decides; before that bf16 tensors raise on MPS."""
    return version is not None and version >= (14,)


def mac_fp16_attention_fails(version: tuple[int, ...] | None) -> bool:
    """Whether fp16 attention on MPS gives black images on this macOS: from macOS 14.5 on, where
    ComfyUI upcasts it to fp32 (`force_upcast_attention_dtype`)."""
    return version is not None and version >= (14, 5)


def mac_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(n) for n in platform.mac_ver()[0].split("."))
    except ValueError:
        return None


def device_kind(device: torch.device) -> str:
    """The kind of `device`: ROCm builds of torch call AMD GPUs "cuda"; DirectML's device is
    "privateuseone"."""
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    if device.type == "privateuseone":
        return "directml"
    return device.type if device.type in DEVICE_KINDS else "cpu"


@dataclass(frozen=True)
class DeviceFacts:
    device: str                      # torch's name of the device ("cuda:0", "mps", "privateuseone:0", "cpu")
    kind: str                        # DEVICE_KINDS
    native_bf16: bool                # bf16 in hardware (not emulated)
    fp16_ok: bool
    fp8_storage: bool                # float8 tensors can live on the device (not on MPS, not DirectML)
    total_bytes: int | None = None   # the device's memory (a Mac: its unified RAM)
    #: Free now; None: not known (then `total_bytes` is used). Not compared: facts read at two
    #: moments are the same device with the same choices (a loaded pipeline stays cached).
    free_bytes: int | None = field(default=None, compare=False)
    unified: bool = False            # the host and the device share one RAM (Apple Silicon)
    positions_on_cpu: bool = False   # no float64 on the device: FLUX's position embedding runs on the CPU
    generator: bool = True           # torch.Generator exists for the device (not on DirectML)
    vae_sdpa: bool = True            # the VAE's attention through SDPA (off on AMD, as ComfyUI does)
    #: fp16 attention must not run here (MPS on macOS 14.5+: black images; ComfyUI upcasts it to fp32,
    #: and also under --force-upcast-attention): the transformer computes in bf16 instead of fp16.
    fp16_attention_fails: bool = False
    # -- what the user (ComfyUI's flags) forced; None: decided from the facts above --
    unet_dtype: torch.dtype | None = None   # --bf16-unet, --fp8_e4m3fn-unet, --force-fp32 ...
    text_dtype: torch.dtype | None = None   # --fp16-text-enc ... (and ComfyUI's fp16 T5 on a Mac)
    text_device: str | None = None          # "cpu": T5 and CLIP-L run on the host
    vae_dtype: torch.dtype | None = None    # --fp32-vae, --bf16-vae, --fp16-vae
    vae_device: str | None = None           # "cpu": --cpu-vae
    vram_state: str = "normal"              # VRAM_STATES (--lowvram, --novram, --highvram, --gpu-only)
    reserve_bytes: int = 0                  # --reserve-vram: kept free for other programs
    pin_allowed: bool = True                # --disable-pinned-memory turns it off
    #: At most this much page-locked (ComfyUI's own cap, less what it pinned); not compared, like free_bytes.
    pin_cap_bytes: int | None = field(default=None, compare=False)
    #: Where the free figure came from, said in the plan's reason when it is not the device's own.
    note: str = ""

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @classmethod
    def of_kind(cls, kind: str, device: str | None = None, total_bytes: int | None = None,
                free_bytes: int | None = None, native_bf16: bool | None = None, **forced) -> "DeviceFacts":
        """The facts every device of `kind` shares; `native_bf16` where the model decides it (CUDA:
        compute capability 8.0+; ROCm: `rocm_native_bf16`; MPS: `mac_bf16`; XPU: torch says)."""
        if kind not in DEVICE_KINDS:
            raise ValueError(f"device kind '{kind}' is not one of {', '.join(DEVICE_KINDS)}")
        default = {"cuda": "cuda", "rocm": "cuda", "mps": "mps", "xpu": "xpu", "directml": "privateuseone:0",
                   "cpu": "cpu"}[kind]
        facts = cls(
            device=device or default, kind=kind,
            native_bf16=(True if kind == "cpu" else kind in ("cuda", "rocm", "mps", "xpu"))
            if native_bf16 is None else native_bf16,
            fp16_ok=kind != "cpu",
            fp8_storage=kind in ("cuda", "rocm", "xpu", "cpu"),
            total_bytes=total_bytes, free_bytes=free_bytes,
            unified=kind == "mps",
            positions_on_cpu=kind in ("xpu", "directml"),
            generator=kind != "directml",
            vae_sdpa=kind != "rocm",
            # ComfyUI runs T5 on a Mac's CPU in fp16 (text_encoder_device / text_encoder_dtype).
            text_dtype=torch.float16 if kind == "mps" else None,
            text_device="cpu" if kind == "mps" else None,
            vram_state="shared" if kind == "mps" else ("disabled" if kind == "cpu" else "normal"),
        )
        return replace(facts, **forced)

    @classmethod
    def probe(cls, device: torch.device | str) -> "DeviceFacts":
        """The facts of `device` from torch (outside ComfyUI)."""
        device = torch.device(device)
        kind = device_kind(device)
        if kind in ("cuda", "rocm"):
            free, total = torch.cuda.mem_get_info(device)
            if kind == "rocm":
                native = rocm_native_bf16(torch.cuda.get_device_properties(device).gcnArchName)
            else:
                native = torch.cuda.get_device_capability(device)[0] >= 8
            return cls.of_kind(kind, str(device), int(total), int(free), native)
        if kind == "mps":
            host, version = host_memory(), mac_version()
            return cls.of_kind(kind, str(device), host.total if host else None, host.available if host else None,
                               mac_bf16(version), fp16_attention_fails=mac_fp16_attention_fails(version))
        if kind == "xpu":
            total = int(torch.xpu.get_device_properties(device).total_memory)
            reserved = int(torch.xpu.memory_reserved(device))
            return cls.of_kind(kind, str(device), total, total - reserved, bool(torch.xpu.is_bf16_supported()))
        if kind == "directml":
            return cls.of_kind(kind, str(device))
        return cls.of_kind("cpu", "cpu")

    def plan_free_bytes(self) -> int | None:
        """The device memory the plan may use: on unified memory the whole RAM less the system's
        share (the weights already loaded sit in that same RAM, so the free figure read after
        loading would count them twice); else the free figure, or the total where no free figure
        exists (DirectML); less `reserve_bytes`. None: unknown (no bound)."""
        if self.unified and self.total_bytes is not None:
            base = self.total_bytes - UNIFIED_SYSTEM_BYTES
        elif self.free_bytes is not None:
            base = self.free_bytes
        else:
            base = self.total_bytes
        return None if base is None else max(0, base - self.reserve_bytes)
