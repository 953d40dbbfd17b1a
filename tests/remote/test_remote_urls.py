"""Where the remote clients send requests and what they take back: https only (http only to this
machine), redirects that keep their scheme, no more images than asked for, proxy URLs that would
send the key in clear refused, and a user:password@ in them never printed."""
from __future__ import annotations

import logging

import pytest
from remote_helpers import aiml_server, all_log_text, fal_server, remote_env, run_node, unused_port  # noqa: F401

from fake_remote_servers import FakeFal
from nodes.remote import ProviderError, RemoteError
from nodes.remote.images import decode_results, item_bytes
from nodes.remote.transport import is_loopback, url_problem


# -- which URLs are fetched ------------------------------------------------------------------------

@pytest.mark.parametrize("url, fetched", [
    ("https://v3.fal.media/files/x.png", True),
    ("http://127.0.0.1:8000/x.png", True),
    ("http://localhost/x.png", True),
    ("http://[::1]:9/x.png", True),
    ("http://v3.fal.media/files/x.png", False),
    ("http://10.0.0.5/x.png", False),
    ("http://169.254.169.254/latest/meta-data", False),
    ("ftp://example.com/x.png", False),
    ("file:///etc/passwd", False),
])
def test_result_urls_are_fetched_only_over_https_or_from_this_machine(url, fetched):
    asked = []
    try:
        item_bytes({"url": url}, lambda u: asked.append(u) or b"")
    except ValueError as exc:
        assert not fetched, exc
        assert "so it was not downloaded" in str(exc)
    assert asked == ([url] if fetched else [])


def test_a_plain_http_result_url_is_named_in_the_error():
    with pytest.raises(ProviderError) as err:
        decode_results([{"url": "http://cdn.example.com/a.png?token=abc"}], lambda u: b"", "fal", "rid-7")
    text = str(err.value)
    assert "result image 1 of 1" in text and "plain http to cdn.example.com" in text and "rid-7" in text


def test_loopback_means_this_machine_only():
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("10.0.0.1") and not is_loopback("localhost.example.com") and not is_loopback(None)
    assert url_problem("https://queue.fal.run") is None


# -- redirects ------------------------------------------------------------------------------------

@pytest.mark.parametrize("location, words", [
    ("file:///etc/passwd", "redirected from http: to file:"),
    ("https://127.0.0.1:9/x.png", "redirected from http: to https:"),
    ("http://example.com/x.png", "plain http to example.com"),
])
def test_a_redirect_that_leaves_the_rules_is_refused_at_once(remote_env, monkeypatch, location, words):
    with fal_server(monkeypatch, queue_polls=0, progress_polls=0,
                    download_errors=[(302, {"detail": "moved"}, {"Location": location})] * 8) as fal:
        with pytest.raises(ProviderError) as err:
            run_node()
        downloads = fal.calls("GET", "/files/")
    assert len(downloads) == 1  # not retried: the same redirect would come again
    assert "result image 1 of 1 could not be read" in str(err.value) and words in str(err.value)


def test_a_redirect_on_the_same_scheme_and_host_is_followed(remote_env, monkeypatch):
    with FakeFal(queue_polls=0, progress_polls=0) as fal:
        monkeypatch.setenv("USO_FAL_QUEUE_URL", fal.url)
        monkeypatch.setenv("FAL_KEY", fal.key)
        real_file = fal._file

        def file_once_moved(name):  # the first download of each file answers 302 to its own path
            if len(fal.calls("GET", "/files/")) == 1:
                return 302, {"Location": f"/files/{name}", "Content-Type": "text/plain"}, b"moved"
            return real_file(name)

        monkeypatch.setattr(fal, "_file", file_once_moved)
        images, _ = run_node()
        downloads = fal.calls("GET", "/files/")
    assert images.shape[0] == 1 and len(downloads) == 2


# -- how many images ------------------------------------------------------------------------------

class _GenerousFal(FakeFal):
    """Returns two images more than num_images asked for."""

    def _make_images(self, body, nsfw, sizes, delivery):
        return super()._make_images({**body, "num_images": int(body.get("num_images", 1)) + 2}, nsfw, sizes,
                                    delivery)


def test_no_more_images_than_asked_for_are_taken(remote_env, monkeypatch):
    with _GenerousFal(queue_polls=0, progress_polls=0) as fal:
        monkeypatch.setenv("USO_FAL_QUEUE_URL", fal.url)
        monkeypatch.setenv("FAL_KEY", fal.key)
        images, _ = run_node(num_images=2)
        downloads = fal.calls("GET", "/files/")
    assert images.shape[0] == 2 and len(downloads) == 2
    assert "fal returned 4 images for num_images=2; kept the first 2" in remote_env.text()


# -- proxy URLs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, key_env, provider", [
    ("USO_FAL_QUEUE_URL", "FAL_KEY", "fal"), ("USO_AIML_URL", "AIML_API_KEY", "aiml")])
def test_a_proxy_url_over_http_to_another_machine_is_refused(remote_env, monkeypatch, caplog, env, key_env,
                                                             provider):
    monkeypatch.setenv(key_env, "id-123:secret-456")
    monkeypatch.setenv(env, "http://someone:pa55word@proxy.example.net:8080/fal")
    with caplog.at_level(logging.DEBUG, logger="uso"), pytest.raises(RemoteError) as err:
        run_node(provider=provider)
    text = str(err.value)
    assert text.startswith(f"{env} (http://proxy.example.net:8080/fal) is plain http to proxy.example.net")
    assert "the API key would travel in clear" in text
    for secret in ("pa55word", "someone"):
        assert secret not in text and secret not in all_log_text(caplog) and secret not in remote_env.text()


@pytest.mark.parametrize("env, key_env, provider", [
    ("USO_FAL_QUEUE_URL", "FAL_KEY", "fal"), ("USO_AIML_URL", "AIML_API_KEY", "aiml")])
def test_user_and_password_in_a_proxy_url_are_refused_without_being_shown(remote_env, monkeypatch, caplog, env,
                                                                          key_env, provider):
    port = unused_port()
    monkeypatch.setenv(key_env, "id-123:secret-456")
    monkeypatch.setenv(env, f"https://someone:pa55word@127.0.0.1:{port}")
    with caplog.at_level(logging.DEBUG, logger="uso"), pytest.raises(RemoteError) as err:
        run_node(provider=provider)
    text = str(err.value)
    assert f"{env} (https://127.0.0.1:{port}) holds a user name or password" in text
    for secret in ("pa55word", "someone"):
        assert secret not in text and secret not in all_log_text(caplog) and secret not in remote_env.text()


def test_an_http_proxy_on_this_machine_is_used(remote_env, monkeypatch):
    with aiml_server(monkeypatch) as aiml:  # the fake listens on http://127.0.0.1
        images, _ = run_node(provider="aiml")
        assert aiml.calls("POST")
    assert images.shape[0] == 1
