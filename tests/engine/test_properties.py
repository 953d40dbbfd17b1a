"""Property-based tests (hypothesis) over sizes, batch counts and image shapes: subject
preprocessing, the UnoPE id grids, packing, the output size rules and IMAGE -> PIL conversion.
Each property is checked against the independent reference (tests/helpers/reference_math.py)
where one exists."""
from __future__ import annotations

from pathlib import Path

import math

import numpy as np
import pytest
import reference_math as ref
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from nodes.comfyui import image_convert
from nodes.engine import InputError, positions, subject
from nodes.engine.pipeline import SubjectEncoding, USOPipeline
from nodes.engine.limits import WIDTH

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ["RGB", "RGBA", "L", "P", "LA", "1", "CMYK"]

long_sides = st.integers(4, 64).map(lambda k: 16 * k)           # 64..1024, what the node accepts
side = st.integers(1, 700)


def _image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), mode="L"))
        return rgba
    return rgb.convert(mode)


# ---------------------------------------------------------------------------------------------
# Subject preprocessing
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(w=side, h=side, long_side=long_sides, mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
@example(w=16, h=16, long_side=512, mode="RGBA", seed=0)
@example(w=1, h=1, long_side=512, mode="RGB", seed=0)
@example(w=700, h=1, long_side=64, mode="L", seed=0)
@example(w=17, h=900, long_side=512, mode="RGB", seed=0)
@example(w=512, h=512, long_side=512, mode="P", seed=0)
def test_subject_preprocessing_sizes_and_reference(w, h, long_side, mode, seed):
    img = _image(w, h, mode, seed)
    short_scaled = int(long_side / max(w, h) * min(w, h))
    if (w, h) != (16, 16) and short_scaled < 16:
        with pytest.raises(ValueError, match=rf"subject image {w}x{h} is too narrow"):
            subject.preprocess_subject(img, long_side)
        return
    out = subject.preprocess_subject(img, long_side)
    ow, oh = out.size
    assert out.mode == "RGB"
    assert ow % 16 == 0 and oh % 16 == 0
    if (w, h) == (16, 16):  # the reference passes 16x16 through untouched
        assert out.size == (16, 16)
    else:
        # The long side is exactly long_side (a multiple of 16, so the crop never shaves it); the
        # short side is the scaled one floored, then cropped to /16: within 16 px, never larger.
        assert max(ow, oh) == long_side and ow <= long_side and oh <= long_side
        long_is_w = w >= h
        assert (ow if long_is_w else oh) == long_side
        short_out = oh if long_is_w else ow
        exact = long_side * min(w, h) / max(w, h)
        assert exact - 17 < short_out <= exact
    theirs = ref.reference_preprocess_subject(img, long_side).convert("RGB")
    assert out.size == theirs.size and out.tobytes() == theirs.tobytes()


@SETTINGS
@given(w=st.integers(1, 400), h=st.integers(1, 400), long_side=long_sides)
@example(w=1, h=1, long_side=784)
@example(w=300, h=200, long_side=512)
def test_keep_size_output_is_a_valid_size_or_a_clear_error(w, h, long_side):
    """keep_size = the preprocessed subject x 1024 / long_side: multiples of 16 in range, or an
    InputError that names the side (an extreme aspect at a large long_side)."""
    img = _image(w, h, "RGB", 0)
    try:
        prepared = subject.preprocess_subject(img, long_side)
    except ValueError:
        return
    enc = SubjectEncoding((torch.zeros(1),), (prepared.size,), long_side, "x")
    try:
        ow, oh = USOPipeline.output_size(None, 1024, 1024, True, enc)
    except InputError as exc:
        assert str(exc).startswith(("width: ", "height: ")) and "outside 16..4096" in str(exc)
        return
    assert ow % 16 == 0 and oh % 16 == 0 and WIDTH.low <= min(ow, oh) and max(ow, oh) <= 1024
    pw, ph = prepared.size
    # The reference's own expression, float rounding included: at long_side 784 a 784 px side gives
    # int(784 * (1024 / 784)) = int(1023.99...) = 1023 -> 1008, not 1024 (exact at 512, the default).
    assert ow == int(pw * (1024 / long_side)) // 16 * 16 and oh == int(ph * (1024 / long_side)) // 16 * 16


@SETTINGS
@given(value=st.one_of(st.integers(-100, 5000), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)))
def test_generate_size_check_accepts_exactly_the_valid_sizes(value):
    problem = WIDTH.problem(value)  # what USO Generate refuses a width with
    valid = isinstance(value, int) and not isinstance(value, bool) and WIDTH.low <= value <= WIDTH.high \
        and value % 16 == 0
    assert (problem is None) == valid
    if problem is not None:
        assert problem.startswith("width: ")


# ---------------------------------------------------------------------------------------------
# Id grids (UnoPE) and packing
# ---------------------------------------------------------------------------------------------

sixteens = st.integers(1, 128).map(lambda k: 16 * k)               # 16..2048 px


