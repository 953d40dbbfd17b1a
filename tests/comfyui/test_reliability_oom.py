"""Out of memory (simulated: CI has no GPU to exhaust): caught in every phase, the memory released,
a message naming the memory mode that would fit, and the model usable afterwards (issue 8)."""
from __future__ import annotations

import copy
import dataclasses
import weakref

import pytest
import torch
from reliability_helpers import (assert_clean, encode_style, encode_subject, generate, image,
                                 loaded_with_reference, single_thread)

from nodes.engine import OutOfMemoryError, USOError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def setup(comfy_folders):
    return loaded_with_reference(seed=5)


class OomOnce:
    """Replace `owner.<name>` by a function that, on its first call, allocates a scratch tensor (what
    the failing kernel had already allocated) and raises torch.OutOfMemoryError like CUDA does."""

    def __init__(self, monkeypatch, owner, name="forward"):
        self.original = getattr(owner, name)
        self.calls = 0
        self.scratch = None
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            scratch = torch.empty(4_000_000)
            self.scratch = weakref.ref(scratch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB "
                                         "total capacity; 21.9 GiB already allocated)")
        return self.original(*args, **kwargs)


def _released_spy(monkeypatch, model):
    calls = []
    original = model.placement.release

    def release(modules):
        calls.append(len(modules))
        return original(modules)

    monkeypatch.setattr(model.placement, "release", release)
    return calls


def _check_recovered(model, err, oom, release_calls):
    assert isinstance(err.value, OutOfMemoryError) and isinstance(err.value, USOError)
    # Raised outside the except block: no chained torch error (whose traceback would keep the failed
    # step's tensors alive while ComfyUI shows the message), and the scratch tensor is gone.
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert oom.scratch is not None and oom.scratch() is None, "the failed step's memory is still referenced"
    assert release_calls == [6], "the models were not taken off the device"
    assert model._released  # the next run places them again, whatever state the OOM left
    assert_clean(model)


def test_oom_while_sampling(setup, monkeypatch):
    model, style, subject, reference = setup
    oom = OomOnce(monkeypatch, model.transformer.transformer_blocks[0])
    release_calls = _released_spy(monkeypatch, model)
    with pytest.raises(OutOfMemoryError) as err:
        generate(model, style=style, subject=subject, seed=5)
    message = str(err.value)
    print(f"\n[OOM while sampling] {message}")
    assert message == ("Out of memory on cpu generating 32x32 with memory='auto' (which chose 'gpu'). The memory "
                       "was released; choose memory 'model_offload' or precision 'fp8_e4m3fn' in USO Load "
                       "Models, or generate a smaller image.")
    _check_recovered(model, err, oom, release_calls)
    assert torch.equal(generate(model, style=style, subject=subject, seed=5)[0], reference)
    assert not model._released
    devices = {p.device for m in model.modules() for p in m.parameters()}
    assert devices == {model.device}


def test_oom_in_the_second_image_of_a_batch(setup, monkeypatch):
    model, style, subject, reference = setup
    block = model.transformer.transformer_blocks[1]
    original = block.forward
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # image 2, step 1 (2 steps per image)
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return original(*args, **kwargs)

    monkeypatch.setattr(block, "forward", forward)
    with pytest.raises(OutOfMemoryError, match="generating 32x32"):
        generate(model, style=style, subject=subject, seed=5, batch_size=2)
    assert_clean(model)
    monkeypatch.undo()
    images, _ = generate(model, style=style, subject=subject, seed=5, batch_size=2)
    assert torch.equal(images[:1], reference)


def test_oom_while_decoding(setup, monkeypatch):
    model, style, subject, reference = setup
    oom = OomOnce(monkeypatch, model.vae, "decode")
    release_calls = _released_spy(monkeypatch, model)
    with pytest.raises(OutOfMemoryError, match=r"^Out of memory on cpu generating 32x32 with memory=") as err:
        generate(model, style=style, subject=subject, seed=5)
    _check_recovered(model, err, oom, release_calls)
    assert torch.equal(generate(model, style=style, subject=subject, seed=5)[0], reference)


