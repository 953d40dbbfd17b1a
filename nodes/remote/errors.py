"""Exceptions of the remote clients and the provider error bodies turned into user messages."""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping

# The user pressed Cancel. Not a RemoteError: the node turns it into ComfyUI's interrupt.
from ..cancel import Cancelled  # noqa: F401 - re-exported for the clients


class RemoteError(RuntimeError):
    """A failure the user can act on; the message says what happened and what to do."""


class KeyProblem(RemoteError):
    """The API key is missing, malformed, or its file cannot be read. Raised before any network call."""


class InputError(RemoteError):
    """An input cannot be sent as it is. Raised before any network call. (The engine's peer is
    `nodes.engine.InputError`.)"""


class ProviderError(RemoteError):
    """The provider answered with an error."""

    def __init__(self, message: str, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class RemoteTimeout(RemoteError):
    """The job did not finish within timeout_s."""


class DeadlineExceeded(Exception):
    """Internal: the job deadline passed while waiting; the provider client turns it into RemoteTimeout."""


MAX_DETAIL_CHARS = 300


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced, for server text that might echo the key back."""
    for s in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def _field(loc: Any) -> str:
    if not isinstance(loc, (list, tuple)):
        return str(loc) if loc not in (None, "") else "input"
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "input"


def fal_error_detail(body: bytes, headers: Mapping[str, str]) -> tuple[str, str | None]:
    """(human detail, error_type) from either fal error shape, or from a non-JSON body."""
    data = parse_json(body)
    error_type = headers.get("x-fal-error-type")
    if isinstance(data, dict):
        error_type = data.get("error_type") or error_type
        detail = data.get("detail", data.get("error", data.get("message")))
        if isinstance(detail, list):
            items = []
            for entry in detail:
                if isinstance(entry, dict):
                    # `msg` is for humans, `type` is the stable key; `input` may echo a whole data URI.
                    kind = f" ({entry['type']})" if entry.get("type") else ""
                    items.append(f"{_field(entry.get('loc'))}: {_short(entry.get('msg', ''))}{kind}")
                else:
                    items.append(_short(str(entry)))
            return "; ".join(items) or "no detail given", error_type
        if detail not in (None, ""):
            return _short(detail if isinstance(detail, str) else json.dumps(detail)), error_type
        if data:
            return _short(json.dumps(data)), error_type
    text = body.decode("utf-8", "replace").strip()
    return (_short(text) if text else "empty response body"), error_type


def aiml_error_detail(body: bytes) -> tuple[str, str | None]:
    """(message, AIML requestId) from AIML's {message, statusCode, requestId, ...} body."""
    data = parse_json(body)
    if isinstance(data, dict):
        message = data.get("message", data.get("error", data.get("detail")))
        if isinstance(message, (list, dict)):
            message = json.dumps(message)
        request_id = data.get("requestId")
        if message not in (None, ""):
            return _short(message), request_id
        return _short(json.dumps(data)), request_id
    text = body.decode("utf-8", "replace").strip()
    return (_short(text) if text else "empty response body"), None


#: The providers' request fields under the names the user sets them by (node inputs; the command
#: line's flags are the same words with dashes).
USER_FIELD_NAMES = {
    "num_inference_steps": "steps", "guidance_scale": "guidance", "image_size": "size (width/height)",
    "enable_safety_checker": "safety_checker", "num_images": "num_images", "output_format": "output_format",
    "negative_prompt": "negative_prompt", "prompt": "prompt", "seed": "seed", "keep_size": "keep_size",
}
_IMAGE_LIST = re.compile(r"\b(?:input_image_urls|image_urls)(?:\.(\d+)|\[(\d+)\])?")
_FIELD = re.compile(r"\b(" + "|".join(sorted(USER_FIELD_NAMES, key=len, reverse=True)) + r")\b")


def image_input_names(has_subject: bool, style_count: int, placeholder: bool) -> list[str]:
    """What the user calls each entry of the provider's image list, in order."""
    names = ["subject_image"] if has_subject else (["the empty subject slot"] if placeholder else [])
    return names + [f"style_images (image {i + 1})" for i in range(style_count)]


def in_user_terms(detail: str, image_names: list[str] | None) -> tuple[str, bool]:
    """`detail` with the provider's field names replaced by the user's input names, and whether it
    names any input at all."""
    named = False

    def image(m: re.Match) -> str:
        nonlocal named
        named = True
        index = m.group(1) or m.group(2)
        if index is None:
            return "subject_image / style_images"
        i = int(index)
        return image_names[i] if image_names and i < len(image_names) else f"image {i + 1} of the list sent"

    def field(m: re.Match) -> str:
        nonlocal named
        named = True
        return USER_FIELD_NAMES[m.group(1)]

    detail = _IMAGE_LIST.sub(image, detail)
    detail = _FIELD.sub(field, detail)
    return detail, named


def input_fix_hint(named: bool) -> str:
    return "Fix the named input(s) and run again." if named else \
        "Check the prompt, the images and the size, steps and guidance, then run again."
