"""The installed pack inside a real ComfyUI, through its HTTP API: node schemas, model lists and
their refresh, the template browser, every API workflow end to end, Cancel, /free, bad input."""
from __future__ import annotations

import json
import re
import shutil
import time

import pytest
from PIL import Image

import real_comfyui as rc
from nodes.comfyui import NODE_CLASS_MAPPINGS, bridge

PACK_MODULE = f"custom_nodes.{rc.PACK_NAME}"
#: The inputs of USO Load Models that name model files, and the ComfyUI folder of each tiny file
#: the combo must offer (paths relative to that folder, '/' separated, as the combos give them).
FILE_SLOTS = ("transformer", "vae", "t5", "clip_l", "siglip", "uso_lora", "projector")
#: Node types the frontend draws itself (never in /object_info, never a missing-node warning).
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _choices(spec) -> list | None:
    """A combo's choices: a V1 list, or a V3 ("COMBO", {"options": [...]}); None for other inputs."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options") if spec[0] == "COMBO" else None


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.object_info()


@pytest.fixture(scope="module")
def in_process_schemas(comfy):
    """INPUT_TYPES computed in this process (no ComfyUI; the pack's own folder walk) over the
    server's model folders, as ComfyUI's /internal/folder_paths gives them."""
    folders = comfy.get("/internal/folder_paths")
    saved = dict(bridge.standalone_model_folders)
    bridge.standalone_model_folders.clear()
    bridge.standalone_model_folders.update({name: list(paths) for name, paths in folders.items()})
    try:
        return {node: json.loads(json.dumps(cls.INPUT_TYPES())) for node, cls in NODE_CLASS_MAPPINGS.items()}
    finally:
        bridge.standalone_model_folders.clear()
        bridge.standalone_model_folders.update(saved)


# -- schemas and model lists ----------------------------------------------------------------------

def refused(comfy, prompt, node, label):
    """The errors POST /prompt gives for `node` when it refuses `prompt` (printed under `label`)."""
    with pytest.raises(rc.PromptRejected) as rejected:
        comfy.queue(prompt)
    errors = rejected.value.body["node_errors"][node]["errors"]
    print(f"{label} {[(e['extra_info'].get('input_name'), e['details']) for e in errors]}")
    return errors


def test_every_node_is_listed_with_its_schema(object_info, in_process_schemas):
    ours = {k for k, v in object_info.items() if v["python_module"] == PACK_MODULE}
    assert ours == set(NODE_CLASS_MAPPINGS)
    for node, cls in NODE_CLASS_MAPPINGS.items():
        info = object_info[node]
        assert info["category"] == cls.CATEGORY
        assert info["display_name"] == cls.GET_SCHEMA().display_name
        assert info["output"] == list(cls.RETURN_TYPES)
        assert info["output_name"] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        assert info["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False))
        expected = in_process_schemas[node]
        for section in ("required", "optional"):
            assert list(info["input"].get(section, {})) == list(expected.get(section, {})), (node, section)
            assert info["input_order"].get(section, []) == list(expected.get(section, {})), (node, section)
            for name, spec in expected.get(section, {}).items():
                served = info["input"][section][name]
                if _choices(spec) is not None:  # a combo: the same choices, found by folder_paths in ComfyUI
                    assert sorted(_choices(served)) == sorted(_choices(spec)), (node, name)
                    assert {**served[1], "options": None} == {**spec[1], "options": None}, (node, name)
                else:
                    assert served == spec, (node, name)


def test_model_combos_list_the_tiny_files(comfy, comfy_stage):
    inputs = comfy.object_info("USOLoadModels")["input"]["required"]
    models = comfy_stage.models_dir
    expected = {
        # Plain names whichever folder holds them: the frontend matches properties.models names to them.
        "transformer": ["flux1-dev-fp8.safetensors", "flux1-dev.safetensors", "flux1-dev-fp8-e4m3fn.safetensors",
                        "flux1-dev-fp8-scaled.safetensors", "FLUX.1-dev"]
                       + (["flux1-dev-Q8_0.gguf"] if (models / "diffusion_models" / "flux1-dev-Q8_0.gguf").exists() else []),
        "vae": ["(from checkpoint)", "ae.safetensors"],
        "t5": ["(from checkpoint)", "t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
               "t5xxl_fp8_e4m3fn_scaled.safetensors"],
        "clip_l": ["(from checkpoint)", "clip_l.safetensors"],
        "siglip": ["sigclip_vision_patch14_384.safetensors", "siglip-so400m-patch14-384"],
        "uso_lora": ["uso-flux1-dit-lora-v1.safetensors", "uso_flux_v1.0/dit_lora.safetensors"],
        "projector": ["uso-flux1-projector-v1.safetensors", "uso_flux_v1.0/projector.safetensors"],
    }
    for slot, names in expected.items():
        missing = set(names) - set(_choices(inputs[slot]))
        assert not missing, f"{slot}: {sorted(missing)} not offered; offered {_choices(inputs[slot])}"
    # .gguf files reach the list through the folder the pack registers with folder_paths.
    if "flux1-dev-Q8_0.gguf" in expected["transformer"]:
        assert "flux1-dev-Q8_0.gguf" in comfy.get(f"/models/{bridge.GGUF_FOLDER}")


def test_a_new_model_file_appears_after_a_refresh_and_a_wrong_one_is_refused_by_name(comfy, comfy_stage):
    """ComfyUI 0.8.0 caches folder listings and re-reads a folder whose modification time changed;
    its Refresh button re-fetches /object_info. The pack lists through those caches."""
    name = "not_a_flux_transformer.safetensors"
    target = comfy_stage.models_dir / "diffusion_models" / name
    assert name not in _choices(comfy.object_info("USOLoadModels")["input"]["required"]["transformer"])
    shutil.copy2(comfy_stage.tiny_models.paths["t5_fp16"], target)
    try:
        assert name in _choices(comfy.object_info("USOLoadModels")["input"]["required"]["transformer"])
        prompt = rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_style.json"))
        prompt[rc.node_id(prompt, "USOLoadModels")]["inputs"]["transformer"] = name
        run = comfy.run(prompt)
        assert run.status == "error", run.describe()
        message = run.error["exception_message"]
        print(f"\n[wrong file] {message.strip()}")
        assert message.startswith("transformer:") and name in message and "T5" in message
        assert "Traceback" not in message
    finally:
        target.unlink()
    assert name not in _choices(comfy.object_info("USOLoadModels")["input"]["required"]["transformer"])


def test_workflows_saved_with_the_older_prefixed_transformer_label_still_run(comfy):
    # Before plain labels the checkpoint was offered as `checkpoints/flux1-dev-fp8.safetensors`;
    # saved workflows keep that value, which is no longer in the list ComfyUI checks against.
    prompt = rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_style.json"))
    loader = rc.node_id(prompt, "USOLoadModels")
    assert prompt[loader]["inputs"]["transformer"] == "flux1-dev-fp8.safetensors"
    prompt[loader]["inputs"]["transformer"] = "checkpoints/flux1-dev-fp8.safetensors"
    run = comfy.run(prompt)
    assert run.status == "success", run.describe()
    # A prefixed name of a file that is not there: refused before the run, once, under transformer.
    prompt[loader]["inputs"]["transformer"] = "checkpoints/nothing.safetensors"
    errors = refused(comfy, prompt, loader, "\n[old label, missing file]")
    assert [e["extra_info"]["input_name"] for e in errors] == ["transformer"], errors
    assert "transformer: 'checkpoints/nothing.safetensors' is not a file" in errors[0]["details"]


# -- the template browser -------------------------------------------------------------------------

def _widget_names(info: dict) -> list[str]:
    """Widget order the frontend stores in widgets_values for a node of this schema."""
    names = []
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                    names.append("control_after_generate")
                if options.get("image_upload"):
                    names.append("upload")
    return names


def test_templates_are_served_and_open_without_missing_nodes(comfy, object_info):
    templates = comfy.get("/workflow_templates")
    assert sorted(templates.get(rc.PACK_NAME, [])) == sorted(p.stem for p in rc.UI_WORKFLOWS)
    model_folders = set(comfy.get("/models"))
    for path in rc.UI_WORKFLOWS:
        served = comfy.get(f"/api/workflow_templates/{rc.PACK_NAME}/{path.name}")
        assert served == rc.load_workflow(path)
        declared = set()
        for node in served["nodes"]:
            for model in node.get("properties", {}).get("models", []):
                # The missing-models dialog looks the file up in this ComfyUI folder.
                assert model["directory"] in model_folders, (path.name, model)
                assert model["name"] in comfy.get(f"/models/{model['directory']}"), (path.name, model)
                declared.add((model["directory"], model["name"]))
        for node in served["nodes"]:
            if node["type"] in FRONTEND_ONLY:
                continue
            assert node["type"] in object_info, f"{path.name}: node type {node['type']} missing in ComfyUI"
            info = object_info[node["type"]]
            names = _widget_names(info)
            values = node.get("widgets_values", [])
            assert len(values) == len(names), (path.name, node["type"], names, values)
            if node.get("mode", 0) in (2, 4):  # muted / bypassed: never run, never checked by the frontend
                continue
            for name, value in zip(names, values):
                spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}.get(name)
                if spec is None or _choices(spec) is None:
                    continue
                assert value in _choices(spec), f"{path.name}: {node['type']}.{name} = {value!r} is not available"
                if node["type"] == "USOLoadModels" and name in FILE_SLOTS and value != "(from checkpoint)":
                    # Each model file of an active loader is declared, so a user without it gets the dialog.
                    assert any(value.endswith(model_name) for _d, model_name in declared), (path.name, name, value)


# -- every API workflow end to end ----------------------------------------------------------------

def _expected_size(prompt: dict, save_id: str, input_dir) -> tuple[int, int]:
    source = prompt[prompt[save_id]["inputs"]["images"][0]]
    inputs = source["inputs"]
    if source["class_type"] == "USORemoteGenerate":
        return inputs["width"], inputs["height"]  # size "custom" (TINY_OVERRIDES)
    if source["class_type"] == "USOGenerate":
        if isinstance(inputs.get("latent"), list):  # the size follows the latent: VAE Encode of an image
            encode = prompt[inputs["latent"][0]]
            assert encode["class_type"] == "VAEEncode", "add a rule for this latent source"
            w, h = Image.open(input_dir / prompt[encode["inputs"]["pixels"][0]]["inputs"]["image"]).size
            assert w % 16 == 0 and h % 16 == 0, "pick test sizes FLUX can patch"
            return w, h
        if not inputs["keep_size"]:
            return inputs["width"], inputs["height"]
        # keep_size: 2x the encoded subject, i.e. the subject image scaled to long side 1024.
        encode = prompt[inputs["subject"][0]]
        w, h = Image.open(input_dir / prompt[encode["inputs"]["image"][0]]["inputs"]["image"]).size
        long_side = encode["inputs"]["long_side"]
        assert (w * long_side) % max(w, h) == 0 and (h * long_side) % max(w, h) == 0, "pick exact test sizes"
        return (w * 1024 // max(w, h)) // 16 * 16, (h * 1024 // max(w, h)) // 16 * 16
    pytest.fail(f"the stage does not know the output size of {source['class_type']} feeding SaveImage "
                f"{save_id}; add a rule to _expected_size")


def _check_files_are_placed(name: str, prompt: dict, object_info: dict) -> None:
    """Every file a workflow names must be in ComfyUI's lists; if the stage does not place it, say so."""
    for nid, node in prompt.items():
        info = object_info.get(node["class_type"])
        assert info is not None, f"{name}: node {nid} has unknown type {node['class_type']}"
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for inp, value in node["inputs"].items():
            spec = specs.get(inp)
            if spec is None or isinstance(value, list) or _choices(spec) is None:
                continue
            assert value in _choices(spec), (
                f"workflows/api/{name}: node {nid} ({node['class_type']}) input '{inp}' names {value!r}, which "
                f"this stage does not provide in ComfyUI. Model files come from tests/helpers/tiny_models.py "
                f"(its models/ tree is copied into ComfyUI's models/), images from IMAGE_SIZES in "
                f"tests/helpers/real_comfyui.py; add it there.")


@pytest.mark.parametrize("path", rc.API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_runs_end_to_end(comfy, comfy_stage, object_info, path):
    prompt = rc.tiny_prompt(rc.load_workflow(path))
    _check_files_are_placed(path.name, prompt, object_info)
    submitted = len(comfy_stage.fal.calls("POST", "/fal-ai/uso"))
    t0 = time.perf_counter()
    run = comfy.run(prompt)
    assert run.status == "success", run.describe()
    remote = [n for n in prompt.values() if n["class_type"] == "USORemoteGenerate"]
    # A remote node's job went to the (fake) fal queue named by USO_FAL_QUEUE_URL in ComfyUI's environment.
    assert len(comfy_stage.fal.calls("POST", "/fal-ai/uso")) - submitted == len(remote)
    saves = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    images = run.image_paths()
    assert len(images) == len(saves) >= 1
    for save_id in saves:
        for image_path in run.image_paths(save_id):
            with Image.open(image_path) as img:
                assert img.format == "PNG"
                assert img.size == _expected_size(prompt, save_id, comfy_stage.input_dir), (path.stem, img.size)
                # ComfyUI's own metadata: the prompt as sent, plus (0.8.0) each node's IS_CHANGED result.
                stored = json.loads(img.info["prompt"])
                assert {k: {kk: vv for kk, vv in v.items() if kk != "is_changed"} for k, v in stored.items()} == prompt
    print(f"\n[{path.stem}] {images[0].name} {Image.open(images[0]).size} in {time.perf_counter() - t0:.1f} s")


# -- Cancel, /free ----------------------------------------------------------------------------------

#: Enough steps that Cancel lands mid-sampling: it is sent on the first progress message.
INTERRUPT_STEPS = 30
SEED = 1234


def _subject_style(seed: int, steps: int = 2) -> dict:
    return rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_subject_style.json"), steps=steps, seed=seed)


def _image_bytes(comfy, prompt) -> bytes:
    run = comfy.run(prompt)
    assert run.status == "success", run.describe()
    return run.image_paths()[0].read_bytes()


def test_an_interrupted_run_leaves_the_next_one_identical(comfy):
    prompt = _subject_style(SEED, INTERRUPT_STEPS)
    reference = _image_bytes(comfy, prompt)
    # Another prompt first: ComfyUI would otherwise serve the same prompt from its output cache.
    assert _image_bytes(comfy, _subject_style(SEED + 1)) != reference
    generate = rc.node_id(prompt, "USOGenerate")
    ws = comfy.websocket()
    try:
        prompt_id = comfy.queue(prompt)
        seen = None
        while True:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue  # binary preview frames
            msg = json.loads(raw)
            data = msg.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if msg["type"] == "progress" and data.get("node") == generate and seen is None:
                seen = (data["value"], data["max"])
                comfy.interrupt()
            if msg["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                break
    finally:
        ws.close()
    run = comfy.wait(prompt_id)
    assert seen is not None and seen[0] < seen[1] == INTERRUPT_STEPS, seen
    stopped = run.message("execution_interrupted")
    assert run.status == "error" and stopped is not None, run.describe()
    assert stopped["node_type"] == "USOGenerate"
    assert run.image_paths() == []
    print(f"\n[interrupt] sent at step {seen[0]}/{seen[1]}; ComfyUI recorded execution_interrupted in "
          f"{stopped['node_type']}")
    assert _image_bytes(comfy, prompt) == reference


#: A prompt of core nodes only. ComfyUI 0.8.0 handles /free's flags in its prompt worker between
#: prompts; a flag set while the worker finishes a prompt can wait for the next one, so this prompt
#: makes sure the flags were handled before ours runs.
CORE_ONLY = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
LOAD_RECORD = re.compile(r"Requested to load (USO\w+)")


def _run_logging(comfy, prompt):
    """Run `prompt` after CORE_ONLY; returns the run and the models ComfyUI logged loading meanwhile."""
    before = len(comfy.log())
    assert comfy.run(CORE_ONLY).status == "success"
    run = comfy.run(prompt)
    return run, LOAD_RECORD.findall(comfy.log()[before:])


def test_free_unloads_and_the_next_run_is_identical(comfy):
    prompt = _subject_style(SEED)
    reference_image = _image_bytes(comfy, prompt)
    # Control: without /free our models stay loaded in ComfyUI's model management.
    run, loaded = _run_logging(comfy, prompt)
    assert run.status == "success", run.describe()
    assert loaded == [], loaded
    assert run.image_paths()[0].read_bytes() == reference_image
    comfy.free(unload_models=True, free_memory=True)
    run, loaded = _run_logging(comfy, prompt)
    assert run.status == "success", run.describe()
    # ComfyUI's own record: it had unloaded our models and loads them again for this run.
    assert "USOFluxTransformer2DModel" in loaded, loaded
    assert run.image_paths()[0].read_bytes() == reference_image
    print(f"\n[/free] next run reloaded {sorted(set(loaded))}; image identical")


# -- bad input --------------------------------------------------------------------------------------

def test_a_bad_value_is_reported_once_under_its_input(comfy):
    prompt = rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_style.json"), width=8192)
    generate = rc.node_id(prompt, "USOGenerate")
    # Out of range: ComfyUI's own check of that input, before the run (POST /prompt answers 400),
    # one error under it (0.8.0 repeats a validate_inputs verdict under every argument it takes).
    with pytest.raises(rc.PromptRejected) as rejected:
        comfy.queue(prompt)
    errors = rejected.value.body["node_errors"][generate]["errors"]
    print(f"\n[width 8192] {[(e['extra_info'].get('input_name'), e['message'], e['details']) for e in errors]}")
    assert [e["extra_info"]["input_name"] for e in errors] == ["width"], errors
    assert "Traceback" not in json.dumps(rejected.value.body)
    # Not a multiple of 16: one error naming width, from USO Generate as soon as it runs.
    prompt[generate]["inputs"]["width"] = 1000
    run = comfy.run(prompt)
    assert run.status == "error", run.describe()
    err = run.error
    print(f"[width 1000] {err['node_type']}: {err['exception_message'].strip()}")
    assert err["node_type"] == "USOGenerate"
    assert err["exception_message"].strip() == ("width: 1000 is not a multiple of 16 (FLUX works on 16 px patches; "
                                                "1024 is USO's native size); use 992 or 1008.")
    # The single-input rule of USO Encode Subject stays a validation error, once, under long_side.
    prompt = rc.tiny_prompt(rc.load_workflow(rc.WORKFLOWS / "api" / "uso_subject.json"))
    subject = rc.node_id(prompt, "USOEncodeSubject")
    prompt[subject]["inputs"]["long_side"] = 500
    errors = refused(comfy, prompt, subject, "[long_side 500]")
    assert [e["extra_info"]["input_name"] for e in errors] == ["long_side"], errors
    assert "long_side: 500 is not a multiple of 16" in errors[0]["details"]
