"""Which model file goes in which slot: ComfyUI folders, default file names, download sources.

Shared by the loader node (combo lists, defaults, the workflows' missing-models entries) and the
command line (finding files in a ComfyUI models directory).
"""
from __future__ import annotations

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

#: The ComfyUI all-in-one checkpoint many users already have (FLUX + CLIP-L + T5 + AE in one file).
AIO_CHECKPOINT = ("flux1-dev-fp8.safetensors",
                  "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors",
                  "checkpoints")

#: Slots that an all-in-one checkpoint or a diffusers FLUX folder can fill.
EMBEDDED_SLOTS = ("vae", "t5", "clip_l")


def choice_label(folder: str, name: str) -> str:
    """How a file is shown in the transformer combo: checkpoints and diffusers folders get a prefix
    so the same name in two folders stays unambiguous."""
    return name if folder == "diffusion_models" else f"{folder}/{name}"


def parse_choice(slot: str, label: str) -> tuple[str, str]:
    """(folder, name) for a combo label of `slot`."""
    if slot == "transformer":
        for folder in ("checkpoints", "diffusers"):
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
