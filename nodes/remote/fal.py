"""fal.ai queue client for `fal-ai/uso`: submit, poll status, fetch result, cancel."""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import (Cancelled, DeadlineExceeded, ProviderError, RemoteError, RemoteTimeout,
                     fal_error_detail, in_user_terms, input_fix_hint, redact)
from .hooks import Hooks
from .keys import ApiKey
from .transport import (FAL_SUBMIT, ONCE, READ, READ_FINAL, USER_AGENT, NetworkFailure, Response,
                        Transport, display_url, raw_request)

log = logging.getLogger("uso.remote")

QUEUE_URL_ENV = "USO_FAL_QUEUE_URL"
DEFAULT_QUEUE_URL = "https://queue.fal.run"
MODEL_ID = "fal-ai/uso"
SUBMIT_TIMEOUT = (10.0, 60.0)
STATUS_TIMEOUT = (10.0, 60.0)
RESULT_TIMEOUT = (10.0, 120.0)
CANCEL_TIMEOUT = (3.0, 5.0)
# How fal says the empty subject slot of a style-only request was not accepted.
_PLACEHOLDER_ERROR_TYPES = {"file_download_error", "image_load_error", "invalid_url", "url_parsing"}
#: Status answers that cannot be read (not JSON, no status) in a row before the job is given up:
#: a proxy's error page or a truncated answer passes; one that stays means we cannot follow the job.
MAX_UNREADABLE_STATUS = 5


@dataclass(frozen=True)
class FalJob:
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


@dataclass
class FalResult:
    data: dict
    request_id: str
    warnings: list[str] = field(default_factory=list)


