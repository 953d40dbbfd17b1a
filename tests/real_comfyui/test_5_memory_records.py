"""Memory shared through ComfyUI's own model management, read from ComfyUI's own records.

A real ComfyUI 0.8.0 server (--cpu) runs, in turn, a native model (Load VAE "taef1" + VAE Decode:
ComfyUI's TAESD, random weights made with ComfyUI's own class) and the pack's USO workflow, and a
test-only extension (memory_records_extension/, linked into custom_nodes here only) serves
comfy.model_management.current_loaded_models at GET /uso_test/loaded_models.

What this shows on the CPU:
- each USO module (transformer, VAE, T5, CLIP-L, SigLIP, projector) is a model in ComfyUI's
  records, on ComfyUI's device, with its size, beside the native TAESD (one graph with both:
  ComfyUI drops a node's outputs, the native VAE with them, when the next graph lacks the node);
- ComfyUI unloads ours when it needs memory: the USOTestNeedMemory node asks ComfyUI's free_memory
  for more than is free (what load_models_gpu asks when a model does not fit), and POST /free
  (unload_models) empties the records, ours included; the next USO run lists ours again;
- a native-only graph after that lists only the native model (nothing of ours is reloaded).

What the CPU cannot show, and why: ComfyUI 0.8.0's load_models_gpu calls free_memory only for
devices other than the CPU (model_management.load_models_gpu: `if device != torch.device("cpu")`),
so on --cpu loading a model never unloads another: in the graph with both, loading ours leaves
the native TAESD listed. Expectation on a GPU (same code path, device cuda):
loading ours calls load_models_gpu(ours, memory_required=the job's working memory: 1 GiB to sample,
3 GiB to decode, 0.5 GiB to encode), which frees model_size x 1.1 + that + ComfyUI's reserve of VRAM
by unloading ComfyUI's models (TAESD, a native
FLUX) when less is free; a native node's load_models_gpu unloads our modules (the engine's
placement moves them to the CPU) when it needs the room, and our next run places them again.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

import real_comfyui as rc

EXTENSION = rc.PACK_ROOT / "tests" / "real_comfyui" / "memory_records_extension"
OURS = {"USOFluxTransformer2DModel", "USOAutoencoderKL", "USOT5EncoderModel", "USOCLIPTextModel",
        "USOSiglipVisionModel", "USOStyleProjector"}

_WRITE_TAEF1 = r"""
import sys
comfy_dir, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.taesd.taesd
from safetensors.torch import save_file

torch.manual_seed(0)
net = comfy.taesd.taesd.TAESD(latent_channels=16)
save_file(net.taesd_encoder.state_dict(), out + "/taef1_encoder.safetensors")
save_file(net.taesd_decoder.state_dict(), out + "/taef1_decoder.safetensors")
"""


@pytest.fixture(scope="module")
def server(comfy_stage, comfy_venv, request):
    approx = comfy_stage.models_dir / "vae_approx"
    approx.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(rc.venv_python(comfy_venv)), "-c", _WRITE_TAEF1, str(comfy_stage.comfy_dir), str(approx)],
                   check=True, capture_output=True, timeout=300)
    link = comfy_stage.comfy_dir / "custom_nodes" / "uso_test_memory_records"
    link.symlink_to(EXTENSION, target_is_directory=True)
    request.addfinalizer(link.unlink)
    srv = comfy_stage.server("memory", comfy_venv)
    request.addfinalizer(srv.stop)
    return srv.start()


def native(width: int) -> dict:
    """Load VAE (taef1) + VAE Decode of an empty FLUX latent + Preview: ComfyUI's own model."""
    return {"901": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": 32, "batch_size": 1}},
            "902": {"class_type": "VAELoader", "inputs": {"vae_name": "taef1"}},
            "903": {"class_type": "VAEDecode", "inputs": {"samples": ["901", 0], "vae": ["902", 0]}},
            "904": {"class_type": "PreviewImage", "inputs": {"images": ["903", 0]}}}


def uso(seed: int) -> dict:
    return rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_style.json"), seed=seed)


def need_memory() -> dict:
    return {"999": {"class_type": "USOTestNeedMemory", "inputs": {"extra_mib": 4096}}}


def records(server) -> list[dict]:
    return server.get("/uso_test/loaded_models")


def names(rows) -> list[str]:
    return [r["model"] for r in rows]


def run_ok(server, prompt):
    run = server.run(prompt)
    assert run.status == "success", run.describe()
    return run


def show(step: str, rows) -> None:
    listed = ", ".join(f"{r['model']} ({r['device']}, size {r['size']}, loaded {r['loaded']})" for r in rows)
    print(f"[ComfyUI records] {step}: {listed or '(none)'}")


def test_native_and_uso_models_in_comfyuis_records(server):
    print()
    run_ok(server, native(32))
    after_native = records(server)
    show("after the native VAE Decode", after_native)
    assert names(after_native) == ["TAESD"]
    assert after_native[0]["device"] == "cpu" and after_native[0]["loaded"] == after_native[0]["size"] > 0

    # One graph with both (ComfyUI drops a node's outputs, the native VAE included, when the next
    # graph no longer has that node; the pack keeps its loaded models across graphs).
    both = {**native(40), **uso(1)}
    run_ok(server, both)
    after_both = records(server)
    show("after a graph with the native VAE Decode and USO", after_both)
    uso_rows = [r for r in after_both if r["patcher"] == "USOModelPatcher"]
    assert {r["model"] for r in uso_rows} == OURS
    for r in uso_rows:
        assert r["device"] == "cpu" and r["loaded"] == r["size"] > 0
    # CPU: loading ours made ComfyUI unload nothing (0.8.0 frees memory only on non-CPU devices).
    assert [r["model"] for r in after_both if r["patcher"] != "USOModelPatcher"] == ["TAESD"]

    # The same graph (its nodes cached) plus a node that needs more memory than is free.
    need = run_ok(server, {**both, **need_memory()})
    unloaded = need.entry["outputs"]["999"]["unloaded"]
    after_need = records(server)
    show(f"after a node needed 4 GiB more than free (ComfyUI unloaded {unloaded})", after_need)
    assert set(unloaded) == OURS | {"TAESD"}
    assert after_need == []

    run_ok(server, {**native(40), **uso(2)})  # a new seed: USO Generate runs, the native nodes are cached
    again = records(server)
    show("after USO again (new seed)", again)
    assert set(names(again)) == {"USOAutoencoderKL", "USOFluxTransformer2DModel"}  # the prompt was cached

    server.free(unload_models=True, free_memory=False)
    deadline = time.monotonic() + 30  # the prompt worker handles the flag when it wakes
    while records(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    show("after POST /free unload_models", records(server))
    assert records(server) == []

    run_ok(server, native(48))
    last = records(server)
    show("after a native-only graph", last)
    assert names(last) == ["TAESD"]  # ours stay unloaded: nothing of ours ran
