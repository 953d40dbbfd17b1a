"""Cancel in every phase (loading, encoding, sampling, decoding, remote polling) returns within a
step or a poll interval and leaves no half state: the next run with the same inputs gives exactly
what a fresh run gives (issue 8)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from reliability_helpers import (assert_clean, loaded_with_reference, encode_style, encode_subject, generate, image, load, node,
                                 single_thread)
from remote_helpers import fal_server, remote_env, run_node  # noqa: F401  (fixture)

from nodes.comfyui import bridge, load_node, pipeline_cache
from nodes.engine import vae as vae_module
from nodes.comfyui.remote_node import USORemoteGenerate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def clean_cancel_state():
    bridge._standalone_interrupt.clear()
    bridge.Progress.listener = None
    yield
    bridge.Progress.listener = None
    bridge._standalone_interrupt.clear()


@pytest.fixture(scope="module")
def setup(comfy_folders):
    return loaded_with_reference(seed=3, steps=4)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cancel_during", ["transformer", "vae", "t5", "siglip"])
def test_cancel_while_loading_stops_before_the_next_model_and_caches_nothing(setup, cancel_during):
    model, style, subject, reference = setup
    steps = load_node.LOAD_STEPS
    seen = []

    def listener(current, total, node_id):
        seen.append(current)
        if current == steps.index(cancel_during):
            bridge.request_interrupt()  # pressed while this model loads

    pipeline_cache.clear()
    bridge.Progress.listener = listener
    with pytest.raises(bridge.Cancelled):
        load()
    bridge.Progress.listener = None
    assert seen[-1] == steps.index(cancel_during)  # raised before the next model was started
    assert pipeline_cache._current is None        # no half-loaded entry
    assert_clean(model)
    fresh = load()
    assert fresh is not model and pipeline_cache._current[1] is fresh
    assert torch.equal(generate(fresh, style=style, subject=subject, seed=3, steps=4)[0], reference)


def test_cancel_during_the_last_model_keeps_the_complete_load_and_stops_the_next_node(setup):
    """The projector is the last file: loading finishes (a complete, cached model, nothing half), and
    Cancel stops the next node, as ComfyUI's own check before each node does."""
    model, style, subject, reference = setup

    def listener(current, total, node_id):
        if current == load_node.LOAD_STEPS.index("projector"):
            bridge.request_interrupt()

    pipeline_cache.clear()
    bridge.Progress.listener = listener
    loaded = load()
    bridge.Progress.listener = None
    assert pipeline_cache._current[1] is loaded
    with pytest.raises(bridge.Cancelled):
        generate(loaded, style=style, subject=subject, seed=3, steps=4)
    assert torch.equal(generate(loaded, style=style, subject=subject, seed=3, steps=4)[0], reference)


def test_cancel_before_loading_keeps_the_cached_model(setup):
    current = load()
    bridge.request_interrupt()
    with pytest.raises(bridge.Cancelled):
        node("USOGenerate")(current, "a cat", 32, 32, False, 2, 4.0, 0, 1)
    assert load() is current  # the cached model was not touched


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["style", "subject"])
def test_cancel_between_the_images_of_an_encode_batch(setup, monkeypatch, kind):
    model = setup[0]
    batch = image(36, 28, 40, batch=3)
    method = "encode_style" if kind == "style" else "encode_subject"
    original = getattr(model, method)
    cache = model._style_cache if kind == "style" else model._subject_cache
    cache.clear()
    calls = []

    def encode_and_press_cancel(*args, **kwargs):
        calls.append(1)
        result = original(*args, **kwargs)
        bridge.request_interrupt()  # pressed while the first image was encoded
        return result

    monkeypatch.setattr(model, method, encode_and_press_cancel)
    with pytest.raises(bridge.Cancelled):
        encode_style(model, batch) if kind == "style" else encode_subject(model, batch)
    assert len(calls) == 1 and len(cache) == 1  # stopped after one image; only finished ones cached
    monkeypatch.undo()
    assert_clean(model)
    again = encode_style(model, batch) if kind == "style" else encode_subject(model, batch)
    cache.clear()
    fresh = encode_style(model, batch) if kind == "style" else encode_subject(model, batch)
    first, second = (again.tokens, fresh.tokens) if kind == "style" else (again.latents, fresh.latents)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))


def test_cancel_before_an_encode_does_no_work(setup, monkeypatch):
    model = setup[0]
    monkeypatch.setattr(model, "encode_style", lambda *a, **k: pytest.fail("encoded after Cancel"))
    bridge.request_interrupt()
    with pytest.raises(bridge.Cancelled):
        encode_style(model, image(20, 20))
    assert not bridge.interrupt_requested()


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cancel_at,batch", [(1, 1), (3, 1), (6, 2)])
def test_cancel_while_sampling_stops_within_a_step(setup, cancel_at, batch):
    model, style, subject, reference = setup
    ticks, pressed = [], []

    def listener(current, total, node_id):
        ticks.append((current, time.perf_counter()))
        if current == cancel_at:
            pressed.append(time.perf_counter())
            bridge.request_interrupt()

    bridge.Progress.listener = listener
    with pytest.raises(bridge.Cancelled):
        generate(model, style=style, subject=subject, seed=3, steps=4, batch_size=batch)
    returned = time.perf_counter()
    bridge.Progress.listener = None
    assert [t for t, _ in ticks] == list(range(1, cancel_at + 1))  # no step after the one Cancel came in
    step_time = (ticks[-1][1] - ticks[0][1]) / max(1, len(ticks) - 1) if len(ticks) > 1 else None
    print(f"\n[cancel while sampling at step {cancel_at}, batch {batch}] returned "
          f"{1000 * (returned - pressed[0]):.1f} ms after Cancel"
          + (f" (a step takes {1000 * step_time:.1f} ms)" if step_time else ""))
    assert_clean(model)
    images, _ = generate(model, style=style, subject=subject, seed=3, steps=4, batch_size=batch)
    assert torch.equal(images[:1], reference)


