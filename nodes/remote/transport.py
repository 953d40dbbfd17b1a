"""Plain HTTP (requests) with explicit timeouts, bounded retries and Cancel/deadline checks.

Every call runs in a daemon worker thread while the caller's thread checks `is_cancelled()` and
the deadline every 0.1 s, so Cancel works even while a request is blocked on the network. An
abandoned call finishes on its own (its read timeout bounds it) and is then dropped, or handed to
`on_late_response` (fal uses that to cancel a job whose submit answer came after Cancel).
"""
from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .errors import Cancelled, DeadlineExceeded, parse_json

log = logging.getLogger("uso.remote")

CHECK_INTERVAL_S = 0.1
USER_AGENT = "comfyui-uso/0.1 (+https://github.com/comfyui-uso/comfyui-uso)"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # lower-case names
    content: bytes
    url: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return parse_json(self.content)

    @property
    def fal_request_id(self) -> str | None:
        return self.headers.get("x-fal-request-id")


class NetworkFailure(Exception):
    """No HTTP answer (DNS, refused, reset, timeout) after the retries the policy allows."""

    def __init__(self, url: str, reason: str, attempts: int, timed_out: bool):
        super().__init__(f"{reason} ({display_url(url)})")
        self.url = url
        self.host = host_of(url)
        self.reason = reason
        self.attempts = attempts
        self.timed_out = timed_out


class TooLarge(Exception):
    pass


class Refused(Exception):
    """A URL this client does not fetch (see `url_problem`), or a redirect to one. Never retried:
    the same answer would come again."""


#: Redirects followed per request: a CDN hop or two, not requests' default of 30.
MAX_REDIRECTS = 5


def is_loopback(host: str | None) -> bool:
    """True for this machine's own addresses (localhost, 127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(url: str) -> str | None:
    """Why this client will not send a request to `url`, or None. Only https goes over the network;
    plain http (the key and the images in clear) only to this machine: tests and local proxies."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return None
    if scheme == "http" and parts.hostname:
        if is_loopback(parts.hostname):
            return None
        return f"is plain http to {parts.hostname}, another machine; only https is used beyond this machine"
    return f"is not an https URL (scheme {scheme + ':' if scheme else 'missing'})"


