"""The jobs of one run: a manifest's rows, or the one job the command line describes, with the
given values as every row's defaults. Shared by the command line and `api.run_manifest`."""
from __future__ import annotations

import os

from . import manifest
from .backend import Backend
from .runner import output_clashes


def job_defaults(backend: Backend) -> dict:
    """Every job field's value when neither the row nor the command line sets it."""
    return dict(backend.defaults, negative_prompt="", output=None, subject=None, styles=(), extra_references=False,
                loras=(), init_image=None, denoise=1.0)


def jobs_for(given: dict, manifest_path: str | None, backend: Backend) -> list[manifest.Job]:
    """The manifest's jobs with `given` (values not None) as every row's defaults, or the one job
    `given` describes; manifest.ManifestError lists every problem."""
    defaults = job_defaults(backend)
    if not manifest_path:
        return [manifest.job_from_values(given, backend, defaults)]
    checked, problems = manifest.check_fields({k: v for k, v in given.items() if v is not None}, backend,
                                              os.getcwd(), defaults)
    if problems:
        raise manifest.ManifestError([f"command line: {p}" for p in problems])
    jobs = manifest.jobs_from_manifest(manifest_path, backend, checked)
    clashes = output_clashes(jobs, backend)
    if clashes:
        raise manifest.ManifestError(clashes)
    return jobs
