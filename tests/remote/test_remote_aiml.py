"""AIML protocol against the fake server: one POST, result shapes, retries at most once, timeout, Cancel."""
from __future__ import annotations

import logging
import time

import pytest
from remote_helpers import (aiml_server, image, press_cancel_after, remote_env, run_node,  # noqa: F401
                            unused_port)

from fake_remote_servers import FakeAiml
from nodes.comfyui import bridge
from nodes.remote import Hooks, ProviderError, RemoteError, RemoteTimeout
from nodes.remote.aiml import AimlClient
from nodes.remote.keys import ApiKey, Secret
from nodes.remote.transport import Transport


def test_one_post_with_the_mapped_body(remote_env, monkeypatch):
    with aiml_server(monkeypatch) as aiml:
        images, seed = run_node(provider="aiml", prompt="a red fox", negative_prompt="blurry", seed=5,
                                size="landscape_16_9", output_format="jpeg", num_images=2)
        posts = aiml.calls("POST")
    assert len(posts) == 1
    body = posts[0].json
    assert posts[0].headers["authorization"] == f"Bearer {aiml.key}"
    assert body["model"] == "bytedance/uso" and len(body["image_urls"]) == 2
    assert "input_image_urls" not in body
    assert {k: body[k] for k in ("prompt", "negative_prompt", "seed", "image_size", "output_format", "num_images")} \
        == {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 5, "image_size": "landscape_16_9",
            "output_format": "jpeg", "num_images": 2}
    assert images.shape == (2, 576, 1024, 3) and seed == 5
    assert remote_env[-1].startswith("AIML: done · 2 images 1024x576 · seed 5")


@pytest.mark.parametrize("shape", ["data_url", "b64", "images_only", "data_uri"])
def test_every_result_shape_is_read(remote_env, monkeypatch, shape):
    with aiml_server(monkeypatch, shape=shape, success_status=200 if shape == "b64" else 201):
        images, _ = run_node(provider="aiml", num_images=2)
    assert images.shape == (2, 256, 256, 3)
    assert [int(images[i, 0, 0].argmax()) for i in range(2)] == [0, 1]


def test_provider_picked_seed_and_missing_seed(remote_env, monkeypatch):
    with aiml_server(monkeypatch, picked_seed=351168504) as aiml:
        _, seed = run_node(provider="aiml", seed=0)
        assert "seed" not in aiml.calls("POST")[0].json
    assert seed == 351168504
    with aiml_server(monkeypatch, report_seed=False):
        _, seed = run_node(provider="aiml", seed=0)
    assert seed == 0 and "AIML did not report the seed it picked; the seed output is 0" in remote_env[-1]


def test_nsfw_flag_warns(remote_env, monkeypatch):
    with aiml_server(monkeypatch, nsfw=[True]):
        run_node(provider="aiml")
    assert "AIML flagged result image 1 of 1 as NSFW" in remote_env[-1]