def test_cancel_from_another_thread_returns_within_a_step(setup):
    """Cancel pressed at an arbitrary moment (ComfyUI's Cancel comes from the server thread)."""
    model, style, subject, reference = setup
    ticks = []
    bridge.Progress.listener = lambda current, total, node_id: ticks.append(time.perf_counter())
    generate(model, style=style, subject=subject, seed=3, steps=6, width=64, height=64)  # warm, and times
    step = max(b - a for a, b in zip(ticks, ticks[1:]))
    ticks.clear()
    pressed = []

    def press():
        pressed.append(time.perf_counter())
        bridge.request_interrupt()

    timer = threading.Timer(2.5 * step, press)
    started = time.perf_counter()
    timer.start()
    with pytest.raises(bridge.Cancelled):
        generate(model, style=style, subject=subject, seed=3, steps=200, width=64, height=64)
    returned = time.perf_counter()
    timer.join()
    bridge.Progress.listener = None
    latency = returned - pressed[0]
    print(f"\n[cancel from another thread while sampling] returned {1000 * latency:.1f} ms after Cancel, "
          f"{len(ticks)} of 200 steps done (slowest step {1000 * step:.1f} ms, run {returned - started:.2f} s)")
    assert len(ticks) < 200
    assert latency < 2 * step + 0.25  # the step in flight finishes, then it stops
    assert_clean(model)
    assert torch.equal(generate(model, style=style, subject=subject, seed=3, steps=4)[0], reference)


def test_cancel_leaves_the_step_cache_and_hooks_clean(setup):
    """After a cancel in the middle of an image, a run with the same seed equals a fresh run, also for
    the second image of a batch (no residue from the cancelled one)."""
    model, style, subject, _ = setup
    fresh, _ = generate(model, style=style, subject=subject, seed=11, steps=3, batch_size=2)

    def listener(current, total, node_id):
        if current == 4:
            bridge.request_interrupt()

    bridge.Progress.listener = listener
    with pytest.raises(bridge.Cancelled):
        generate(model, style=style, subject=subject, seed=11, steps=3, batch_size=2)
    bridge.Progress.listener = None
    assert not model.transformer.context_embedder._forward_hooks
    again, _ = generate(model, style=style, subject=subject, seed=11, steps=3, batch_size=2)
    assert torch.equal(again, fresh)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def test_cancel_while_decoding_a_batch_stops_before_the_next_image(setup, monkeypatch):
    model, style, subject, reference = setup
    decoded = []
    original = vae_module.decode_latents

    def decode_and_press_cancel(*args, **kwargs):
        decoded.append(1)
        out = original(*args, **kwargs)
        bridge.request_interrupt()  # pressed while image 1 of 3 was decoded
        return out

    monkeypatch.setattr(vae_module, "decode_latents", decode_and_press_cancel)
    with pytest.raises(bridge.Cancelled):
        generate(model, style=style, subject=subject, seed=3, steps=4, batch_size=3)
    assert decoded == [1]
    monkeypatch.undo()
    assert_clean(model)
    images, _ = generate(model, style=style, subject=subject, seed=3, steps=4, batch_size=3)
    assert images.shape[0] == 3 and torch.equal(images[:1], reference)


def test_cancel_after_the_last_step_does_not_decode(setup, monkeypatch):
    model, style, subject, _ = setup
    monkeypatch.setattr(vae_module, "decode_latents", lambda *a, **k: pytest.fail("decoded after Cancel"))

    def listener(current, total, node_id):
        if current == total:
            bridge.request_interrupt()

    bridge.Progress.listener = listener
    with pytest.raises(bridge.Cancelled):
        generate(model, style=style, subject=subject, seed=3, steps=2)
    assert_clean(model)


# ---------------------------------------------------------------------------------------------
# Remote polling (cross-check; the remote tests cover the protocol)
# ---------------------------------------------------------------------------------------------

def test_cancel_while_polling_fal_returns_within_a_poll_interval(remote_env, monkeypatch):  # noqa: F811
    monkeypatch.setattr(USORemoteGenerate, "POLL_INTERVAL_S", 1.0)  # the node's default
    pressed = []

    def press():
        pressed.append(time.monotonic())
        bridge.request_interrupt()

    with fal_server(monkeypatch, never_finish=True) as fal:
        timer = threading.Timer(1.5, press)  # in the middle of a wait between two polls
        timer.start()
        with pytest.raises(bridge.Cancelled):
            run_node()
        latency = time.monotonic() - pressed[0]
        assert fal.cancel_seen.wait(2)  # the remote job was cancelled too
    print(f"\n[cancel while polling fal] returned {1000 * latency:.0f} ms after Cancel (poll interval 1 s)")
    assert latency < USORemoteGenerate.POLL_INTERVAL_S
    assert not bridge.interrupt_requested()
    with fal_server(monkeypatch) as fal:  # the next run starts clean
        images, _seed = run_node()
        assert images.shape[0] == 1
