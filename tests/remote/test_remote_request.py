"""The neutral request: checks, clamping, seed mapping, the two JSON bodies, images in and out."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from remote_helpers import aiml_server, fal_server, image, remote_env, run_node  # noqa: F401

from nodes.remote import InputError
from nodes.remote.errors import ProviderError
from nodes.remote.images import (MAX_ENCODED_BYTES, MAX_PIXELS, decode_data_uri, decode_results,
                                 encode_for_upload, to_data_uri)
from nodes.remote.request import (PROVIDER_SEED_MAX, aiml_body, build_request, fal_body, image_list, map_seed)


def _req(**over):
    args = dict(provider="fal", prompt="a cat", size="custom", width=1024, height=768, keep_size=False, steps=28,
                guidance=4.0, seed=7, num_images=1, negative_prompt="", output_format="png",
                safety_checker=True, has_subject=True, style_count=1)
    args.update(over)
    return build_request(**args)


# -- mapping ---------------------------------------------------------------------------------------

def test_fal_and_aiml_bodies_follow_the_mapping_table():
    req = _req(negative_prompt="blurry", keep_size=True, num_images=2, output_format="jpeg",
               safety_checker=False)
    from dataclasses import replace
    req = replace(req, image_urls=("data:image/png;base64,AAA", "data:image/png;base64,BBB"))
    common = {"prompt": "a cat", "negative_prompt": "blurry", "image_size": {"width": 1024, "height": 768},
              "keep_size": True, "num_inference_steps": 28, "guidance_scale": 4.0, "num_images": 2,
              "enable_safety_checker": False, "output_format": "jpeg", "seed": 7}
    assert fal_body(req) == {"input_image_urls": list(req.image_urls), **common}
    assert aiml_body(req) == {"model": "bytedance/uso", "image_urls": list(req.image_urls), **common}


def test_optional_fields_are_left_out_and_presets_sent_by_name():
    body = fal_body(_req(size="portrait_16_9", seed=0))
    assert body["image_size"] == "portrait_16_9"
    for absent in ("seed", "negative_prompt", "keep_size", "sync_mode"):
        assert absent not in body


def test_seed_mapping():
    assert map_seed(0) is None
    assert map_seed(1) == 1 and map_seed(123456) == 123456 and map_seed(PROVIDER_SEED_MAX) == PROVIDER_SEED_MAX
    assert map_seed(PROVIDER_SEED_MAX + 1) == 1
    assert map_seed(0xFFFFFFFFFFFFFFFF) == (0xFFFFFFFFFFFFFFFF - 1) % PROVIDER_SEED_MAX + 1


@given(st.integers(min_value=1, max_value=0xFFFFFFFFFFFFFFFF))
def test_every_comfy_seed_maps_into_what_both_providers_accept(seed):
    assert 1 <= map_seed(seed) <= PROVIDER_SEED_MAX


# -- clamping and refusing before any call ------------------------------------------------------------

@pytest.mark.parametrize("over, field, value, words", [
    ({"steps": 80}, "num_inference_steps", 50, "steps 80 is outside 1-50; using 50"),
    ({"steps": 0}, "num_inference_steps", 1, "steps 0 is outside 1-50; using 1"),
    ({"guidance": 15.0}, "guidance_scale", 10.0, "guidance 15.0 is outside 1.0-10.0 (fal accepts 1-10)"),
    ({"num_images": 9}, "num_images", 4, "num_images 9 is outside 1-4; using 4"),
    ({"width": 1000}, "image_size", {"width": 1008, "height": 768}, "width 1000 is not a multiple of 16"),
    ({"height": 4096}, "image_size", {"width": 1024, "height": 2048}, "height 4096 is outside 256-2048"),
])
def test_out_of_range_values_are_clamped_with_a_warning(over, field, value, words):
    req = _req(**over)
    assert fal_body(req)[field] == value
    assert any(words in w for w in req.warnings), req.warnings


def test_long_prompt_is_cut_to_4000_with_a_warning():
    req = _req(prompt="x" * 4500)
    assert len(req.prompt) == 4000
    assert "prompt has 4500 characters" in req.warnings[0]


def test_keep_size_without_subject_is_dropped_with_a_warning():
    req = _req(keep_size=True, has_subject=False)
    assert not req.keep_size and "keep_size" in req.warnings[0]


@pytest.mark.parametrize("over, words", [
    ({"provider": "openai"}, "provider: 'openai' is not supported; choose one of 'fal', 'aiml'."),
    ({"size": "huge"}, "size: 'huge' is not supported"),
    ({"output_format": "webp"}, "output_format: 'webp' is not supported; choose one of 'png', 'jpeg'."),
    ({"guidance": float("nan")}, "guidance: expected a number between 1 and 10"),
    ({"steps": 2.5}, "steps: expected a whole number, got 2.5"),
    ({"seed": -1}, "seed: -1 is negative"),
    ({"has_subject": False, "style_count": 0}, "No input image: connect subject_image"),
])
def test_values_that_cannot_be_fixed_are_refused(over, words):
    with pytest.raises(InputError) as err:
        _req(**over)
    assert words in str(err.value)


@pytest.mark.parametrize("over, words", [
    ({"subject_image": None, "style_images": None}, "No input image"),
    ({"output_format": "gif"}, "output_format: 'gif'"),
    ({"subject_image": torch.zeros(1, 8, 8, 2)}, "subject_image: expected an IMAGE of shape"),
])
def test_node_refuses_before_any_request(remote_env, monkeypatch, over, words):
    with fal_server(monkeypatch) as fal:
        with pytest.raises(InputError, match=words.replace("(", r"\(")):
            run_node(**over)
        assert fal.requests == []


def test_node_clamps_and_reports_before_the_paid_call(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        run_node(steps=70, guidance=12.5, width=250)
        body = fal.calls("POST")[0].json
    assert body["num_inference_steps"] == 50 and body["guidance_scale"] == 10.0
    assert body["image_size"] == {"width": 256, "height": 256}
    first_warning = next(t for t in remote_env if t.startswith("Warning:"))
    assert remote_env.index(first_warning) < remote_env.index("fal: submitting the job")
    assert "steps 70 is outside 1-50; using 50" in first_warning


# -- image lists: style only, too many styles ----------------------------------------------------------

def test_style_only_image_lists():
    assert image_list("fal", None, ["s1", "s2"]) == (["", "s1", "s2"], [])
    urls, notes = image_list("aiml", None, ["s1"])
    assert urls == ["s1"] and "first style image also fills the subject" in notes[0]
    assert image_list("aiml", "subj", ["s1"]) == (["subj", "s1"], [])


def test_more_than_two_styles_are_dropped_with_a_warning(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        run_node(style_images=image(batch=4))
        urls = fal.calls("POST")[0].json["input_image_urls"]
    assert len(urls) == 3
    assert "style_images holds 4 images; USO takes at most 2 styles, so images 3-4 were dropped" \
        in remote_env.text()


def test_subject_batch_sends_only_the_first_frame(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        run_node(subject_image=image(batch=2), style_images=None)
        assert len(fal.calls("POST")[0].json["input_image_urls"]) == 1
    assert "subject_image holds 2 images; only the first is sent" in remote_env.text()


# -- data URIs -------------------------------------------------------------------------------------

def _uri_image(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(decode_data_uri(uri)))


def test_small_image_goes_as_lossless_png():
    img = Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8))
    uri = to_data_uri(img)
    assert uri.startswith("data:image/png;base64,")
    assert np.array_equal(np.asarray(_uri_image(uri)), np.asarray(img))


def test_rgba_and_grayscale_become_rgb():
    assert _uri_image(to_data_uri(Image.new("RGBA", (8, 8), (1, 2, 3, 4)))).mode == "RGB"
    assert _uri_image(to_data_uri(Image.new("L", (8, 8), 9))).mode == "RGB"


def test_big_image_is_downscaled_to_the_pixel_cap():
    data, mime = encode_for_upload(Image.new("RGB", (3000, 2000), (10, 20, 30)))
    with Image.open(io.BytesIO(data)) as img:
        assert img.width * img.height <= MAX_PIXELS
        assert abs(img.width / img.height - 1.5) < 0.01
    assert mime == "image/png"


def test_noisy_image_falls_back_to_jpeg_under_the_byte_cap():
    noise = Image.fromarray((np.random.default_rng(1).random((1400, 1400, 3)) * 255).astype(np.uint8))
    data, mime = encode_for_upload(noise)
    assert mime == "image/jpeg" and len(data) <= MAX_ENCODED_BYTES
    uri = to_data_uri(noise)
    assert uri.startswith("data:image/jpeg;base64,")
    assert len(uri) <= MAX_ENCODED_BYTES * 4 / 3 + 64


# -- results ---------------------------------------------------------------------------------------

def _png(size, color, mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


def test_results_from_url_data_uri_b64_and_file_data():
    png = _png((16, 8), (255, 0, 0))
    b64 = base64.b64encode(png).decode()
    items = [{"url": "https://cdn.example/a.png"}, {"url": f"data:image/png;base64,{b64}"}, {"b64_json": b64},
             {"file_data": b64}]
    images, warnings = decode_results(items, lambda url: png, "fal", "rid")
    assert [im.size for im in images] == [(16, 8)] * 4 and warnings == []
    assert images[0].getpixel((0, 0)) == (255, 0, 0)


def test_results_in_other_modes_become_rgb():
    items = [{"b64_json": base64.b64encode(_png((4, 4), c, m)).decode()}
             for m, c in (("RGBA", (9, 8, 7, 0)), ("L", 77), ("P", 3), ("I;16", 65535))]
    images, _ = decode_results(items, None, "AIML", None)
    assert all(im.mode == "RGB" for im in images)
    assert images[3].getpixel((0, 0)) == (255, 255, 255)


def test_mismatched_result_sizes_are_resized_with_a_warning():
    items = [{"b64_json": base64.b64encode(_png(s, (0, 0, 0))).decode()} for s in ((16, 16), (8, 12))]
    images, warnings = decode_results(items, None, "fal", None)
    assert images[1].size == (16, 16)
    assert "result image 2 is 8x12, image 1 is 16x16" in warnings[0]


@pytest.mark.parametrize("item, words", [
    ({"url": "file:///etc/passwd"}, "is not an https URL (scheme file:)"),
    ({"url": "data:image/png;base64,bm90IGFuIGltYWdl"}, "could not be read"),
    ({}, "has no url, b64_json or file_data"),
])
def test_unreadable_results_name_the_image_and_request(item, words):
    with pytest.raises(ProviderError) as err:
        decode_results([item], lambda url: b"", "fal", "rid-1")
    assert "fal: result image 1 of 1 could not be read" in str(err.value)
    assert words in str(err.value) and "request_id=rid-1" in str(err.value)
