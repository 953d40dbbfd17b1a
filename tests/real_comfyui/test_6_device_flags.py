"""ComfyUI's flags mean for USO what they mean for ComfyUI's own nodes: the real ComfyUI 0.8.0
modules parse a command line with several flags (device_flags_probe.py, one process per line), and
the pack's `bridge.device_facts` and the engine's precision must show them. CPU only (--cpu)."""
from __future__ import annotations

import pytest

import real_comfyui as rc

GIB = 1024 ** 3


def probe(comfy_stage, comfy_venv, tmp_path_factory, flags):
    work = tmp_path_factory.mktemp("device_flags")
    return rc.run_probe("device_flags_probe.py", {"comfyui": str(comfy_stage.comfy_dir), "pack": str(rc.PACK_ROOT),
                                                  "work": str(work), "flags": flags},
                        work, comfy_venv, comfy_stage.server_env)


def test_force_fp16_cpu_vae_reserve_and_no_pinning(comfy_stage, comfy_venv, tmp_path_factory):
    seen = probe(comfy_stage, comfy_venv, tmp_path_factory,
                 ["--force-fp16", "--cpu-vae", "--reserve-vram", "1", "--disable-pinned-memory",
                  "--fp16-text-enc", "--fp32-vae", "--disable-mmap"])
    assert seen["kind"] == "cpu" and seen["unet_dtype"] == "torch.float16"
    assert seen["auto"] == {"compute": "torch.float16", "text": "torch.float16", "vae": "torch.float32"}
    assert seen["vae_device"] == "cpu" and seen["reserve_bytes"] == GIB
    assert not seen["pin_allowed"] and seen["pipeline_facts_are_comfyuis"]


@pytest.mark.parametrize("flags, unet, compute", [(["--force-fp32"], "torch.float32", "torch.float32"),
                                                  (["--bf16-unet"], "torch.bfloat16", "torch.bfloat16"),
                                                  (["--force-upcast-attention"], "None", "torch.float32"),
                                                  ([], "None", "torch.float32")])
def test_transformer_dtype_flags(comfy_stage, comfy_venv, tmp_path_factory, flags, unet, compute):
    seen = probe(comfy_stage, comfy_venv, tmp_path_factory, flags)
    assert seen["unet_dtype"] == unet and seen["auto"]["compute"] == compute
    assert seen["vram_state"] == "disabled" and seen["text_device"] == "cpu"
    assert seen["fp16_attention_fails"] is ("--force-upcast-attention" in flags)
