"""Tokenizers for CLIP-L and T5, found on disk (never downloaded).

Looked for, in order: a folder the caller names, the folder in the USO_TOKENIZER_DIR environment
variable, the diffusers FLUX folder in use, and the files ComfyUI ships in its own tree.
"""
from __future__ import annotations

import os

from .errors import TokenizerNotFoundError

#: Sub-folder names tried inside a tokenizer root, and inside a diffusers FLUX folder.
SUBFOLDERS = {"clip_l": ("clip_l", "tokenizer"), "t5": ("t5", "tokenizer_2")}
_MAX_LENGTH = {"clip_l": 77, "t5": 512}
_WHERE = ("the 'tokenizer' (CLIP-L) and 'tokenizer_2' (T5) folders of the FLUX.1-dev diffusers "
          "repository (black-forest-labs/FLUX.1-dev), or, inside ComfyUI, its own "
          "comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer (ComfyUI Desktop keeps them in the "
          "app's resources: %LOCALAPPDATA%\\Programs\\@comfyorgcomfyui-electron\\resources\\ComfyUI\\comfy "
          "on Windows, /Applications/ComfyUI.app/Contents/Resources/ComfyUI/comfy on macOS)")


def has_tokenizer_files(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    files = set(os.listdir(folder))
    return ("tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files
            or "spiece.model" in files)


def candidate_folders(kind: str, roots: list[str]) -> list[str]:
    out = []
    for root in roots:
        if not root:
            continue
        out.append(root)
        out.extend(os.path.join(root, sub) for sub in SUBFOLDERS[kind])
    return out


def load_tokenizer(kind: str, roots: list[str]):
    """The first tokenizer found for `kind` ("clip_l" or "t5") under the given roots."""
    from transformers import AutoTokenizer

    tried = []
    for folder in candidate_folders(kind, roots):
        if not has_tokenizer_files(folder):
            tried.append(folder)
            continue
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # a folder with the files but an unusable config
            tried.append(f"{folder} ({type(exc).__name__}: {exc})")
            continue
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if kind == "t5":
            _legacy_t5_prefix(tok)
        tok.model_max_length = _MAX_LENGTH[kind]
        return tok
    name = "CLIP-L" if kind == "clip_l" else "T5"
    needed = "vocab.json + merges.txt (or tokenizer.json)" if kind == "clip_l" else \
        "tokenizer.json (or spiece.model)"
    looked = "; ".join(tried) if tried else "nowhere (no folder was given)"
    raise TokenizerNotFoundError(
        f"{name} tokenizer not found: needs {needed} with tokenizer_config.json. Looked in: {looked}. "
        f"Get the files from {_WHERE}, put them in a folder and name it as the tokenizer folder "
        "(or set USO_TOKENIZER_DIR).")


def _legacy_t5_prefix(tok) -> None:
    """Tokenize T5 prompts as the reference's slow, legacy T5Tokenizer does: every piece of text
    between special tokens gets sentencepiece's "▁" prefix. ComfyUI's (and FLUX.1-dev's) fast
    tokenizer.json says `legacy: false`, i.e. Metaspace `prepend_scheme: "first"`: text right after
    a special token's text ("</s>word", "<extra_id_0>.") loses the "▁" and gets other ids. Newer
    transformers rebuild the pre-tokenizer with "always"; older ones take the file as it is."""
    import json

    from tokenizers import Tokenizer

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return  # a sentencepiece (slow) tokenizer: legacy unless told otherwise

    def always(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "always"
            for value in node.values():
                always(value)
        elif isinstance(node, list):
            for value in node:
                always(value)

    state = json.loads(backend.to_str())
    before = json.dumps(state["pre_tokenizer"])
    always(state["pre_tokenizer"])
    if json.dumps(state["pre_tokenizer"]) != before:
        backend.pre_tokenizer = Tokenizer.from_str(json.dumps(state)).pre_tokenizer


def tokenizer_roots(explicit: str | None, diffusers_dir: str | None, comfy_dirs: dict[str, str],
                    kind: str) -> list[str]:
    roots = [explicit, os.environ.get("USO_TOKENIZER_DIR"), diffusers_dir, comfy_dirs.get(kind)]
    return [r for r in roots if r]
