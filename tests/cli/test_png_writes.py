"""PNG outputs are written through a fresh temporary file (`mkstemp` in the target folder) renamed
into place: a link placed in the folder cannot redirect the write, two writers of one path never
share a temporary file, an interrupted write leaves nothing behind, and the file gets the mode a
plainly created one would."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from nodes.files import png_info

RED, BLUE = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))


def pixel(path) -> tuple:
    with Image.open(path) as img:
        return img.convert("RGB").getpixel((0, 0))


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_a_link_placed_at_the_old_temporary_name_cannot_redirect_the_write(tmp_path):
    victim = tmp_path / "elsewhere.txt"
    victim.write_bytes(b"not yours")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "job.png.part")  # the name the writer used to open
    png_info.save_png(RED, str(out / "job.png"), {"prompt": "p"})
    assert victim.read_bytes() == b"not yours"
    assert pixel(out / "job.png") == (255, 0, 0) and not (out / "job.png").is_symlink()
    assert png_info.read_parameters(str(out / "job.png")) == {"prompt": "p"}


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_a_link_at_the_output_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "elsewhere.png"
    victim.write_bytes(b"not yours")
    os.symlink(victim, tmp_path / "job.png")
    png_info.save_png(RED, str(tmp_path / "job.png"), {"prompt": "p"})
    assert victim.read_bytes() == b"not yours" and not (tmp_path / "job.png").is_symlink()


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path, monkeypatch):
    """The second writer runs while the first has written its data but not yet renamed it (two Ray
    workers on the same job): both finish, and the file holds one whole image."""
    path = str(tmp_path / "job.png")
    renamed_from = []
    real_replace, real_save = os.replace, Image.Image.save

    def replace(src, dst):
        renamed_from.append(str(src))
        return real_replace(src, dst)

    def save(img, fp, *args, **kwargs):
        real_save(img, fp, *args, **kwargs)
        if img is RED:  # the first writer, between its write and its rename
            png_info.save_png(BLUE, path, {"prompt": "second"})

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Image.Image, "save", save)
    png_info.save_png(RED, path, {"prompt": "first"})
    assert len(renamed_from) == 2 and renamed_from[0] != renamed_from[1]
    assert pixel(path) == (255, 0, 0) and png_info.read_parameters(path) == {"prompt": "first"}
    assert sorted(os.listdir(tmp_path)) == ["job.png"]


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    real_save = Image.Image.save

    def broken(img, fp, *args, **kwargs):  # the data is written, then Ctrl-C before the rename
        real_save(img, fp, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        png_info.save_png(RED, str(tmp_path / "job.png"), {})
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_the_file_gets_the_mode_of_a_plainly_created_one(tmp_path):
    old = os.umask(0o027)
    try:
        png_info.save_png(Image.fromarray(np.zeros((4, 4, 3), np.uint8)), str(tmp_path / "a.png"), {})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.png").st_mode & 0o777) == (os.stat(tmp_path / "plain").st_mode & 0o777) == 0o640