def host_of(url: str) -> str:
    """host[:port] of `url`, without any user:password@ part."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def display_url(url: str) -> str:
    """`url` as it may appear in messages and logs: no user:password@, no query (tokens)."""
    parts = urlsplit(url)
    if parts.scheme == "data":
        return "data:…"
    return f"{parts.scheme}://{host_of(url)}{parts.path}"


class _CheckedSession(requests.Session):
    """requests' own redirect handling, with every target checked before it is followed: same
    scheme as the request it answers (no https -> http, no file:), and a URL `url_problem` accepts."""

    max_redirects = MAX_REDIRECTS

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target is None:
            return None
        full = urljoin(resp.url, target)
        was, now = urlsplit(resp.url).scheme.lower(), urlsplit(full).scheme.lower()
        if now != was:
            raise Refused(f"redirected from {was}: to {now + ':' if now else 'an unreadable URL'} "
                          f"({host_of(resp.url)}), which is refused")
        problem = url_problem(full)
        if problem is not None:
            raise Refused(f"redirected to a URL that {problem}")
        return target


def never_sent(exc: BaseException) -> bool:
    """True only when the failure provably happened before the request left this machine."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError) or isinstance(
            exc, (requests.exceptions.ReadTimeout, requests.exceptions.SSLError)):
        return False
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)):
            return True
        stack.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    return False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "no answer within the read timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS/SSL error"
    if never_sent(exc):
        return "could not connect (DNS failure or connection refused)"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection dropped before a complete answer"
    if isinstance(exc, (TooLarge, Refused)):
        return str(exc)
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
    return type(exc).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried. `attempts` counts the first try."""

    attempts: int
    statuses: frozenset[int] = frozenset()
    # Non-idempotent POST: retry an exception only if it provably never arrived, and a 5xx only
    # when no x-fal-request-id shows that fal saw it.
    post: bool = False
    fal_ingress_statuses: frozenset[int] = frozenset()

    def retry_response(self, resp: Response) -> bool:
        if resp.headers.get("x-fal-retryable", "").lower() == "false":
            return False
        if resp.status == 504 and resp.headers.get("x-fal-request-timeout-type", "").lower() == "user":
            return False
        if resp.status in self.statuses:
            return True
        return resp.status in self.fal_ingress_statuses and not resp.fal_request_id

    def retry_exception(self, exc: BaseException) -> bool:
        if isinstance(exc, (TooLarge, Refused, requests.exceptions.TooManyRedirects)):
            return False
        if self.post:
            return never_sent(exc)
        return isinstance(exc, requests.exceptions.RequestException)


READ = RetryPolicy(attempts=8, statuses=frozenset({408, 429, 500, 502, 503, 504}))
READ_FINAL = RetryPolicy(attempts=8, statuses=frozenset({408, 429, 502, 503, 504}))
FAL_SUBMIT = RetryPolicy(attempts=5, statuses=frozenset({429}), post=True,
                         fal_ingress_statuses=frozenset({502, 503, 504}))
AIML_POST = RetryPolicy(attempts=2, statuses=frozenset({429, 503}), post=True)
ONCE = RetryPolicy(attempts=1)


def _retry_after(resp: Response) -> float | None:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return None


@dataclass
class Transport:
    is_cancelled: Callable[[], bool] = lambda: False
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    on_retry: Callable[[str], None] = lambda text: None
    rng: random.Random = field(default_factory=random.Random)

    def check(self, deadline: float | None = None) -> None:
        if self.is_cancelled():
            raise Cancelled()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded()

    def sleep(self, seconds: float, deadline: float | None = None) -> None:
        end = time.monotonic() + max(0.0, seconds)
        while True:
            self.check(deadline)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(CHECK_INTERVAL_S, left))

    def backoff(self, attempt: int) -> float:
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
        return delay * (0.5 + 0.5 * self.rng.random())

    def send(self, method: str, url: str, *, policy: RetryPolicy, timeout: tuple[float, float],
             headers: Mapping[str, str] | None = None, json_body: Any = None,
             params: Mapping[str, str] | None = None, deadline: float | None = None,
             max_bytes: int = 256 * 1024 * 1024, label: str = "",
             tick: Callable[[float], None] | None = None,
             on_late_response: Callable[[Response], None] | None = None) -> Response:
        """The final response (any status) once the policy stops retrying; NetworkFailure if none came."""
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        started = time.monotonic()
        for attempt in range(1, policy.attempts + 1):
            self.check(deadline)
            try:
                resp = self._in_worker(method, url, all_headers, json_body, params, timeout, max_bytes,
                                       deadline, tick, started, on_late_response)
            except (Cancelled, DeadlineExceeded):
                raise
            except Exception as exc:  # requests/urllib3 errors, TooLarge, Refused
                log.info("USO remote: %s %s failed: %s", method, display_url(url), _reason(exc))
                if attempt < policy.attempts and policy.retry_exception(exc):
                    delay = self.backoff(attempt)
                    self.on_retry(f"{label}network problem ({_reason(exc)}), retrying in {delay:.1f} s "
                                  f"(attempt {attempt + 1} of {policy.attempts})")
                    self.sleep(delay, deadline)
                    continue
                timed_out = isinstance(exc, requests.exceptions.Timeout)
                raise NetworkFailure(url, _reason(exc), attempt, timed_out) from None
            log.debug("USO remote: %s %s -> HTTP %d%s", method, display_url(url), resp.status,
                     f" (x-fal-request-id {resp.fal_request_id})" if resp.fal_request_id else "")
            if not resp.ok and attempt < policy.attempts and policy.retry_response(resp):
                delay = self.backoff(attempt)
                after = _retry_after(resp)
                if after is not None:
                    delay = max(delay, min(after, self.backoff_cap_s))
                what = "rate or concurrency limited" if resp.status == 429 else "server error"
                self.on_retry(f"{label}{what} (HTTP {resp.status}), retrying in {delay:.1f} s "
                              f"(attempt {attempt + 1} of {policy.attempts})")
                self.sleep(delay, deadline)
                continue
            return resp
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _in_worker(self, method, url, headers, json_body, params, timeout, max_bytes, deadline,
                   tick, started, on_late_response) -> Response:
        box: dict[str, Any] = {}
        done = threading.Event()
        abandoned = threading.Event()
        lock = threading.Lock()  # exactly one of the two threads hands a late answer on

        def work() -> None:
            try:
                # A late-response handler needs the whole answer; otherwise stop reading once abandoned.
                resp = raw_request(method, url, headers=headers, timeout=timeout, json_body=json_body,
                                   params=params, max_bytes=max_bytes,
                                   abandoned=None if on_late_response else abandoned)
                with lock:
                    box["resp"] = resp
                    late = abandoned.is_set()
                if late and on_late_response is not None:
                    on_late_response(resp)
            except BaseException as exc:  # handed to the waiting thread
                box["exc"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="uso-remote-http", daemon=True).start()
        next_tick = time.monotonic() + 1.0
        while not done.wait(CHECK_INTERVAL_S):
            try:
                self.check(deadline)
            except (Cancelled, DeadlineExceeded):
                with lock:
                    abandoned.set()
                    arrived = box.get("resp")
                if arrived is not None and on_late_response is not None:
                    threading.Thread(target=on_late_response, args=(arrived,), daemon=True).start()
                raise
            if tick is not None and time.monotonic() >= next_tick:
                next_tick += 1.0
                tick(time.monotonic() - started)
        if "exc" in box:
            raise box["exc"]
        return box["resp"]


def raw_request(method: str, url: str, *, headers: Mapping[str, str], timeout: tuple[float, float],
                json_body: Any = None, params: Mapping[str, str] | None = None,
                max_bytes: int = 256 * 1024 * 1024, abandoned: threading.Event | None = None) -> Response:
    """One blocking request in the calling thread: no retries, no Cancel checks. Refused for a
    URL `url_problem` names, and for a redirect to one or to another scheme."""
    problem = url_problem(url)
    if problem is not None:
        raise Refused(f"{display_url(url)} {problem}")
    # A fresh session per call: no pooled keep-alive connection that the server may have closed,
    # which would turn a POST into an ambiguous "connection aborted".
    with _CheckedSession() as session:
        session.trust_env = True  # honour HTTPS_PROXY / NO_PROXY like the rest of ComfyUI
        with session.request(method, url, headers=dict(headers), json=json_body, params=params,
                             timeout=timeout, stream=True, allow_redirects=True) as r:
            chunks, size = [], 0
            for chunk in r.iter_content(64 * 1024):
                if abandoned is not None and abandoned.is_set():
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"answer larger than {max_bytes // (1024 * 1024)} MB")
                chunks.append(chunk)
            return Response(r.status_code, {k.lower(): v for k, v in r.headers.items()},
                            b"".join(chunks), r.url)

