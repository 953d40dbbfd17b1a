"""One remote generation: check inputs, resolve the key, send, decode. No ComfyUI here."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from . import aiml, fal
from .errors import RemoteError, image_input_names, redact
from .hooks import Hooks
from .images import decode_results, frames, to_data_uri
from .keys import ApiKey, resolve_key
from .request import (MAX_STYLES, aiml_body, build_request, clamp_timeout, fal_body, image_list)
from .transport import READ, NetworkFailure, Transport, display_url, host_of, url_problem

log = logging.getLogger("uso.remote")

DOWNLOAD_TIMEOUT = (10.0, 300.0)
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    fal_queue_url: str = fal.DEFAULT_QUEUE_URL
    aiml_url: str = aiml.DEFAULT_URL
    poll_interval_s: float = 1.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    in_comfyui: bool = True        # messages: how to give a key inside ComfyUI, or to a script

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Base URLs from USO_FAL_QUEUE_URL / USO_AIML_URL (proxies, tests), else the real services."""
        urls = {
            "fal_queue_url": os.environ.get(fal.QUEUE_URL_ENV, "").strip() or fal.DEFAULT_QUEUE_URL,
            "aiml_url": os.environ.get(aiml.URL_ENV, "").strip() or aiml.DEFAULT_URL,
        }
        return cls(**{**urls, **overrides})


@dataclass
class RemoteInputs:
    """The node's inputs, one to one."""

    provider: str
    prompt: str
    size: str
    width: int
    height: int
    keep_size: bool
    steps: int
    guidance: float
    seed: int
    num_images: int
    negative_prompt: str
    output_format: str
    safety_checker: bool
    timeout_s: int
    subject_image: Any = None  # IMAGE tensor (or a list of PIL images) or None
    style_images: Any = None  # IMAGE tensor (or a list of PIL images) or None; each element is one style


@dataclass
class RemoteResult:
    images: list[Image.Image]
    seed: int
    request_id: str | None
    warnings: list[str] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)


def _check_url(env: str, value: str, default: str) -> str:
    """`value` if the key may be sent to it: https, or http to this machine (a local proxy, tests).
    Messages show the URL without any user:password@ part."""
    parts = urlsplit(value)
    problem = url_problem(value)
    if problem is not None:
        shown = f" ({display_url(value)}) {problem}: the API key would travel in clear" \
            if parts.scheme.lower() in ("http", "https") and parts.hostname else " is not an https URL"
        raise RemoteError(f"{env}{shown}. Set it to an https URL like {default} (http only to a proxy on this "
                          f"machine: 127.0.0.1 or localhost), or unset it to use {default}.")
    if parts.username is not None or parts.password is not None:
        # requests would send them as Basic auth in place of the provider's key header.
        raise RemoteError(f"{env} ({display_url(value)}) holds a user name or password before its host; the "
                          "Authorization header carries the API key, so they cannot be sent. Remove them (a "
                          "proxy's own credentials go in HTTPS_PROXY).")
    return value.rstrip("/")


