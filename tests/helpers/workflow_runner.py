"""A small runner for API-format workflows, following ComfyUI's semantics closely enough to run
the pack's workflows in tests: literal inputs and ["node id", output index] links, only nodes
upstream of an output node run, each node once. Core nodes the workflows use are stand-ins with
ComfyUI's behaviour (LoadImage reads from an input folder, SaveImage captures its images).

UI-format helpers check a UI workflow against node schemas and turn it into API format.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

# -- core stand-ins --------------------------------------------------------------------------


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load"
    input_dir = "."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ([], {"image_upload": True})}}

    def load(self, image):
        img = ImageOps.exif_transpose(Image.open(os.path.join(self.input_dir, image)))
        rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
        if "A" in img.getbands():
            mask = 1.0 - torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)[None]
        else:
            mask = torch.zeros((1, 64, 64))
        return rgb, mask


class SaveImage:
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    saved: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save(self, images, filename_prefix="ComfyUI"):
        SaveImage.saved.append((filename_prefix, images))
        return ()


class PreviewImage(SaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def save(self, images):
        SaveImage.saved.append(("preview", images))
        return ()


class VAELoader:
    """ComfyUI's Load VAE: a file of the vae folder (here read with the pack's own loader)."""

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": ([],)}}

    def load_vae(self, vae_name):
        from nodes.comfyui import bridge
        from nodes.engine import loaders

        return (loaders.load_vae(loaders.Component(bridge.resolve_model_path("vae", vae_name))),)


class VAEEncode:
    """ComfyUI's VAE Encode: pixels cropped (centered) to multiples of 8, 2x - 1, the posterior
    mode, returned unscaled -- ComfyUI's LATENT convention (its Flux latent_format scales on the
    way into the model: (z - 0.1159) * 0.3611)."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, pixels, vae):
        for dim in (1, 2):
            keep = pixels.shape[dim] // 8 * 8
            pixels = pixels.narrow(dim, (pixels.shape[dim] % 8) // 2, keep)
        x = pixels[..., :3].movedim(-1, 1) * 2.0 - 1.0
        with torch.inference_mode():
            return ({"samples": vae.encode(x).latent_dist.mode().float()},)


CORE_NODES = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage,
              "VAELoader": VAELoader, "VAEEncode": VAEEncode}
#: Widget values the frontend stores for core nodes (LoadImage also stores its upload button).
CORE_WIDGETS = {"LoadImage": ["image", "upload"], "SaveImage": ["filename_prefix"], "PreviewImage": [],
                "Note": ["text"], "MarkdownNote": ["text"], "VAELoader": ["vae_name"], "VAEEncode": []}
UI_ONLY = {"Note", "MarkdownNote"}


# -- running one node like ComfyUI 0.8.0 ------------------------------------------------------


def is_v3(cls) -> bool:
    from comfy_api.internal import _ComfyNodeInternal

    return isinstance(cls, type) and issubclass(cls, _ComfyNodeInternal)


def input_types(cls) -> dict:
    """The node's INPUT_TYPES in the V1 shape the saved workflows were made with: a combo as
    (list of choices, options); V3 nodes give ("COMBO", {"options": [...], ...})."""
    out = {}
    for section, inputs in cls.INPUT_TYPES().items():
        if section == "hidden":
            out[section] = {name: spec[0] if isinstance(spec, tuple) else spec for name, spec in inputs.items()}
            continue
        out[section] = {}
        for name, (kind, *rest) in inputs.items():
            options = dict(rest[0]) if rest else {}
            if kind == "COMBO":
                kind = list(options.pop("options"))
            out[section][name] = (kind, options)
    return out


def run_node(cls, *args, unique_id: str | None = None, **kwargs) -> tuple:
    """Execute one node as ComfyUI's executor does: a V3 node on a locked clone of its class with
    its hidden inputs (unique_id) set, through EXECUTE_NORMALIZED; returns the outputs tuple.
    Positional arguments follow the schema's input order (required, then optional)."""
    from comfy_api.internal import make_locked_method_func

    if args:
        types = cls.INPUT_TYPES()
        names = [*types.get("required", {}), *types.get("optional", {})]
        kwargs = {**dict(zip(names, args)), **kwargs}
    clone = cls.PREPARE_CLASS_CLONE({"hidden_inputs": {"UNIQUE_ID": unique_id}})
    out = make_locked_method_func(cls, cls.FUNCTION, clone)(**kwargs)
    return tuple(out.result or ())


