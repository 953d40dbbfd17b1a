"""Which file feeds each model slot, outside ComfyUI (command line, Python API).

Sources, strongest first:

1. an explicit path per slot (``--transformer PATH`` ...). A value that is not an existing path is
   taken as a file name inside the slot's model folders, like the loader node's lists
   (``--transformer checkpoints/flux1-dev-fp8.safetensors``);
2. a diffusers FLUX.1-dev folder (``--diffusers DIR``): transformer, VAE, T5, CLIP-L and tokenizers;
3. ComfyUI model folders: a ``models/`` directory (``--comfy-models DIR``) and the folders listed in
   ``extra_model_paths.yaml`` files, searched for the catalog's default file names
   (`model_catalog.SLOTS`). Without either flag, the ComfyUI installation this pack sits in
   (``ComfyUI/custom_nodes/<pack>``) is used when there is one.

VAE, T5 and CLIP-L come from the transformer itself when it is a ComfyUI all-in-one checkpoint or
a diffusers folder, unless given explicitly. Tokenizers: ``--tokenizers DIR``, the diffusers folder,
ComfyUI's own tokenizer files next to the models directory, or ``USO_TOKENIZER_DIR``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..engine.model_set import ModelFiles
from .. import model_catalog
from ..model_catalog import EMBEDDED_SLOTS, SLOTS, parse_choice, pick_default, transformer_labels

#: ComfyUI's model folder names and their sub-directories of ``models/`` (legacy names included).
COMFY_SUBDIRS = {
    "diffusion_models": ("diffusion_models", "unet"),
    "checkpoints": ("checkpoints",),
    "diffusers": ("diffusers",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "clip_vision": ("clip_vision",),
    "loras": ("loras",),
    "model_patches": ("model_patches",),
}
#: Old folder names ComfyUI still accepts in extra_model_paths.yaml (folder_paths.map_legacy).
LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}
#: Flag spelling of each slot, for messages.
SLOT_FLAGS = {"transformer": "--transformer", "vae": "--vae", "t5": "--t5", "clip_l": "--clip-l",
              "siglip": "--siglip", "uso_lora": "--uso-lora", "projector": "--projector"}


class ModelPathError(ValueError):
    """One or more slots have no usable file; `problems` holds one line per slot."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class ModelSources:
    comfy_models: list[str] = field(default_factory=list)
    extra_model_paths: list[str] = field(default_factory=list)
    diffusers: str | None = None
    explicit: dict[str, str] = field(default_factory=dict)   # slot -> path or folder-relative name
    tokenizers: str | None = None


@dataclass
class ResolvedModels:
    files: ModelFiles
    comfy_tokenizer_dirs: dict[str, str]
    notes: list[str]             # "slot: path (why)" per slot, for the log


# -- ComfyUI folders --------------------------------------------------------------------------------

def folders_from_models_dir(models_dir: str) -> dict[str, list[str]]:
    """ComfyUI's folders under one ``models/`` directory (only those that exist)."""
    root = os.path.abspath(os.path.expanduser(models_dir))
    out: dict[str, list[str]] = {}
    for folder, subs in COMFY_SUBDIRS.items():
        for sub in subs:
            path = os.path.join(root, sub)
            if os.path.isdir(path):
                out.setdefault(folder, []).append(path)
    return out


def parse_simple_yaml(text: str) -> dict:
    """The subset of YAML that extra_model_paths.yaml uses: top-level sections holding
    ``key: value`` pairs, where a value may be a ``|`` block of lines. Comments are skipped."""
    data: dict = {}
    section: dict | None = None
    block_key, block_indent, block_lines = None, 0, []

    def close_block():
        nonlocal block_key, block_lines
        if section is not None and block_key is not None:
            section[block_key] = "\n".join(block_lines) + ("\n" if block_lines else "")
        block_key, block_lines = None, []

    for raw in text.splitlines():
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if block_key is not None:
            if not stripped:
                continue
            if indent > block_indent:
                block_lines.append(stripped)
                continue
            close_block()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition(":")
        if not sep:
            raise ValueError(f"cannot read the line {raw.strip()!r}")
        key, value = key.strip().strip("'\""), _strip_comment(value).strip()
        if indent == 0:
            section = {} if not value else None
            data[key] = section if section is not None else _scalar(value)
        elif section is not None:
            if value in ("|", "|-", "|+", ">", ">-"):
                block_key, block_indent = key, indent
            else:
                section[key] = _scalar(value)
    close_block()
    return data


