"""Keys: where they come from, refused before any network call, never shown anywhere."""
from __future__ import annotations

import json
import logging

import pytest
from remote_helpers import (aiml_server, all_log_text, fal_server, remote_env, run_node,  # noqa: F401
                            unused_port)

from nodes.comfyui import bridge
from nodes.remote import KeyProblem, ProviderError
from nodes.remote.keys import KEY_FILE_NAME, ApiKey, Secret, key_format_problem, resolve_key

LEAK_ID = "LEAKCHECKid0123"
LEAK_SECRET = "LEAKCHECKsecret456789"
LEAK_KEY = f"{LEAK_ID}:{LEAK_SECRET}"


def _write_keys(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


# -- resolution ------------------------------------------------------------------------------------

def test_env_var_is_used_and_wins_over_file(remote_env, monkeypatch, tmp_path):
    _write_keys(tmp_path / KEY_FILE_NAME, {"fal": "file-id:file-secret"})
    monkeypatch.setenv("FAL_KEY", "env-id:env-secret")
    key = resolve_key("fal", str(tmp_path))
    assert key.secret.reveal() == "env-id:env-secret"
    assert key.source == "the environment variable FAL_KEY"


def test_key_file_in_user_directory_is_read_fresh_each_time(remote_env, tmp_path):
    path = tmp_path / KEY_FILE_NAME
    _write_keys(path, {"fal": "one-id:one-secret", "aiml": "aiml-one"})
    assert resolve_key("fal", str(tmp_path)).secret.reveal() == "one-id:one-secret"
    assert resolve_key("aiml", str(tmp_path)).secret.reveal() == "aiml-one"
    _write_keys(path, {"fal": "two-id:two-secret"})
    key = resolve_key("fal", str(tmp_path))
    assert key.secret.reveal() == "two-id:two-secret"
    assert str(path) in key.source


def test_keys_file_env_var_outside_comfyui(remote_env, monkeypatch, tmp_path):
    monkeypatch.setenv("USO_REMOTE_KEYS_FILE", _write_keys(tmp_path / "k.json", {"aiml": "abc-123"}))
    assert resolve_key("aiml", None).secret.reveal() == "abc-123"


def test_aiml_accepts_both_env_names_and_fal_accepts_id_plus_secret(remote_env, monkeypatch):
    monkeypatch.setenv("AIMLAPI_KEY", "old-name-key")
    assert resolve_key("aiml", None).source == "the environment variable AIMLAPI_KEY"
    monkeypatch.setenv("AIML_API_KEY", "new-name-key")
    assert resolve_key("aiml", None).secret.reveal() == "new-name-key"
    monkeypatch.setenv("FAL_KEY_ID", "kid")
    monkeypatch.setenv("FAL_KEY_SECRET", "ksecret")
    assert resolve_key("fal", None).secret.reveal() == "kid:ksecret"


def test_quotes_and_whitespace_around_a_key_are_dropped(remote_env, monkeypatch):
    monkeypatch.setenv("FAL_KEY", '  "a-id:a-secret"\n')
    assert resolve_key("fal", None).secret.reveal() == "a-id:a-secret"


@pytest.mark.parametrize("value, words", [
    ("nocolonatall", "no ':'"),
    (":secretonly", "one side of the ':' is empty"),
    ("Key a:b", "'Key '"),
    ("a b:c", "spaces"),
    ("a\u00e9:b", "non-ASCII"),
])
def test_malformed_fal_keys_are_described_without_the_key(value, words):
    problem = key_format_problem("fal", value)
    assert problem and words in problem
    assert value not in problem


def test_missing_key_message_says_where_to_put_it(remote_env, tmp_path):
    with pytest.raises(KeyProblem) as err:
        resolve_key("fal", str(tmp_path))
    msg = str(err.value)
    assert "FAL_KEY" in msg and "key_id:key_secret" in msg and str(tmp_path / KEY_FILE_NAME) in msg
    with pytest.raises(KeyProblem) as err:
        resolve_key("aiml", None)
    assert "AIML_API_KEY" in str(err.value) and "USO_REMOTE_KEYS_FILE" in str(err.value)


@pytest.mark.parametrize("content, words", [
    ('{"fal": "' + LEAK_KEY + '"', "not valid JSON (line 1"),
    (json.dumps([LEAK_KEY]), "must hold a JSON object"),
    (json.dumps({"fal": 12345}), "must be a string"),
])
def test_broken_key_file_is_explained_without_its_content(remote_env, tmp_path, content, words):
    _write_keys(tmp_path / KEY_FILE_NAME, content)
    with pytest.raises(KeyProblem) as err:
        resolve_key("fal", str(tmp_path))
    assert words in str(err.value)
    assert LEAK_SECRET not in str(err.value)


def test_keys_file_env_var_pointing_nowhere(remote_env, monkeypatch, tmp_path):
    monkeypatch.setenv("USO_REMOTE_KEYS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(KeyProblem, match="not a file"):
        resolve_key("fal", None)


def test_secret_never_prints_itself():
    key = ApiKey("fal", Secret(LEAK_KEY), "test")
    for text in (repr(key), str(key), f"{key}", f"{key.secret}", repr([key.secret])):
        assert LEAK_SECRET not in text


# -- the node: no network call without a usable key -------------------------------------------------

@pytest.mark.parametrize("provider, env, value, words", [
    ("fal", None, None, "no API key found"),
    ("fal", "FAL_KEY", "LEAKCHECKnocolon123456", "malformed"),
    ("aiml", None, None, "no API key found"),
    ("aiml", "AIML_API_KEY", "Bearer LEAKCHECKaiml", "malformed"),
])
def test_node_refuses_bad_or_missing_key_before_any_request(remote_env, monkeypatch, caplog, provider, env,
                                                           value, words):
    caplog.set_level(logging.DEBUG)
    with fal_server(monkeypatch) as fal, aiml_server(monkeypatch) as aiml:
        for name in ("FAL_KEY", "AIML_API_KEY"):
            monkeypatch.delenv(name)
        if env:
            monkeypatch.setenv(env, value)
        with pytest.raises(KeyProblem) as err:
            run_node(provider=provider)
        assert fal.requests == [] and aiml.requests == []
    assert words in str(err.value)
    if value:
        assert "LEAKCHECK" not in str(err.value)
        assert "LEAKCHECK" not in all_log_text(caplog) + remote_env.text()


def test_node_reads_key_file_from_comfy_user_directory(remote_env, monkeypatch, tmp_path):
    with fal_server(monkeypatch, key="file-id:file-secret") as fal:
        monkeypatch.delenv("FAL_KEY")
        monkeypatch.setattr(bridge, "user_directory", lambda: str(tmp_path))
        _write_keys(tmp_path / KEY_FILE_NAME, {"fal": "file-id:file-secret"})
        images, _seed = run_node()
        assert images.shape[0] == 1
        assert fal.calls("POST")[0].headers["authorization"] == "Key file-id:file-secret"


# -- rejected keys: the server's echo of the key is redacted everywhere -------------------------------

def test_rejected_fal_key_never_appears_in_message_logs_or_progress(remote_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    with fal_server(monkeypatch) as fal:
        monkeypatch.setenv("FAL_KEY", LEAK_KEY)
        with pytest.raises(ProviderError) as err:
            run_node()
        assert len(fal.calls("POST")) == 1  # 401 is not retried
        assert LEAK_ID in fal.requests[0].headers["authorization"]  # the fake did echo it back
    msg = str(err.value)
    assert "fal rejected the API key from the environment variable FAL_KEY (HTTP 401" in msg
    for text in (msg, repr(err.value), all_log_text(caplog), remote_env.text()):
        assert LEAK_SECRET not in text and LEAK_ID not in text


def test_rejected_aiml_key_never_appears_in_message_logs_or_progress(remote_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    with aiml_server(monkeypatch) as aiml:
        monkeypatch.setenv("AIML_API_KEY", LEAK_SECRET)
        with pytest.raises(ProviderError) as err:
            run_node(provider="aiml")
        assert len(aiml.requests) == 1
    msg = str(err.value)
    assert "AIML rejected the API key from the environment variable AIML_API_KEY (HTTP 401" in msg
    for text in (msg, all_log_text(caplog), remote_env.text()):
        assert LEAK_SECRET not in text


def test_key_is_not_sent_to_result_download_hosts(remote_env, monkeypatch):
    with fal_server(monkeypatch) as fal:
        run_node()
        downloads = fal.calls("GET", "/files/")
        assert downloads and all("authorization" not in r.headers for r in downloads)


def test_no_key_and_no_server_reachable_still_reports_the_key_first(remote_env, monkeypatch):
    monkeypatch.setenv("USO_FAL_QUEUE_URL", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(KeyProblem):
        run_node()
