"""Every job's images go under that job's own names: a backend returning more images than asked
for never writes outside them, and a manifest whose jobs would write the same file is refused
before anything runs."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from nodes import api
from nodes.cli import command as cli
from nodes.jobs import plan, runner
from nodes.jobs.backend import Backend

COLORS = {"b": [(0, 0, 255)], "a": [(255, 0, 0), (0, 255, 0), (9, 9, 9)]}


def write_manifest(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


class GenerousBackend:
    """Returns more images than the job's batch_size, like a provider that ignores num_images."""
    backend = Backend(tiny=True)

    def generate(self, *, prompt, seed, on_step=None, **kwargs):
        images = [Image.new("RGB", (8, 8), c) for c in COLORS[prompt]]
        return api.Output(images, [seed] * len(images), {"prompt": prompt})


def pixel(path) -> tuple:
    with Image.open(path) as img:
        return img.getpixel((0, 0))


def test_extra_images_are_not_written_over_another_jobs_output(tmp_path):
    rows = [{"prompt": "b", "output": "a_1.png"}, {"prompt": "a", "output": "a.png"}]
    tiny = Backend(tiny=True)
    jobs = plan.jobs_for({}, write_manifest(tmp_path / "jobs.jsonl", rows), tiny)
    out = tmp_path / "out"
    outcomes = runner.run_jobs(jobs, tiny, GenerousBackend, str(out))
    assert [o.status for o in outcomes] == ["done", "done"]
    assert outcomes[1].paths == [str(out / "a.png")]
    assert pixel(out / "a_1.png") == (0, 0, 255)  # still job 1's image
    assert pixel(out / "a.png") == (255, 0, 0)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_1.png"]


@pytest.mark.parametrize("rows, clash", [
    # job 1 makes a_7.png and a_8.png (one per image seed)
    ([{"prompt": "x", "output": "a.png", "batch_size": 2, "seed": 7}, {"prompt": "y", "output": "a_8.png"}],
     "jobs.jsonl line 2: its output 'a_8.png' is also an output of jobs.jsonl line 1"),
    # job 1's numbered name, given to job 2 by hand
    ([{"prompt": "a cat", "seed": 5}, {"prompt": "y", "output": "0001_a-cat_5.png"}],
     "jobs.jsonl line 2: its output '0001_a-cat_5.png' is also an output of jobs.jsonl line 1"),
    # one file on Windows and macOS
    ([{"prompt": "x", "output": "Cat.png"}, {"prompt": "y", "output": "cat.png"}],
     "jobs.jsonl line 2: its output 'cat.png' is also an output of jobs.jsonl line 1"),
])
def test_jobs_whose_outputs_would_collide_are_refused_before_anything_runs(tmp_path, capsys, rows, clash):
    manifest_path = write_manifest(tmp_path / "jobs.jsonl", rows)
    code = cli.main(["--tiny", "--manifest", manifest_path, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and clash in err and "nothing was generated" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is also an output of"):
        api.run_manifest(manifest_path, tmp_path / "out", tiny=True)