def _strip_comment(value: str) -> str:
    stripped = value.strip()
    if stripped[:1] in ("'", '"'):
        end = stripped.find(stripped[0], 1)
        return stripped if end < 0 else stripped[:end + 1]
    cut = value.find(" #")
    return value if cut < 0 else value[:cut]


def _scalar(value: str):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def read_extra_model_paths(path: str) -> dict[str, list[str]]:
    """Folders from a ComfyUI extra_model_paths.yaml, with ComfyUI's rules: ``base_path`` (~ and
    $VARS expanded) relative to the file; each value is one path per line; legacy names mapped."""
    path = os.path.abspath(os.path.expanduser(path))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml  # PyYAML is not a dependency; ComfyUI's own environment has it
        config = yaml.safe_load(text)
    except ImportError:
        config = parse_simple_yaml(text)
    except Exception as exc:  # yaml.YAMLError
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    yaml_dir = os.path.dirname(path)
    out: dict[str, list[str]] = {}
    for conf in (config or {}).values():
        if not isinstance(conf, dict):
            continue
        conf = dict(conf)
        base = conf.pop("base_path", None)
        conf.pop("is_default", None)
        if isinstance(base, str):
            base = os.path.expandvars(os.path.expanduser(base))
            if not os.path.isabs(base):
                base = os.path.join(yaml_dir, base)
        else:
            base = None
        for folder, value in conf.items():
            if not isinstance(value, str):
                continue
            for line in value.split("\n"):
                line = line.strip()
                if not line:
                    continue
                full = os.path.join(base, line) if base else (
                    line if os.path.isabs(line) else os.path.join(yaml_dir, line))
                out.setdefault(LEGACY_NAMES.get(folder, folder), []).append(os.path.normpath(full))
    return out


def enclosing_comfyui(start: str | None = None) -> str | None:
    """The ComfyUI root when this pack sits in ``<root>/custom_nodes/<pack>``, else None.

    A pack linked into custom_nodes (a symlink) is found through the shell's working folder
    ($PWD keeps the linked path) when the command runs from the pack folder.
    """
    pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(start or __file__))))  # <pack>/nodes/cli/
    candidates = [pack]
    logical = os.environ.get("PWD", "") if start is None else ""
    if logical and os.path.isdir(logical) and os.path.realpath(logical) == os.path.realpath(pack):
        candidates.append(logical)
    for folder in candidates:
        custom_nodes = os.path.dirname(folder)
        root = os.path.dirname(custom_nodes)
        if os.path.basename(custom_nodes) == "custom_nodes" and os.path.isdir(os.path.join(root, "models")):
            return root
    return None


def tokenizer_dirs_beside(models_dirs: list[str]) -> dict[str, str]:
    """ComfyUI's shipped tokenizer folders next to a ``models/`` directory (ComfyUI/comfy/...), else
    in ComfyUI Desktop's app resources (Desktop keeps ``comfy/`` there, apart from ``models/``)."""
    roots = [os.path.dirname(os.path.abspath(os.path.expanduser(d))) for d in models_dirs]
    for root in roots + model_catalog.desktop_comfyui_dirs():
        dirs = model_catalog.comfy_tokenizer_dirs(os.path.join(root, "comfy"))
        if dirs:
            return dirs
    return {}


# -- resolving the slots ----------------------------------------------------------------------------

def _merge(target: dict[str, list[str]], extra: dict[str, list[str]]) -> None:
    for folder, paths in extra.items():
        for p in paths:
            if p not in target.setdefault(folder, []):
                target[folder].append(p)


def gather_folders(sources: ModelSources) -> dict[str, list[str]]:
    folders: dict[str, list[str]] = {}
    for models_dir in sources.comfy_models:
        if not os.path.isdir(os.path.expanduser(models_dir)):
            raise ModelPathError([f"--comfy-models: '{models_dir}' is not a folder."])
        _merge(folders, folders_from_models_dir(models_dir))
    for yaml_path in sources.extra_model_paths:
        try:
            _merge(folders, read_extra_model_paths(yaml_path))
        except (OSError, ValueError) as exc:
            raise ModelPathError([f"--extra-model-paths: cannot read '{yaml_path}': {exc}"]) from None
    return folders


