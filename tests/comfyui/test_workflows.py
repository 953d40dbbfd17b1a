"""The shipped workflows: UI files match the node schemas and their API twins; every local API
workflow runs end to end on the tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import workflow_runner as wr
from nodes.comfyui import NODE_CLASS_MAPPINGS, pipeline_cache

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))
LOCAL = ["uso_subject", "uso_style", "uso_two_styles", "uso_subject_style", "uso_restyle", "uso_style_lora",
         "uso_restyle_latent"]


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_every_use_has_a_ui_workflow_and_an_api_twin():
    names = {p.stem for p in UI_FILES}
    assert set(LOCAL) | {"uso_remote"} <= names
    assert names == {p.stem for p in API_FILES}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_the_node_schemas(path):
    wf = load(path)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    classes = {**wr.CORE_NODES, **NODE_CLASS_MAPPINGS}
    for n in wf["nodes"]:
        assert n["type"] in classes or n["type"] in wr.UI_ONLY, f"unknown node type {n['type']}"
        expected = wr.CORE_WIDGETS.get(n["type"]) or wr.widget_names(classes[n["type"]])
        assert len(n["widgets_values"]) == len(expected), (n["type"], expected, n["widgets_values"])
        if n["type"] in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[n["type"]]
            for name, value in zip(expected, n["widgets_values"]):
                if name == "control_after_generate":
                    assert value in ("fixed", "increment", "decrement", "randomize")
                    continue
                kind = wr.input_type(cls, name)
                if kind == "COMBO":
                    spec = wr.input_types(cls).get("required", {}).get(name) or wr.input_types(cls)["optional"][name]
                    if name not in ("transformer", "vae", "t5", "clip_l", "siglip", "uso_lora", "projector", "lora_name"):
                        assert value in spec[0], (n["type"], name, value)
                else:
                    assert isinstance(value, {"INT": int, "FLOAT": (int, float), "STRING": str,
                                              "BOOLEAN": bool}[kind]), (n["type"], name, value)
    for link_id, origin, origin_slot, target, target_slot, link_type in wf["links"]:
        src, dst = nodes[origin], nodes[target]
        assert src["outputs"][origin_slot]["type"] == link_type
        assert link_id in src["outputs"][origin_slot]["links"]
        slot = dst["inputs"][target_slot]
        assert slot["link"] == link_id and slot["type"] == link_type
        if dst["type"] in NODE_CLASS_MAPPINGS:
            assert wr.input_type(NODE_CLASS_MAPPINGS[dst["type"]], slot["name"]) == link_type
        if src["type"] in NODE_CLASS_MAPPINGS:
            assert NODE_CLASS_MAPPINGS[src["type"]].RETURN_TYPES[origin_slot] == link_type


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_and_api_twin_agree(path):
    api = load(ROOT / "workflows" / "api" / path.name)
    converted = wr.ui_to_api(load(path), NODE_CLASS_MAPPINGS)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == converted


@pytest.mark.parametrize("name", LOCAL + ["uso_remote"])
def test_workflow_lists_its_models_for_the_missing_models_dialog(name):
    wf = load(ROOT / "workflows" / f"{name}.json")
    note = " ".join(n["widgets_values"][0] for n in wf["nodes"] if n["type"] in wr.UI_ONLY)
    assert note.strip()
    if name == "uso_remote":  # remote-first: no local model files asked for (its local branch is muted)
        assert all("models" not in n["properties"] for n in wf["nodes"])
        return
    loaders = [n for n in wf["nodes"] if n["type"] == "USOLoadModels"]
    models = loaders[0]["properties"]["models"]
    assert "models" not in wf  # every entry on the loader, whose widget value it matches
    assert {m["directory"] for m in models} == {"checkpoints", "loras", "model_patches", "clip_vision"}
    for m in models:
        assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith(m["name"])
        assert m["name"] in note and m["directory"] in note


@pytest.fixture()
def input_dir(tmp_path, comfy_folders):
    for i, name in enumerate(("uso_subject.png", "uso_style.png", "uso_style_2.png")):
        comfy_folders.make_image(96 + 16 * i, 72, seed=i).save(tmp_path / name)
    wr.LoadImage.input_dir = str(tmp_path)
    wr.SaveImage.saved.clear()
    return tmp_path


@pytest.mark.parametrize("name", LOCAL)
def test_api_workflow_runs_end_to_end_on_the_tiny_models(name, input_dir):
    prompt = load(ROOT / "workflows" / "api" / f"{name}.json")
    # Tiny sizes and fp32 so this runs in seconds on a CPU; everything else as shipped.
    overrides = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "USOGenerate":
            overrides.update({(node_id, "width"): 64, (node_id, "height"): 48, (node_id, "steps"): 2})
        if node["class_type"] == "USOEncodeSubject":
            overrides[(node_id, "long_side")] = 64
        if node["class_type"] == "USOLoadModels":
            overrides[(node_id, "precision")] = "fp32"
    results = wr.run_api_workflow(prompt, NODE_CLASS_MAPPINGS, overrides)
    assert len(wr.SaveImage.saved) == 1
    _prefix, images = wr.SaveImage.saved[0]
    generate = next(n for n in prompt.values() if n["class_type"] == "USOGenerate")
    if "latent" in generate["inputs"]:
        # native VAE Encode of the 96x72 photo: the size follows the latent (72 -> 64, FLUX's 16 px patches)
        assert images.shape == (1, 64, 96, 3)
    elif generate["inputs"]["keep_size"]:
        # 96x72 subject at long side 64 -> 64x48 -> 2x at 1024/64 scale
        assert images.shape == (1, 768, 1024, 3)
    else:
        assert images.shape == (1, 48, 64, 3)
    assert results


def test_the_lora_workflow_changes_the_image_and_strength_zero_does_not(input_dir):
    """The LoRA workflow with its LoRA at 0 gives uso_style's image; at its strength another one."""
    def run(name, **extra):
        prompt = load(ROOT / "workflows" / "api" / f"{name}.json")
        overrides = {}
        for node_id, node in prompt.items():
            if node["class_type"] == "USOGenerate":
                overrides.update({(node_id, "width"): 64, (node_id, "height"): 48, (node_id, "steps"): 2})
            if node["class_type"] == "USOLoadModels":
                overrides[(node_id, "precision")] = "fp32"
            if node["class_type"] == "USOLoraLoader" and "strength" in extra:
                overrides[(node_id, "strength")] = extra["strength"]
        wr.SaveImage.saved.clear()
        wr.run_api_workflow(prompt, NODE_CLASS_MAPPINGS, overrides)
        return wr.SaveImage.saved[0][1]

    plain = run("uso_style")
    assert torch.equal(run("uso_style_lora", strength=0.0), plain)
    assert (run("uso_style_lora") - plain).abs().max() > 1 / 255


