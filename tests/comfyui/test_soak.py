"""Soak: 200 consecutive generations through the nodes on the tiny models, with changing prompts,
seeds, sizes, batch sizes and style / subject images. Resident memory must not grow beyond a
bound after warm-up, and repeated inputs must give identical images.

Marked slow: the plain `pytest` run leaves it out and CI runs it as a step of its own
(`pytest -q -m slow`). `USO_SOAK_RUNS` changes the number of runs (e.g. 2000 for a long local
soak). Run with `-s` for the figures.
"""
from __future__ import annotations

import gc
import os
import time

import pytest
import torch
from reliability_helpers import encode_style, encode_subject, generate, image, load, single_thread

from nodes.comfyui import pipeline_cache

RUNS = int(os.environ.get("USO_SOAK_RUNS", "200"))
WARMUP = 20
RSS_BOUND_MB = 50  # growth of VmRSS from the end of warm-up to the last run
SIZES = [(32, 32), (48, 32), (32, 48), (64, 32), (48, 48), (64, 64), (80, 48)]
PROMPTS = ["a cat", "a watercolor painting of a dog", "", "portrait of a woman, ink sketch",
           "a red house in the forest at night " * 20, "un chat 🐱 sur un toit"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield

def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_soak_200_generations_memory_bounded_and_deterministic(comfy_folders):
    pipeline_cache.clear()
    model = load()
    styles, subjects = [], []  # (input image, encoding)
    first_result: dict[tuple, torch.Tensor] = {}
    history: list[tuple] = []
    repeats = 0
    times = []
    rss_start = rss_after_warmup = None
    started = time.perf_counter()
    for i in range(RUNS):
        if i % 10 == 0:  # a new style image: size, channels and crop vary
            img = image(24 + 7 * (i % 5), 20 + 5 * (i % 3), seed=100 + i, channels=(3, 4, 1)[i // 10 % 3])
            styles.append((img, encode_style(model, img, crop=("reference", "center")[i // 10 % 2])))
        if i % 10 == 5:  # a new subject image
            img = image(40 + 8 * (i % 4), 32 + 16 * (i % 3), seed=200 + i)
            subjects.append((img, encode_subject(model, img, long_side=64)))
        if i % 5 == 4 and history:  # every fifth run repeats an earlier run exactly
            config = history[(i * 7919) % len(history)]
            repeats += 1
        else:
            w, h = SIZES[i % len(SIZES)]
            config = (PROMPTS[i % len(PROMPTS)], i % 13, w, h, 1 + i % 3, 1 + (i % 4 == 0),
                      len(styles) - 1 if i % 3 else None, len(subjects) - 1 if subjects and i % 2 else None)
        prompt, seed, w, h, steps, batch, style_i, subject_i = config
        t0 = time.perf_counter()
        images, latent = generate(model, prompt=prompt, seed=seed, width=w, height=h, steps=steps,
                                  batch_size=batch,
                                  style=styles[style_i][1] if style_i is not None else None,
                                  subject=subjects[subject_i][1] if subject_i is not None else None)
        times.append(time.perf_counter() - t0)
        assert images.shape == (batch, h, w, 3) and latent["samples"].shape == (batch, 16, h // 8, w // 8)
        if config in first_result:
            assert torch.equal(images, first_result[config]), f"run {i} differs from its first run"
        else:
            first_result[config] = images
            history.append(config)
        if i == 0:
            gc.collect()
            rss_start = rss_mb()
        if i == WARMUP - 1:
            gc.collect()
            rss_after_warmup = rss_mb()
    elapsed = time.perf_counter() - started
    gc.collect()
    rss_end = rss_mb()

    # Re-encode the first inputs from their images (the caches have moved on) and repeat the first
    # runs: the same images as 200 runs ago.
    model._style_cache.clear()
    model._subject_cache.clear()
    model._prompt_cache.clear()
    checked = 0
    for config in history[:6]:
        prompt, seed, w, h, steps, batch, style_i, subject_i = config
        style = encode_style(model, styles[style_i][0], crop="reference" if style_i % 2 == 0 else "center") \
            if style_i is not None else None
        subject = encode_subject(model, subjects[subject_i][0], long_side=64) if subject_i is not None else None
        images, _ = generate(model, prompt=prompt, seed=seed, width=w, height=h, steps=steps, batch_size=batch,
                             style=style, subject=subject)
        assert torch.equal(images, first_result[config]), f"re-encoded {config} differs"
        checked += 1

    growth = rss_end - rss_after_warmup
    warm = times[WARMUP:]
    print(f"\n[soak] {RUNS} generations in {elapsed:.1f} s ({1000 * sum(warm) / len(warm):.0f} ms per run "
          f"after warm-up; first {WARMUP}: {1000 * sum(times[:WARMUP]) / WARMUP:.0f} ms, last 50: "
          f"{1000 * sum(times[-50:]) / 50:.0f} ms); {len(styles)} style and {len(subjects)} subject images "
          f"encoded; {repeats} exact repeats + {checked} re-encoded repeats identical")
    print(f"[soak] VmRSS: {rss_start:.1f} MB after run 1, {rss_after_warmup:.1f} MB after warm-up "
          f"({WARMUP} runs), {rss_end:.1f} MB after run {RUNS}: growth {growth:+.1f} MB "
          f"(bound {RSS_BOUND_MB} MB)")
    assert repeats >= RUNS // 6
    assert growth < RSS_BOUND_MB