def test_oom_while_encoding_the_prompt(setup, monkeypatch):
    model, style, subject, reference = setup
    prompt = "a dog in the style of the image"
    oom = OomOnce(monkeypatch, model.t5)
    release_calls = _released_spy(monkeypatch, model)
    with pytest.raises(OutOfMemoryError) as err:
        generate(model, prompt=prompt, style=style, subject=subject, seed=5)
    print(f"\n[OOM while encoding the prompt] {err.value}")
    assert str(err.value).startswith("Out of memory on cpu encoding the prompt with memory=")
    _check_recovered(model, err, oom, release_calls)
    assert prompt not in model._prompt_cache  # no half entry
    images, _ = generate(model, prompt=prompt, style=style, subject=subject, seed=5)
    assert prompt in model._prompt_cache and images.shape == (1, 32, 32, 3)


def test_oom_while_encoding_a_style_image(setup, monkeypatch):
    model, _, _, _ = setup
    cached = len(model._style_cache)
    oom = OomOnce(monkeypatch, model.siglip)
    release_calls = _released_spy(monkeypatch, model)
    img = image(44, 36, 11)
    with pytest.raises(OutOfMemoryError) as err:
        encode_style(model, img)
    print(f"\n[OOM while encoding a style image] {err.value}")
    assert str(err.value).startswith("Out of memory on cpu encoding a style image with memory=")
    _check_recovered(model, err, oom, release_calls)
    assert len(model._style_cache) == cached
    first = encode_style(model, img)
    monkeypatch.undo()
    model._style_cache.clear()
    assert torch.equal(encode_style(model, img).tokens[0], first.tokens[0])


def test_oom_while_encoding_a_subject_image(setup, monkeypatch):
    model, _, _, _ = setup
    cached = len(model._subject_cache)
    oom = OomOnce(monkeypatch, model.vae, "encode")
    release_calls = _released_spy(monkeypatch, model)
    with pytest.raises(OutOfMemoryError) as err:
        encode_subject(model, image(52, 36, 12))
    print(f"\n[OOM while encoding a subject image] {err.value}")
    assert str(err.value).startswith("Out of memory on cpu encoding a subject image with memory=")
    _check_recovered(model, err, oom, release_calls)
    assert len(model._subject_cache) == cached
    assert len(encode_subject(model, image(52, 36, 12)).latents) == 1


@pytest.mark.parametrize("chosen,mode,fp8,fixes", [
    ("gpu", "gpu", False, "choose memory 'model_offload' or precision 'fp8_e4m3fn'"),
    ("auto", "gpu", True, "choose memory 'model_offload'"),
    ("model_offload", "model_offload", False, "choose memory 'group_offload' or precision 'fp8_e4m3fn'"),
    ("auto", "group_offload", False, "choose precision 'fp8_e4m3fn'"),
    ("group_offload", "group_offload", True, "choose a smaller GGUF transformer (e.g. Q8_0)"),
])
def test_the_message_names_a_lighter_memory_mode_or_fp8(setup, chosen, mode, fp8, fixes):
    pipe = copy.copy(setup[0])
    pipe.memory_mode = mode
    pipe.options = dataclasses.replace(pipe.options, memory=chosen)
    pipe.precision = dataclasses.replace(pipe.precision, fp8_storage=fp8)
    message = pipe._oom_message("generating 1024x1024")
    print(f"\n[OOM message, memory={chosen}->{mode}, fp8={fp8}] {message}")
    shown = f"memory='{mode}'" if chosen == mode else f"memory='{chosen}' (which chose '{mode}')"
    assert message.startswith(f"Out of memory on cpu generating 1024x1024 with {shown}. The memory was released; ")
    assert f"{fixes} in USO Load Models, or generate a smaller image." in message
