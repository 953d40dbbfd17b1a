"""Inside ComfyUI the pack reads the device and the user's flags through comfy.model_management
and comfy.cli_args (`bridge.device_facts`). Here both are imitated by monkeypatch with ComfyUI
0.8.0's rules for the functions the bridge calls; tests/real_comfyui/test_6_device_flags.py
checks the same against the real modules of a running ComfyUI."""
from __future__ import annotations

import enum
import types

import pytest
import torch

from nodes.comfyui import bridge
from nodes.engine import memory
from nodes.engine.errors import InputError

GIB = 1024 ** 3


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


FLAGS = ("force_fp32", "force_fp16", "fp16_unet", "bf16_unet", "fp32_unet", "fp8_e4m3fn_unet",
         "fp8_e4m3fn_text_enc", "fp16_text_enc", "bf16_text_enc", "fp32_text_enc", "fp16_vae", "bf16_vae",
         "fp32_vae", "cpu_vae", "lowvram", "novram", "highvram", "gpu_only", "disable_pinned_memory",
         "disable_mmap", "force_upcast_attention")


def comfy(device="cuda", amd=False, directml=False, mac=(14, 5), reserve_vram=None, **flags):
    """(model_management, args) as ComfyUI 0.8.0 sets them for `device` and the flags."""
    args = types.SimpleNamespace(**{f: False for f in FLAGS}, reserve_vram=reserve_vram)
    for name, value in flags.items():
        setattr(args, name, value)
    if args.force_fp16:
        args.fp16_unet = True   # cli_args does this
    dev = torch.device(device)
    state = VRAMState.NORMAL_VRAM
    if args.lowvram:
        state = VRAMState.LOW_VRAM
    elif args.novram:
        state = VRAMState.NO_VRAM
    elif args.highvram or args.gpu_only:
        state = VRAMState.HIGH_VRAM
    if dev.type == "mps":
        state = VRAMState.SHARED
    mm = types.SimpleNamespace(directml_enabled=directml, vram_state=state, MAX_PINNED_MEMORY=-1 if (
        args.disable_pinned_memory or dev.type == "mps") else 60 * GIB, TOTAL_PINNED_MEMORY=2 * GIB)

    def should_use_bf16(d=None, **_):
        if args.force_fp32 or directml:
            return False
        if dev.type == "mps":
            return mac >= (14,)
        return True

    def should_use_fp16(d=None, **_):
        return not args.force_fp32 or args.force_fp16

    def unet_dtype(d=None, model_params=0, supported_dtypes=(), weight_dtype=None):
        for flag, dt in (("fp32_unet", torch.float32), ("bf16_unet", torch.bfloat16), ("fp16_unet", torch.float16),
                         ("fp8_e4m3fn_unet", torch.float8_e4m3fn)):
            if getattr(args, flag):
                return dt
        return torch.bfloat16 if should_use_bf16() else torch.float32

    def text_encoder_device():
        if args.gpu_only:
            return dev
        return dev if state in (VRAMState.HIGH_VRAM, VRAMState.NORMAL_VRAM) else torch.device("cpu")

    mm.get_torch_device = lambda: dev
    mm.is_amd = lambda: amd
    mm.should_use_bf16, mm.should_use_fp16, mm.unet_dtype = should_use_bf16, should_use_fp16, unet_dtype
    mm.supports_cast = lambda d, dt: not (directml or dev.type == "mps")
    mm.get_total_memory = lambda d=None: 24 * GIB if dev.type != "mps" else 64 * GIB
    mm.get_free_memory = lambda d=None: 20 * GIB if dev.type != "mps" else 22 * GIB
    mm.text_encoder_device = text_encoder_device
    mm.text_encoder_dtype = lambda d=None: torch.float16
    mm.vae_device = lambda: torch.device("cpu") if args.cpu_vae else dev
    mm.force_upcast_attention_dtype = lambda: {torch.float16: torch.float32} if (
        args.force_upcast_attention or (dev.type == "mps" and mac >= (14, 5))) else None
    mm.extra_reserved_memory = lambda: int((reserve_vram if reserve_vram is not None else 0.4) * GIB)
    return mm, args


@pytest.fixture
def facts(monkeypatch):
    def read(**kwargs):
        mm, args = comfy(**kwargs)
        monkeypatch.setattr(bridge, "_mm", mm)
        monkeypatch.setattr(bridge, "_args", args)
        return bridge.device_facts()
    return read


def auto(f, stored=memory.FileStorage()):
    return memory.resolve_precision("auto", f.torch_device, stored, facts=f)


def test_outside_comfyui_there_are_no_facts(monkeypatch):
    monkeypatch.setattr(bridge, "_mm", None)
    assert bridge.device_facts() is None


def test_no_flags_on_an_nvidia_card(facts):
    f = facts()
    assert (f.kind, f.native_bf16, f.fp8_storage, f.vram_state) == ("cuda", True, True, "normal")
    assert f.unet_dtype is None and f.text_device is None and f.vae_device is None
    assert f.reserve_bytes == int(0.4 * GIB) and f.pin_allowed and f.pin_cap_bytes == 58 * GIB
    assert auto(f).compute == torch.bfloat16


def test_force_fp32_and_force_fp16(facts):
    assert auto(facts(force_fp32=True), memory.FileStorage("fp8", "fp8")).compute == torch.float32
    assert auto(facts(force_fp16=True)).compute == torch.float16


def test_fp8_unet_text_and_vae_flags(facts):
    f = facts(fp8_e4m3fn_unet=True, fp16_text_enc=True, fp32_vae=True, cpu_vae=True)
    p = auto(f)
    assert p.fp8_storage and p.text == torch.float16 and p.vae == torch.float32 and f.vae_device == "cpu"


@pytest.mark.parametrize("flag, state, text_device", [("lowvram", "low", "cpu"), ("novram", "no", "cpu"),
                                                      ("highvram", "high", None), ("gpu_only", "high", None)])
def test_vram_flags(facts, flag, state, text_device):
    f = facts(**{flag: True})
    assert f.vram_state == state and f.text_device == text_device


def test_reserve_and_pinning_flags(facts):
    f = facts(reserve_vram=3, disable_pinned_memory=True)
    assert f.reserve_bytes == 3 * GIB and not f.pin_allowed


def test_a_mac_in_comfyui(facts):
    f = facts(device="mps")
    assert f.kind == "mps" and f.unified and not f.fp8_storage and f.text_device == "cpu"
    p = auto(f, memory.FileStorage("fp8", "fp8"))
    assert (p.compute, p.text, p.fp8_storage) == (torch.bfloat16, torch.float16, False)
    assert auto(facts(device="mps", mac=(13, 6))).compute == torch.float16
    assert f.plan_free_bytes() == 64 * GIB - memory.device_facts.UNIFIED_SYSTEM_BYTES - f.reserve_bytes


def test_where_comfyui_upcasts_fp16_attention_a_forced_fp16_computes_in_bf16(facts):
    # macOS 14.5+ (ComfyUI's black-image rule) or --force-upcast-attention, with bf16 available.
    for f in (facts(device="mps", mac=(14, 5), force_fp16=True), facts(force_upcast_attention=True, force_fp16=True)):
        assert f.fp16_attention_fails and auto(f).compute == torch.bfloat16
        with pytest.raises(InputError, match="^precision: 'fp16' attention gives black images"):
            memory.resolve_precision("fp16", f.torch_device, facts=f)
    f = facts(device="mps", mac=(14, 4), force_fp16=True)
    assert not f.fp16_attention_fails and auto(f).compute == torch.float16


def test_amd_and_directml(facts):
    assert not facts(amd=True).vae_sdpa and facts(amd=True).kind == "rocm"
    d = facts(device="cpu", directml=True)
    assert d.kind == "directml" and d.total_bytes is None and d.free_bytes is None and "DirectML" in d.note
    assert not d.generator and d.positions_on_cpu and not d.fp8_storage
