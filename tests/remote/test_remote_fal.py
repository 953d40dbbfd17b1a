"""fal queue protocol against the fake server: happy paths, retries, failures, timeout, Cancel."""
from __future__ import annotations

import re
import threading
import time

import pytest
import torch
from remote_helpers import (fal_server, image, press_cancel_after, remote_env, run_node,  # noqa: F401
                            unused_port)

from fake_remote_servers import FakeFal
from nodes.comfyui import bridge
from nodes.remote import Cancelled, Hooks, ProviderError, RemoteError, RemoteTimeout
from nodes.remote.fal import FalClient
from nodes.remote.keys import ApiKey, Secret
from nodes.remote.transport import Transport


def _body(**over) -> dict:
    uri = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
    body = {"input_image_urls": [uri], "prompt": "p", "image_size": {"width": 256, "height": 256},
            "num_inference_steps": 28, "guidance_scale": 4.0, "num_images": 1, "enable_safety_checker": True,
            "output_format": "png"}
    body.update(over)
    return body


def _client(server: FakeFal, reports: list | None = None, cancelled=lambda: False) -> FalClient:
    hooks = Hooks(is_cancelled=cancelled, report=(reports.append if reports is not None else lambda t: None))
    transport = Transport(is_cancelled=cancelled, backoff_base_s=0.01, on_retry=hooks.report)
    return FalClient(ApiKey("fal", Secret(server.key), "the environment variable FAL_KEY"), server.url,
                     transport, hooks, poll_interval_s=0.02)


# -- happy paths -----------------------------------------------------------------------------------

def test_full_queue_flow_with_progress_text(remote_env, monkeypatch):
    with fal_server(monkeypatch, queue_polls=3, queue_start=2, progress_polls=2) as fal:
        images, seed = run_node(prompt="a red fox", seed=42, num_images=1)
        methods = [(r.method, r.path.rsplit("/", 1)[-1]) for r in fal.requests]
        body = fal.calls("POST")[0].json
        status_calls = fal.calls("GET", "/status")
    assert methods[0] == ("POST", "uso")
    assert len(status_calls) == 6 and all(r.query["logs"] == ["1"] for r in status_calls)
    assert body["prompt"] == "a red fox" and body["seed"] == 42 and len(body["input_image_urls"]) == 2
    assert images.dtype == torch.float32 and images.shape == (1, 256, 256, 3)
    assert seed == 42
    text = remote_env.text()
    assert re.search(r"fal: in queue \(2 ahead\) · \d+ s elapsed", text)
    assert "fal: in queue (0 ahead)" in text
    assert re.search(r"fal: generating · \d+ s \(\d+ s elapsed, \d+ s in queue\)\ndenoising step", text)
    assert re.search(r"fal: done · 1 image 256x256 · seed 42 · \d+ s \(request_id=[0-9a-f-]+\)", remote_env[-1])


