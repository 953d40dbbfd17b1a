"""API keys: where they come from, whether they look right, and keeping them out of text.

Lookup order for each run (nothing is cached, so a changed key works without a restart):

1. environment: fal ``FAL_KEY`` (or ``FAL_KEY_ID`` + ``FAL_KEY_SECRET``), AIML ``AIML_API_KEY``
   (or ``AIMLAPI_KEY``);
2. the key file, JSON ``{"fal": "key_id:key_secret", "aiml": "your-aiml-key"}``: the path in
   ``USO_REMOTE_KEYS_FILE`` when set, else ``<ComfyUI user directory>/uso_remote_keys.json``.

The file sits in the user directory's root, not in ``user/default/``: ComfyUI serves the files of
``user/<name>/`` over its /userdata HTTP API, so a key there could be read by any browser that
reaches the server.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import KeyProblem

KEY_FILE_NAME = "uso_remote_keys.json"
KEYS_FILE_ENV = "USO_REMOTE_KEYS_FILE"
ENV_VARS = {"fal": ("FAL_KEY",), "aiml": ("AIML_API_KEY", "AIMLAPI_KEY")}
PROVIDER_NAMES = {"fal": "fal", "aiml": "AIML"}
KEY_FORMATS = {"fal": "key_id:key_secret", "aiml": "your-aiml-key"}
KEY_PAGES = {"fal": "https://fal.ai/dashboard/keys", "aiml": "https://aimlapi.com/app/keys"}
_MAX_FILE_BYTES = 64 * 1024


class Secret:
    """A string that never prints itself (repr, str, f-strings, logging, tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def parts(self) -> list[str]:
        """The key and its pieces long enough to identify it, for redaction."""
        pieces = [p for p in self._value.split(":") if len(p) >= 6]
        return [self._value, *pieces]

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("API keys are not picklable")


@dataclass(frozen=True)
class ApiKey:
    provider: str
    secret: Secret
    source: str  # where it came from, e.g. "the environment variable FAL_KEY"


def key_file_path(user_dir: str | None) -> Path | None:
    explicit = os.environ.get(KEYS_FILE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    if user_dir:
        return Path(user_dir) / KEY_FILE_NAME
    return None


def where_to_put_it(provider: str, user_dir: str | None, in_comfyui: bool = True) -> str:
    """How to give the key, for ComfyUI (an environment variable is read when ComfyUI starts) or
    for the command line and the Python API (`in_comfyui` False: read by the next run)."""
    env = " or ".join(ENV_VARS[provider])
    example = json.dumps({provider: KEY_FORMATS[provider]})
    path = key_file_path(user_dir)
    if path is not None:
        file_hint = f"or write {example} into {path} (read on every run{', no restart needed' if in_comfyui else ''})"
    else:
        file_hint = (f"or write {example} into a JSON file and set the environment variable "
                     f"{KEYS_FILE_ENV} to its path")
    if in_comfyui:
        return (f"Set the environment variable {env} to your {PROVIDER_NAMES[provider]} key "
                f"('{KEY_FORMATS[provider]}', from {KEY_PAGES[provider]}) and restart ComfyUI, "
                f"{file_hint}. Never type the key into a widget: widgets are saved in workflows and PNGs.")
    return (f"Set the environment variable {env} to your {PROVIDER_NAMES[provider]} key "
            f"('{KEY_FORMATS[provider]}', from {KEY_PAGES[provider]}) in the shell or process that runs "
            f"this (e.g. export {ENV_VARS[provider][0]}=...), {file_hint}. Never put the key in a script, "
            "a manifest or a command line: those end up in files and shell histories.")


def resolve_key(provider: str, user_dir: str | None, in_comfyui: bool = True) -> ApiKey:
    """The key for `provider`, validated; KeyProblem (without the key in it) otherwise."""
    if provider not in ENV_VARS:
        raise KeyProblem(f"provider: '{provider}' is not supported; choose 'fal' or 'aiml'.")
    found = _from_env(provider) or _from_file(provider, user_dir)
    if found is None:
        raise KeyProblem(f"{PROVIDER_NAMES[provider]}: no API key found. "
                         f"{where_to_put_it(provider, user_dir, in_comfyui)}")
    value, source = found
    problem = key_format_problem(provider, value)
    if problem:
        raise KeyProblem(f"{PROVIDER_NAMES[provider]}: the API key from {source} is malformed: "
                         f"{problem}. {where_to_put_it(provider, user_dir, in_comfyui)}")
    return ApiKey(provider, Secret(value), source)


def _clean(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1].strip()  # FAL_KEY="..." copied from a .env file
    return value


def _from_env(provider: str) -> tuple[str, str] | None:
    for name in ENV_VARS[provider]:
        value = _clean(os.environ.get(name, ""))
        if value:
            return value, f"the environment variable {name}"
    if provider == "fal":
        key_id = _clean(os.environ.get("FAL_KEY_ID", ""))
        key_secret = _clean(os.environ.get("FAL_KEY_SECRET", ""))
        if key_id and key_secret:
            return f"{key_id}:{key_secret}", "the environment variables FAL_KEY_ID and FAL_KEY_SECRET"
    return None


def _from_file(provider: str, user_dir: str | None) -> tuple[str, str] | None:
    path = key_file_path(user_dir)
    if path is None:
        return None
    example = json.dumps({"fal": KEY_FORMATS["fal"], "aiml": KEY_FORMATS["aiml"]})
    explicit = bool(os.environ.get(KEYS_FILE_ENV, "").strip())
    if not path.is_file():
        if explicit:
            raise KeyProblem(f"{KEYS_FILE_ENV} points to {path}, which is not a file. "
                             f"Create it with the content {example}, or unset {KEYS_FILE_ENV}.")
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyProblem(f"The key file {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                         "check its permissions.") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise KeyProblem(f"The key file {path} is larger than 64 KB; it should only hold {example}.")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise KeyProblem(f"The key file {path} is not UTF-8 text. Expected the content {example}.") from None
    except json.JSONDecodeError as exc:
        # Only the position: the parser's message could quote the file, i.e. the key.
        raise KeyProblem(f"The key file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}). "
                         f"Expected the content {example}.") from None
    if not isinstance(data, dict):
        raise KeyProblem(f"The key file {path} must hold a JSON object like {example}.")
    value = data.get(provider)
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeyProblem(f"The key file {path}: the entry \"{provider}\" must be a string "
                         f"('{KEY_FORMATS[provider]}').")
    value = _clean(value)
    if not value:
        return None
    return value, f"the key file {path} (entry \"{provider}\")"


def key_format_problem(provider: str, value: str) -> str | None:
    """What is wrong with the key's shape, in words that do not repeat the key; None if fine."""
    lowered = value.lower()
    if lowered.startswith(("key ", "bearer ")):
        return "it starts with 'Key ' or 'Bearer '; store only the key itself, the prefix is added automatically"
    if any(c.isspace() for c in value):
        return "it contains spaces or line breaks; copy the key again without them"
    if not value.isascii() or not value.isprintable():
        return "it contains non-ASCII or control characters; copy the key again"
    if provider == "fal":
        key_id, sep, key_secret = value.partition(":")
        if not sep:
            return "fal keys look like 'key_id:key_secret' (two parts joined by ':'), but this one has no ':'"
        if not key_id or not key_secret:
            return "fal keys look like 'key_id:key_secret', but one side of the ':' is empty"
    return None
