"""ComfyUI at scale: a farm runs many ComfyUI processes behind a queue; an API workflow
with a fixed seed must give the same image whichever process runs it."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

import real_comfyui as rc


def _prompt(seed: int) -> dict:
    return rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_subject_style.json"), seed=seed)


def test_two_comfyui_processes_write_byte_identical_images(comfy, second_comfy):
    assert comfy.port != second_comfy.port and comfy.output_dir != second_comfy.output_dir
    prompt = _prompt(987654321)
    # Queued on both before waiting: the two processes work at the same time, as in a farm.
    ids = [server.queue(prompt) for server in (comfy, second_comfy)]
    runs = [server.wait(pid) for server, pid in zip((comfy, second_comfy), ids)]
    for run in runs:
        assert run.status == "success", run.describe()
    first, second = (run.image_paths()[0] for run in runs)
    assert first.parent != second.parent
    assert first.read_bytes() == second.read_bytes()


def test_model_file_dates_reach_the_png_metadata_not_the_pixels(second_comfy, comfy_stage):
    """ComfyUI 0.8.0 writes each node's IS_CHANGED result into the PNG's prompt metadata; USO Load
    Models' is the chosen files' sizes and modification times. The same files with other dates (a
    copy without `cp -p` / `rsync -t` on another worker) give the same pixels in a different file."""
    prompt = _prompt(55555)
    lora = comfy_stage.models_dir / "loras" / "uso-flux1-dit-lora-v1.safetensors"
    stat = lora.stat()
    before = second_comfy.run(prompt)
    os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        after = second_comfy.run(prompt)
    finally:
        os.utime(lora, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert before.status == after.status == "success", (before.describe(), after.describe())
    a, b = before.image_paths()[0], after.image_paths()[0]
    assert a.read_bytes() != b.read_bytes()
    with Image.open(a) as ia, Image.open(b) as ib:
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
        meta_a, meta_b = json.loads(ia.info["prompt"]), json.loads(ib.info["prompt"])
    loader = rc.node_id(prompt, "USOLoadModels")
    assert meta_a[loader]["is_changed"] != meta_b[loader]["is_changed"]
    for node in meta_a.values():
        node.pop("is_changed", None)
    for node in meta_b.values():
        node.pop("is_changed", None)
    assert meta_a == meta_b