def list_files(folders: dict[str, list[str]], folder: str) -> list[str]:
    """Names in one ComfyUI model folder, like ComfyUI's lists (`model_catalog.list_folder_files`)."""
    return model_catalog.list_folder_files(folders.get(folder, []), folder)


def _transformer_places(folders: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    return transformer_labels({folder: list_files(folders, folder) for folder in SLOTS["transformer"].folders})


def _candidates(folders: dict[str, list[str]], slot: str) -> list[str]:
    if slot == "transformer":
        return list(_transformer_places(folders))
    return [name for folder in SLOTS[slot].folders for name in list_files(folders, folder)]


def _by_name(folders: dict[str, list[str]], slot: str, name: str) -> str | None:
    """`name` as a file inside the slot's folders (a loader-node label for the transformer)."""
    tries = [parse_choice(slot, name, _transformer_places(folders))] if slot == "transformer" else []
    tries += [(folder, name) for folder in SLOTS[slot].folders]
    for folder, rel in tries:
        for root in folders.get(folder, []):
            candidate = os.path.join(root, rel)
            if os.path.exists(candidate):
                return os.path.abspath(candidate)
    return None


def _explicit(folders: dict[str, list[str]], slot: str, value: str) -> tuple[str | None, str | None]:
    """(path, problem) for an explicit choice."""
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return os.path.abspath(expanded), None
    if folders:
        found = _by_name(folders, slot, value)
        if found:
            return found, None
        where = ", ".join(SLOTS[slot].folders)
        return None, (f"{slot}: '{value}' is neither an existing path nor a file in the ComfyUI "
                      f"'{where}' folder(s).")
    return None, f"{slot}: '{value}' does not exist ({SLOT_FLAGS[slot]})."


#: Where the default files of a slot sit in a ComfyUI models folder, for messages. The transformer
#: has two defaults: BFL's file, and the all-in-one checkpoint of ComfyUI's own USO template.
_TRANSFORMER_PLACES = "diffusion_models/flux1-dev.safetensors or checkpoints/flux1-dev-fp8.safetensors"


def _default_places(slot: str) -> str:
    info = SLOTS[slot]
    return _TRANSFORMER_PLACES if slot == "transformer" else f"{info.directory}/{info.defaults[0]}"


def _default(folders: dict[str, list[str]], slot: str, given: list[str] = ()) -> tuple[str | None, str | None]:
    """The slot's default file in `folders`; `given` names the folders the user pointed at."""
    info = SLOTS[slot]
    if not folders:
        if given:
            return None, (f"{slot}: no file found: {', '.join(given)} holds none of ComfyUI's model folders "
                          f"({', '.join(info.folders)}); point --comfy-models at ComfyUI's 'models' folder (the "
                          f"one holding {_default_places(slot)}), or pass {SLOT_FLAGS[slot]} PATH.")
        return None, (f"{slot}: no file given; pass {SLOT_FLAGS[slot]} PATH or --comfy-models DIR "
                      f"(ComfyUI's models folder holding {_default_places(slot)}).")
    labels = _candidates(folders, slot)
    label = pick_default(slot, labels)
    path = _by_name(folders, slot, label) if label is not None else None
    if path:
        return path, None
    searched = "; ".join(f"{f}: {', '.join(folders.get(f, [])) or '(none)'}" for f in info.folders)
    hint = (f"found {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''} but none has a default name "
            f"({', '.join(info.defaults)}); pick one with {SLOT_FLAGS[slot]} NAME") if labels else \
        f"download {info.url} into {info.directory}/{_TRANSFORMER_ALTERNATIVE if slot == 'transformer' else ''}, " \
        f"or pass {SLOT_FLAGS[slot]} PATH"
    return None, f"{slot}: no file found ({searched}); {hint}."


_TRANSFORMER_ALTERNATIVE = (" (or ComfyUI's all-in-one flux1-dev-fp8.safetensors from "
                            "https://huggingface.co/Comfy-Org/flux1-dev into checkpoints/)")


def _embeds_text_and_vae(transformer: str) -> bool:
    """True for a diffusers folder or a ComfyUI all-in-one checkpoint."""
    if os.path.isdir(transformer):
        return True
    from ..engine import loaders  # reads the file header only
    try:
        component, _layout = loaders.transformer_component(transformer)
    except Exception:
        return False  # the loader reports a wrong file with its own, better message
    return bool(component.prefix)


def with_installation_defaults(sources: ModelSources) -> tuple[ModelSources, list[str]]:
    """`sources` completed the way ComfyUI itself would see the files: without --comfy-models
    or --extra-model-paths, the ComfyUI installation around this pack (explicit files still win);
    next to each ``models/`` directory, its ``extra_model_paths.yaml`` (ComfyUI reads that file
    from its root)."""
    notes = []
    comfy_models = list(sources.comfy_models)
    if not comfy_models and not sources.extra_model_paths:
        root = enclosing_comfyui()
        if root:
            comfy_models = [os.path.join(root, "models")]
            notes.append(f"models: the ComfyUI installation around this pack ({root})")
    extra = list(sources.extra_model_paths)
    for models_dir in comfy_models:
        yaml_path = os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(models_dir))),
                                 "extra_model_paths.yaml")
        if os.path.isfile(yaml_path) and yaml_path not in extra:
            extra.append(yaml_path)
            notes.append(f"models: also the folders of {yaml_path}")
    return ModelSources(comfy_models, extra, sources.diffusers, dict(sources.explicit), sources.tokenizers), notes