def test_style_only_sends_styles_and_explains(remote_env, monkeypatch):
    with aiml_server(monkeypatch) as aiml:
        run_node(provider="aiml", subject_image=None, style_images=image(batch=2))
        urls = aiml.calls("POST")[0].json["image_urls"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert "AIML cannot leave the subject slot empty" in remote_env.text()


def test_empty_prompt_is_sent_as_empty_string(remote_env, monkeypatch):
    with aiml_server(monkeypatch) as aiml:
        run_node(provider="aiml", prompt="", keep_size=True)
        body = aiml.calls("POST")[0].json
    assert body["prompt"] == "" and body["keep_size"] is True


# -- retries: at most once, only where the request never ran ------------------------------------------

@pytest.mark.parametrize("status", [429, 503])
def test_429_or_503_then_success(remote_env, monkeypatch, status):
    with aiml_server(monkeypatch, errors=[FakeAiml.error(status, "Too many requests")]) as aiml:
        images, _ = run_node(provider="aiml")
        assert len(aiml.calls("POST")) == 2
    assert images.shape[0] == 1
    assert f"(HTTP {status}), retrying in" in remote_env.text()


def test_second_429_is_not_retried_again(remote_env, monkeypatch):
    errors = [FakeAiml.error(429, "Free-tier limit: 10 per hour")] * 2
    with aiml_server(monkeypatch, errors=errors) as aiml:
        with pytest.raises(ProviderError) as err:
            run_node(provider="aiml")
        assert len(aiml.calls("POST")) == 2
    assert str(err.value) == ("AIML: rate limit (HTTP 429: Free-tier limit: 10 per hour), still after one retry. "
                              "Wait a few minutes (free-tier keys have an hourly limit), then run again. "
                              "(AIML requestId=aiml-req-1)")


@pytest.mark.parametrize("status, expected", [
    (500, "AIML server error (HTTP 500: Internal error). Run again later; the model may be under maintenance. "
          "(AIML requestId=aiml-req-1)"),
    (504, "AIML: the generation timed out on AIML's side (HTTP 504: Internal error). It may still have been "
          "billed; run again later. (AIML requestId=aiml-req-1)"),
    (403, "AIML refused the request (HTTP 403: Internal error). The account is probably out of credits; top it "
          "up in the AIML dashboard. (AIML requestId=aiml-req-1)"),
])
def test_errors_that_are_not_retried(remote_env, monkeypatch, status, expected):
    with aiml_server(monkeypatch, errors=[FakeAiml.error(status, "Internal error")]) as aiml:
        with pytest.raises(ProviderError) as err:
            run_node(provider="aiml")
        assert len(aiml.calls("POST")) == 1
    assert str(err.value) == expected


def test_validation_error_400(remote_env, monkeypatch):
    """AIML's 400 body shape; injected, because the node itself never sends what the schema rejects."""
    with aiml_server(monkeypatch, errors=[FakeAiml.error(400, "Body validation error: image_urls.0: Invalid url")]):
        with pytest.raises(ProviderError) as err:
            run_node(provider="aiml")
    # In the user's terms: image_urls.0 is the subject_image input.
    assert str(err.value) == ("AIML rejected the input (HTTP 400): Body validation error: subject_image: Invalid "
                              "url. Fix the named input(s) and run again. (AIML requestId=aiml-req-1)")


def test_dropped_connection_is_not_retried(remote_env, monkeypatch):
    with aiml_server(monkeypatch, drops=1) as aiml:
        with pytest.raises(RemoteError) as err:
            run_node(provider="aiml")
        assert len(aiml.calls("POST")) == 1
    assert "the request may have reached AIML and may be billed" in str(err.value)


def test_unreachable_server_is_retried_once(remote_env, monkeypatch):
    monkeypatch.setenv("AIML_API_KEY", "k-123")
    monkeypatch.setenv("USO_AIML_URL", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(RemoteError) as err:
        run_node(provider="aiml")
    assert "AIML: the request failed after 2 attempt(s): could not connect" in str(err.value)
    assert "nothing was charged" in str(err.value) and "USO_AIML_URL" in str(err.value)


def test_wrong_base_url_404(remote_env, monkeypatch):
    with FakeAiml() as aiml:
        monkeypatch.setenv("AIML_API_KEY", aiml.key)
        monkeypatch.setenv("USO_AIML_URL", aiml.url + "/wrong")
        with pytest.raises(ProviderError, match=r"AIML: no image endpoint at .*/wrong/v1/images/generations "
                                                r"\(HTTP 404: Cannot POST /wrong/v1/images/generations\)"):
            run_node(provider="aiml")


def test_bad_base_url_is_refused_before_any_call(remote_env, monkeypatch):
    monkeypatch.setenv("AIML_API_KEY", "k-123")
    monkeypatch.setenv("USO_AIML_URL", "api.aimlapi.com")
    with pytest.raises(RemoteError, match="USO_AIML_URL is not an https URL"):
        run_node(provider="aiml")


# -- timeout and Cancel ----------------------------------------------------------------------------

def test_slow_answer_hits_the_timeout():
    with FakeAiml(delay_s=20) as aiml:
        hooks = Hooks()
        client = AimlClient(ApiKey("aiml", Secret(aiml.key), "test"), aiml.url,
                            Transport(backoff_base_s=0.01), hooks)
        started = time.monotonic()
        with pytest.raises(RemoteTimeout) as err:
            client.run({"model": "bytedance/uso", "prompt": "", "image_urls": ["http://x/y.png"]}, timeout_s=0.5)
        assert time.monotonic() - started < 5
        assert len(aiml.calls("POST")) == 1
    assert str(err.value) == ("AIML: no answer within timeout_s=0.5 s. AIML has no way to cancel a generation, so "
                              "it may still finish on AIML's side and be billed. Raise timeout_s if generations "
                              "usually take longer, or try fal, which can be cancelled.")


def test_cancel_while_waiting_returns_quickly_and_warns(remote_env, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    with aiml_server(monkeypatch, delay_s=20):
        press_cancel_after(0.3)
        started = time.monotonic()
        with pytest.raises(bridge.Cancelled):
            run_node(provider="aiml")
        assert time.monotonic() - started < 5
    assert "AIML: cancelled here. AIML has no way to cancel a generation" in remote_env[-1]
    assert any("AIML request abandoned on Cancel" in r.getMessage() for r in caplog.records)
