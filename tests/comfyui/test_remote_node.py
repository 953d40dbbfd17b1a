"""The node as ComfyUI sees it: schema, registry, isolation from ComfyUI, and the remote workflows."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import workflow_runner
import torch
from comfy_api.internal import first_real_override
from PIL import Image
from remote_helpers import fal_server, remote_env, run_node, widget_defaults  # noqa: F401

from nodes import comfyui as nodes
from nodes.comfyui.remote_node import NODE_CLASSES, USORemoteGenerate

ROOT = Path(__file__).resolve().parents[2]
UI_WORKFLOW = ROOT / "workflows" / "uso_remote.json"
API_WORKFLOW = ROOT / "workflows" / "api" / "uso_remote.json"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
INPUT_ORDER = ["provider", "prompt", "size", "width", "height", "keep_size", "steps", "guidance", "seed",
               "num_images", "negative_prompt", "output_format", "safety_checker", "timeout_s"]


# -- schema ----------------------------------------------------------------------------------------

def test_registered_with_the_pack_conventions():
    assert NODE_CLASSES == [USORemoteGenerate]
    assert nodes.NODE_CLASS_MAPPINGS["USORemoteGenerate"] is USORemoteGenerate
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["USORemoteGenerate"] == "USO Remote Generate (fal / AIML)"
    cls = USORemoteGenerate
    assert (cls.CATEGORY, tuple(cls.RETURN_TYPES), tuple(cls.RETURN_NAMES)) == ("USO", ("IMAGE", "INT"),
                                                                                ("images", "seed"))
    assert callable(getattr(cls, cls.FUNCTION)) and cls.DESCRIPTION


def test_inputs_order_types_and_ranges():
    spec = workflow_runner.input_types(USORemoteGenerate)
    required = spec["required"]
    assert list(required) == INPUT_ORDER
    assert list(spec["optional"]) == ["subject_image", "style_images"]
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert required["provider"][0] == ["fal", "aiml"]
    assert required["size"][0] == ["custom", "square_hd", "square", "portrait_4_3", "portrait_16_9",
                                   "landscape_4_3", "landscape_16_9"]
    assert required["width"][1] == {**required["width"][1], "default": 1024, "min": 256, "max": 2048, "step": 16}
    assert required["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF and required["seed"][1]["control_after_generate"]
    assert required["timeout_s"][1]["min"] == 10 and required["timeout_s"][1]["max"] == 3600
    for name, (kind, opts) in {**required, **spec["optional"]}.items():
        assert opts.get("tooltip"), name
        if kind in ("INT", "FLOAT"):
            assert "min" in opts and "max" in opts, name  # the frontend's own default range is 0..2048


def test_no_key_widget_and_no_kwargs_validation():
    spec = workflow_runner.input_types(USORemoteGenerate)
    names = " ".join([*spec["required"], *spec["optional"], *spec["hidden"]]).lower()
    assert "key" not in names.replace("keep_size", "") and "token" not in names
    assert first_real_override(USORemoteGenerate, "validate_inputs") is None


def test_remote_package_never_imports_comfyui():
    for path in (ROOT / "nodes" / "remote").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                assert "comfy" not in mod and mod.split(".")[0] not in ("folder_paths", "server", "execution"), \
                    f"{path.name} imports {mod}"


def test_called_as_comfyui_calls_it_with_default_widgets(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        kwargs = widget_defaults()
        kwargs["subject_image"] = torch.rand(1, 40, 30, 3)
        images, seed = workflow_runner.run_node(USORemoteGenerate, unique_id="12", **kwargs)
        body = fal.calls("POST")[0].json
    assert body["image_size"] == {"width": 1024, "height": 1024} and body["num_inference_steps"] == 28
    assert body["guidance_scale"] == 4.0 and "seed" not in body and body["enable_safety_checker"] is True
    assert isinstance(images, torch.Tensor) and images.shape == (1, 1024, 1024, 3)
    assert isinstance(seed, int) and seed == 2**63 + 12345


# -- workflows -------------------------------------------------------------------------------------

CORE = {  # what the checks need from ComfyUI's own nodes: widgets, input sockets, output types
    "LoadImage": {"widgets": ["image", "upload"], "inputs": {}, "outputs": ["IMAGE", "MASK"]},
    "SaveImage": {"widgets": ["filename_prefix"], "inputs": {"images": "IMAGE"}, "outputs": []},
    "MarkdownNote": {"widgets": ["text"], "inputs": {}, "outputs": []},
    "Note": {"widgets": ["text"], "inputs": {}, "outputs": []},
}


def _schema(node_type: str) -> dict:
    if node_type in CORE:
        return CORE[node_type]
    cls = nodes.NODE_CLASS_MAPPINGS[node_type]
    spec = workflow_runner.input_types(cls)
    widgets, sockets = [], {}
    for name, (kind, opts) in [*spec["required"].items(), *spec.get("optional", {}).items()]:
        if isinstance(kind, list) or kind in WIDGET_TYPES:
            widgets.append(name)
            if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                widgets.append(f"{name}:control")
        else:
            sockets[name] = kind
    return {"widgets": widgets, "inputs": sockets, "outputs": list(cls.RETURN_TYPES)}


def test_ui_workflow_matches_the_node_schemas():
    wf = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))
    assert wf["version"] == 0.4
    by_id = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(by_id) and wf["last_link_id"] >= max(link[0] for link in wf["links"])
    assert {n["type"] for n in wf["nodes"]} >= {"LoadImage", "USORemoteGenerate", "SaveImage"}
    assert any(n["type"] in ("MarkdownNote", "Note") and "uso_remote_keys.json" in n["widgets_values"][0]
               for n in wf["nodes"])
    for n in wf["nodes"]:
        schema = _schema(n["type"])
        assert len(n["widgets_values"]) == len(schema["widgets"]), n["type"]
        assert [o["type"] for o in n["outputs"]] == schema["outputs"], n["type"]
        for inp in n["inputs"]:
            assert schema["inputs"].get(inp["name"]) == inp["type"], (n["type"], inp["name"])
    remote = next(n for n in wf["nodes"] if n["type"] == "USORemoteGenerate")
    values = dict(zip(_schema("USORemoteGenerate")["widgets"], remote["widgets_values"]))
    assert values["seed:control"] in ("fixed", "increment", "decrement", "randomize")
    required = workflow_runner.input_types(USORemoteGenerate)["required"]
    for name, value in values.items():
        if name.endswith(":control"):
            continue
        kind, opts = required[name]
        if isinstance(kind, list):
            assert value in kind, name
        elif kind in ("INT", "FLOAT"):
            assert opts["min"] <= value <= opts["max"], name
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = by_id[src]["outputs"][src_slot]
        inp = by_id[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == kind and link_id in out["links"] and inp["link"] == link_id


def test_api_workflow_is_the_twin_of_the_ui_workflow():
    ui = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))
    api = json.loads(API_WORKFLOW.read_text(encoding="utf-8"))
    remote_ui = next(n for n in ui["nodes"] if n["type"] == "USORemoteGenerate")
    remote_api = next(n for n in api.values() if n["class_type"] == "USORemoteGenerate")
    widgets = [w for w in _schema("USORemoteGenerate")["widgets"] if not w.endswith(":control")]
    ui_values = [v for w, v in zip(_schema("USORemoteGenerate")["widgets"], remote_ui["widgets_values"])
                 if not w.endswith(":control")]
    assert [remote_api["inputs"][w] for w in widgets] == ui_values
    loads_ui = sorted(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "LoadImage")
    loads_api = sorted(n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage")
    assert loads_ui == loads_api


def test_api_workflow_runs_end_to_end_against_fake_fal(remote_env, monkeypatch, tmp_path):
    prompt = json.loads(API_WORKFLOW.read_text(encoding="utf-8"))
    for n in prompt.values():
        if n["class_type"] == "LoadImage":
            Image.new("RGB", (96, 64), (120, 60, 30)).save(tmp_path / n["inputs"]["image"])
    workflow_runner.LoadImage.input_dir = str(tmp_path)
    workflow_runner.SaveImage.saved.clear()
    with fal_server(monkeypatch) as fal:
        workflow_runner.run_api_workflow(prompt, nodes.NODE_CLASS_MAPPINGS)
        body = fal.calls("POST")[0].json
    saved = dict(workflow_runner.SaveImage.saved)
    remote = next(n for n in prompt.values() if n["class_type"] == "USORemoteGenerate")["inputs"]
    assert body["prompt"] == remote["prompt"] and len(body["input_image_urls"]) == 2
    images = saved["uso/remote"]
    assert images.shape == (remote["num_images"], remote["height"], remote["width"], 3)
    assert any("fal: done" in t for t in remote_env)


def test_outputs_do_not_carry_the_key(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        images, seed = run_node()
    assert isinstance(seed, int) and isinstance(images, torch.Tensor)
    assert fal.key not in repr(workflow_runner.input_types(USORemoteGenerate)) + USORemoteGenerate.DESCRIPTION


@pytest.mark.parametrize("path", [UI_WORKFLOW, API_WORKFLOW])
def test_workflows_are_valid_json_without_absolute_paths(path):
    text = path.read_text(encoding="utf-8")
    json.loads(text)
    assert "/home/" not in text and "C:\\\\" not in text and "/work/" not in text