def validation_errors(cls, inputs: dict) -> list[dict]:
    """What ComfyUI 0.8.0's validate_inputs reports for a node's widget values: ranges and combo
    lists of inputs its validate_inputs does not take, then the validator's verdict once per
    argument it takes (execution.py). [{"input_name", "details"}]"""
    import inspect

    from comfy_api.internal import first_real_override

    validator = first_real_override(cls, "validate_inputs")
    taken = inspect.getfullargspec(validator).args[1:] if validator else []
    types = cls.INPUT_TYPES()
    errors = []
    for section in ("required", "optional"):
        for name, (kind, options) in types.get(section, {}).items():
            if name not in inputs or name in taken:
                continue
            value = inputs[name]
            if kind == "COMBO" and value not in options["options"]:
                errors.append({"input_name": name, "details": f"{name}: '{value}' not in list"})
            elif kind in ("INT", "FLOAT") and not options["min"] <= value <= options["max"]:
                errors.append({"input_name": name, "details": f"Value {value} outside {options['min']}..{options['max']}"})
    if taken:
        verdict = validator(**{k: inputs[k] for k in taken if k in inputs})
        if verdict is not True:
            errors += [{"input_name": name, "details": f"{name} - {verdict}"} for name in taken if name in inputs]
    return errors


# -- API format --------------------------------------------------------------------------------


def run_api_workflow(prompt: dict, node_classes: dict, overrides: dict | None = None) -> dict:
    """Execute an API-format prompt; returns {node id: outputs tuple}. `overrides` maps
    (node id, input name) -> value, e.g. to shrink sizes for tiny models."""
    classes = {**CORE_NODES, **node_classes}
    overrides = overrides or {}
    for node_id, node in prompt.items():
        if node["class_type"] not in classes:
            raise KeyError(f"node {node_id}: class {node['class_type']} does not exist")
    outputs_needed = [nid for nid, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs_needed:
        raise ValueError("prompt has no output node")
    results: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id in results:
            return results[node_id]
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        kwargs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                kwargs[name] = run(value[0])[value[1]]
            else:
                kwargs[name] = value
        for (nid, name), value in overrides.items():
            if nid == node_id:
                kwargs[name] = value
        if is_v3(cls):
            constants = {k: v for k, v in kwargs.items() if not isinstance(node["inputs"].get(k), list)}
            if errors := validation_errors(cls, constants):
                raise ValueError(f"node {node_id} failed validation: {errors}")
            results[node_id] = run_node(cls, unique_id=node_id, **kwargs)
            return results[node_id]
        out = getattr(cls(), cls.FUNCTION)(**kwargs)  # the core stand-ins (V1)
        if isinstance(out, dict):
            out = out.get("result", ())
        results[node_id] = tuple(out)
        return results[node_id]

    for node_id in outputs_needed:
        run(node_id)
    return results


# -- UI format ---------------------------------------------------------------------------------


def widget_names(cls) -> list[str]:
    """The widget inputs in the order the frontend stores them (required then optional), with the
    hidden control_after_generate value after `seed`/`noise_seed` or flagged INT inputs."""
    types = input_types(cls)
    names = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"):
                names.append(name)
                if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
                    names.append("control_after_generate")
    return names


def output_types(cls) -> tuple:
    return tuple(cls.RETURN_TYPES)


def input_type(cls, name: str):
    types = input_types(cls)
    for section in ("required", "optional"):
        if name in types.get(section, {}):
            kind = types[section][name][0]
            return "COMBO" if isinstance(kind, list) else kind  # V1 lists, V3 "COMBO"
    return None


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """What the frontend's graphToPrompt does for a flat (subgraph-free) workflow."""
    classes = {**CORE_NODES, **node_classes}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) in (2, 4):
            continue
        cls = classes[node["type"]]
        names = CORE_WIDGETS.get(node["type"]) or widget_names(cls)
        inputs = {}
        for name, value in zip(names, node.get("widgets_values", [])):
            if name in ("control_after_generate", "upload"):
                continue
            inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
