"""A manifest's jobs over a Ray cluster (``python -m nodes.cli --manifest jobs.jsonl --ray``).

One Ray actor per GPU (``num_gpus=1``; CPU actors where the cluster has no GPU), each loading the
models once and keeping its pipeline's encodings cache between jobs. Jobs that share their LoRAs
and reference images (styles, subject and how they are encoded) form a group; a free worker takes
the next job of the group it is on, else a fresh group, else the last job of the longest group.

Everything else is `runner`'s: the output names, the finished check (resume, --overwrite), the
call into the loaded USO, the PNG writing, the failure reason and the progress lines. The driver
writes the images (workers return them), or with ``write_on_workers`` the workers write them
into an ``out_dir`` every node sees at the same path. Either way a job's result is accepted
once: a job whose worker dies goes back to the queue (up to `MAX_ATTEMPTS` runs) and the dead
worker is replaced, and since outputs are written atomically and an image depends only on the
job and the model files, a re-run can never leave two different files or a half one.

Ctrl-C (KeyboardInterrupt in the driver) kills the workers: the running jobs are 'cancelled',
the rest 'not run'.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

from . import runner
from .backend import Backend
from .manifest import Job
from .progress import BatchProgress

MAX_ATTEMPTS = 3
RAY_MISSING = ("--ray needs Ray, which is not installed in this Python environment. Install it with "
               "pip install \"ray>=2.60\" (in the Python that runs this command), or run without --ray.")
_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RaySetupError(Exception):
    """Ray is missing, the cluster cannot be reached, or the workers cannot load the models."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RaySetupError(RAY_MISSING) from None
    return ray


# -- which worker runs which job ---------------------------------------------------------------------

def reference_key(job: Job) -> tuple:
    """What a worker can reuse between jobs besides the models: the LoRAs on the transformer
    (changing them re-fuses weights) and the style and subject encodings."""
    return (tuple(job.loras), tuple(job.styles), job.style_crop, job.subject, job.long_side)


class JobQueue:
    """Jobs grouped by `reference_key` in manifest order; `next_for(worker)` keeps a worker on
    its group while it lasts, then starts a fresh group, then takes the tail of the longest one."""

    def __init__(self, jobs: list[Job]):
        groups: dict[tuple, deque] = {}
        for job in jobs:
            groups.setdefault(reference_key(job), deque()).append(job)
        self.groups = list(groups.values())
        self.started: set[int] = set()          # ids of groups some worker has taken from
        self.current: dict[int, deque] = {}     # worker id -> its group

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def next_for(self, worker: int) -> Job | None:
        group = self.current.get(worker)
        if not group:
            fresh = [g for g in self.groups if g and id(g) not in self.started]
            others = [g for g in self.groups if g]
            if not others:
                return None
            group = fresh[0] if fresh else max(others, key=len)
            if fresh:
                self.started.add(id(group))
                self.current[worker] = group
            else:          # stealing: leave the owner its group, take from the far end
                return group.pop()
        return group.popleft()

    def put_back(self, job: Job) -> None:
        """A job whose worker died runs next, on whichever worker asks first."""
        self.groups.insert(0, deque([job]))


# -- the worker ------------------------------------------------------------------------------------

class JobWorker:
    """Runs on a Ray worker process: loads the models once (`start`), then runs jobs (`run`)."""

    def __init__(self, open_uso: Callable[[], object]):
        self._open_uso = open_uso
        self.uso = None

    def start(self) -> dict:
        """Load the models; a dict with where this worker runs, or {'setup_error': message}."""
        try:
            self.uso = self._open_uso()
        except Exception as exc:  # noqa: BLE001 - reported to the driver as a setup error (exit 2)
            return {"setup_error": " ".join(str(exc).split()) or type(exc).__name__}
        pipe = getattr(self.uso, "pipeline", None)
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "device": str(pipe.device) if pipe is not None else "remote"}

    def run(self, job: Job, paths: list[str], write: bool) -> dict:
        started = time.monotonic()
        try:
            result = runner.generate(self.uso, job)
            warnings = list(result.warnings)
            if write:
                paths = runner.save_outputs(result, paths, job)
                result = None
            else:      # the latents stay here; the driver writes the images
                result = replace(result, latents=None)
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the others
            return {"status": "failed", "error": runner.failure_reason(exc), "traceback": traceback.format_exc(),
                    "seconds": time.monotonic() - started}
        return {"status": "done", "result": result, "paths": paths, "warnings": warnings,
                "seconds": time.monotonic() - started}


