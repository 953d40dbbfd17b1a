"""The import rules of ARCHITECTURE.md, checked by import-linter with the contracts in
/.importlinter: every part imports only the parts below it (the engine and remote, the nodes and
the benchmarks, never each other), and no package's modules import each other in a cycle.
Imports inside functions count."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the pack in `folder` (a process of its own: import-linter sets up logging
    and sys.path for itself)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_parts_keep_their_import_rules():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_inside_a_function_that_breaks_the_layers_is_caught(tmp_path):
    # The jobs layer reaching up into the API from inside a function: the cycle issue 18 removed.
    shutil.copytree(ROOT / "nodes", tmp_path / "nodes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    with open(tmp_path / "nodes" / "jobs" / "runner.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _cancelled_class():\n    from ..api import Cancelled\n\n    return Cancelled\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "nodes.jobs.runner -> nodes.api" in result.stdout, result.stdout
