"""AIML API client for `bytedance/uso`: one blocking POST (AIML has no job id, status or cancel)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .errors import (Cancelled, DeadlineExceeded, ProviderError, RemoteError, RemoteTimeout,
                     aiml_error_detail, in_user_terms, input_fix_hint, redact)
from .hooks import Hooks
from .keys import ApiKey
from .transport import AIML_POST, NetworkFailure, Response, Transport, display_url

log = logging.getLogger("uso.remote")

URL_ENV = "USO_AIML_URL"
DEFAULT_URL = "https://api.aimlapi.com"
PATH = "/v1/images/generations"
CONNECT_TIMEOUT_S = 10.0
NO_CANCEL = ("AIML has no way to cancel a generation, so it may still finish on AIML's side and be "
             "billed")


@dataclass
class AimlResult:
    data: dict
    items: list
    request_id: str | None
    warnings: list[str] = field(default_factory=list)


class AimlClient:
    def __init__(self, key: ApiKey, base_url: str, transport: Transport, hooks: Hooks):
        self.key = key
        self.base_url = base_url.rstrip("/")
        self.t = transport
        self.hooks = hooks
        self.image_names: list[str] | None = None   # the user's name of each image_urls entry

    def run(self, body: dict, timeout_s: float, image_names: list[str] | None = None) -> AimlResult:
        """POST and wait; `image_names` name the entries of image_urls in messages."""
        self.image_names = image_names
        url = self.base_url + PATH
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.key.secret.reveal()}"}  # requests adds Content-Type for JSON

        def tick(elapsed: float) -> None:
            self.hooks.report(f"AIML: generating · {elapsed:.0f} s elapsed (AIML reports no progress)")

        self.hooks.report("AIML: request sent, waiting for the images")
        self.hooks.progress(0.1)
        try:
            resp = self.t.send("POST", url, policy=AIML_POST, timeout=(CONNECT_TIMEOUT_S, timeout_s),
                               headers=headers, json_body=body, deadline=deadline, tick=tick, label="AIML: ")
        except Cancelled:
            log.warning("USO remote: AIML request abandoned on Cancel; %s", NO_CANCEL)
            self.hooks.report(f"AIML: cancelled here. {NO_CANCEL}.")
            raise
        except DeadlineExceeded:
            raise RemoteTimeout(self._timeout_message(timeout_s)) from None
        except NetworkFailure as f:
            if f.timed_out or time.monotonic() >= deadline:
                raise RemoteTimeout(self._timeout_message(timeout_s)) from None
            hint = f" and {URL_ENV}" if self.base_url != DEFAULT_URL else ""
            charged = "nothing was charged" if f.reason.startswith("could not connect") else \
                "the request may have reached AIML and may be billed"
            raise RemoteError(f"AIML: the request failed after {f.attempts} attempt(s): {f.reason} ({f.host}); "
                              f"{charged}. Check your internet connection or proxy{hint}, then run again.") from None
        if not resp.ok:
            raise self._error(resp, url)
        data = resp.json()
        if not isinstance(data, dict):
            raise ProviderError(f"AIML answered HTTP {resp.status} but not with JSON. Run again; if it repeats, "
                                "report it to AIML.", resp.status)
        items = result_items(data)
        if not items:
            raise ProviderError(f"AIML answered HTTP {resp.status} without images (no 'data' or 'images'). "
                                "Run again; if it repeats, report it to AIML.", resp.status)
        self.hooks.progress(0.8)
        return AimlResult(data, items, data.get("requestId") if isinstance(data.get("requestId"), str) else None)

    @staticmethod
    def _timeout_message(timeout_s: float) -> str:
        return (f"AIML: no answer within timeout_s={timeout_s:g} s. {NO_CANCEL}. Raise timeout_s if "
                "generations usually take longer, or try fal, which can be cancelled.")

    def _error(self, resp: Response, url: str) -> ProviderError:
        message, request_id = aiml_error_detail(resp.content)
        message, named = in_user_terms(redact(message, self.key.secret.parts()), self.image_names)
        code = resp.status
        if code == 401:
            msg = (f"AIML rejected the API key from {self.key.source} (HTTP 401: {message}). Copy a valid key "
                   "from https://aimlapi.com/app/keys.")
        elif code == 403:
            msg = (f"AIML refused the request (HTTP 403: {message}). The account is probably out of credits; "
                   "top it up in the AIML dashboard.")
        elif code == 404:
            msg = f"AIML: no image endpoint at {display_url(url)} (HTTP 404: {message}). Check {URL_ENV} if you set it."
        elif code in (400, 422):
            msg = f"AIML rejected the input (HTTP {code}): {message}. {input_fix_hint(named)}"
        elif code == 429:
            msg = (f"AIML: rate limit (HTTP 429: {message}), still after one retry. Wait a few minutes (free-tier "
                   "keys have an hourly limit), then run again.")
        elif code == 504:
            msg = (f"AIML: the generation timed out on AIML's side (HTTP 504: {message}). It may still have "
                   "been billed; run again later.")
        elif code >= 500:
            msg = (f"AIML server error (HTTP {code}: {message}). Run again later; the model may be under "
                   "maintenance.")
        else:
            msg = f"AIML: unexpected answer (HTTP {code}: {message})."
        if request_id:
            msg += f" (AIML requestId={request_id})"
        return ProviderError(msg, code, request_id)


def result_items(data: dict) -> list:
    """Per image: data[i] when it has a url / b64_json, else images[i] (the fal pass-through copy)."""
    primary = data.get("data") if isinstance(data.get("data"), list) else []
    fallback = data.get("images") if isinstance(data.get("images"), list) else []
    items = []
    for i in range(max(len(primary), len(fallback))):
        first = primary[i] if i < len(primary) else None
        if isinstance(first, dict) and (first.get("url") or first.get("b64_json")):
            items.append(first)
        elif i < len(fallback):
            items.append(fallback[i])
        elif first is not None:
            items.append(first)
    return items
