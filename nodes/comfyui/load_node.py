"""USO Load Models: the model files of ComfyUI's own folders -> one USO_MODEL (a USOPipeline)."""
from __future__ import annotations

import os

from . import bridge, pipeline_cache, requirements
from .bridge import io
from .sockets import USOModel, unique_id
from ..engine import EngineOptions, InputError, ModelFiles, USOError
from ..engine.memory import ENCODER_PLACEMENTS, MEMORY_MODES, PRECISIONS
from ..engine.speed import ATTENTION_CHOICES, STEP_CACHE_MAX, check_step_cache
from ..engine.pipeline import LORA_MODES
from ..model_catalog import EMBEDDED_SLOTS, FROM_CHECKPOINT, SLOTS, parse_choice, pick_default, transformer_labels

LOAD_STEPS = ("transformer", "uso_lora", "vae", "t5", "clip_l", "tokenizers", "siglip", "projector")


def transformer_places() -> dict[str, tuple[str, str]]:
    """{combo label: (folder, name)} of the transformer files in ComfyUI's folders."""
    return transformer_labels({folder: bridge.list_model_files(folder) for folder in SLOTS["transformer"].folders})


def transformer_choices() -> list[str]:
    return list(transformer_places())


def slot_choices(slot: str) -> list[str]:
    names = []
    for folder in SLOTS[slot].folders:
        names += bridge.list_model_files(folder)
    if slot == "siglip":  # HF folders (google/siglip-so400m-patch14-384) inside clip_vision
        names += _hf_folders("clip_vision")
    return ([FROM_CHECKPOINT] if slot in EMBEDDED_SLOTS else []) + names


def _hf_folders(folder: str) -> list[str]:
    found = []
    for root in bridge.model_folder_paths(folder):
        if os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if os.path.isfile(os.path.join(root, entry, "config.json")):
                    found.append(entry)
    return found


def default_choices() -> dict[str, tuple[list[str], str]]:
    """{slot: (choices, default)} for the file inputs of a fresh node. With an all-in-one checkpoint
    or a diffusers folder as the default transformer, vae / t5 / clip_l default to '(from
    checkpoint)' (its own parts, all three alike); with a bare transformer, to their own files."""
    places = transformer_places()
    transformers = list(places)
    transformer = pick_default("transformer", transformers) or (transformers[0] if transformers else "")
    bundled = bool(transformer) and parse_choice("transformer", transformer, places)[0] != "diffusion_models"
    out = {"transformer": (transformers, transformer)}
    for slot in ("vae", "t5", "clip_l", "siglip", "uso_lora", "projector"):
        choices = slot_choices(slot)
        if bundled and slot in EMBEDDED_SLOTS:
            out[slot] = (choices, FROM_CHECKPOINT)
        else:
            out[slot] = (choices, pick_default(slot, choices) or (choices[0] if choices else ""))
    return out


def resolve(slot: str, label: str) -> str | None:
    """Absolute path for a combo value; None for "(from checkpoint)"."""
    if label == FROM_CHECKPOINT and slot in EMBEDDED_SLOTS:
        return None
    folder, name = parse_choice(slot, label, transformer_places() if slot == "transformer" else None)
    try:
        return bridge.resolve_model_path(folder, name)
    except (ValueError, FileNotFoundError) as exc:
        raise USOError(f"{slot}: {exc}") from None


class USOLoadModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        embedded = " '(from checkpoint)' takes it from an all-in-one checkpoint or a diffusers folder."
        files = default_choices()

        def file_input(slot: str, tooltip: str) -> io.Combo.Input:
            choices, default = files[slot]
            return io.Combo.Input(slot, options=choices, default=default, tooltip=tooltip)

        return io.Schema(
            node_id="USOLoadModels", display_name="USO Load Models", category="USO",
            description=("Loads FLUX.1-dev with the USO LoRA, the SigLIP style encoder and the USO projector from "
                         "ComfyUI's model folders (the files ComfyUI's own USO template uses work). With an "
                         "all-in-one checkpoint or a diffusers folder as transformer, vae / t5 / clip_l can be "
                         "'(from checkpoint)'."),
            inputs=[
                file_input("transformer", "FLUX.1-dev: diffusion_models (bf16, fp8, scaled fp8, GGUF), checkpoints "
                                          "(ComfyUI all-in-one, e.g. flux1-dev-fp8.safetensors) or diffusers "
                                          "folders."),
                file_input("vae", "The FLUX autoencoder (ae.safetensors)." + embedded),
                file_input("t5", "T5-XXL text encoder (fp16, fp8 or scaled fp8)." + embedded),
                file_input("clip_l", "CLIP-L text encoder." + embedded),
                file_input("siglip", "SigLIP so400m patch14-384 (clip_vision), e.g. sigclip_vision_patch14_384."),
                file_input("uso_lora", "The USO DiT LoRA (uso-flux1-dit-lora-v1 or the original dit_lora)."),
                file_input("projector", "The USO style projector (uso-flux1-projector-v1 or the original "
                                        "projector)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU. "
                                       "fp8_e4m3fn: transformer weights stored in fp8 (about half the VRAM), "
                                       "computed in bf16."),
                io.Combo.Input("memory", options=list(MEMORY_MODES), default="auto",
                               tooltip="auto: the fastest placement that fits the free VRAM. gpu: everything "
                                       "resident. model_offload: one model on the GPU at a time. group_offload: the "
                                       "transformer streamed block by block (least VRAM, slower)."),
                io.Combo.Input("lora_mode", options=list(LORA_MODES), default="auto", optional=True,
                               tooltip="auto: fused into bf16/fp16 weights (fastest), unfused over fp8/GGUF "
                                       "weights. unfused: exactly like the reference."),
                io.Combo.Input("encoders", options=list(ENCODER_PLACEMENTS), default="auto", optional=True,
                               tooltip="Where T5 (9.5 GB), CLIP-L and SigLIP live in 'gpu' memory mode. offload: in "
                                       "RAM, streamed through the GPU when a new prompt or style is encoded (T5 "
                                       "leaves the GPU after encoding). auto: resident when everything fits."),
                io.Combo.Input("attention", options=list(ATTENTION_CHOICES), default="native", optional=True,
                               tooltip="diffusers' attention backend. native = torch SDPA, like the reference. "
                                       "flash, flash3, sage, xformers need their package and a GPU (checked when "
                                       "loading); sage can give black images."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the repeated transformer blocks. The first image at a new "
                                         "size compiles (seconds); later ones are faster."),
                io.Float.Input("step_cache", default=0.0, min=0.0, max=STEP_CACHE_MAX, step=0.01, optional=True,
                               tooltip="First Block Cache threshold (0 = off). 0.05-0.15 skips steps whose first "
                                       "block barely changed: faster, and the image changes more the higher it "
                                       "is."),
            ],
            outputs=[USOModel.Output(display_name="uso_model",
                                     tooltip="FLUX.1-dev + the USO LoRA + SigLIP + the style projector, ready for "
                                             "the USO nodes.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, transformer):
        # Takes over ComfyUI's own "is the value in the list" check for this one input, so that saved
        # workflows holding the older label `checkpoints/<file>` (now offered as `<file>`) still run.
        # ComfyUI reports the message under each argument of this method: transformer only.
        if transformer is None or transformer in transformer_places():
            return True
        try:
            resolve("transformer", transformer)
        except USOError:
            return (f"transformer: '{transformer}' is not a file in ComfyUI's diffusion_models, checkpoints or "
                    f"diffusers folders; pick one of the listed files, or download {SLOTS['transformer'].url} "
                    f"into models/{SLOTS['transformer'].directory}.")
        return True

    @classmethod
    def fingerprint_inputs(cls, **widgets):
        """Reload when a chosen file changes on disk (size or modification time)."""
        stamps = []
        for slot, label in sorted(widgets.items()):
            if slot not in SLOTS or not isinstance(label, str):
                continue
            try:
                path = resolve(slot, label)
            except USOError:
                continue
            if path:
                stat = os.stat(path)
                stamps.append(f"{slot}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(stamps)

    @classmethod
    def execute(cls, transformer, vae, t5, clip_l, siglip, uso_lora, projector, precision="auto",
                memory="auto", lora_mode="auto", encoders="auto", attention="native", compile=False,
                step_cache=0.0) -> io.NodeOutput:
        requirements.require_installed()  # a clone without `pip install -r requirements.txt`
        for name, value, choices in (("precision", precision, PRECISIONS), ("memory", memory, MEMORY_MODES),
                                     ("lora_mode", lora_mode, LORA_MODES),
                                     ("encoders", encoders, ENCODER_PLACEMENTS),
                                     ("attention", attention, ATTENTION_CHOICES)):
            if value not in choices:  # an API workflow skips no check, but fail before loading anything
                raise InputError(f"{name}: '{value}' is not one of {', '.join(choices)}.")
        files = ModelFiles(transformer=resolve("transformer", transformer), vae=resolve("vae", vae),
                           t5=resolve("t5", t5), clip_l=resolve("clip_l", clip_l),
                           siglip=resolve("siglip", siglip), uso_lora=resolve("uso_lora", uso_lora),
                           projector=resolve("projector", projector))
        options = EngineOptions(precision=precision, memory=memory, lora_mode=lora_mode, encoders=encoders,
                                attention=attention, compile=bool(compile),
                                step_cache=check_step_cache(step_cache),
                                device=bridge.torch_device(), facts=bridge.device_facts(),
                                comfy_tokenizer_dirs=bridge.shipped_tokenizer_dirs())
        progress = bridge.Progress(len(LOAD_STEPS), node_id=unique_id(cls))

        def on_load_step(what: str) -> None:
            bridge.throw_if_interrupted()
            progress.set(LOAD_STEPS.index(what) if what in LOAD_STEPS else progress.current)

        fingerprint = cls.fingerprint_inputs(transformer=transformer, vae=vae, t5=t5, clip_l=clip_l,
                                             siglip=siglip, uso_lora=uso_lora, projector=projector)
        pipeline = pipeline_cache.get_or_load(files, options, fingerprint, on_load_step)
        progress.set(len(LOAD_STEPS))
        return io.NodeOutput(pipeline)


NODE_CLASSES = [USOLoadModels]