def generate(inputs: RemoteInputs, *, user_dir: str | None, hooks: Hooks = Hooks(),
             settings: Settings | None = None) -> RemoteResult:
    """Everything that can be checked is checked before the first network call."""
    settings = settings or Settings.from_env()
    provider = inputs.provider
    warnings: list[str] = []

    subject = frames(inputs.subject_image, "subject_image") if inputs.subject_image is not None else []
    styles = frames(inputs.style_images, "style_images") if inputs.style_images is not None else []
    if len(subject) > 1:
        warnings.append(f"subject_image holds {len(subject)} images; only the first is sent")
    if len(styles) > MAX_STYLES:
        dropped = f"image {MAX_STYLES + 1} was" if len(styles) == MAX_STYLES + 1 else \
            f"images {MAX_STYLES + 1}-{len(styles)} were"
        warnings.append(f"style_images holds {len(styles)} images; USO takes at most {MAX_STYLES} styles, so "
                        f"{dropped} dropped")
        styles = styles[:MAX_STYLES]

    req = build_request(provider=provider, prompt=inputs.prompt, size=inputs.size, width=inputs.width,
                        height=inputs.height, keep_size=inputs.keep_size, steps=inputs.steps,
                        guidance=inputs.guidance, seed=inputs.seed, num_images=inputs.num_images,
                        negative_prompt=inputs.negative_prompt, output_format=inputs.output_format,
                        safety_checker=inputs.safety_checker, has_subject=bool(subject),
                        style_count=len(styles))
    warnings.extend(req.warnings)
    timeout_s = clamp_timeout(inputs.timeout_s, warnings)
    if provider == "fal":
        base_url = _check_url(fal.QUEUE_URL_ENV, settings.fal_queue_url, fal.DEFAULT_QUEUE_URL)
    else:
        base_url = _check_url(aiml.URL_ENV, settings.aiml_url, aiml.DEFAULT_URL)
    key = resolve_key(provider, user_dir, settings.in_comfyui)

    urls, notes = image_list(provider, to_data_uri(subject[0]) if subject else None,
                             [to_data_uri(s) for s in styles])
    warnings.extend(notes)
    req = replace(req, image_urls=tuple(urls))
    image_names = image_input_names(bool(subject), len(styles), placeholder=bool(urls) and urls[0] == "")
    for w in warnings:
        log.warning("USO remote: %s", w)
    if warnings:
        hooks.report("Warning: " + "\nWarning: ".join(warnings))
    logged = len(warnings)

    transport = Transport(is_cancelled=hooks.is_cancelled, backoff_base_s=settings.backoff_base_s,
                          backoff_cap_s=settings.backoff_cap_s, on_retry=hooks.report)
    started = time.monotonic()
    if provider == "fal":
        client = fal.FalClient(key, base_url, transport, hooks, settings.poll_interval_s)
        fal_result = client.run(fal_body(req), timeout_s, image_names)
        data, items, request_id = fal_result.data, fal_result.data["images"], fal_result.request_id
        warnings.extend(fal_result.warnings)
        name = "fal"
    else:
        aiml_result = aiml.AimlClient(key, base_url, transport, hooks).run(aiml_body(req), timeout_s, image_names)
        data, items, request_id = aiml_result.data, aiml_result.items, aiml_result.request_id
        name = "AIML"

    if len(items) > req.num_images:  # never more files than were asked (and paid) for
        warnings.append(f"{name} returned {len(items)} images for num_images={req.num_images}; kept the first "
                        f"{req.num_images}")
        items = items[:req.num_images]
    images, decode_warnings = decode_results(items, _downloader(transport, name, key), name, request_id)
    warnings.extend(decode_warnings)
    hooks.progress(0.9)

    nsfw = _nsfw_flags(data, len(images))
    for i, flagged in enumerate(nsfw):
        if flagged:
            warnings.append(f"{name} flagged result image {i + 1} of {len(images)} as NSFW; its safety checker "
                            "usually replaces such an image with a black one. It is passed on unchanged: check "
                            "it before using it")
    seed = _used_seed(data, req.seed, warnings, name)

    for w in warnings[logged:]:
        log.warning("USO remote: %s", w)
    w0, h0 = images[0].size
    rid = f" (request_id={request_id})" if request_id else ""
    summary = (f"{name}: done · {len(images)} image{'s' if len(images) != 1 else ''} {w0}x{h0} · seed {seed} · "
               f"{time.monotonic() - started:.0f} s{rid}")
    hooks.report(summary + "".join(f"\nWarning: {w}" for w in warnings))
    hooks.progress(1.0)
    return RemoteResult(images, seed, request_id, warnings, nsfw)


def _downloader(transport: Transport, name: str, key: ApiKey):
    def download(url: str) -> bytes:
        # No Authorization header: result URLs are public CDN links, often on another host.
        try:
            resp = transport.send("GET", url, policy=READ, timeout=DOWNLOAD_TIMEOUT,
                                  headers={"Accept": "image/*, */*"}, max_bytes=MAX_DOWNLOAD_BYTES,
                                  label=f"{name}: ")
        except NetworkFailure as f:
            raise ValueError(f"downloading it from {f.host} failed: {f.reason}") from None
        if not resp.ok:
            body = redact(resp.content[:200].decode("utf-8", "replace"), key.secret.parts())
            raise ValueError(f"downloading it from {host_of(url)} failed with HTTP {resp.status}"
                             f"{': ' + ' '.join(body.split()) if body.strip() else ''}")
        return resp.content

    return download


def _nsfw_flags(data: dict, count: int) -> list[bool]:
    flags = data.get("has_nsfw_concepts")
    if not isinstance(flags, list):
        return [False] * count
    return [bool(flags[i]) if i < len(flags) else False for i in range(count)]


def _used_seed(data: dict, sent: int | None, warnings: list[str], name: str) -> int:
    seed = data.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        return seed
    if sent is not None:
        return sent
    warnings.append(f"{name} did not report the seed it picked; the seed output is 0")
    return 0
