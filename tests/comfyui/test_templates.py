"""The templates' model lists as ComfyUI's frontend (1.35.9, what ComfyUI 0.8.0 pins) reads them
for its missing-models dialog: it keeps a node's `properties.models` entry only when the entry's
`name` equals one of that node's widget values, then looks `name` up in the model folder
`directory`; workflow-level `models` entries skip the widget match. (The browser stage,
tests/browser, checks the dialog itself.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from browser_pages import declared_models

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_every_model_entry_is_one_the_frontend_keeps(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    for node in wf["nodes"]:
        values = {v for v in node.get("widgets_values", []) if isinstance(v, str)}
        for m in node.get("properties", {}).get("models", []):
            assert m["name"] in values, f"{path.name}: node {node['id']} lists {m['name']} but no widget holds it"
    for m in declared_models(wf):
        assert "/" not in m["name"], f"{path.name}: {m['name']} is looked up as a file name in {m['directory']}"


@pytest.mark.parametrize("path", [p for p in UI_FILES if p.stem != "uso_remote"], ids=lambda p: p.stem)
def test_the_checkpoint_the_loader_names_is_offered_for_download(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    loader = next(n for n in wf["nodes"] if n["type"] == "USOLoadModels")
    # The transformer widget holds the plain file name, which the loader's own entry matches.
    name = loader["widgets_values"][0]
    assert name == "flux1-dev-fp8.safetensors"
    offered = {(m["directory"], m["name"]): m["url"] for m in loader["properties"]["models"]}
    assert offered[("checkpoints", name)].endswith("/" + name)
