"""The command line, started as a script: `python uso_cli.py ...` (the same as `python -m nodes.cli`).

For Pythons where `-m nodes.cli` cannot work: ComfyUI portable's `python_embeded` has a
`python3XX._pth` file, so the current folder is not on sys.path, PYTHONPATH is ignored and
`../ComfyUI` comes first; `nodes` is then ComfyUI's own `nodes.py`. This script puts the pack's
folder first and forgets a `nodes` module imported from elsewhere, then runs `nodes.cli`.

ComfyUI never imports this file: it imports a pack's `__init__.py` only.
"""
import os
import runpy
import sys


def _pack_first() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [here] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    for name in [m for m in sys.modules if m == "nodes" or m.startswith("nodes.")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not os.path.abspath(origin).startswith(here + os.sep):
            del sys.modules[name]


if __name__ == "__main__":
    _pack_first()
    runpy.run_module("nodes.cli", run_name="__main__", alter_sys=True)
