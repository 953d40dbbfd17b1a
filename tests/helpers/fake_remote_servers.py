"""Fake fal queue (`fal-ai/uso`) and AIML (`bytedance/uso`) servers for the remote node's tests.

They follow the providers' documented HTTP APIs: fal's submit / status / result / cancel with both error
body shapes and a failed job that still reports COMPLETED; AIML's one blocking POST with its
{message, statusCode, ...} errors. Each server listens on 127.0.0.1 (port 0), runs in daemon
threads, records every request, and stops itself after `max_lifetime_s` even if a test forgets.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

PRESETS = {
    "square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576),
}
COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
DROP = object()  # handler result: close the connection without any answer


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def _json(status: int, payload: Any, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def encode_image(size: tuple[int, int], color: tuple[int, int, int], fmt: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    pil_format = "JPEG" if fmt == "jpeg" else "PNG"
    Image.new("RGB", size, color).save(buf, pil_format)
    return buf.getvalue(), f"image/{fmt}"


def decodes_as_image(uri: str) -> bool:
    try:
        payload = base64.b64decode(uri.split(",", 1)[1])
        with Image.open(io.BytesIO(payload)) as img:
            img.verify()
        return True
    except Exception:
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        req = Recorded(self.command, parts.path, parse_qs(parts.query),
                       {k.lower(): v for k, v in self.headers.items()}, body)
        app = self.server.app
        app.record(req)
        try:
            result = app.handle(req)
        except Exception as exc:  # a bug in the fake must show up in the test, not hang it
            result = _json(500, {"detail": f"fake server bug: {exc!r}"})
        if result is DROP:
            self.close_connection = True
            return
        status, headers, payload = result
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:
            pass  # the client gave up (Cancel); fine

    def log_message(self, *args):
        pass


class _FakeServer:
    def __init__(self, max_lifetime_s: float = 30.0):
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.app = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-remote-server", daemon=True)
        self._timer = threading.Timer(max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    def start(self):
        self._thread.start()
        self._timer.start()
        return self

    def stop(self):
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.stopping.set()
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def record(self, req: Recorded) -> None:
        with self._lock:
            self.requests.append(req)

    def calls(self, method: str | None = None, contains: str = "") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def _pop(self, queue: list):
        with self._lock:
            return queue.pop(0) if queue else None

    def _file(self, name: str):
        blob = self.files.get(name)
        if blob is None:
            return _json(404, {"detail": "file not found"})
        data, mime = blob
        return 200, {"Content-Type": mime}, data

    def _add_file(self, data: bytes, mime: str) -> str:
        name = f"{uuid.uuid4().hex}.{mime.split('/')[1]}"
        self.files[name] = (data, mime)
        return f"{self.url}/files/{name}"

    def _make_images(self, body: dict, nsfw: list[bool] | None, sizes: list | None, delivery: str):
        size = body.get("image_size", "square_hd")
        wh = PRESETS.get(size, (1024, 1024)) if isinstance(size, str) else (size["width"], size["height"])
        fmt = body.get("output_format", "png")
        count = int(body.get("num_images", 1))
        flags = [bool(nsfw[i]) if nsfw and i < len(nsfw) else False for i in range(count)]
        images = []
        for i in range(count):
            this_size = tuple(sizes[i]) if sizes and i < len(sizes) else wh
            data, mime = encode_image(this_size, (0, 0, 0) if flags[i] else COLORS[i % 4], fmt)
            if delivery == "data":
                url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
            else:
                url = self._add_file(data, mime)
            images.append({"url": url, "content_type": mime, "file_name": None, "file_size": len(data),
                           "width": this_size[0], "height": this_size[1], "_bytes": data})
        return images, flags


@dataclass
class FalJob:
    id: str
    body: dict
    polls: int = 0
    cancelled: bool = False


class FakeFal(_FakeServer):
    """fal queue API for fal-ai/uso.

    Scenario knobs: `*_errors` are (status, headers, body) answers served, in order, before the
    normal answer of that endpoint; `submit_drops` closes that many submit connections without
    an answer; `queue_polls`/`progress_polls` shape the job; `never_finish` keeps it running
    until cancelled; `job_error` = (status, body, status_error) makes the job fail behind
    COMPLETED; `reject_empty_content` refuses "" as the subject slot (from the job's result, and
    with `reject_empty_content_at_submit` at submit, as fal's URL check does); `status_garbage`
    answers that many status polls with a page that is not JSON (a proxy's error page).
    """

    def __init__(self, *, key: str = "fake-key-id:fake-key-secret", submit_errors=(), submit_drops: int = 0,
                 status_errors=(), result_errors=(), download_errors=(), queue_polls: int = 2,
                 queue_start: int = 3, progress_polls: int = 1, never_finish: bool = False,
                 job_error: tuple | None = None, reject_empty_content: bool = False,
                 reject_empty_content_at_submit: bool = False, status_garbage: int = 0,
                 nsfw: list[bool] | None = None, delivery: str = "url", result_sizes: list | None = None,
                 picked_seed: int = 2**63 + 12345, foreign_urls: bool = False, max_lifetime_s: float = 30.0):
        super().__init__(max_lifetime_s)
        self.key = key
        self.submit_errors = list(submit_errors)
        self.submit_drops = submit_drops
        self.status_errors = list(status_errors)
        self.result_errors = list(result_errors)
        self.download_errors = list(download_errors)
        self.queue_polls = queue_polls
        self.queue_start = queue_start
        self.progress_polls = progress_polls
        self.never_finish = never_finish
        self.job_error = job_error
        self.reject_empty_content = reject_empty_content
        self.reject_empty_content_at_submit = reject_empty_content_at_submit
        self.status_garbage = status_garbage
        self.nsfw = nsfw
        self.delivery = delivery
        self.result_sizes = result_sizes
        self.picked_seed = picked_seed
        self.foreign_urls = foreign_urls
        self.jobs: dict[str, FalJob] = {}
        self.files: dict[str, tuple[bytes, str]] = {}
        self.cancel_seen = threading.Event()

    def handle(self, req: Recorded):
        path = req.path
        if path.startswith("/files/"):
            injected = self._pop(self.download_errors)
            return _json(*injected) if injected else self._file(path[len("/files/"):])
        auth = req.headers.get("authorization", "")
        if auth != f"Key {self.key}":
            # Like some real gateways, echo what was sent: the client must redact it.
            return _json(401, {"detail": f"No user found for Key ID and Secret (got {auth!r})"})
        prefix = "/fal-ai/uso"
        if req.method == "POST" and path == prefix:
            return self._submit(req)
        if not path.startswith(prefix + "/requests/"):
            return _json(404, {"detail": "Not Found"})
        rest = path[len(prefix + "/requests/"):].split("/")
        job = self.jobs.get(rest[0])
        if job is None:
            return _json(404, {"detail": "Request not found"})
        if req.method == "GET" and rest[1:] == ["status"]:
            return self._status(job, req)
        if req.method == "GET" and rest[1:] == []:
            return self._result(job)
        if req.method == "PUT" and rest[1:] == ["cancel"]:
            return self._cancel(job)
        return _json(405, {"detail": "Method Not Allowed"})

    def _submit(self, req: Recorded):
        with self._lock:
            if self.submit_drops > 0:
                self.submit_drops -= 1
                return DROP
        injected = self._pop(self.submit_errors)
        if injected:
            return _json(*injected)
        body = req.json
        if not isinstance(body, dict):
            return _json(422, {"detail": [{"loc": ["body"], "msg": "Input should be a valid dictionary",
                                           "type": "dict_type"}]})
        urls = body.get("input_image_urls")
        if self.reject_empty_content_at_submit and isinstance(urls, list) and urls[:1] == [""]:
            return _json(422, {"detail": [{"loc": ["body", "input_image_urls", 0], "msg": "Input should be a valid URL",
                                           "type": "url_parsing", "input": ""}]})
        rid = str(uuid.uuid4())
        self.jobs[rid] = FalJob(rid, body)
        base = ("https://queue.fal.run" if self.foreign_urls else self.url) + f"/fal-ai/uso/requests/{rid}"
        return _json(200, {"request_id": rid, "gateway_request_id": rid, "response_url": base,
                           "status_url": f"{base}/status", "cancel_url": f"{base}/cancel",
                           "queue_position": self.queue_start}, {"x-fal-request-id": rid})

    def _state(self, job: FalJob) -> str:
        if job.cancelled:
            return "COMPLETED"
        if job.polls < self.queue_polls:
            return "IN_QUEUE"
        if self.never_finish or job.polls < self.queue_polls + self.progress_polls:
            return "IN_PROGRESS"
        return "COMPLETED"

    def _status(self, job: FalJob, req: Recorded):
        injected = self._pop(self.status_errors)
        if injected:
            return _json(*injected)
        with self._lock:
            garbage = self.status_garbage > 0
            self.status_garbage -= garbage
        if garbage:
            return 200, {"Content-Type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"
        with self._lock:
            state = self._state(job)
            position = max(0, self.queue_start - job.polls)
            job.polls += 1
        out: dict = {"status": state, "response_url": f"{self.url}/fal-ai/uso/requests/{job.id}"}
        if state == "IN_QUEUE":
            out["queue_position"] = position
        elif req.query.get("logs") in (["1"], ["true"]):
            out["logs"] = [{"message": f"denoising step {job.polls}", "level": "INFO", "source": "user",
                            "timestamp": "2026-01-01T00:00:00Z"}]
        if state == "COMPLETED":
            out["metrics"] = {"inference_time": 1.5}
            failure = self._failure(job)
            if failure and failure[2]:
                out["error"], out["error_type"] = failure[2], failure[1].get("error_type", "job_failed")
        return _json(200, out)

    def _failure(self, job: FalJob):
        """(status, body, status_error) of a failed job, else None."""
        if job.cancelled:
            return 499, {"detail": "Request was cancelled by the client", "error_type": "client_cancelled"}, \
                "Request was cancelled"
        if self.job_error:
            status, body, status_error = self.job_error
            return status, body, status_error
        errors = self.validation_errors(job.body)
        if errors:
            return 422, {"detail": errors}, "Input validation failed"
        return None

    def validation_errors(self, body: dict) -> list[dict]:
        errors = []

        def err(loc, msg, kind):
            errors.append({"loc": ["body", *loc], "msg": msg, "type": kind, "input": "<omitted>"})

        urls = body.get("input_image_urls")
        if not isinstance(urls, list) or not urls:
            err(["input_image_urls"], "Field required", "missing")
        else:
            for i, u in enumerate(urls):
                if u == "" and i == 0 and len(urls) > 1 and not self.reject_empty_content:
                    continue
                if not isinstance(u, str) or not (u.startswith("data:image/") or u.startswith("http")):
                    err(["input_image_urls", i], "Could not download the file from the URL", "file_download_error")
                elif u.startswith("data:") and not decodes_as_image(u):
                    err(["input_image_urls", i], "Could not load the image", "image_load_error")
                elif len(u) > 10_000_000:
                    err(["input_image_urls", i], "Image too large", "image_too_large")
        steps = body.get("num_inference_steps", 28)
        if not isinstance(steps, int) or not 1 <= steps <= 50:
            err(["num_inference_steps"], "Input should be between 1 and 50", "less_than_equal")
        guidance = body.get("guidance_scale", 4)
        if not isinstance(guidance, (int, float)) or not 1 <= guidance <= 10:
            err(["guidance_scale"], "Input should be between 1 and 10", "less_than_equal")
        count = body.get("num_images", 1)
        if not isinstance(count, int) or not 1 <= count <= 4:
            err(["num_images"], "Input should be between 1 and 4", "less_than_equal")
        if body.get("output_format", "png") not in ("png", "jpeg"):
            err(["output_format"], "Input should be 'jpeg' or 'png'", "enum")
        size = body.get("image_size", "square_hd")
        if not ((isinstance(size, str) and size in PRESETS) or (isinstance(size, dict) and isinstance(size.get("width"), int)
                                    and isinstance(size.get("height"), int))):
            err(["image_size"], "Input should be a preset or {width, height}", "union_tag_invalid")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            err(["seed"], "Input should be a valid integer", "int_type")
        return errors

    def _result(self, job: FalJob):
        if self._state(job) != "COMPLETED":
            return _json(400, {"detail": "Request is still in progress"})
        injected = self._pop(self.result_errors)
        if injected:
            return _json(*injected)
        failure = self._failure(job)
        if failure:
            status, body, _ = failure
            headers = {"x-fal-request-id": job.id}
            if isinstance(body, dict) and body.get("error_type"):
                headers["X-Fal-Error-Type"] = body["error_type"]
            if status >= 500:
                headers["X-Fal-Retryable"] = "false"
            return _json(status, body, headers)
        images, flags = self._make_images(job.body, self.nsfw, self.result_sizes, self.delivery)
        for img in images:
            img.pop("_bytes")
        seed = job.body.get("seed", self.picked_seed)
        return _json(200, {"images": images, "seed": seed, "has_nsfw_concepts": flags,
                           "prompt": job.body.get("prompt", ""), "timings": {"inference": 1.5}},
                     {"x-fal-request-id": job.id})

    def _cancel(self, job: FalJob):
        self.cancel_seen.set()
        with self._lock:
            if self._state(job) == "COMPLETED" and not job.cancelled:
                return _json(400, {"status": "ALREADY_COMPLETED"})
            job.cancelled = True
        return _json(202, {"status": "CANCELLATION_REQUESTED"})


class FakeAiml(_FakeServer):
    """AIML API POST /v1/images/generations for bytedance/uso (synchronous, no cancel).

    `errors` are (status, headers, body) answers served in order before the normal one; `drops`
    closes that many connections without an answer; `delay_s` holds the answer (released when
    the server stops); `shape` picks the success body: "data_url", "b64", "images_only",
    "data_uri".
    """

    def __init__(self, *, key: str = "fake-aiml-key-0123456789", errors=(), drops: int = 0,
                 delay_s: float = 0.0, shape: str = "data_url", nsfw: list[bool] | None = None,
                 success_status: int = 201, picked_seed: int = 351168504, report_seed: bool = True,
                 max_lifetime_s: float = 30.0):
        super().__init__(max_lifetime_s)
        self.key = key
        self.errors = list(errors)
        self.drops = drops
        self.delay_s = delay_s
        self.shape = shape
        self.nsfw = nsfw
        self.success_status = success_status
        self.picked_seed = picked_seed
        self.report_seed = report_seed
        self.files: dict[str, tuple[bytes, str]] = {}

    @staticmethod
    def error(status: int, message: str):
        return status, {"message": message, "path": "/v1/images/generations", "requestId": "aiml-req-1",
                        "statusCode": status, "timestamp": "2026-01-01T00:00:00.000Z"}

    def handle(self, req: Recorded):
        if req.path.startswith("/files/"):
            return self._file(req.path[len("/files/"):])
        if req.method != "POST" or req.path != "/v1/images/generations":
            return _json(*self.error(404, f"Cannot {req.method} {req.path}"))
        auth = req.headers.get("authorization", "")
        if auth != f"Bearer {self.key}":
            return _json(*self.error(401, f"This request requires a valid API key (received {auth!r})"))
        with self._lock:
            if self.drops > 0:
                self.drops -= 1
                return DROP
        injected = self._pop(self.errors)
        if injected:
            return _json(*injected)
        body = req.json
        problems = self.validation_errors(body if isinstance(body, dict) else {})
        if problems:
            return _json(*self.error(400, "Body validation error: " + "; ".join(problems)))
        if self.delay_s:
            self.stopping.wait(self.delay_s)
            if self.stopping.is_set():
                return DROP
        images, flags = self._make_images(body, self.nsfw, None, "data" if self.shape == "data_uri" else "url")
        if self.shape == "b64":
            data = [{"b64_json": base64.b64encode(img.pop("_bytes")).decode()} for img in images]
        else:
            for img in images:
                img.pop("_bytes")
            data = images
        out: dict = {"has_nsfw_concepts": flags, "prompt": body["prompt"], "timings": {"inference": 10.5},
                     "meta": {"usage": {"tokens_used": 420000}}}
        if self.report_seed:
            out["seed"] = body.get("seed", self.picked_seed)
        if self.shape == "images_only":
            out["images"] = data
        else:
            out["data"] = data
            if self.shape != "b64":
                out["images"] = images
        return _json(self.success_status, out)

    @staticmethod
    def validation_errors(body: dict) -> list[str]:
        problems = []
        if body.get("model") != "bytedance/uso":
            problems.append("model: Expected 'bytedance/uso'")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            problems.append("prompt: Required")
        elif len(prompt) > 4000:
            problems.append("prompt: String must contain at most 4000 character(s)")
        urls = body.get("image_urls")
        if not isinstance(urls, list) or not 1 <= len(urls) <= 3:
            problems.append("image_urls: Array must contain 1-3 element(s)")
        else:
            for i, u in enumerate(urls):
                if not isinstance(u, str) or not (u.startswith("data:image/") or u.startswith("http")):
                    problems.append(f"image_urls.{i}: Invalid url")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or seed < 1):
            problems.append("seed: Number must be greater than or equal to 1")
        guidance = body.get("guidance_scale", 4)
        if not isinstance(guidance, (int, float)) or not 1 <= guidance <= 20:
            problems.append("guidance_scale: Number must be between 1 and 20")
        steps = body.get("num_inference_steps", 28)
        if not isinstance(steps, int) or not 1 <= steps <= 50:
            problems.append("num_inference_steps: Number must be between 1 and 50")
        count = body.get("num_images", 1)
        if not isinstance(count, int) or not 1 <= count <= 4:
            problems.append("num_images: Number must be between 1 and 4")
        return problems
