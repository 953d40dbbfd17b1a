"""The nodes on ComfyUI's V3 schema keep the interface saved workflows were made with: every node id,
display name, input (name, section, order, type, default, range, step, seed control), hidden input
and output of the V1 classes (data/node_interface_v1.json, written from them at main fd70334 with
no model files present, so the file combos hold only "(from checkpoint)" where a slot has it)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import workflow_runner as wr
from nodes.comfyui import NODE_CLASS_MAPPINGS, bridge, comfy_entrypoint
from nodes.engine import limits

SAVED = Path(__file__).parent / "data" / "node_interface_v1.json"


def interface(classes: dict) -> dict:
    out = {}
    for node_id, cls in sorted(classes.items()):
        types = wr.input_types(cls)
        inputs = {}
        for section in ("required", "optional"):
            for name, (kind, opts) in types.get(section, {}).items():
                entry = {"section": section, "type": "COMBO" if isinstance(kind, list) else kind}
                for key in ("default", "min", "max", "step", "control_after_generate", "multiline"):
                    if key in opts:
                        entry[key] = opts[key]
                inputs[name] = entry
        out[node_id] = {"display_name": cls.GET_SCHEMA().display_name, "category": cls.CATEGORY,
                        "inputs": inputs, "input_order": [*types.get("required", {}), *types.get("optional", {})],
                        "hidden": sorted(types.get("hidden", {})),
                        "outputs": list(cls.RETURN_TYPES), "output_names": list(cls.RETURN_NAMES)}
    return out


def test_the_v3_nodes_keep_the_v1_interface(monkeypatch):
    monkeypatch.setattr(bridge, "standalone_model_folders", {})
    assert interface(NODE_CLASS_MAPPINGS) == json.loads(SAVED.read_text())


def test_the_extension_lists_every_node_once():
    extension = asyncio.run(comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    assert {cls.GET_SCHEMA().node_id: cls for cls in nodes} == NODE_CLASS_MAPPINGS
    assert len(nodes) == len(NODE_CLASS_MAPPINGS) == 7


def test_widget_ranges_and_defaults_are_the_engines_limits():
    generate = wr.input_types(NODE_CLASS_MAPPINGS["USOGenerate"])
    subject = wr.input_types(NODE_CLASS_MAPPINGS["USOEncodeSubject"])
    widgets = {**generate["required"], **generate["optional"]}
    for limit in (limits.WIDTH, limits.HEIGHT, limits.STEPS, limits.GUIDANCE, limits.SEED, limits.BATCH_SIZE,
                  limits.DENOISE):
        options = widgets[limit.name][1]
        assert (options["min"], options["max"], options["default"]) == (limit.low, limit.high, limit.default)
    options = subject["required"]["long_side"][1]
    long_side = limits.LONG_SIDE
    assert (options["min"], options["max"], options["default"], options["step"]) == (
        long_side.low, long_side.high, long_side.default, long_side.multiple)
