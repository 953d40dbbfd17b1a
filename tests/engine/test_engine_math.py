"""Golden values of the USO reference: schedule, id grids, packing, subject/style preprocessing."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import reference_math as ref
from nodes.engine import positions, schedule, style, subject


def test_reference_schedule_golden_values_25_steps_1024():
    t = schedule.timesteps(25, 1024, 1024)
    assert len(t) == 26 and t[0] == 1.0 and t[-1] == 0.0
    assert t[1:4] == pytest.approx([0.9746, 0.9483, 0.9213], abs=1e-4)
    assert t[12] == pytest.approx(0.6336, abs=1e-4)


def test_flux_shift_is_the_standard_one():
    assert schedule.timesteps(25, 1024, 1024, shift="flux")[12] == pytest.approx(0.7738, abs=1e-4)


@pytest.mark.parametrize("steps,w,h", [(25, 1024, 1024), (28, 768, 1344), (4, 512, 512), (1, 64, 48)])
def test_schedule_matches_reference_bit_for_bit(steps, w, h):
    assert schedule.timesteps(steps, w, h) == ref.reference_schedule(steps, w, h)


def test_schedule_rejects_unknown_shift():
    with pytest.raises(ValueError, match="shift"):
        schedule.timesteps(4, 64, 64, shift="comfy")


def test_id_grids_of_the_spec_case():
    # 1024x1024 output, one 512x512 subject: noise (0,i,j) i,j<64; subject (0,64+i,64+j) i,j<32.
    noise = positions.grid_ids(64, 64)
    assert noise.shape == (4096, 3)
    assert noise[:, 0].eq(0).all() and noise[:, 1].max() == 63 and noise[:, 2].max() == 63
    first, second = positions.subject_ids((64, 64), [(32, 32), (32, 32)])
    assert first.shape == (1024, 3)
    assert first[0].tolist() == [0, 64, 64] and first[-1].tolist() == [0, 95, 95]
    assert second[0].tolist() == [0, 96, 96]
    expected_noise, expected_refs = ref.reference_ids(1024, 1024, [(512, 512), (512, 512)])
    assert torch.equal(noise, expected_noise)
    assert torch.equal(first, expected_refs[0]) and torch.equal(second, expected_refs[1])


def test_subject_ids_follow_each_subjects_own_size():
    ids = positions.subject_ids((4, 6), [(2, 3), (5, 1)])
    assert ids[0][0].tolist() == [0, 4, 6]
    assert ids[1][0].tolist() == [0, 6, 9]
    _, expected = ref.reference_ids(96, 64, [(48, 32), (16, 80)])
    assert torch.equal(ids[0], expected[0]) and torch.equal(ids[1], expected[1])


def test_token_counts_of_the_spec_case_scaled_down():
    # The reference's 1024x1024 case at 1/16 of the size: 64x64 output, 32x32 subject, two styles of 24 tokens (tiny
    # projector: 3 x 8), T5 512.
    noise = torch.zeros(1, 16, 8, 8)
    packed = positions.pack(noise)
    assert packed.shape == (1, 16, 64)
    subject_tokens = positions.pack(torch.zeros(1, 16, 4, 4))
    assert subject_tokens.shape == (1, 4, 64)
    assert 16 + 4 + (2 * 24 + 512) == 580


def test_pack_unpack_roundtrip_and_reference_order():
    z = torch.randn(2, 16, 6, 10)
    packed = positions.pack(z)
    assert torch.equal(packed, ref.pack(z))
    assert torch.equal(positions.unpack(packed, 48, 80), z)  # height, width


@pytest.mark.parametrize("size", [(16, 16), (640, 480), (480, 640), (1000, 1000), (33, 517), (300, 17 * 16)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_subject_preprocessing_matches_reference(size, mode):
    image = ref_image(size, mode)
    ours = subject.preprocess_subject(image, 512)
    theirs = ref.reference_preprocess_subject(image, 512).convert("RGB")
    assert ours.size == theirs.size
    assert ours.size[0] % 16 == 0 and ours.size[1] % 16 == 0
    assert ours.tobytes() == theirs.tobytes()


def test_subject_too_elongated_is_refused():
    with pytest.raises(ValueError, match="too narrow"):
        subject.preprocess_subject(Image.new("RGB", (17, 900)), 512)


@pytest.mark.parametrize("size", [(384, 384), (500, 300), (31, 77)])
def test_style_pixels_reference_crop_matches_reference(size):
    image = ref_image(size, "RGB")
    assert torch.equal(style.style_pixels(image, 384, "reference"), ref.reference_style_pixels(image, 384))


def test_style_center_crop_keeps_aspect():
    # A wide image whose left and right thirds differ: center crop keeps only the middle.
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))
    centered = style.style_pixels(img, 56, "center")
    squashed = style.style_pixels(img, 56, "reference")
    assert centered.shape == squashed.shape == (1, 3, 56, 56)
    assert centered[0, 2].mean() > 0.9 and centered[0, 0].mean() < -0.9   # all blue
    assert squashed[0, 0].mean() > -0.5                                    # red survives


def ref_image(size, mode):
    from tiny_models import make_image

    img = make_image(*size, seed=sum(size))
    if mode == "RGBA":
        img = img.convert("RGBA")
        alpha = Image.linear_gradient("L").resize(img.size)
        img.putalpha(alpha)
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P")
    return img
