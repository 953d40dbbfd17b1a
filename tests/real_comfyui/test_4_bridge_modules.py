"""nodes/comfyui/bridge.py against ComfyUI 0.8.0's own modules (folder_paths, model_management,
model_patcher, utils.ProgressBar, server.PromptServer), imported in ComfyUI's Python with the pack's
requirements (bridge_probe.py, one process, about 15 s). Every ComfyUI-side branch of the bridge
runs here; the ComfyUI-absent side runs in the plain suite.

CPU only (--cpu): ComfyUI's records are checked on the CPU device. What only a GPU shows (ComfyUI
freeing VRAM before it loads ours, our release moving weights off the GPU) is described in
test_5_memory_records.py's docstring.
"""
from __future__ import annotations

import pytest

import real_comfyui as rc

OURS = {"USOFluxTransformer2DModel", "USOAutoencoderKL", "USOT5EncoderModel", "USOCLIPTextModel",
        "USOSiglipVisionModel", "USOStyleProjector"}


@pytest.fixture(scope="module")
def seen(comfy_stage, comfy_venv, tmp_path_factory):
    work = tmp_path_factory.mktemp("bridge_probe")
    return rc.run_probe("bridge_probe.py", {
        "comfyui": str(comfy_stage.comfy_dir), "pack": str(rc.PACK_ROOT),
        "models": str(comfy_stage.tiny_models.models_dir),
        "tokenizers": str(comfy_stage.tiny_models.paths["tokenizer_t5"].parent), "work": str(work)},
        work, comfy_venv, comfy_stage.server_env)


def ours(rows):
    return [r for r in rows if r["ours"]]


def test_the_bridge_uses_comfyuis_modules(seen):
    assert seen["bridge_sees_comfyui"]
    assert seen["torch_device"] == "cpu"  # ComfyUI's device under --cpu, passed on to the engine


def test_gguf_files_are_listed_through_comfyuis_folder_lists(seen):
    assert seen["gguf_folder"] == {"extensions": [".gguf"], "shares_diffusion_models_list": True,
                                   "same_entry_after_second_call": True}
    listing = seen["listing"]
    # A .gguf (hidden by ComfyUI's own extension filter) shows; a .txt does not; the folder that
    # contains a link to itself lists each file once and takes no time.
    assert listing["first"] == ["flux1-dev-Q8_0.gguf", "sub/flux1-dev.safetensors"]
    assert listing["seconds_with_symlink_loop"] < 5
    # A file added later shows on the next listing (what ComfyUI's Refresh asks for).
    assert listing["after_new_file"] == ["flux1-dev-Q8_0.gguf", "flux1-schnell.safetensors",
                                         "sub/flux1-dev.safetensors"]
    assert listing["unknown_folder"] == [] and listing["unknown_folder_paths"] == []
    assert listing["diffusers"] == ["FLUX.1-dev"]
    assert seen["resolved"] and seen["user_directory"]


def test_comfyuis_shipped_tokenizers_are_found_and_load(seen):
    assert seen["tokenizers"] == {"clip_l": {"folder": "comfy/sd1_tokenizer", "vocab": 49408},
                                  "t5": {"folder": "comfy/text_encoders/t5_tokenizer", "vocab": 32100}}


def test_cancel_is_comfyuis_interrupt(seen):
    assert seen["cancel"] == {"comfy_flag_after_request": True, "bridge_sees_it": True,
                              "raised": "comfy.model_management.InterruptProcessingException",
                              "flag_after_raise": False}


def test_progress_goes_through_comfyuis_progress_bar_and_server(seen):
    assert seen["progress"] == [[1, 4, "7"], [3, 4, "7"], [9, 10, "7"]]
    # The server's binary progress-text frame: node id "7", then the text.
    assert len(seen["progress_text"]) == 1 and seen["progress_text"][0].endswith("7status: queued")


def test_our_modules_are_comfyui_models_with_their_sizes(seen):
    native = seen["native_only"]
    assert [r["model"] for r in native] == ["TAESD"] and native[0]["loaded"] == native[0]["size"] > 0
    # Planning: free memory plus what ComfyUI's own models hold (ComfyUI unloads them for ours).
    avail = seen["available_bytes"]
    assert avail["native_loaded"] == native[0]["loaded"]
    assert abs(avail["value"] - (avail["comfy_free"] + avail["native_loaded"])) < 64 << 20  # RAM moves a bit
    rows = ours(seen["after_uso_load"])
    sizes = {"USOFluxTransformer2DModel": "transformer", "USOAutoencoderKL": "vae", "USOT5EncoderModel": "t5",
             "USOCLIPTextModel": "clip", "USOSiglipVisionModel": "siglip", "USOStyleProjector": "projector"}
    assert {r["model"] for r in rows} == OURS  # "gpu" mode: placed (announced) when loaded
    for r in rows:
        assert r["device"] == "cpu"
        assert r["size"] == r["loaded"] == seen["module_bytes"][sizes[r["model"]]]
    # Loading ours on the CPU unloads nothing of ComfyUI's (0.8.0 frees memory only on other devices).
    assert [r["model"] for r in seen["after_uso_load"] if not r["ours"]] == ["TAESD"]
    assert seen["image_shape"] == [1, 32, 32, 3]
    # Generating lists the modules it used most recently first (ComfyUI's order).
    assert [r["model"] for r in seen["after_uso_generate"][:2]] == ["USOAutoencoderKL", "USOFluxTransformer2DModel"]


def test_comfyui_unloads_ours_when_it_needs_the_memory(seen):
    # ComfyUI's free_memory for 4 GiB more than is free (what load_models_gpu does for a model that
    # does not fit): ComfyUI unloads its own model and ours (on the CPU unloading frees no RAM, so
    # it goes through every model it may unload).
    assert set(seen["free_memory_unloaded"]) == OURS | {"TAESD"}
    assert seen["after_free_memory"] == [] and seen["unloaded_report_zero"]
    # The next generation places them again (the prompt is cached: T5/CLIP-L are not needed).
    assert seen["same_image_after_unload"]
    assert {r["model"] for r in ours(seen["after_second_generate"])} == {"USOAutoencoderKL",
                                                                         "USOFluxTransformer2DModel"}
    # Asked for part of its memory (1 KiB of the VAE's), a module is unloaded whole.
    assert seen["partial_request"] == {"loaded_before": seen["module_bytes"]["vae"], "unloaded_whole": True,
                                       "loaded_after": 0}
    assert seen["after_unload_all"] == []  # Unload Models / POST /free


def test_streamed_modules_report_what_they_need_while_running(seen):
    g = seen["group_offload"]
    assert g["reported"]["USOFluxTransformer2DModel"] == g["transformer_device_bytes"] < g["transformer_bytes"]
    assert g["reported"]["USOT5EncoderModel"] == g["t5_device_bytes"]


def test_a_dropped_pipeline_leaves_comfyuis_records(seen):
    # Only the patcher this probe kept a reference to remains, reporting nothing.
    assert seen["after_pipelines_dropped"] == [{"model": seen["kept"], "ours": True, "device": "cpu",
                                                "size": 0, "loaded": 0}]
    assert seen["orphan_patcher"] == {"size": 0, "loaded": 0, "detach_returns_holder": True}
