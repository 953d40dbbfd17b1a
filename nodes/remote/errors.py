"""Exceptions of the remote clients and the provider error bodies turned into user messages."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping


class RemoteError(RuntimeError):
    """A failure the user can act on; the message says what happened and what to do."""


class KeyProblem(RemoteError):
    """The API key is missing, malformed, or its file cannot be read. Raised before any network call."""


class InputProblem(RemoteError):
    """An input cannot be sent as it is. Raised before any network call."""


class ProviderError(RemoteError):
    """The provider answered with an error."""

    def __init__(self, message: str, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class RemoteTimeout(RemoteError):
    """The job did not finish within timeout_s."""


class Cancelled(Exception):
    """The user pressed Cancel. Not a RemoteError: the node turns it into ComfyUI's interrupt."""


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
