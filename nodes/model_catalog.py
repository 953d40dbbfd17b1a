"""Which model file goes in which slot: ComfyUI folders, default file names, download sources.

Shared by the loader node (combo lists, defaults, the workflows' missing-models entries) and the
command line (finding files in a ComfyUI models directory). Knows ComfyUI's file layout, never
imports ComfyUI.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

FROM_CHECKPOINT = "(from checkpoint)"


@dataclass(frozen=True)
class Slot:
    name: str
    folders: tuple[str, ...]        # ComfyUI model folders searched, in order
    defaults: tuple[str, ...]       # preferred file names, first found wins
    url: str                        # where the default file comes from
    directory: str                  # the folder the default file belongs in


SLOTS = {
    "transformer": Slot(
        "transformer", ("diffusion_models", "checkpoints", "diffusers"),
        ("flux1-dev.safetensors", "flux1-dev-fp8.safetensors", "FLUX.1-dev"),
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
        "diffusion_models"),
    "vae": Slot("vae", ("vae",), ("ae.safetensors",),
                "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors", "vae"),
    "t5": Slot("t5", ("text_encoders",), ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
                                          "t5xxl_fp8_e4m3fn_scaled.safetensors"),
               "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
               "text_encoders"),
    "clip_l": Slot("clip_l", ("text_encoders",), ("clip_l.safetensors",),
                   "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
                   "text_encoders"),
    "siglip": Slot("siglip", ("clip_vision",), ("sigclip_vision_patch14_384.safetensors",),
                   "https://huggingface.co/Comfy-Org/sigclip_vision_384/resolve/main/"
                   "sigclip_vision_patch14_384.safetensors", "clip_vision"),
    "uso_lora": Slot("uso_lora", ("loras",), ("uso-flux1-dit-lora-v1.safetensors", "uso_flux_v1.0/dit_lora.safetensors"),
                     "https://huggingface.co/Comfy-Org/USO_1.0_Repackaged/resolve/main/split_files/loras/"
                     "uso-flux1-dit-lora-v1.safetensors", "loras"),
    "projector": Slot("projector", ("model_patches",), ("uso-flux1-projector-v1.safetensors",
                                                        "uso_flux_v1.0/projector.safetensors"),
                      "https://huggingface.co/Comfy-Org/USO_1.0_Repackaged/resolve/main/split_files/"
                      "model_patches/uso-flux1-projector-v1.safetensors", "model_patches"),
}

#: Slots that an all-in-one checkpoint or a diffusers FLUX folder can fill.
EMBEDDED_SLOTS = ("vae", "t5", "clip_l")


#: Transformer folders whose files an older label named with a `folder/` prefix
#: (`checkpoints/flux1-dev-fp8.safetensors`); saved workflows still hold such labels.
PREFIXED_FOLDERS = ("checkpoints", "diffusers")


def transformer_labels(found: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """{combo label: (folder, name)} for the transformer files `found` per folder. A label is the plain
    file name, because ComfyUI's frontend offers a workflow's missing-model download only where a
    `properties.models` name equals a widget value. Only a name held by two folders gets a `folder/`
    prefix on its later copies (folder order: diffusion_models, checkpoints, diffusers)."""
    labels: dict[str, tuple[str, str]] = {}
    for folder in SLOTS["transformer"].folders:
        for name in found.get(folder, []):
            label = name if name not in labels else f"{folder}/{name}"
            labels.setdefault(label, (folder, name))
    return labels


def parse_choice(slot: str, label: str, places: dict[str, tuple[str, str]] | None = None) -> tuple[str, str]:
    """(folder, name) for a combo value of `slot`. For the transformer, `places` is
    `transformer_labels` of the files present; a value not among them in the older prefixed form
    (`checkpoints/<file>`) names its folder, any other is taken as a diffusion_models file."""
    if slot == "transformer":
        if places and label in places:
            return places[label]
        for folder in PREFIXED_FOLDERS:
            if label.startswith(folder + "/"):
                return folder, label[len(folder) + 1:]
        return "diffusion_models", label
    return SLOTS[slot].folders[0], label


def pick_default(slot: str, available: list[str]) -> str | None:
    """The first default name present in `available` (labels), else None."""
    for name in SLOTS[slot].defaults:
        for label in available:
            if label == name or label.endswith("/" + name):
                return label
    return None


#: Weight files the loaders read (pickles are never offered).
WEIGHT_EXTENSIONS = (".safetensors", ".sft", ".gguf")


def _walk_once(root: str):
    """os.walk following links, each real directory visited once (a symlink loop ends, not hangs)."""
    seen: set[str] = set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield dirpath, dirs, files


def list_folder_files(roots: list[str], folder: str) -> list[str]:
    """Names ('/'-separated, relative to their root) of the weight files under `roots`; for the
    `diffusers` folder, the sub-folders holding a model_index.json (as ComfyUI's DiffusersLoader)."""
    found: set[str] = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, files in _walk_once(root):
            if folder == "diffusers":
                if "model_index.json" in files:
                    found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                    dirs[:] = []
                continue
            for f in files:
                if f.lower().endswith(WEIGHT_EXTENSIONS):
                    found.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def desktop_comfyui_dirs() -> list[str]:
    """Where ComfyUI Desktop keeps its ComfyUI tree (with `comfy/` and the tokenizers): in the app's
    resources, not beside the user's `models/`. Taken from Desktop's install layout as documented,
    not checked against a real install."""
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return [os.path.join(local, "Programs", "@comfyorgcomfyui-electron", "resources", "ComfyUI")] if local else []
    if sys.platform == "darwin":
        return ["/Applications/ComfyUI.app/Contents/Resources/ComfyUI"]
    return []


def comfy_tokenizer_dirs(comfy_package_dir: str) -> dict[str, str]:
    """The CLIP-L and T5 tokenizer folders ComfyUI ships inside its `comfy` package folder."""
    dirs = {"clip_l": os.path.join(comfy_package_dir, "sd1_tokenizer"),
            "t5": os.path.join(comfy_package_dir, "text_encoders", "t5_tokenizer")}
    return {k: v for k, v in dirs.items() if os.path.isdir(v)}
