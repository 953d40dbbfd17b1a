"""Windows-only path forms are refused on every OS (read with `ntpath`, so a manifest means the same
everywhere): drive-relative names (`C:x.png`, relative to drive C's own current folder) and network
(UNC) paths (`\\\\server\\share\\x.png`), in a manifest's output names and input files and in --out."""
from __future__ import annotations

import json

import pytest

from nodes.cli import command as cli

UNC = "is a network (UNC) path"
DRIVE_RELATIVE = "is relative to drive C:'s own current folder"


def run(tmp_path, capsys, rows=None, extra=()):
    argv = ["--tiny", "--out", str(tmp_path / "out"), "--dry-run", *extra]
    if rows is not None:
        (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        argv += ["--manifest", str(tmp_path / "jobs.jsonl")]
    code = cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("output, words", [
    ("C:x.png", "no drive such as C:"),
    ("C:\\renders\\x.png", "no drive such as C:"),
    ("C:/renders/x.png", "no drive such as C:"),
    ("\\\\server\\share\\x.png", "no absolute path"),
    ("//server/share/x.png", "no absolute path"),
])
def test_an_output_name_with_a_drive_or_a_server_is_refused(tmp_path, capsys, output, words):
    code, err = run(tmp_path, capsys, [{"prompt": "ok", "output": "fine.png"}, {"prompt": "p", "output": output}])
    assert code == cli.EXIT_USAGE
    assert f"jobs.jsonl line 2: output '{output}' must be a file name inside the output folder" in err
    assert words in err and "line 1" not in err


@pytest.mark.parametrize("field, value, words", [
    ("subject", "C:cat.png", DRIVE_RELATIVE),
    ("subject", "\\\\server\\share\\cat.png", UNC),
    ("subject", "//server/share/cat.png", UNC),
    ("styles", ["C:ink.png"], DRIVE_RELATIVE),
    ("init_image", "\\\\?\\C:\\cat.png", UNC),
    ("loras", ["\\\\nas\\loras\\x.safetensors:0.8"], UNC),
])
def test_an_input_path_drive_relative_or_on_a_server_is_refused(tmp_path, capsys, field, value, words):
    row = {"prompt": "p", field: value}
    if field == "init_image":
        row["denoise"] = 0.5
    code, err = run(tmp_path, capsys, [row])
    assert code == cli.EXIT_USAGE
    what = {"styles": "style", "loras": "lora"}.get(field, field)
    assert f"jobs.jsonl line 1: {what} '" in err and words in err


@pytest.mark.parametrize("out, words", [("C:renders", DRIVE_RELATIVE), ("\\\\server\\share\\renders", UNC)])
def test_out_drive_relative_or_on_a_server_is_refused(tmp_path, capsys, out, words):
    code = cli.main(["--tiny", "--prompt", "p", "--out", out, "--dry-run"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and f"error: --out '{out}' {words}" in err


def test_ordinary_names_still_pass(tmp_path, capsys):
    code, err = run(tmp_path, capsys, [{"prompt": "p", "output": "sub/x.png"}, {"prompt": "q", "output": "y"}])
    assert code == cli.EXIT_OK, err