def resolve(sources: ModelSources) -> ResolvedModels:
    """Paths for every slot, or ModelPathError listing every slot that has none."""
    sources, notes = with_installation_defaults(sources)
    folders = gather_folders(sources)
    given = [*sources.comfy_models, *sources.extra_model_paths]
    chosen: dict[str, str | None] = {}
    problems: list[str] = []

    def take(slot: str, result: tuple[str | None, str | None], why: str) -> None:
        path, problem = result
        if problem:
            problems.append(problem)
        else:
            chosen[slot] = path
            notes.append(f"{slot}: {path} ({why})")

    if sources.explicit.get("transformer"):
        take("transformer", _explicit(folders, "transformer", sources.explicit["transformer"]), "given")
    elif sources.diffusers:
        path = os.path.abspath(os.path.expanduser(sources.diffusers))
        take("transformer", (path, None) if os.path.isdir(path) else
             (None, f"transformer: --diffusers '{sources.diffusers}' is not a folder."), "diffusers folder")
    else:
        take("transformer", _default(folders, "transformer", given), "ComfyUI default name")

    transformer = chosen.get("transformer")
    embedded = transformer is not None and _embeds_text_and_vae(transformer)
    for slot in ("vae", "t5", "clip_l", "siglip", "uso_lora", "projector"):
        if sources.explicit.get(slot):
            take(slot, _explicit(folders, slot, sources.explicit[slot]), "given")
        elif slot in EMBEDDED_SLOTS and transformer is None:
            continue  # the transformer's own problem is reported; it might have held this one
        elif slot in EMBEDDED_SLOTS and embedded:
            chosen[slot] = None
            notes.append(f"{slot}: from the transformer ({os.path.basename(transformer)})")
        else:
            take(slot, _default(folders, slot, given), "ComfyUI default name")

    tokenizers = None
    if sources.tokenizers:
        tokenizers = os.path.abspath(os.path.expanduser(sources.tokenizers))
        if not os.path.isdir(tokenizers):
            problems.append(f"tokenizers: --tokenizers '{sources.tokenizers}' is not a folder.")
    if problems:
        raise ModelPathError(problems)
    files = ModelFiles(transformer=chosen["transformer"], siglip=chosen["siglip"], uso_lora=chosen["uso_lora"],
                       projector=chosen["projector"], vae=chosen.get("vae"), t5=chosen.get("t5"),
                       clip_l=chosen.get("clip_l"), tokenizer_dir=tokenizers)
    return ResolvedModels(files, tokenizer_dirs_beside(sources.comfy_models), notes)
