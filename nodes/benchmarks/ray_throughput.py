"""Manifest throughput in one process and on Ray (a script, not a test).

    python -m nodes.benchmarks.ray_throughput --size tiny --jobs 24
    python -m nodes.benchmarks.ray_throughput --size medium --jobs 6 --width 256 --height 256 --steps 4

Random-weight models of `--size` (nodes/engine/random_models.py), one style image shared by every
job (as a manifest of one look would), distinct prompts and seeds. Measures, on this machine:

- one process (`runner.run_jobs`, the command line without --ray): seconds per job after the models
  are loaded;
- a local Ray cluster started for the run with 1 and then 2 CPU workers (`ray_runner.run_on_ray`,
  each worker with --threads CPUs, as the one process): the whole run (cluster start, workers
  loading the models, the jobs) and the steady rate once every worker is ready;
- the overhead Ray adds per job, with 1 worker: the driver's gap between two completions minus
  the job's own time on the worker (dispatch, the image coming back, the driver writing the PNG),
  median over the jobs.

Prints a table and a JSON line, with the load average before and after (other work on the
machine slows every figure).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from ..jobs import ray_runner, runner
from ..jobs.backend import Backend
from ..jobs.plan import jobs_for
from ..jobs.progress import BatchProgress

TINY = Backend(tiny=True)     # random weights: what the PNGs record, and tiny's job defaults

PROMPTS = ("a cat in the city at night", "a portrait of a woman with a red hat", "a dog in a green forest",
           "a sketch of a man", "an oil painting of the sky", "a photo of a blue city")


def random_uso(size: str):
    """A loaded USO on random `size` weights (module level: Ray workers unpickle it by name)."""
    from .. import api
    from ..engine import EngineOptions, USOPipeline
    from ..engine.random_models import build_random_models

    return api.LocalUSO(USOPipeline(build_random_models(size), EngineOptions(device="cpu")), TINY,
                   {"models": f"random-{size}"})


class _Clock(BatchProgress):
    """Progress lines with their times: when each worker was ready, when each job finished."""

    def __init__(self, total):
        super().__init__(total, enabled=False)
        self.ready: list[float] = []
        self.done: list[float] = []
        self.done_tags: list[int] = []      # job positions (1-based), in completion order

    def line(self, text):
        now = time.monotonic()
        if re.match(r"Ray: worker \d+ .* ready", text):
            self.ready.append(now)
        elif "] done in " in text:
            self.done.append(now)
            self.done_tags.append(int(text[1:text.index("/")]))


def _manifest(folder: str, args) -> str:
    style = os.path.join(folder, "style.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(style)
    path = os.path.join(folder, "jobs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(args.jobs):
            f.write(json.dumps({"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "styles": ["style.png"], "seed": i,
                                "width": args.width, "height": args.height, "steps": args.steps,
                                "long_side": 64}) + "\n")
    return path


def _load() -> str:
    """The load average, where the OS has one (Windows has none)."""
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "%.2f %.2f %.2f" % os.getloadavg()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodes.benchmarks.ray_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "medium"), default="tiny")
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of the one process and of each Ray worker (the local cluster gets "
                        "workers x threads CPUs); 1 keeps a shared machine's load from stalling multi-threaded "
                        "steps")
    args = p.parse_args(argv)
    import ray

    make = functools.partial(random_uso, args.size)
    import torch

    torch.set_num_threads(args.threads)
    result = {"size": args.size, "jobs": args.jobs, "width": args.width, "height": args.height,
              "steps": args.steps, "threads": args.threads, "load_before": _load()}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = jobs_for({}, _manifest(tmp, args), TINY)

        started = time.monotonic()
        uso = make()
        load_s = time.monotonic() - started
        outcomes = runner.run_jobs(jobs, TINY, lambda: uso, os.path.join(tmp, "one"),
                                   progress=_Clock(len(jobs)))
        one_s = time.monotonic() - started - load_s
        assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
        per_job = statistics.median(o.seconds for o in outcomes[1:])     # the first one warms up
        result["one_process"] = {"load_s": round(load_s, 2), "s_per_job": round(per_job, 4),
                                 "jobs_per_min": round(60 / per_job, 1),
                                 "jobs_per_min_mean": round(60 * len(jobs) / one_s, 1)}
        del uso

        for n in args.workers:
            started = time.monotonic()
            ray.init(address="local", num_cpus=n * args.threads, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=200 * 1024 ** 2)
            init_s = time.monotonic() - started
            clock = _Clock(len(jobs))
            outcomes = ray_runner.run_on_ray(jobs, TINY, make, os.path.join(tmp, f"ray{n}"), workers=n,
                                             progress=clock)
            total_s = time.monotonic() - started
            ray.shutdown()
            assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
            last_ready = max(clock.ready)
            after = [t for t in clock.done if t > last_ready]
            # steady rate: the median gap between completions once every worker is ready, times the
            # workers (robust to the other work on a shared machine), and the plain mean
            gaps = np.diff([last_ready] + after)
            steady_s = float(np.median(gaps)) if len(gaps) else float("nan")
            # Ray's own cost per job: the driver's gap between completions minus the job's time on
            # the worker (dispatch, image transfer, driver-side PNG write), with 1 worker
            worker_s = {i + 1: o.seconds for i, o in enumerate(outcomes)}
            overhead = float(np.median([g - worker_s[t] for g, t in zip(gaps, clock.done_tags[-len(gaps):])])) \
                if len(gaps) else float("nan")
            result[f"ray_{n}"] = {"overhead_s_per_job": round(overhead, 4),"cluster_start_s": round(init_s, 2), "total_s": round(total_s, 2),
                                  "workers_ready_s": round(last_ready - started, 2),
                                  "jobs_after_ready": len(after), "s_per_job": round(steady_s, 4),
                                  "jobs_per_min": round(60 / steady_s, 1),
                                  "jobs_per_min_mean": round(60 * len(after) / (after[-1] - last_ready), 1),
                                  "jobs_per_min_whole_run": round(60 * len(jobs) / total_s, 1)}
    if "ray_1" in result:
        result["overhead_s_per_job"] = result["ray_1"]["overhead_s_per_job"]
    result["load_after"] = _load()

    print(f"{args.size}: {args.jobs} jobs of {args.width}x{args.height}, {args.steps} steps, one style; "
          f"{args.threads} thread(s) per process / worker; {os.cpu_count()} cores; load average before {result['load_before']}, after {result['load_after']}")
    one = result["one_process"]
    print(f"  one process      : {one['jobs_per_min']:8.1f} jobs/min (median {one['s_per_job']:.3f} s/job; mean "
          f"{one['jobs_per_min_mean']:.1f} jobs/min; models loaded in {one['load_s']:.1f} s)")
    for n in args.workers:
        r = result[f"ray_{n}"]
        print(f"  Ray, {n} worker{'s' if n > 1 else ' '} : {r['jobs_per_min']:8.1f} jobs/min steady "
              f"(median gap {r['s_per_job']:.3f} s over {r['jobs_after_ready']} jobs; mean "
              f"{r['jobs_per_min_mean']:.1f} jobs/min); whole run {r['total_s']:.1f} s = "
              f"{r['jobs_per_min_whole_run']:.1f} jobs/min (cluster start {r['cluster_start_s']:.1f} s, "
              f"workers ready after {r['workers_ready_s']:.1f} s)")
    if "overhead_s_per_job" in result:
        print(f"  Ray overhead per job (1 worker: driver's gap between completions minus the job's time on "
              f"the worker, median): {result['overhead_s_per_job'] * 1000:.0f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
