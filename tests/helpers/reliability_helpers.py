"""Helpers shared by the reliability tests (test_reliability_*.py, test_soak.py): the nodes called
as ComfyUI calls them, images made the way ComfyUI's Load Image makes them, and state checks."""
from __future__ import annotations

import functools
import struct
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from nodes.comfyui import NODE_CLASS_MAPPINGS, bridge, pipeline_cache
from nodes.model_catalog import FROM_CHECKPOINT

#: The separate-file model set (BFL transformer, ae, T5, CLIP-L), fp32 on the CPU.
LOADER = dict(transformer="flux1-dev.safetensors", vae="ae.safetensors", t5="t5xxl_fp16.safetensors",
              clip_l="clip_l.safetensors", siglip="sigclip_vision_patch14_384.safetensors",
              uso_lora="uso-flux1-dit-lora-v1.safetensors", projector="uso-flux1-projector-v1.safetensors",
              precision="fp32", memory="auto", lora_mode="auto")

#: The same models from ComfyUI's all-in-one fp8 checkpoint (what the workflows name).
CHECKPOINT_LOADER = {**LOADER, "transformer": "checkpoints/flux1-dev-fp8.safetensors", "vae": FROM_CHECKPOINT,
                     "t5": FROM_CHECKPOINT, "clip_l": FROM_CHECKPOINT}


@contextmanager
def single_thread():
    """One intra-op torch thread. The tiny models gain nothing from more, and on a busy 2-core
    machine two OpenMP threads spin-wait on each other: runs then take 10-50x longer. No result
    depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def node(node_id: str):
    """Calls the node as ComfyUI runs it: node(id)(*inputs, unique_id=..., **inputs) -> outputs tuple."""
    from workflow_runner import run_node

    return functools.partial(run_node, NODE_CLASS_MAPPINGS[node_id])


def load(**overrides):
    (pipe,) = node("USOLoadModels")(**{**LOADER, **overrides}, unique_id="1")
    return pipe


def image(w: int, h: int, seed: int = 0, channels: int = 3, batch: int = 1) -> torch.Tensor:
    """A structured test picture as a ComfyUI IMAGE [B, H, W, C]."""
    from tiny_models import make_image

    frames = [torch.from_numpy(np.asarray(make_image(w, h, seed + i), dtype=np.float32) / 255.0)
              for i in range(batch)]
    t = torch.stack(frames)
    if channels == 1:
        return t.mean(dim=-1, keepdim=True)
    if channels == 4:
        return torch.cat([t, torch.full_like(t[..., :1], 0.5)], dim=-1)
    return t


def encode_style(model, img, crop="reference", previous=None):
    return node("USOEncodeStyle")(model, img, crop, previous=previous)[0]


def encode_subject(model, img, long_side=64, previous=None):
    return node("USOEncodeSubject")(model, img, long_side, "mean", 0, previous=previous)[0]


def generate(model, **kw):
    args = dict(prompt="a cat", width=32, height=32, keep_size=False, steps=2, guidance=4.0, seed=1,
                batch_size=1, unique_id="4")
    args.update(kw)
    return node("USOGenerate")(model, **args)


def loaded_with_reference(seed: int, steps: int = 2):
    """(model, style, subject, reference image): the right files loaded through the node, encodings
    of two test pictures, and the image they give, to compare later runs against."""
    pipeline_cache.clear()
    model = load()
    style = encode_style(model, image(40, 30, 1))
    subject = encode_subject(model, image(48, 40, 2))
    reference = generate(model, style=style, subject=subject, seed=seed, steps=steps)[0]
    return model, style, subject, reference


def lock_is_free(lock, timeout: float = 2.0) -> bool:
    """Whether another thread can take `lock` (an RLock held by this thread would still pass here)."""
    got = []

    def take():
        ok = lock.acquire(timeout=timeout)
        got.append(ok)
        if ok:
            lock.release()

    t = threading.Thread(target=take)
    t.start()
    t.join(timeout + 1)
    return got == [True]


def assert_clean(model) -> None:
    """No state left behind by a failed or cancelled run."""
    assert not model.transformer.context_embedder._forward_hooks, "style injection hook left installed"
    assert lock_is_free(model._lock), "pipeline lock still held"
    assert lock_is_free(pipeline_cache._lock), "pipeline cache lock still held"
    assert not bridge.interrupt_requested(), "Cancel flag left set for the next run"


# ---------------------------------------------------------------------------------------------
# Images the way ComfyUI's Load Image produces them
# ---------------------------------------------------------------------------------------------

def comfy_load_image(path) -> torch.Tensor:
    """ComfyUI's LoadImage (nodes.py): exif transpose, 32-bit int images scaled by 1/255, RGB, /255."""
    frames = []
    with Image.open(path) as img:
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            frames.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0))
    return torch.stack(frames)


def write_png16(path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3] uint16), written by hand: PIL cannot write
    16-bit RGB."""
    pixels = np.asarray(pixels, dtype=">u2")
    h, w = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
    return Path(path)
