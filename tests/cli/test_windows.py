"""Windows: the portable build's and Desktop's Python, consoles, file names and files in use.

Run on Linux with Windows' behaviour imitated: a `._pth` interpreter laid out like ComfyUI
portable's `python_embeded`, cp1252 consoles and manifests, no /proc, Windows' file-name rules.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- 1. the command line under ComfyUI portable's embedded Python ----------------------------------

def _portable_root(tmp_path):
    """A folder laid out like ComfyUI portable: python_embeded/ (a Python with a `._pth` file that
    lists ../ComfyUI first, as the real one does) and ComfyUI/ with its own nodes.py and this pack
    in custom_nodes."""
    if sys.version_info < (3, 11) or not sys.platform.startswith("linux"):
        pytest.skip("._pth files outside Windows need Python 3.11+; the layout is built for Linux")
    root = tmp_path / "ComfyUI_windows_portable"
    embeded = root / "python_embeded"
    comfy = root / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    embeded.mkdir()
    (comfy / "nodes.py").write_text("NODE_CLASS_MAPPINGS = {}\n")  # ComfyUI's own module `nodes`
    os.symlink(PACK, comfy / "custom_nodes" / "comfyui-uso")
    exe = embeded / "python"
    shutil.copy2(os.path.realpath(sys.executable), exe)  # a copy: the ._pth is looked up beside it
    stdlib = sysconfig.get_paths()["stdlib"]
    site = sysconfig.get_paths()["purelib"]
    (embeded / "python._pth").write_text("\n".join([
        "../ComfyUI", os.path.join(os.path.dirname(stdlib), "python%d%d.zip" % sys.version_info[:2]),
        stdlib, os.path.join(stdlib, "lib-dynload"), site, ""]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = PACK  # ignored under a ._pth, as on Windows
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    return root, exe, env


def test_portable_python_runs_the_launcher_but_not_dash_m(tmp_path):
    root, exe, env = _portable_root(tmp_path)
    probe = subprocess.run([str(exe), "-c", "import sys, nodes; print(nodes.__file__); print(sys.flags.isolated)"],
                           cwd=PACK, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[0] == str(root / "ComfyUI" / "nodes.py")  # the imitation holds

    dash_m = subprocess.run([str(exe), "-m", "nodes.cli", "--help"], cwd=PACK, env=env,
                            capture_output=True, text=True, timeout=60)
    assert dash_m.returncode != 0
    assert "nodes.cli" in dash_m.stderr

    launcher = os.path.join("ComfyUI", "custom_nodes", "comfyui-uso", "uso_cli.py")
    run = subprocess.run([str(exe), launcher, "--help"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--manifest" in run.stdout and "--tokenizers" in run.stdout


def test_launcher_drops_a_foreign_nodes_module_already_imported(tmp_path, monkeypatch):
    import runpy
    import types

    foreign = types.ModuleType("nodes")
    foreign.__file__ = str(tmp_path / "nodes.py")
    monkeypatch.setitem(sys.modules, "nodes", foreign)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + [p for p in sys.path if os.path.abspath(p or ".") != PACK])
    launcher = runpy.run_path(os.path.join(PACK, "uso_cli.py"), run_name="uso_cli_test")
    launcher["_pack_first"]()
    assert sys.path[0] == PACK
    assert sys.modules.get("nodes") is not foreign


def test_comfyui_imports_only_the_init_and_never_the_launcher():
    init = open(os.path.join(PACK, "__init__.py")).read()
    assert "uso_cli" not in init
    # The launcher does nothing when imported (ComfyUI would never import it; a tool might).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import uso_cli; "
                          "print(sys.path[0] == sys.argv[1], 'nodes.cli' in sys.modules)", PACK],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr
