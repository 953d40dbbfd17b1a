"""ComfyUI at scale (issue 15): a farm runs many ComfyUI processes behind a queue; an API workflow
with a fixed seed must give the same image whichever process runs it."""
from __future__ import annotations

import real_comfyui as rc


def test_two_comfyui_processes_write_byte_identical_images(comfy, second_comfy):
    assert comfy.port != second_comfy.port and comfy.output_dir != second_comfy.output_dir
    prompt = rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_subject_style.json"), seed=987654321)
    # Queued on both before waiting: the two processes work at the same time, as in a farm.
    ids = [server.queue(prompt) for server in (comfy, second_comfy)]
    runs = [server.wait(pid) for server, pid in zip((comfy, second_comfy), ids)]
    for run in runs:
        assert run.status == "success", run.describe()
    first, second = (run.image_paths()[0] for run in runs)
    assert first.parent != second.parent
    assert first.read_bytes() == second.read_bytes()
