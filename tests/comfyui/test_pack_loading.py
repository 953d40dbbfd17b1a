"""The pack loads the way ComfyUI loads it, and every node's schema is well formed."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOCKET_TYPES = {"IMAGE", "LATENT", "MASK", "CLIP_VISION_OUTPUT", "USO_MODEL", "USO_STYLE", "USO_SUBJECT"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def load_like_comfyui(module_name: str):
    """What ComfyUI's load_custom_node does: spec_from_file_location on the folder's __init__.py
    under a module name derived from the path, registered in sys.modules."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    """The loaded pack's node classes by id, registered as ComfyUI 0.8.0 registers V3 nodes: the
    ComfyExtension from `comfy_entrypoint`, its get_node_list(), each class under its schema's id."""
    import asyncio

    module = load_like_comfyui("custom_nodes_x_comfyui_uso_x_test_pack")
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # ComfyUI would load that instead (V1) and skip ours
    extension = asyncio.run(module.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    module.NODE_CLASS_MAPPINGS = {cls.GET_SCHEMA().node_id: cls for cls in nodes}
    module.NODE_DISPLAY_NAME_MAPPINGS = {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA().display_name for cls in nodes}
    return module


def test_pack_imports_under_an_arbitrary_module_name(pack):
    assert pack.NODE_CLASS_MAPPINGS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert set(pack.NODE_CLASS_MAPPINGS) == {"USOLoadModels", "USOLoraLoader", "USOEncodeStyle", "USOEncodeSubject",
                                             "USOStyleFromClipVision", "USOGenerate", "USORemoteGenerate"}


def test_pack_imports_in_a_clean_interpreter_without_comfyui():
    # A separate process: nothing of the test session (sys.path, fixtures) helps the import.
    import comfy_api_source

    code = (f"import importlib.util, sys, asyncio; sys.path.append(r'{comfy_api_source.source_dir()}'); "
            f"spec = importlib.util.spec_from_file_location('x_pack', r'{ROOT / '__init__.py'}', "
            f"submodule_search_locations=[r'{ROOT}']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['x_pack'] = m; spec.loader.exec_module(m); "
            "print(sorted(c.GET_SCHEMA().node_id for c in asyncio.run(asyncio.run(m.comfy_entrypoint()).get_node_list())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "USOGenerate" in out.stdout


def test_the_pack_uses_relative_imports_only():
    import ast

    for path in [ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] != "nodes", f"{path}:{node.lineno}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "nodes" for a in node.names), f"{path}:{node.lineno}"


def _imports(path):
    """(absolute module names, relative module names) imported by one file."""
    import ast

    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names]
            (relative if node.level else absolute).update(names)
    return absolute, relative


COMFYUI_MODULES = ("folder_paths", "comfy", "comfy_api", "server", "execution", "latent_preview")


def test_only_the_bridge_imports_comfyui():
    for path in (ROOT / "nodes").rglob("*.py"):
        absolute, _ = _imports(path)
        touched = {m for m in absolute if m.split(".")[0] in COMFYUI_MODULES}
        if path == ROOT / "nodes" / "comfyui" / "bridge.py":
            assert touched, "the bridge is where ComfyUI is imported"
        else:
            assert not touched, f"{path.relative_to(ROOT)} imports {touched}; only nodes/comfyui/bridge.py may"


def _check_input(name, spec):
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, name
    kind = spec[0]
    options = spec[1] if len(spec) == 2 else {}
    assert isinstance(options, dict), name
    if isinstance(kind, list) or kind == "COMBO":  # combo: V1 list, V3 "COMBO" with its options
        kind = kind if isinstance(kind, list) else options["options"]
        assert all(isinstance(c, str) for c in kind), name
        if kind and "default" in options:
            assert options["default"] in kind, name
        return
    assert kind in SOCKET_TYPES | WIDGET_TYPES, f"{name}: unknown type {kind}"
    if kind in ("INT", "FLOAT"):
        assert "min" in options and "max" in options, f"{name}: give min and max (the UI default is 0..2048)"
        assert options["min"] <= options["default"] <= options["max"], name
    if kind in WIDGET_TYPES:
        assert "default" in options, name
    assert options.get("tooltip"), f"{name}: every input has a tooltip"


def test_every_node_schema_is_well_formed(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("USO"), node_id
        assert cls.CATEGORY == "USO"
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        names = [*types.get("required", {}), *types.get("optional", {})]
        assert len(names) == len(set(names)), node_id
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                _check_input(f"{node_id}.{name}", spec)
        assert isinstance(cls.RETURN_TYPES, (tuple, list)) and cls.RETURN_TYPES
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert cls.DESCRIPTION and cls.GET_SCHEMA().display_name == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]


def test_node_ids_do_not_collide_with_core_or_known_uso_packs(pack):
    taken = {"USOStyleReference", "USOModelLoader", "USOImageEncoder", "USOSampler", "USOLatentToImage",
             "RunningHub USO Loader", "RunningHub USO Sampler"}
    assert not taken & set(pack.NODE_CLASS_MAPPINGS)


def test_validate_inputs_never_takes_kwargs(pack):
    # A **kwargs validate_inputs switches off ComfyUI's own range checks for every input.
    import inspect

    from comfy_api.internal import first_real_override

    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        if validator := first_real_override(cls, "validate_inputs"):
            assert inspect.getfullargspec(validator).varkw is None, node_id
