"""One image over 2 CPU processes (torchrun, gloo) with Ulysses context parallelism on our transformer
call (style tokens before the text, subject tokens after the image): the latents equal one
process's within 1e-4 (fp32). About 6 s: two processes importing torch and diffusers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "nodes.benchmarks.context_parallel", "--size", "tiny", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_ulysses_over_two_cpu_processes_gives_the_one_process_latents():
    run = _torchrun("--tolerance", "1e-4")
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    m = re.search(r"2 processes \(gloo\), ulysses 2 x ring 1: largest latent difference to one process (\S+)", text)
    assert m, text[-3000:]
    assert float(m.group(1)) <= 1e-4