class _PlaceholderRejected(Exception):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class FalClient:
    def __init__(self, key: ApiKey, base_url: str, transport: Transport, hooks: Hooks,
                 poll_interval_s: float = 1.0):
        self.key = key
        self.base_url = base_url.rstrip("/")
        self.t = transport
        self.hooks = hooks
        self.poll_interval_s = poll_interval_s
        self.image_names: list[str] | None = None   # the user's name of each input_image_urls entry

    # -- public ---------------------------------------------------------------------------------

    def run(self, body: dict, timeout_s: float, image_names: list[str] | None = None) -> FalResult:
        """Submit, wait, return the result JSON. Cancel and timeout also cancel the fal job.
        `image_names` name the entries of input_image_urls in messages (subject_image, ...)."""
        deadline = time.monotonic() + timeout_s
        self.image_names = image_names
        try:
            return self._run_once(body, timeout_s, deadline)
        except _PlaceholderRejected as exc:
            # Refused at submit (fal checks URLs there) or by the job's result: resend without it.
            urls = body["input_image_urls"][1:]
            self.image_names = image_names[1:] if image_names else None
            note = (f"fal did not accept an empty subject slot for a style-only request ({exc.detail}); "
                    "ran it again with the style images only, so the first style image also fills the "
                    "subject/content slot and shapes the layout")
            self.hooks.report(f"fal: {note}")  # logged with the other warnings by the caller
            result = self._run_once({**body, "input_image_urls": urls}, timeout_s, deadline)
            result.warnings.insert(0, note)
            return result

    # -- steps ----------------------------------------------------------------------------------

    def _run_once(self, body: dict, timeout_s: float, deadline: float) -> FalResult:
        started = time.monotonic()
        job = self._submit(body, timeout_s, deadline)
        try:
            status = self._poll(job, started, deadline)
        except Cancelled:
            self._cancel(job)
            self.hooks.report(f"fal: cancelled; asked fal to stop request {job.request_id}")
            raise
        except DeadlineExceeded:
            self._cancel(job)
            raise RemoteTimeout(
                f"fal: no result after timeout_s={timeout_s:g} s (request_id={job.request_id}); the fal job "
                "was cancelled. Raise timeout_s if fal's queue is long, or run again later.") from None
        except RemoteError:
            self._cancel(job)  # we can no longer follow the job; don't let it run on unseen
            raise
        return self._result(job, status, _has_placeholder(body))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.key.secret.reveal()}"}  # requests adds Content-Type for JSON

    def _submit(self, body: dict, timeout_s: float, deadline: float) -> FalJob:
        url = f"{self.base_url}/{MODEL_ID}"
        self.hooks.report("fal: submitting the job")
        try:
            resp = self.t.send("POST", url, policy=FAL_SUBMIT, timeout=SUBMIT_TIMEOUT, headers=self._headers(),
                               json_body=body, deadline=deadline, label="fal: ",
                               on_late_response=self._cancel_late_submit)
        except Cancelled:
            self.hooks.report("fal: cancelled while submitting; if fal accepts the job after all, it is "
                              "cancelled as soon as its request id arrives")
            raise
        except DeadlineExceeded:
            raise RemoteTimeout(f"fal: no answer to the submit within timeout_s={timeout_s:g} s. If fal accepts "
                                "the job late it is cancelled automatically. Check your connection and run "
                                "again.") from None
        except NetworkFailure as f:
            sure = "it never reached fal, nothing was charged" if f.reason.startswith("could not connect") \
                else "it may or may not have reached fal"
            raise RemoteError(f"fal: submitting the job failed after {f.attempts} attempt(s): {f.reason} "
                              f"({f.host}); {sure}. Check your internet connection or proxy"
                              f"{self._url_hint()}, then run again.") from None
        if not resp.ok:
            refusal = self._placeholder_refusal(resp, _has_placeholder(body))
            if refusal is not None:
                raise refusal
            raise self._error(resp, "submit")
        job = self._job(resp)
        if job is None:
            raise ProviderError(f"fal accepted the job but its answer has no request_id (HTTP {resp.status}). "
                                "Check the fal dashboard for a stray request, then run again.", resp.status)
        log.info("USO remote: fal request_id %s", job.request_id)
        self.hooks.report(f"fal: submitted (request_id={job.request_id})")
        self.hooks.progress(0.05)
        return job

    def _job(self, resp: Response) -> FalJob | None:
        data = resp.json()
        if not isinstance(data, dict) or not isinstance(data.get("request_id"), str) or not data["request_id"]:
            return None
        rid = data["request_id"]
        built = f"{self.base_url}/{MODEL_ID}/requests/{rid}"

        def pick(name: str, fallback: str) -> str:
            # Use fal's own URLs, but only on our host: the key goes with them, and a proxy
            # set in USO_FAL_QUEUE_URL must stay in the path.
            value = data.get(name)
            return value if isinstance(value, str) and _same_origin(value, self.base_url) else fallback

        return FalJob(rid, pick("status_url", f"{built}/status"), pick("response_url", built),
                      pick("cancel_url", f"{built}/cancel"))

    def _poll(self, job: FalJob, started: float, deadline: float) -> dict:
        active_since: float | None = None
        queued_for = 0.0
        unreadable = 0
        while True:
            try:
                resp = self.t.send("GET", job.status_url, policy=READ, timeout=STATUS_TIMEOUT,
                                   headers=self._headers(), params={"logs": "1"}, deadline=deadline,
                                   label="fal: ")
            except NetworkFailure as f:
                raise RemoteError(f"fal: lost contact while waiting for request {job.request_id}: {f.reason} "
                                  f"({f.host}) after {f.attempts} attempts; the job was cancelled. Check your "
                                  "connection and run again.") from None
            if not resp.ok:
                raise self._error(resp, "status", job)
            status = resp.json()
            if not isinstance(status, dict) or not isinstance(status.get("status"), str):
                # Not an answer about the job (a proxy's page, a cut-off body): ask again, a few
                # times; never take it for "finished" (the result would be "still in progress").
                unreadable += 1
                text = " ".join(resp.content[:120].decode("utf-8", "replace").split()) or "an empty body"
                if unreadable >= MAX_UNREADABLE_STATUS:
                    raise RemoteError(
                        f"fal: the status of request {job.request_id} could not be read {unreadable} times in a "
                        f"row (HTTP {resp.status}, not a fal status: '{redact(text, self.key.secret.parts())}'); "
                        f"the job was cancelled so it does not run on unseen. Run again; if it repeats, check "
                        f"your proxy{self._url_hint()}.")
                self.hooks.report(f"fal: the status answer could not be read ({unreadable} of "
                                  f"{MAX_UNREADABLE_STATUS}); asking again")
                self.t.sleep(self.poll_interval_s, deadline)
                continue
            unreadable = 0
            state = status.get("status")
            now = time.monotonic()
            elapsed = now - started
            if state == "IN_QUEUE":
                if active_since is not None:  # fal re-queued the job after a runner failure
                    active_since = None
                ahead = status.get("queue_position")
                where = f"{ahead} ahead" if isinstance(ahead, int) else "position unknown"
                queued_for = elapsed
                self.hooks.report(f"fal: in queue ({where}) · {elapsed:.0f} s elapsed")
                self.hooks.progress(0.1)
            elif state == "IN_PROGRESS":
                if active_since is None:
                    active_since = now
                text = (f"fal: generating · {now - active_since:.0f} s "
                        f"({elapsed:.0f} s elapsed, {queued_for:.0f} s in queue)")
                line = _last_log_line(status.get("logs"))
                if line:
                    text += "\n" + redact(line, self.key.secret.parts())
                self.hooks.report(text)
                self.hooks.progress(0.3)
            else:
                # COMPLETED, or a status this client does not know: the result GET tells the outcome.
                self.hooks.report(f"fal: finished ({state}) · {elapsed:.0f} s elapsed, fetching the result")
                self.hooks.progress(0.8)
                return status
            self.t.sleep(self.poll_interval_s, deadline)

    def _result(self, job: FalJob, status: dict, placeholder: bool) -> FalResult:
        status_error = status.get("error") if isinstance(status.get("error"), str) else None
        # A job that failed keeps failing: don't retry its 500 for a minute.
        policy = READ_FINAL if status_error else READ
        try:
            resp = self.t.send("GET", job.response_url, policy=policy, timeout=RESULT_TIMEOUT,
                               headers=self._headers(), label="fal: ")
        except NetworkFailure as f:
            raise RemoteError(f"fal: the job finished but its result could not be fetched: {f.reason} "
                              f"({f.host}) after {f.attempts} attempts (request_id={job.request_id}). "
                              "Check your connection and run again.") from None
        if not resp.ok:
            refusal = self._placeholder_refusal(resp, placeholder)
            if refusal is not None:
                raise refusal
            raise self._error(resp, "result", job, status_error)
        data = resp.json()
        if not isinstance(data, dict):
            raise ProviderError(f"fal: the result of request {job.request_id} is not JSON (HTTP {resp.status}). "
                                "Run again; if it repeats, report it to fal.", resp.status, job.request_id)
        images = data.get("images")
        if not isinstance(images, list) or not images:
            why = f"fal reported: {redact(status_error, self.key.secret.parts())}" if status_error \
                else "the result has no images"
            raise ProviderError(f"fal: the job finished without images ({why}) (request_id={job.request_id}). "
                                "Run again.", resp.status, job.request_id)
        return FalResult(data, job.request_id)

    def _cancel(self, job: FalJob) -> None:
        """Best effort, once, short timeouts; never raises (we are already failing or cancelling)."""
        quiet = Transport(is_cancelled=lambda: False, backoff_base_s=self.t.backoff_base_s)
        try:
            resp = quiet.send("PUT", job.cancel_url, policy=ONCE, timeout=CANCEL_TIMEOUT, headers=self._headers())
            log.info("USO remote: fal cancel of %s -> HTTP %d", job.request_id, resp.status)
        except Exception as exc:  # the job may run on; say so in the log, don't mask the real error
            log.warning("USO remote: could not cancel fal request %s (%s)", job.request_id, type(exc).__name__)

    def _cancel_late_submit(self, resp: Response) -> None:
        """Runs in the abandoned submit's worker thread when fal's answer arrives after Cancel."""
        job = self._job(resp) if resp.ok else None
        if job is None:
            return
        try:
            raw_request("PUT", job.cancel_url, headers={**self._headers(), "User-Agent": USER_AGENT},
                        timeout=CANCEL_TIMEOUT, max_bytes=1024 * 1024)
            log.info("USO remote: cancelled fal request %s whose submit answered after Cancel", job.request_id)
        except Exception as exc:
            log.warning("USO remote: could not cancel late fal request %s (%s)", job.request_id,
                        type(exc).__name__)

    # -- errors ---------------------------------------------------------------------------------

    def _placeholder_refusal(self, resp: Response, placeholder: bool) -> _PlaceholderRejected | None:
        """fal refusing the empty subject slot of a style-only request (HTTP 400/422 about entry 0
        of input_image_urls, or a download / URL error type), at submit or from the result."""
        if not placeholder or resp.status not in (400, 422):
            return None
        detail, error_type = fal_error_detail(resp.content, resp.headers)
        about_slot = "input_image_urls.0" in detail or (
            error_type in _PLACEHOLDER_ERROR_TYPES and not re.search(r"input_image_urls\.[1-9]", detail))
        return _PlaceholderRejected(redact(detail, self.key.secret.parts())) if about_slot else None

    def _url_hint(self) -> str:
        return f" and {QUEUE_URL_ENV}" if self.base_url != DEFAULT_QUEUE_URL else ""

    def _error(self, resp: Response, stage: str, job: FalJob | None = None,
               status_error: str | None = None) -> ProviderError:
        detail, error_type = fal_error_detail(resp.content, resp.headers)
        detail, named = in_user_terms(redact(detail, self.key.secret.parts()), self.image_names)
        code = resp.status
        kind = f"HTTP {code}" + (f", {error_type}" if error_type else "")
        lower = detail.lower()
        failed = "fal: the job failed: " if stage == "result" else ""
        if code == 401 or (code == 403 and ("key" in lower or "auth" in lower)):
            msg = (f"fal rejected the API key from {self.key.source} ({kind}: {detail}). Use the full "
                   "'key_id:key_secret' string from https://fal.ai/dashboard/keys and check the key is active.")
        elif code == 403:
            msg = (f"fal refused the request ({kind}: {detail}). The fal account may be locked or out of "
                   "credits: check https://fal.ai/dashboard/billing.")
        elif code == 404 and stage == "submit":
            msg = (f"fal: no USO endpoint at {display_url(self.base_url)}/{MODEL_ID} ({kind}: {detail}). "
                   f"Check {QUEUE_URL_ENV} if you set it.")
        elif code == 404:
            msg = f"fal: request not found ({kind}: {detail}); it expired or the model id is wrong. Run again."
        elif code in (400, 422):
            msg = f"{failed}fal rejected the input ({kind}): {detail}. {input_fix_hint(named)}"
        elif code == 429:
            msg = (f"fal: rate or concurrency limit ({kind}: {detail}), still after several retries. Wait a "
                   "minute or run fewer jobs at once, then run again.")
        elif code == 499:
            msg = f"{failed}the job was cancelled on fal ({kind}: {detail})."
        elif code == 504 and resp.headers.get("x-fal-request-timeout-type", "").lower() == "user":
            msg = f"{failed}no fal runner started in time ({kind}: {detail}). Run again later."
        elif code >= 500:
            msg = (f"{failed}fal server error ({kind}: {detail}). fal does not charge for server errors; "
                   "run again later.")
        else:
            msg = f"{failed}unexpected answer from fal ({kind}: {detail})."
        if status_error and status_error not in msg:
            msg += f" fal's status said: {redact(status_error, self.key.secret.parts())}."
        rid = job.request_id if job else resp.fal_request_id
        if rid:
            msg += f" (request_id={rid})"
        return ProviderError(msg, code, rid)


def _has_placeholder(body: dict) -> bool:
    """A style-only request with the reference's empty subject slot first."""
    urls = body.get("input_image_urls") or []
    return urls[:1] == [""] and len(urls) > 1


def _same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _last_log_line(logs: Any) -> str:
    if not isinstance(logs, list):
        return ""
    for entry in reversed(logs):
        message = entry.get("message") if isinstance(entry, dict) else None
        if isinstance(message, str) and message.strip():
            text = " ".join(message.split())
            return text if len(text) <= 200 else text[:199] + "…"
    return ""