@SETTINGS
@given(width=sixteens, height=sixteens,
       refs=st.lists(st.tuples(st.integers(1, 64).map(lambda k: 16 * k), st.integers(1, 64).map(lambda k: 16 * k)),
                     max_size=4))
def test_id_grids_counts_ranges_diagonal_and_reference(width, height, refs):
    rows, cols = height // 16, width // 16
    noise = positions.grid_ids(rows, cols)
    assert noise.shape == (rows * cols, 3)
    assert noise[:, 0].eq(0).all()
    assert noise[:, 1].min() == 0 and noise[:, 1].max() == rows - 1
    assert noise[:, 2].min() == 0 and noise[:, 2].max() == cols - 1
    assert noise[cols - 1].tolist() == [0, 0, cols - 1]        # row-major
    grids = [(rh // 16, rw // 16) for rw, rh in refs]
    subject_ids = positions.subject_ids((rows, cols), grids)
    assert len(subject_ids) == len(refs)
    start = (rows, cols)                                        # the first subject starts at (H/16, W/16)
    for ids, (h, w) in zip(subject_ids, grids):
        assert ids.shape == (h * w, 3) and ids[:, 0].eq(0).all()
        assert ids[0].tolist() == [0, start[0], start[1]]
        assert ids[:, 1].max() == start[0] + h - 1 and ids[:, 2].max() == start[1] + w - 1
        start = (start[0] + h, start[1] + w)                    # the next one: previous start + its size
    expected_noise, expected_refs = ref.reference_ids(width, height, refs)
    assert torch.equal(noise, expected_noise)
    assert all(torch.equal(a, b) for a, b in zip(subject_ids, expected_refs))


@SETTINGS
@given(batch=st.integers(1, 3), channels=st.sampled_from([4, 16]), rows=st.integers(1, 24),
       cols=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_and_reference(batch, channels, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, channels, 2 * rows, 2 * cols, generator=g)
    packed = positions.pack(z)
    assert packed.shape == (batch, rows * cols, 4 * channels)
    assert torch.equal(packed, ref.pack(z))
    height, width = 16 * rows, 16 * cols
    assert torch.equal(positions.unpack(packed, height, width), z)
    assert torch.equal(ref.unpack(packed, width, height), z)


# ---------------------------------------------------------------------------------------------
# IMAGE -> PIL
# ---------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), h=st.integers(1, 40), w=st.integers(1, 40), channels=st.sampled_from([1, 3, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), spread=st.sampled_from([1.0, 1.5]),
       rank3=st.booleans(), block=st.sampled_from([1, 7, 1 << 22]), seed=st.integers(0, 2**16))
def test_image_batch_to_pils_over_shapes(batch, h, w, channels, dtype, spread, rank3, block, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(batch, h, w, channels, generator=g) * spread - (spread - 1) / 2).to(dtype)
    if rank3:
        pixels = pixels[0]
        batch = 1
    saved = image_convert._BLOCK_VALUES
    image_convert._BLOCK_VALUES = block  # 1 and 7: one row per block; the default: the whole frame
    try:
        pils = image_convert.image_batch_to_pils(pixels, "image")
    finally:
        image_convert._BLOCK_VALUES = saved
    assert len(pils) == batch
    expected = pixels.reshape(batch, h, w, channels).float()
    expected = expected.expand(batch, h, w, 3) if channels == 1 else expected[..., :3]
    expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for pil, exp in zip(pils, expected):
        assert pil.mode == "RGB" and pil.size == (w, h)
        assert np.array_equal(np.asarray(pil), exp)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=5))
def test_image_batch_to_pils_refuses_every_other_shape_clearly(shape):
    t = torch.rand(*shape)
    ok = (len(shape) in (3, 4) and shape[-1] in (1, 3, 4) and all(d >= 1 for d in shape))
    assume(not ok or math.prod(shape) < 10_000)
    if ok:
        assert len(image_convert.image_batch_to_pils(t)) == (shape[0] if len(shape) == 4 else 1)
    else:
        with pytest.raises(ValueError, match=r"^image: "):
            image_convert.image_batch_to_pils(t)


@pytest.mark.parametrize("long_side,encoded,output", [
    (512, (512, 384), (1024, 768)),     # the default long side: 2x
    (64, (64, 32), (1024, 512)),        # a --tiny run (long side 64): 16x, not 2x
    (784, (784, 588), (1008, 752)),     # int(784 * (1024 / 784)) = 1023 -> 1008; 588 -> 767 -> 752
    (1024, (1024, 680), (1024, 672)),   # 1x, then down to a multiple of 16
])
def test_keep_size_is_the_encoded_size_times_1024_over_long_side(long_side, encoded, output):
    """What the README, the node tooltip and --help say keep_size does."""
    enc = SubjectEncoding((torch.zeros(1),), (encoded,), long_side, "x")
    assert USOPipeline.output_size(None, 16, 16, True, enc) == output
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "each side of its encoded size × 1024 / `long_side`, down to a multiple of 16: 2× at the default " \
           "long side 512" in readme
