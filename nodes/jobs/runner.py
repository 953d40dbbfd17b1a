"""Running jobs in this process: output names, resume, one failure never stopping the others, and
the summary. The jobs come checked from `manifest`; the USO that runs them is made by the caller
(`nodes.api.open_backend`), only when the first job needs it."""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..cancel import Cancelled
from ..engine import USOError
from ..engine.pipeline import batch_seeds
from ..files.png_info import save_png
from ..remote import RemoteError
from .backend import Backend
from .manifest import Job, slug
from .progress import BatchProgress


# -- output names -----------------------------------------------------------------------------------

def output_paths(job: Job, out_dir: str, backend: Backend, numbered: bool) -> list[str]:
    """Where the job's images go; a function of the job alone, so a re-run finds them.

    Local: one file per image seed, ``[<index>_]<slug>_<seed>.png`` (`numbered` adds the index).
    fal/AIML (one seed for the whole request): ``..._<seed>_<k>.png`` for k = 1..batch_size.
    An explicit `output` name is used as is for one image, else as ``<stem>_<seed>.png``.
    """
    n = job.batch_size
    if backend.is_local:
        tags = [str(s) for s in batch_seeds(job.seed, n)]
    else:
        tags = [str(job.seed)] if n == 1 else [f"{job.seed}_{k + 1}" for k in range(n)]
    if job.output:
        stem, ext = os.path.splitext(job.output)
        names = [job.output] if n == 1 else [f"{stem}_{t}{ext}" for t in tags]
    else:
        base = slug(job.prompt) or slug(os.path.splitext(os.path.basename(job.subject or ""))[0]) or "image"
        prefix = f"{job.index:04d}_" if numbered else ""
        names = [f"{prefix}{base}_{t}.png" for t in tags]
    return [os.path.join(out_dir, name) for name in names]


def output_clashes(jobs: list[Job], backend: Backend, numbered: bool = True) -> list[str]:
    """One problem per job with an output name that an earlier job also writes (an explicit
    `output` of one job can be another's numbered or seed-tagged name): refused before anything
    runs, so no job overwrites another's images. Names compare case-blind, as on Windows and macOS."""
    owners: dict[str, Job] = {}
    problems = []
    for job in jobs:
        for name in output_paths(job, "", backend, numbered):
            first = owners.setdefault(name.casefold(), job)
            if first is not job:
                problems.append(f"{job.where}: its output '{name}' is also an output of {first.where}; give one "
                                "of them another 'output' name")
                break
    return problems


# -- running ----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    job: Job
    status: str                      # done | skipped | failed | cancelled | not run
    paths: list[str]
    error: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"job": self.job.index, "where": self.job.where, "status": self.status, "outputs": self.paths,
                "error": self.error, "seconds": round(self.seconds, 3), "warnings": self.warnings,
                "parameters": {k: v for k, v in asdict(self.job).items() if k not in ("index", "where")}}


def is_finished(paths: list[str], overwrite: bool) -> bool:
    """True when a re-run skips the job: every output exists and --overwrite was not given."""
    return not overwrite and all(_exists_as_named(p) for p in paths)


def _exists_as_named(path: str) -> bool:
    """The file exists under this exact name. On NTFS (and macOS's APFS) `Cat.png` exists when
    `cat.png` is asked for: the listing tells another job's file from this one's."""
    if not os.path.exists(path):
        return False
    folder, name = os.path.split(path)
    try:
        return name in os.listdir(folder or ".")
    except OSError:
        return False


def progress_units(job: Job, backend: Backend) -> tuple[int, str]:
    """(total, unit) of a job's step bar: denoising steps locally, percent remotely."""
    return (job.steps * job.batch_size, "step") if backend.is_local else (100, "%")


def generate(uso, job: Job, on_step: Callable[[int, int], None] | None = None,
             on_status: Callable[[str], None] | None = None):
    """One job's `api.Output` from a loaded local or remote USO (every job field goes through
    `Job.generate_kwargs`, so a new field needs no change here)."""
    kwargs = job.generate_kwargs(uso.backend)
    if uso.backend.is_local:
        return uso.generate(on_step=on_step, **kwargs)
    return uso.generate(on_status=on_status,
                        on_progress=None if on_step is None else (lambda f: on_step(round(100 * f), 100)),
                        **kwargs)


def save_outputs(result, paths: list[str], job: Job) -> list[str]:
    """Write the job's images (atomically, with their parameters) to `paths`, the job's own names;
    returns the paths written: fewer when a provider returned fewer images. Images beyond
    `paths` are not written (a name made up for them could be another job's)."""
    paths = paths[:len(result.images)]
    for k, path in enumerate(paths):
        save_png(result.images[k], path, {**result.image_parameters(k), "job": job.index})
    return paths


