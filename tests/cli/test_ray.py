"""Manifests over Ray (`--ray`, `api.run_manifest(ray=...)`) on a local cluster of 2 CPU workers,
shared by the tests of this file (each run starts its own 2 worker processes in it):

- 2 workers loading model files write the same files, byte for byte, as one process;
- a worker killed in the middle of a job: the job runs again on another worker, one output file;
- a job that raises and a corrupt input image: reported by their manifest line, the others finish;
- a job that kills every worker it runs on: failed after 3 tries (each worker replaced), the rest done;
- Ctrl-C (SIGINT) to a driver subprocess: exit 130, the workers' processes stopped;
- a driver killed (SIGKILL) and run again: finished outputs skipped, the rest done;
- --ray without Ray installed: a message naming the install command, exit 2.
The job queue (grouping by reference images) is checked without Ray.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nodes import api
from nodes.cli import command as cli
from nodes.jobs import ray_runner
from nodes.jobs import runner as batch
from nodes.jobs.backend import Backend
from nodes.jobs.manifest import Job
from nodes.jobs.plan import jobs_for
from nodes.jobs.progress import BatchProgress

from reliability_helpers import single_thread
from test_cli import write_image, write_truncated_png  # tests/cli is on sys.path (pytest rootdir mode)

ROOT = Path(__file__).resolve().parents[2]
SLOW = {"width": 256, "height": 256, "steps": 100}     # ~1.5 s on one core: long enough to be killed in
TINY = Backend(tiny=True)


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 ** 2,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class Lines(BatchProgress):
    """Progress that keeps its lines (and can react to them)."""

    def __init__(self, total, on_line=None):
        super().__init__(total, enabled=False)
        self.lines: list[str] = []
        self.on_line = on_line

    def line(self, text):
        self.lines.append(text)
        if self.on_line:
            self.on_line(text)


# -- same bytes from any worker ------------------------------------------------------------------------

def test_two_workers_write_the_same_files_as_one_process(ray_address, tiny_models, tmp_path, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    write_image(pics / "ink.png", 60, 40, 1)
    write_image(pics / "me.png", 48, 64, 2)
    rows = [{"prompt": "ink cat", "styles": ["ink.png"], "seed": 1},
            {"prompt": "me", "subject": "me.png", "seed": 2},
            {"prompt": "ink dog", "styles": ["ink.png"], "seed": 3, "batch_size": 2},
            {"prompt": "plain", "seed": 4, "width": 80, "height": 48},
            {"prompt": "me in ink", "subject": "me.png", "styles": ["ink.png"], "seed": 5},
            {"prompt": "ink fox", "styles": ["ink.png"], "seed": 6}]
    jobs = write_manifest(pics / "jobs.jsonl", rows)

    # model files as a user gives them (the workers load them from the paths the driver resolved)
    p = tiny_models.paths
    models = ["--transformer", p["flux_bfl"], "--vae", p["ae"], "--t5", p["t5_fp16"], "--clip-l", p["clip_l"],
              "--siglip", p["siglip_file"], "--uso-lora", p["lora_comfy"], "--projector", p["projector_comfy"],
              "--tokenizers", p["tokenizer_t5"].parent, "--width", 64, "--height", 64, "--steps", 3,
              "--long-side", 64, "--manifest", jobs]
    with single_thread():
        assert cli.main([str(a) for a in models + ["--out", tmp_path / "one"]]) == 0
    assert cli.main([str(a) for a in models + ["--out", tmp_path / "ray", "--ray", ray_address,
                                                "--ray-workers", "2", "--verbose", "--progress", "on"]]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"jobs: 100%.*6/6", err)             # the tqdm bar across the cluster's jobs
    assert "Ray: starting 2 workers" in out
    ready = set(re.findall(r"Ray: (worker \d) \(.*\) ready", out))
    # A worker still loading when the other has finished every job is not waited for (on a busy
    # 2-core machine one worker can run all 6), so 1 or 2 workers report ready; each job ran on one.
    assert 1 <= len(ready) <= 2
    ran_on = re.findall(r"\[\d/6\] \S+ line \d+ -> (worker \d) \(", out)
    assert len(ran_on) == 6 and set(ran_on) <= ready
    assert "Summary: 6 jobs: 6 done (7 images), 0 skipped, 0 failed" in out
    one, on_ray = files_in(tmp_path / "one"), files_in(tmp_path / "ray")
    assert list(on_ray) == list(one) and len(one) == 7
    assert on_ray == one                # names, pixels and PNG parameters, byte for byte


def test_jobs_sharing_reference_images_stay_on_one_worker():
    def job(i, styles=(), subject=None):
        return Job(index=i, where=f"line {i}", prompt=f"p{i}", subject=subject, styles=tuple(styles), seed=i,
                   width=64, height=64, keep_size=False, steps=4, guidance=4.0, batch_size=1,
                   style_crop="reference", long_side=64, shift="reference", extra_references=False,
                   negative_prompt="", output=None)

    jobs = [job(1, ["a.png"]), job(2, subject="s.png"), job(3, ["a.png"]), job(4, subject="s.png"),
            job(5, ["a.png"]), job(6, ["a.png"]), job(7, ["a.png"])]
    queue = ray_runner.JobQueue(jobs)
    taken = {1: [], 2: []}
    order = [1, 2, 1, 2, 2, 1, 2]          # which worker asks next
    for w in order:
        taken[w].append(queue.next_for(w).index)
    assert taken[1] == [1, 3, 5]           # worker 1 keeps the style a.png group
    assert taken[2] == [2, 4, 7, 6]        # worker 2: its subject group, then the tail of worker 1's
    assert queue.next_for(1) is None and len(queue) == 0
    queue.put_back(jobs[0])
    assert queue.next_for(2).index == 1    # a job back from a dead worker goes to the next that asks


# -- faults ----------------------------------------------------------------------------------------------

def test_a_worker_killed_mid_job_its_job_runs_again_elsewhere_one_output(ray_address, tmp_path):
    rows = [dict(prompt="long", seed=11, **SLOW), {"prompt": "short a", "seed": 12}, {"prompt": "short b", "seed": 13}]
    jobs = jobs_for({}, str(write_manifest(tmp_path / "jobs.jsonl", rows)), TINY)
    killed = []

    def kill_the_long_jobs_worker(text):
        m = re.search(r"jobs\.jsonl line 1 -> worker \d \(\S+ pid (\d+),", text)
        if m and not killed:
            killed.append(int(m.group(1)))
            threading.Timer(0.5, os.kill, (killed[0], signal.SIGKILL)).start()

    progress = Lines(len(jobs), kill_the_long_jobs_worker)
    make = _tiny_loader()
    outcomes = ray_runner.run_on_ray(jobs, TINY, make, str(tmp_path / "out"), workers=2, progress=progress,
                                     verbose=True, write_on_workers=True)
    assert killed, progress.lines
    assert [o.status for o in outcomes] == ["done", "done", "done"], progress.lines
    died = [ln for ln in progress.lines if "died while running jobs.jsonl line 1" in ln]
    assert len(died) == 1 and f"pid {killed[0]}" in died[0]
    reruns = [ln for ln in progress.lines if "jobs.jsonl line 1 -> worker" in ln]
    assert len(reruns) == 2 and f"pid {killed[0]}" not in reruns[1]
    assert sorted(os.listdir(tmp_path / "out")) == ["0001_long_11.png", "0002_short-a_12.png",
                                                    "0003_short-b_13.png"]
    # the re-run image is the one a single process makes
    with single_thread():
        reference = batch.run_jobs(jobs[:1], TINY, make, str(tmp_path / "one"))
    assert (tmp_path / "one" / "0001_long_11.png").read_bytes() == (tmp_path / "out" / "0001_long_11.png").read_bytes()
    assert reference[0].status == "done"


class _CrashingTiny:
    """The tiny backend, except that a job whose prompt is 'crash' ends its worker's process
    (as a segfault or the kernel's OOM killer would)."""

    def __init__(self):
        self.uso = api.load(tiny=True)
        self.backend = self.uso.backend

    def generate(self, prompt=None, **kwargs):
        if prompt == "crash":
            os._exit(1)
        return self.uso.generate(prompt, **kwargs)


def _crashing_tiny():
    return _CrashingTiny()


def test_a_job_that_kills_every_worker_it_runs_on_fails_after_three_tries(ray_address, tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the workers cannot import tests/
    rows = [{"prompt": "crash", "seed": 1}, {"prompt": "fine", "seed": 2}]
    jobs = jobs_for({}, str(write_manifest(tmp_path / "jobs.jsonl", rows)), TINY)
    progress = Lines(len(jobs))
    outcomes = ray_runner.run_on_ray(jobs, TINY, _crashing_tiny, str(tmp_path / "out"), workers=2,
                                     progress=progress)
    assert [o.status for o in outcomes] == ["failed", "done"], progress.lines
    assert outcomes[0].error == "its Ray worker died 3 times while running it"
    assert sum("died while running jobs.jsonl line 1" in ln for ln in progress.lines) == 2
    assert os.listdir(tmp_path / "out") == ["0002_fine_2.png"]


def _tiny_loader():
    import functools

    return functools.partial(api.load, tiny=True)


def test_a_job_that_raises_and_a_corrupt_image_are_reported_by_line_the_others_finish(ray_address, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    write_image(pics / "gone.png", 40, 40, 5)
    write_truncated_png(pics / "broken.png")
    rows = [{"prompt": "fine one", "seed": 1}, {"prompt": "broken", "subject": "broken.png", "seed": 2},
            {"prompt": "gone", "styles": ["gone.png"], "seed": 3}, {"prompt": "fine two", "seed": 4}]
    jobs = jobs_for({}, str(write_manifest(pics / "jobs.jsonl", rows)), TINY)   # all rows check out
    (pics / "gone.png").unlink()            # ... then a style file disappears before its job runs
    progress = Lines(len(jobs))
    outcomes = ray_runner.run_on_ray(jobs, TINY, _tiny_loader(), str(tmp_path / "out"), workers=2,
                                     progress=progress)
    assert [o.status for o in outcomes] == ["done", "failed", "failed", "done"]
    assert "broken.png" in outcomes[1].error and "gone.png" in outcomes[2].error
    assert any(ln.startswith("[2/4] FAILED jobs.jsonl line 2: ") for ln in progress.lines)
    assert any(ln.startswith("[3/4] FAILED jobs.jsonl line 3: ") for ln in progress.lines)
    text = batch.summary(outcomes, 1.0, str(tmp_path / "out"))
    assert "2 done (2 images), 0 skipped, 2 failed" in text and "FAILED job 3 (jobs.jsonl line 3)" in text
    assert sorted(os.listdir(tmp_path / "out")) == ["0001_fine-one_1.png", "0004_fine-two_4.png"]


def _driver(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "nodes.cli", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(proc: subprocess.Popen, pattern: str, count: int = 1, timeout: float = 120) -> list[str]:
    lines, found, deadline = [], 0, time.monotonic() + timeout
    while found < count:
        assert time.monotonic() < deadline, "".join(lines)
        line = proc.stdout.readline()
        assert line, "driver ended early:\n" + "".join(lines)
        lines.append(line)
        found += bool(re.search(pattern, line))
    return lines


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_in_the_driver_cancels_the_cluster_work(ray_address, tmp_path):
    slower = dict(SLOW, width=384, height=384, steps=200)    # ~6 s: both workers still busy at Ctrl-C
    jobs = write_manifest(tmp_path / "jobs.jsonl", [dict(prompt=f"slow {i}", seed=i, **slower) for i in range(4)])
    out = tmp_path / "out"
    proc = _driver(["--tiny", "--manifest", str(jobs), "--out", str(out), "--ray", ray_address,
                    "--ray-workers", "2", "--verbose"])
    try:
        lines = _read_until(proc, r"-> worker", 2)
        pids = [int(p) for p in re.findall(r"-> worker \d \(\S+ pid (\d+),", "".join(lines))]
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    m = re.search(r"Summary: 4 jobs: (\d) done \(\d images?\), 0 skipped, 0 failed, (\d) cancelled, (\d) not run", text)
    assert m, text
    done, cancelled, not_run = map(int, m.groups())
    assert cancelled >= 1 and not_run >= 1 and done + cancelled + not_run == 4, text
    assert all(_gone(pid) for pid in pids), f"worker processes {pids} still run"
    assert len(os.listdir(out) if out.exists() else []) == done     # nothing from the cancelled jobs


def test_a_killed_driver_resumes_finished_outputs_skipped(ray_address, tmp_path):
    rows = [dict(prompt=f"job {i}", seed=i, width=256, height=256, steps=40) for i in range(6)]
    jobs = write_manifest(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    proc = _driver(["--tiny", "--manifest", str(jobs), "--out", str(out), "--ray", ray_address,
                    "--ray-workers", "2"])
    try:
        _read_until(proc, r"\] done in ", 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    done_before = {name for name in os.listdir(out) if not name.endswith(".part")}  # a write the kill cut
    assert 2 <= len(done_before) < 6
    results = api.run_manifest(jobs, out, tiny=True, ray="auto", ray_workers=2)
    status = {os.path.basename(r["outputs"][0]): r["status"] for r in results}
    assert {name for name, s in status.items() if s == "skipped"} == done_before
    assert {s for name, s in status.items() if name not in done_before} == {"done"}
    assert sorted(os.listdir(out)) == sorted(status)       # six images, no half-written .part files


def test_ray_flag_without_ray_installed_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)          # as if Ray were not installed
    code = cli.main(["--tiny", "--prompt", "a cat", "--out", str(tmp_path / "out"), "--ray"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--ray needs Ray, which is not installed" in err and 'pip install "ray>=2.60"' in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
