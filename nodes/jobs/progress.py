"""What a batch shows while it runs: tqdm bars across the jobs and the steps of the running job,
and a line per finished job. Shared by the in-process runner and the Ray runner."""
from __future__ import annotations

import sys


class BatchProgress:
    """tqdm bars: one across jobs, one across the steps of the running job; lines in between.
    `enabled` None = bars only on a terminal; the per-job lines are always written."""

    def __init__(self, total_jobs: int, enabled: bool | None = None, stream=None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.stream = stream or sys.stderr
        disable = (not self.stream.isatty()) if enabled is None else not enabled
        self.jobs = tqdm(total=total_jobs, desc="jobs", unit="job", position=0, file=self.stream,
                         disable=disable, dynamic_ncols=True)
        self.steps = None
        self._disable = disable

    def start_job(self, label: str, total_steps: int, unit: str = "step") -> None:
        self.close_steps()
        self.steps = self._tqdm(total=total_steps, desc=label, unit=unit, position=1, leave=False,
                                file=self.stream, disable=self._disable, dynamic_ncols=True)

    def step(self, done: int, total: int) -> None:
        if self.steps is not None:
            if self.steps.total != total:
                self.steps.total = total
            self.steps.n = done
            self.steps.refresh()

    def status(self, text: str) -> None:
        if self.steps is not None:
            self.steps.set_postfix_str(text.splitlines()[0][:60], refresh=True)

    def line(self, text: str) -> None:
        self._tqdm.write(text, file=sys.stdout)

    def job_done(self) -> None:
        self.close_steps()
        self.jobs.update(1)

    def close_steps(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self) -> None:
        self.close_steps()
        self.jobs.close()
