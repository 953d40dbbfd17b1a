"""The pack cloned without `pip install -r requirements.txt`: diffusers is absent (ComfyUI's own
Python has torch, numpy, Pillow, safetensors, transformers, requests, but not diffusers). The pack
still imports, registers the same node ids with the same inputs (saved workflows open without
missing nodes), and the loader names the missing package and the exact command for the Python it
runs in. Here diffusers is hidden from a fresh interpreter by an import hook; the real-ComfyUI stage
(tests/real_comfyui/test_1_without_requirements.py) does the same in a ComfyUI without it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import comfy_api_source

ROOT = Path(__file__).resolve().parents[2]

# Loads the pack as ComfyUI does and prints what ComfyUI would read from it, as JSON.
_PROBE = r"""
import importlib.abc, importlib.util, json, sys
hidden = set(sys.argv[2].split(",")) - {""}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None

sys.meta_path.insert(0, Refuse())
root = sys.argv[1]
sys.path += [sys.argv[3], root + "/tests/helpers"]  # ComfyUI's comfy_api; the test helpers
import asyncio
from workflow_runner import run_node

spec = importlib.util.spec_from_file_location("comfyui_uso_probe", root + "/__init__.py",
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["comfyui_uso_probe"] = pack
spec.loader.exec_module(pack)
classes = {c.GET_SCHEMA().node_id: c for c in asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())}
out = {"imported_after_load": sorted(m for m in hidden if m in sys.modules),
       "nodes": {k: json.loads(json.dumps(c.INPUT_TYPES(), default=str)) for k, c in sorted(classes.items())}}
try:
    run_node(classes["USOLoadModels"], "flux1-dev.safetensors", "ae.safetensors", "t5xxl_fp16.safetensors",
             "clip_l.safetensors", "sigclip_vision_patch14_384.safetensors", "uso-flux1-dit-lora-v1.safetensors",
             "uso-flux1-projector-v1.safetensors")
except Exception as exc:
    out["load_error"] = [type(exc).__name__, str(exc)]
out["executable"] = sys.executable
print("PROBE " + json.dumps(out))
"""


def probe(hidden: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), hidden, str(comfy_api_source.source_dir())],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def test_without_diffusers_the_pack_loads_the_same_nodes_and_the_loader_says_how_to_install():
    without = probe("diffusers")
    complete = probe("")
    assert without["imported_after_load"] == []              # importing the pack never needed it
    assert without["nodes"] == complete["nodes"]             # same ids, same inputs and defaults
    kind, message = without["load_error"]
    assert kind == "MissingPackageError"
    assert "the Python package diffusers, which is not installed" in message
    command = f"{without['executable']} -m pip install -r {ROOT / 'requirements.txt'}"
    assert message.splitlines()[-1] == command
    # With everything installed the check passes and the loader goes on to the files (none here).
    assert complete["load_error"][0] != "MissingPackageError"


def test_every_requirement_that_does_not_import_is_named():
    # Without tokenizers, transformers does not import either: both are named, in requirements.txt
    # order. (Not tqdm, as before the V3 nodes: ComfyUI's own comfy_api needs it, so a ComfyUI has it.)
    kind, message = probe("diffusers,tokenizers")["load_error"]
    assert kind == "MissingPackageError"
    assert "the Python packages diffusers, transformers, tokenizers, which are not installed" in message
