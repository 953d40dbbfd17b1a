"""The most common install mistake, in a real ComfyUI: the pack cloned into custom_nodes without
`pip install -r requirements.txt` (diffusers absent from ComfyUI's Python). The pack still loads,
its nodes are listed, and running one says which package is missing and the exact command for
ComfyUI's own Python; that command, run as printed, installs the requirements and keeps torch."""
from __future__ import annotations

import os
import shlex

import pytest

import real_comfyui as rc
from nodes.comfyui import NODE_CLASS_MAPPINGS


def test_the_pack_loads_and_lists_its_nodes(bare_comfy):
    log = bare_comfy.log()
    assert "IMPORT FAILED" not in log, log[-3000:]
    info = bare_comfy.object_info()
    listed = {k for k, v in info.items() if v["python_module"] == f"custom_nodes.{rc.PACK_NAME}"}
    assert listed == set(NODE_CLASS_MAPPINGS)


def _pip_command(message: str) -> list[str]:
    """The `<python> -m pip install -r <requirements.txt>` the message gives, as argv."""
    for line in message.splitlines():
        if "-m pip install" not in line:
            continue
        tokens = shlex.split(line)
        for i in range(1, len(tokens) - 4):
            if tokens[i:i + 4] == ["-m", "pip", "install", "-r"]:
                return tokens[i - 1:i + 5]
    pytest.fail(f"no '<python> -m pip install -r <file>' line in the message:\n{message}")


@pytest.fixture(scope="module")
def missing_package_run(bare_comfy):
    prompt = rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_style.json"))
    return bare_comfy.run(prompt)


def test_running_a_node_names_the_missing_package_and_the_command(bare_comfy, missing_package_run):
    run = missing_package_run
    assert run.status == "error", run.describe()
    err = run.error
    assert err["node_type"] == "USOLoadModels"
    message = err["exception_message"]
    print(f"\n[bare ComfyUI] USOLoadModels says: {message.strip()}")
    assert "diffusers" in message
    assert "Traceback" not in message
    python, _m, _pip, _install, _r, requirements = _pip_command(message)
    # ComfyUI's own interpreter (the venv ComfyUI runs in), not some python on PATH.
    assert os.path.realpath(os.path.dirname(python)) == os.path.realpath(rc.venv_python(bare_comfy.venv).parent)
    assert os.path.samefile(requirements, rc.PACK_ROOT / "requirements.txt")


def test_the_printed_command_installs_the_requirements_and_keeps_torch(bare_comfy, missing_package_run):
    argv = _pip_command(missing_package_run.error["exception_message"])
    torch_before = rc.package_version(bare_comfy.venv, "torch")
    rc.pip_install_requirements(argv, bare_comfy.venv, bare_comfy.state_dir / "constraints")
    assert rc.has_module(bare_comfy.venv, "diffusers")
    assert rc.package_version(bare_comfy.venv, "torch") == torch_before