def teardown_module():
    pipeline_cache.clear()


def test_remote_workflow_feeds_the_same_images_and_values_to_local_and_remote():
    wf = load(ROOT / "workflows" / "uso_remote.json")
    nodes = {n["id"]: n for n in wf["nodes"]}
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    remote, local = by_type["USORemoteGenerate"][0], by_type["USOGenerate"][0]
    assert local["mode"] == 2 and remote["mode"] == 0  # local branch muted until unmuted by the user
    links = {link[0]: link for link in wf["links"]}

    def source(node, input_name):
        slot = next(s for s in node["inputs"] if s["name"] == input_name)
        return links[slot["link"]][1]

    subject_enc = nodes[source(local, "subject")]
    style_enc = nodes[source(local, "style")]
    assert source(remote, "subject_image") == source(subject_enc, "image")
    assert source(remote, "style_images") == source(style_enc, "image")
    r = dict(zip(wr.widget_names(NODE_CLASS_MAPPINGS["USORemoteGenerate"]), remote["widgets_values"]))
    g = dict(zip(wr.widget_names(NODE_CLASS_MAPPINGS["USOGenerate"]), local["widgets_values"]))
    for key in ("prompt", "width", "height", "keep_size", "steps", "guidance", "seed"):
        assert r[key] == g[key], key
