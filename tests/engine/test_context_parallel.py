"""One image over 2 CPU processes (torchrun, gloo) with Ulysses context parallelism on our transformer
call (style tokens before the text, subject tokens after the image): the latents equal one
process's within 1e-4 (fp32). About 6 s: two processes importing torch and diffusers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(*args: str) -> tuple[int, str]:
    """(exit status, output) of torchrun with 2 processes; on a hang the whole process group
    (torchrun and both ranks) is killed, so no rank is left waiting for the other."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "nodes.benchmarks.context_parallel", "--size", "tiny", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError("torchrun did not finish in 240 s:\n" + out[-3000:]) from None
    return proc.returncode, out


def test_ulysses_over_two_cpu_processes_gives_the_one_process_latents():
    code, text = _torchrun("--tolerance", "1e-4")
    assert code == 0, text[-3000:]
    m = re.search(r"2 processes \(gloo\), ulysses 2 x ring 1: largest latent difference to one process (\S+)", text)
    assert m, text[-3000:]
    assert float(m.group(1)) <= 1e-4