def report(progress: BatchProgress, tag: str, outcome: Outcome, traceback_text: str = "") -> None:
    """The line a finished job gets (and its warnings, and with --verbose a failure's traceback)."""
    if outcome.status == "skipped":
        progress.line(f"{tag} skipped (already done): {display_path(outcome.paths[0])}{_more(outcome.paths)}")
    elif outcome.status == "cancelled":
        progress.line(f"{tag} cancelled: {outcome.job.where}")
    elif outcome.status == "failed":
        progress.line(f"{tag} FAILED {outcome.job.where}: {outcome.error}")
        if traceback_text:
            progress.line(traceback_text.rstrip())
    elif outcome.status == "done":
        for w in outcome.warnings:
            progress.line(f"{tag} warning: {w}")
        progress.line(f"{tag} done in {outcome.seconds:.1f} s: {display_path(outcome.paths[0])}"
                      f"{_more(outcome.paths)}")


def not_run(jobs: list[Job], out_dir: str, backend: Backend, numbered: bool) -> list[Outcome]:
    return [Outcome(j, "not run", output_paths(j, out_dir, backend, numbered)) for j in jobs]


def run_jobs(jobs: list[Job], backend: Backend, open_uso: Callable[[], object], out_dir: str, *,
             overwrite: bool = False, numbered: bool = True, progress: BatchProgress | None = None,
             on_cancel_check: Callable[[], bool] = lambda: False, tracebacks: bool = False) -> list[Outcome]:
    """Run every job on `backend`; a failure is recorded and the next job runs. `open_uso()` makes
    the USO (loads the models) only when the first job needs it, so a finished batch re-runs
    without loading. A KeyboardInterrupt or a cancel stops the batch: the rest is marked 'not run'."""
    progress = progress or BatchProgress(len(jobs), enabled=False)
    outcomes: list[Outcome] = []
    uso = None
    total = len(jobs)
    for i, job in enumerate(jobs):
        paths = output_paths(job, out_dir, backend, numbered)
        tag = f"[{i + 1}/{total}]"
        if is_finished(paths, overwrite):
            outcomes.append(Outcome(job, "skipped", paths))
            report(progress, tag, outcomes[-1])
            progress.job_done()
            continue
        if on_cancel_check():
            outcomes.extend(not_run(jobs[i:], out_dir, backend, numbered))
            break
        if uso is None:
            uso = open_uso()   # errors here are setup errors: they stop the batch
        started = time.monotonic()
        progress.start_job(f"job {i + 1}", *progress_units(job, backend))
        trace = ""
        try:
            result = generate(uso, job, on_step=progress.step, on_status=progress.status)
            paths = save_outputs(result, paths, job)
        except (KeyboardInterrupt, Cancelled):
            outcomes.append(Outcome(job, "cancelled", paths, "cancelled", time.monotonic() - started))
            report(progress, tag, outcomes[-1])
            outcomes.extend(not_run(jobs[i + 1:], out_dir, backend, numbered))
            break
        except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the others
            outcomes.append(Outcome(job, "failed", paths, failure_reason(exc), time.monotonic() - started))
            trace = traceback.format_exc() if tracebacks else ""
        else:
            outcomes.append(Outcome(job, "done", paths, "", time.monotonic() - started, list(result.warnings)))
        report(progress, tag, outcomes[-1], trace)
        progress.job_done()
    return outcomes


def failure_reason(exc: BaseException) -> str:
    """A failed job's one-line reason (the exception type only where the message alone is unclear)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (USOError, RemoteError, ValueError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"


def display_path(path: str) -> str:
    """`path` relative to the current folder when it lies inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _more(paths: list[str]) -> str:
    return f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""


def summary(outcomes: list[Outcome], seconds: float, out_dir: str) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "cancelled", "not run")}
    images = sum(len(o.paths) for o in outcomes if o.status == "done")
    parts = [f"{counts['done']} done ({images} image{'s' if images != 1 else ''})", f"{counts['skipped']} skipped",
             f"{counts['failed']} failed"]
    parts += [f"{counts[s]} {s}" for s in ("cancelled", "not run") if counts[s]]
    lines = [f"Summary: {len(outcomes)} job{'s' if len(outcomes) != 1 else ''}: {', '.join(parts)} "
             f"in {seconds:.1f} s; output folder {display_path(out_dir) or '.'}"]
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"  FAILED job {o.job.index} ({o.job.where}): {o.error}")
    return "\n".join(lines)