@pytest.mark.parametrize("fmt, first_bytes", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8")])
def test_png_and_jpeg_results(remote_env, monkeypatch, fmt, first_bytes):
    with fal_server(monkeypatch) as fal:
        images, _ = run_node(output_format=fmt)
        served = next(iter(fal.files.values()))[0]
    assert served.startswith(first_bytes)
    assert images.shape == (1, 256, 256, 3)
    red = images[0, 0, 0]
    assert abs(float(red[0]) - 200 / 255) < 0.03 and abs(float(red[1]) - 40 / 255) < 0.03


def test_several_images_come_back_as_one_batch_in_order(remote_env, monkeypatch):
    with fal_server(monkeypatch, delivery="data"):
        images, _ = run_node(num_images=3)
    assert images.shape == (3, 256, 256, 3)
    assert [int(images[i, 0, 0].argmax()) for i in range(3)] == [0, 1, 2]


def test_provider_picked_seed_above_2_63_is_returned(remote_env, monkeypatch):
    with fal_server(monkeypatch, picked_seed=2**63 + 99) as fal:
        _, seed = run_node(seed=0)
        assert "seed" not in fal.calls("POST")[0].json
    assert seed == 2**63 + 99


def test_large_comfy_seed_is_folded_and_the_used_seed_returned(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        _, seed = run_node(seed=0xFFFFFFFFFFFFFFFF)
        sent = fal.calls("POST")[0].json["seed"]
    assert 1 <= sent <= 2_147_483_646 and seed == sent


def test_nsfw_flag_warns(remote_env, monkeypatch, caplog):
    with fal_server(monkeypatch, nsfw=[False, True]):
        images, _ = run_node(num_images=2)
    assert float(images[1].max()) == 0.0  # the fake, like fal, returns a black image
    warning = "fal flagged result image 2 of 2 as NSFW"
    assert warning in remote_env[-1]
    assert any(warning in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_style_only_sends_an_empty_subject_slot(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        images, _ = run_node(subject_image=None, style_images=image(batch=2))
        urls = fal.calls("POST")[0].json["input_image_urls"]
    assert urls[0] == "" and len(urls) == 3 and all(u.startswith("data:image/png") for u in urls[1:])
    assert images.shape[0] == 1


def test_style_only_falls_back_when_fal_rejects_the_empty_slot(remote_env, monkeypatch):
    with fal_server(monkeypatch, reject_empty_content=True) as fal:
        images, _ = run_node(subject_image=None, style_images=image(batch=2))
        posts = fal.calls("POST")
    assert [len(p.json["input_image_urls"]) for p in posts] == [3, 2]
    assert posts[1].json["input_image_urls"] == posts[0].json["input_image_urls"][1:]
    assert images.shape[0] == 1
    assert "fal did not accept an empty subject slot" in remote_env[-1]


def test_style_only_falls_back_when_fal_refuses_the_empty_slot_at_submit(remote_env, monkeypatch):
    # fal checks URLs when the job is submitted: HTTP 422 "input_image_urls.0: Input should be a valid URL".
    with fal_server(monkeypatch, reject_empty_content_at_submit=True) as fal:
        images, _ = run_node(subject_image=None, style_images=image(batch=2))
        posts = fal.calls("POST")
        assert len(fal.jobs) == 1                      # only the resent request became a job
    assert [len(p.json["input_image_urls"]) for p in posts] == [3, 2]
    assert posts[1].json["input_image_urls"] == posts[0].json["input_image_urls"][1:]
    assert images.shape[0] == 1
    assert "fal did not accept an empty subject slot" in remote_env[-1]


def test_a_refused_style_image_is_named_as_the_user_knows_it(remote_env, monkeypatch):
    detail = [{"loc": ["body", "input_image_urls", 2], "msg": "Input should be a valid URL", "type": "url_parsing"}]
    with fal_server(monkeypatch, submit_errors=[(422, {"detail": detail})]) as fal:
        with pytest.raises(ProviderError) as err:
            run_node(style_images=image(batch=2))
        assert len(fal.calls("POST")) == 1              # a subject was given: nothing to resend
    message = str(err.value)
    assert "style_images (image 2): Input should be a valid URL" in message and "input_image_urls" not in message
    assert "Fix the named input(s)" in message


def test_an_unreadable_status_is_asked_again_not_taken_as_finished(remote_env, monkeypatch):
    with fal_server(monkeypatch, status_garbage=3, queue_polls=1, progress_polls=1) as fal:
        images, _ = run_node()
        rid = next(iter(fal.jobs))
        results = [r for r in fal.calls("GET", rid) if not r.path.endswith("/status")]
    assert images.shape[0] == 1
    assert len(results) == 1                            # the result was fetched once, when finished
    assert "fal: the status answer could not be read (1 of 5); asking again" in remote_env.text()


def test_a_status_that_stays_unreadable_cancels_the_job_and_says_so(remote_env, monkeypatch):
    with fal_server(monkeypatch, status_garbage=100) as fal:
        with pytest.raises(RemoteError) as err:
            run_node()
        rid = next(iter(fal.jobs))
        assert fal.cancel_seen.is_set() and fal.jobs[rid].cancelled
        assert not [r for r in fal.calls("GET", rid) if not r.path.endswith("/status")]  # no result fetch
    message = str(err.value)
    assert f"the status of request {rid} could not be read 5 times in a row" in message
    assert "502 Bad Gateway" in message and "the job was cancelled" in message
    assert "still in progress" not in message


def test_an_undecodable_result_image_is_described_not_shown_as_a_python_object(remote_env, monkeypatch):
    with fal_server(monkeypatch, download_errors=[(200, {"error": "not an image"})] * 5):
        with pytest.raises(ProviderError) as err:
            run_node()
    message = str(err.value)
    assert "result image 1 of 1 could not be read: it is not an image file (" in message
    assert "starting '{\"error\": \"not an image\"}'" in message
    assert "BytesIO" not in message and " at 0x" not in message


def test_foreign_status_urls_are_not_followed(remote_env, monkeypatch):
    """The key goes with the status/result/cancel URLs, so they must stay on the configured host."""
    with fal_server(monkeypatch, foreign_urls=True) as fal:
        images, _ = run_node()
        assert fal.calls("GET", "/status")
    assert images.shape[0] == 1


def test_mismatched_result_sizes(remote_env, monkeypatch):
    with fal_server(monkeypatch, result_sizes=[(256, 256), (128, 64)]):
        images, _ = run_node(num_images=2)
    assert images.shape == (2, 256, 256, 3)
    assert "result image 2 is 128x64, image 1 is 256x256" in remote_env[-1]


# -- retries ---------------------------------------------------------------------------------------

def test_submit_429_then_success(remote_env, monkeypatch):
    with fal_server(monkeypatch, submit_errors=[(429, {"detail": "Too many requests"}, {"Retry-After": "0"})]) as fal:
        images, _ = run_node()
        assert len(fal.calls("POST")) == 2
    assert images.shape[0] == 1
    assert "fal: rate or concurrency limited (HTTP 429), retrying in" in remote_env.text()


def test_status_and_result_500_then_success(remote_env, monkeypatch):
    with fal_server(monkeypatch, status_errors=[(500, {"detail": "boom"})],
                    result_errors=[(503, {"detail": "busy"})], download_errors=[(502, {"detail": "gw"})]) as fal:
        images, _ = run_node()
        assert len(fal.calls("POST")) == 1
    assert images.shape[0] == 1
    assert "fal: server error (HTTP 500), retrying" in remote_env.text()


def test_submit_5xx_from_ingress_is_retried(remote_env, monkeypatch):
    with fal_server(monkeypatch, submit_errors=[(503, {"detail": "<html>bad gateway</html>"})]) as fal:
        run_node()
        assert len(fal.calls("POST")) == 2


def test_submit_5xx_that_reached_fal_is_not_retried(remote_env, monkeypatch):
    error = (503, {"detail": "No runner available", "error_type": "runner_scheduling_failure"},
             {"x-fal-request-id": "abc-123"})
    with fal_server(monkeypatch, submit_errors=[error]) as fal:
        with pytest.raises(ProviderError) as err:
            run_node()
        assert len(fal.calls("POST")) == 1
    assert str(err.value) == ("fal server error (HTTP 503, runner_scheduling_failure: No runner available). fal does "
                              "not charge for server errors; run again later. (request_id=abc-123)")


def test_submit_dropped_after_sending_is_not_retried(remote_env, monkeypatch):
    with fal_server(monkeypatch, submit_drops=1) as fal:
        with pytest.raises(RemoteError) as err:
            run_node()
        assert len(fal.calls("POST")) == 1
    assert "fal: submitting the job failed after 1 attempt(s): connection dropped before a complete answer" \
        in str(err.value)
    assert "it may or may not have reached fal" in str(err.value)


def test_submit_to_nothing_is_retried_then_explained(remote_env, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "a-id:a-secret")
    monkeypatch.setenv("USO_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(RemoteError) as err:
        run_node()
    msg = str(err.value)
    assert "fal: submitting the job failed after 5 attempt(s): could not connect" in msg
    assert "it never reached fal, nothing was charged" in msg and "USO_FAL_QUEUE_URL" in msg


# -- failures --------------------------------------------------------------------------------------

def test_job_failing_behind_completed_with_validation_detail_list(remote_env, monkeypatch):
    detail = [{"loc": ["body", "input_image_urls", 1], "msg": "Could not load the image",
               "type": "image_load_error", "input": "data:image/png;base64,AAAA"},
              {"loc": ["body", "guidance_scale"], "msg": "Input should be less than or equal to 10",
               "type": "less_than_equal"}]
    with fal_server(monkeypatch, job_error=(422, {"detail": detail}, "Input validation failed")) as fal:
        with pytest.raises(ProviderError) as err:
            run_node()
        rid = next(iter(fal.jobs))
        assert len(fal.calls("GET", rid)) >= 2
    assert str(err.value) == (
        "fal: the job failed: fal rejected the input (HTTP 422): style_images (image 1): Could not load the image "
        "(image_load_error); guidance: Input should be less than or equal to 10 (less_than_equal). Fix the "
        "named input(s) and run again. fal's status said: Input validation failed. "
        f"(request_id={rid})")


def test_job_failing_with_string_detail_and_error_type(remote_env, monkeypatch):
    body = {"detail": "Image too large: max 4096x4096", "error_type": "image_too_large"}
    with fal_server(monkeypatch, job_error=(422, body, None)) as fal:
        with pytest.raises(ProviderError) as err:
            run_node()
        rid = next(iter(fal.jobs))
    assert str(err.value) == ("fal: the job failed: fal rejected the input (HTTP 422, image_too_large): Image too "
                              "large: max 4096x4096. Check the prompt, the images and the size, steps and "
                              "guidance, then run again. "  # no input named: no "fix the named input(s)"
                              f"(request_id={rid})")


def test_job_failing_with_server_error_is_reported_not_retried(remote_env, monkeypatch):
    body = {"detail": "CUDA out of memory", "error_type": "runner_server_error"}
    with fal_server(monkeypatch, job_error=(500, body, "Runner crashed")) as fal:
        with pytest.raises(ProviderError) as err:
            run_node()
        rid = next(iter(fal.jobs))
        assert len([r for r in fal.calls("GET", rid) if not r.path.endswith("/status")]) == 1
    assert str(err.value) == ("fal: the job failed: fal server error (HTTP 500, runner_server_error: CUDA out of "
                              "memory). fal does not charge for server errors; run again later. fal's status "
                              f"said: Runner crashed. (request_id={rid})")


def test_submit_422_validation_and_non_json_errors(remote_env, monkeypatch):
    errors = [(422, {"detail": [{"loc": ["body", "num_images"], "msg": "Input should be less than or equal to 4",
                                 "type": "less_than_equal"}]})]
    with fal_server(monkeypatch, submit_errors=errors):
        with pytest.raises(ProviderError, match=r"^fal rejected the input \(HTTP 422\): num_images: Input should"):
            run_node()


def test_locked_account(remote_env, monkeypatch):
    with fal_server(monkeypatch, submit_errors=[(403, {"detail": "User is locked. Reason: Exhausted balance."})]):
        with pytest.raises(ProviderError) as err:
            run_node()
    assert str(err.value) == ("fal refused the request (HTTP 403: User is locked. Reason: Exhausted balance.). The "
                              "fal account may be locked or out of credits: check https://fal.ai/dashboard/billing.")


def test_status_404_cancels_and_reports(remote_env, monkeypatch):
    with fal_server(monkeypatch, status_errors=[(404, {"detail": "Request not found"})]) as fal:
        with pytest.raises(ProviderError, match=r"fal: request not found \(HTTP 404: Request not found\)"):
            run_node()
        assert fal.cancel_seen.is_set()


def test_rate_limit_that_never_ends(remote_env, monkeypatch):
    errors = [(429, {"detail": "Too many requests"})] * 5
    with fal_server(monkeypatch, submit_errors=errors) as fal:
        with pytest.raises(ProviderError) as err:
            run_node()
        assert len(fal.calls("POST")) == 5
    assert str(err.value) == ("fal: rate or concurrency limit (HTTP 429: Too many requests), still after several "
                              "retries. Wait a minute or run fewer jobs at once, then run again.")


# -- timeout and Cancel ----------------------------------------------------------------------------

def test_slow_job_hits_the_timeout_and_is_cancelled_on_fal():
    with FakeFal(never_finish=True) as fal:
        started = time.monotonic()
        with pytest.raises(RemoteTimeout) as err:
            _client(fal).run(_body(), timeout_s=0.5)
        assert time.monotonic() - started < 5
        assert fal.cancel_seen.is_set()
        rid = next(iter(fal.jobs))
    assert str(err.value) == (f"fal: no result after timeout_s=0.5 s (request_id={rid}); the fal job was "
                              "cancelled. Raise timeout_s if fal's queue is long, or run again later.")


def test_cancel_during_polling_cancels_the_fal_job(remote_env, monkeypatch):
    with fal_server(monkeypatch, never_finish=True) as fal:
        press_cancel_after(0.4)
        started = time.monotonic()
        with pytest.raises(bridge.Cancelled):
            run_node()
        assert time.monotonic() - started < 5
        assert fal.cancel_seen.wait(2)
        assert fal.calls("PUT", "/cancel")[0].headers["authorization"] == f"Key {fal.key}"
    assert not bridge.interrupt_requested()  # consumed, the next run starts clean
    assert "fal: cancelled; asked fal to stop request" in remote_env[-1]


def test_cancel_during_a_slow_submit_cancels_the_late_job():
    class SlowSubmit(FakeFal):
        def _submit(self, req):
            self.stopping.wait(0.6)
            return super()._submit(req)

    with SlowSubmit() as fal:
        flag = {"cancel": False}
        press = threading.Timer(0.2, lambda: flag.update(cancel=True))
        press.start()
        started = time.monotonic()
        with pytest.raises(Cancelled):
            _client(fal, cancelled=lambda: flag["cancel"]).run(_body(), timeout_s=30)
        assert time.monotonic() - started < 0.6
        assert fal.cancel_seen.wait(5)


def test_cancel_before_start_makes_no_request(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        bridge.request_interrupt()
        with pytest.raises(bridge.Cancelled):
            run_node()
        assert fal.requests == []