# -- the driver ------------------------------------------------------------------------------------

@dataclass
class _Worker:
    number: int
    actor: object
    info: dict | None = None

    def describe(self) -> str:
        if not self.info:
            return f"worker {self.number}"
        return f"worker {self.number} ({self.info['host']} pid {self.info['pid']}, {self.info['device']})"


def connect(address: str | None):
    """Ray, connected: to `address` ('auto', 'host:port', 'ray://...'), or to a local cluster
    started for this run when `address` is None or 'local'. Returns (ray, started_here)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address in (None, "", "local"):
            ray.init(address="local", **kwargs)
        else:      # the pack at the same path on every node (a shared or identical install)
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": _PACK_ROOT}}, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        raise RaySetupError(f"--ray {address or ''}: cannot reach the Ray cluster ({' '.join(str(exc).split())}). "
                            "Give the head's address (host:6379 or ray://host:10001), 'auto' on a cluster "
                            "node, or --ray alone to start a local cluster.") from None
    return ray, True


def worker_resources(ray, workers: int | None, jobs: int) -> tuple[int, dict]:
    """(number of workers, actor options): one per GPU of the cluster (at most `workers`), else
    `workers` CPU workers (default 1) sharing the cluster's CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        n = min(gpus, workers or gpus)
        options = {"num_gpus": 1}
    else:
        n = workers or 1
        options = {"num_cpus": max(1, int(resources.get("CPU", 1)) // n)}
    return max(1, min(n, jobs)), options


def run_on_ray(jobs: list[Job], backend: Backend, open_uso: Callable[[], object], out_dir: str, *,
               address: str | None = None, workers: int | None = None, overwrite: bool = False,
               numbered: bool = True, progress: BatchProgress | None = None, tracebacks: bool = False,
               verbose: bool = False, write_on_workers: bool = False) -> list[runner.Outcome]:
    """`runner.run_jobs` over Ray: the same outcomes in the same order. `open_uso` is sent to each
    worker (it must pickle: a module-level function or a functools.partial of one).
    RaySetupError when Ray is missing, unreachable or the models do not load (nothing ran)."""
    progress = progress or BatchProgress(len(jobs), enabled=False)
    total = len(jobs)
    position = {job.index: i for i, job in enumerate(jobs)}
    tag = {job.index: f"[{i + 1}/{total}]" for i, job in enumerate(jobs)}
    planned = {job.index: runner.output_paths(job, out_dir, backend, numbered) for job in jobs}
    outcomes: dict[int, runner.Outcome] = {}

    def finish(outcome: runner.Outcome, trace: str = "") -> None:
        outcomes[outcome.job.index] = outcome
        runner.report(progress, tag[outcome.job.index], outcome, trace)
        progress.job_done()

    todo = []
    for job in jobs:
        if runner.is_finished(planned[job.index], overwrite):
            finish(runner.Outcome(job, "skipped", planned[job.index]))
        else:
            todo.append(job)
    if not todo:           # a finished batch re-runs without Ray or models
        return [outcomes[j.index] for j in jobs]

    ray, started_here = connect(address)
    count, options = worker_resources(ray, workers, len(todo))
    actor_class = ray.remote(JobWorker)
    queue = JobQueue(todo)
    pool: dict[int, _Worker] = {}
    inflight: dict[object, tuple] = {}     # object ref -> ("start", worker) | ("run", worker, job, started)
    attempts: dict[int, int] = {}
    spares = count                         # replacements for workers that die
    numbers = iter(range(1, 10**6))

    def spawn() -> None:
        w = _Worker(next(numbers), actor_class.options(max_restarts=0, **options).remote(open_uso))
        pool[w.number] = w
        inflight[w.actor.start.remote()] = ("start", w)

    def dispatch(w: _Worker) -> None:
        job = queue.next_for(w.number)
        if job is None:
            return
        attempts[job.index] = attempts.get(job.index, 0) + 1
        if verbose:
            progress.line(f"{tag[job.index]} {job.where} -> {w.describe()}")
        inflight[w.actor.run.remote(job, planned[job.index], write_on_workers)] = ("run", w, job, time.monotonic())

    def worker_died(w: _Worker) -> None:
        nonlocal spares
        pool.pop(w.number, None)
        if spares > 0 and len(queue) + sum(1 for v in inflight.values() if v[0] == "run") > 0:
            spares -= 1
            spawn()

    try:
        for _ in range(count):
            spawn()
        progress.line(f"Ray: starting {count} worker{'s' if count != 1 else ''} "
                      f"({', '.join(f'{k}={v}' for k, v in options.items())} each) for {len(todo)} job"
                      f"{'s' if len(todo) != 1 else ''}")
        while inflight and (len(queue) or any(entry[0] == "run" for entry in inflight.values())):
            # (a worker still loading when the last job is done is not waited for)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            entry = inflight.pop(ready[0])
            w = entry[1]
            try:
                value = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                value = None   # the worker process died (killed, out of memory, node lost)
            except ray.exceptions.RayTaskError as exc:   # raised outside JobWorker's own handling
                value = {"status": "failed", "setup_error": runner.failure_reason(exc.cause or exc),
                         "error": runner.failure_reason(exc.cause or exc), "traceback": str(exc), "seconds": 0.0}
            if entry[0] == "start":
                if value is None:
                    progress.line(f"Ray: {w.describe()} died while loading the models")
                    worker_died(w)
                elif "setup_error" in value:
                    raise RaySetupError(value["setup_error"])
                else:
                    w.info = value
                    progress.line(f"Ray: {w.describe()} ready")
                    dispatch(w)
            else:
                job = entry[2]
                if value is None:
                    worker_died(w)
                    if attempts[job.index] >= MAX_ATTEMPTS:
                        finish(runner.Outcome(job, "failed", planned[job.index],
                                             f"its Ray worker died {attempts[job.index]} times while running it",
                                             time.monotonic() - entry[3]))
                    else:
                        progress.line(f"{tag[job.index]} {w.describe()} died while running {job.where}; "
                                      "the job runs again on another worker")
                        queue.put_back(job)
                        for other in pool.values():     # an idle worker may take it at once
                            if other.info and not any(v[1] is other for v in inflight.values()):
                                dispatch(other)
                                break
                    continue
                dispatch(w)      # the worker's next job runs while the driver writes this one's PNGs
                if value["status"] == "done":
                    paths = value["paths"] if write_on_workers else \
                        runner.save_outputs(value["result"], planned[job.index], job)
                    finish(runner.Outcome(job, "done", paths, "", value["seconds"], value["warnings"]))
                else:
                    finish(runner.Outcome(job, "failed", planned[job.index], value["error"], value["seconds"]),
                           value["traceback"] if tracebacks else "")
            if not pool and len(queue):
                for job in _drain(queue):
                    finish(runner.Outcome(job, "failed", planned[job.index], "every Ray worker died"))
    except KeyboardInterrupt:
        for entry in inflight.values():
            if entry[0] == "run":
                outcomes[entry[2].index] = runner.Outcome(entry[2], "cancelled", planned[entry[2].index],
                                                         "cancelled", time.monotonic() - entry[3])
                runner.report(progress, tag[entry[2].index], outcomes[entry[2].index])
        inflight.clear()
    finally:
        for w in pool.values():         # stops running jobs too (Ctrl-C, a setup error)
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if started_here:
            ray.shutdown()
    for job in jobs:
        if job.index not in outcomes:
            outcomes[job.index] = runner.not_run([job], out_dir, backend, numbered)[0]
    return sorted(outcomes.values(), key=lambda o: position[o.job.index])


def _drain(queue: JobQueue) -> list[Job]:
    jobs = []
    for group in queue.groups:
        jobs.extend(group)
        group.clear()
    return jobs
