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


def _tokenizer_files(folder):
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")


def test_desktop_tokenizers_found_in_the_app_resources(tmp_path, monkeypatch):
    from nodes import model_catalog
    from nodes.files import model_paths

    # Desktop: models/ under the user's base folder, comfy/ in the app's resources.
    resources = tmp_path / "AppData" / "Local" / "Programs" / "@comfyorgcomfyui-electron" / "resources" / "ComfyUI"
    _tokenizer_files(resources / "comfy" / "sd1_tokenizer")
    _tokenizer_files(resources / "comfy" / "text_encoders" / "t5_tokenizer")
    models = tmp_path / "Documents" / "ComfyUI" / "models"
    models.mkdir(parents=True)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))
    monkeypatch.setattr(sys, "platform", "linux")
    assert model_paths.tokenizer_dirs_beside([str(models)]) == {}
    monkeypatch.setattr(sys, "platform", "win32")
    assert model_catalog.desktop_comfyui_dirs() == [str(resources)]
    assert model_paths.tokenizer_dirs_beside([str(models)]) == {
        "clip_l": str(resources / "comfy" / "sd1_tokenizer"),
        "t5": str(resources / "comfy" / "text_encoders" / "t5_tokenizer")}
    monkeypatch.setattr(sys, "platform", "darwin")
    assert model_catalog.desktop_comfyui_dirs() == ["/Applications/ComfyUI.app/Contents/Resources/ComfyUI"]


def test_tokenizer_message_names_the_desktop_location_and_the_option():
    from nodes.engine.errors import TokenizerNotFoundError
    from nodes.engine.tokenizers import load_tokenizer

    with pytest.raises(TokenizerNotFoundError) as err:
        load_tokenizer("t5", [])
    msg = str(err.value)
    assert "ComfyUI Desktop" in msg
    assert r"%LOCALAPPDATA%\Programs\@comfyorgcomfyui-electron\resources\ComfyUI\comfy" in msg
    assert "/Applications/ComfyUI.app/Contents/Resources/ComfyUI/comfy" in msg
    assert "USO_TOKENIZER_DIR" in msg


# -- 3. host RAM on every OS ------------------------------------------------------------------------

def test_host_ram_known_without_proc_and_sysconf(monkeypatch):
    """Windows has neither /proc/meminfo nor os.sysconf: the pin budget is still bounded."""
    from nodes.engine import memory
    from nodes.engine.memory import host as host_ram

    def no_proc(file, *a, **k):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(file)
        return open(file, *a, **k)

    # The engine's own reads see no /proc and no sysconf (psutil keeps its own, as on Windows it
    # asks the Windows API).
    monkeypatch.setattr(host_ram, "open", no_proc, raising=False)
    monkeypatch.setattr(host_ram, "os", type("os_without_sysconf", (), {"path": os.path})())
    host = memory.host_memory()
    assert host is not None and 0 < host.available <= host.total
    import psutil
    assert host.total == psutil.virtual_memory().total
    budget = memory.pin_budget(host)
    assert budget is not None and 0 <= budget <= host.total // 2


def test_psutil_is_a_requirement():
    import tomllib

    req = open(os.path.join(PACK, "requirements.txt")).read().split()
    deps = tomllib.load(open(os.path.join(PACK, "pyproject.toml"), "rb"))["project"]["dependencies"]
    assert any(r.startswith("psutil") for r in req) and any(d.startswith("psutil") for d in deps)


# -- 4. a cp1252 console and manifests saved by Windows tools ---------------------------------------

def test_cp1252_console_prints_a_name_outside_it_and_the_summary(tmp_path, monkeypatch):
    import io

    from nodes.cli import command

    (tmp_path / "jobs.jsonl").write_text('{"prompt": "x", "output": "\\u732b.png", "width": 64, "height": 64}\n',
                                         encoding="utf-8")
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    err = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = command.main(["--tiny", "--manifest", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"),
                         "--progress", "off"])
    out.flush()
    printed = out.buffer.getvalue().decode("cp1252")
    assert code == 0
    assert (tmp_path / "out" / "\u732b.png").is_file()
    assert "\\u732b.png" in printed and "Summary: 1 job: 1 done" in printed


def _read(tmp_path, name, data: bytes):
    from nodes.jobs import manifest

    path = tmp_path / name
    path.write_bytes(data)
    return manifest.read_rows(str(path))


CSV = 'prompt,seed,output\ncaf\u00e9 na\u00efve \u20ac,3,caf\u00e9.png\n'


@pytest.mark.parametrize("saved_as,data", [
    ("Excel CSV (cp1252)", CSV.replace("\n", "\r\n").encode("cp1252")),
    ("UTF-8 with BOM", "\ufeff".encode("utf-8") + CSV.encode("utf-8")),
    ("PowerShell 5.1 > (UTF-16LE, BOM)", CSV.replace("\n", "\r\n").encode("utf-16")),  # utf-16: BOM, native LE
    ("UTF-16BE with BOM", b"\xfe\xff" + CSV.encode("utf-16-be")),
], ids=["excel-cp1252", "utf8-bom", "powershell-utf16le", "utf16be"])
def test_manifests_saved_by_windows_tools_are_read(tmp_path, saved_as, data):
    rows, problems = _read(tmp_path, "jobs.csv", data)
    assert problems == []
    assert rows == [(2, {"prompt": "caf\u00e9 na\u00efve \u20ac", "seed": "3", "output": "caf\u00e9.png"})]


def test_powershell_jsonl_is_read(tmp_path):
    rows, problems = _read(tmp_path, "jobs.jsonl", b"\xff\xfe" + '{"prompt": "\u732b"}\r\n'.encode("utf-16-le"))
    assert problems == [] and rows == [(1, {"prompt": "\u732b"})]


def test_undecodable_manifest_names_its_line(tmp_path):
    from nodes.jobs import manifest

    # 0x81 is undefined in cp1252 and invalid UTF-8: no reading fits.
    with pytest.raises(manifest.ManifestError) as err:
        _read(tmp_path, "jobs.csv", b"prompt,seed\na,1\nb\x81,2\n")
    (msg,) = err.value.problems
    assert msg.startswith("jobs.csv line 3: bytes that are not UTF-8 or cp1252 text")
    assert "CSV UTF-8" in msg
    with pytest.raises(manifest.ManifestError) as err:
        _read(tmp_path, "jobs.jsonl", b"\xff\xfe" + '{"prompt": "a"}\n'.encode("utf-16-le") + b"\x00\xd8")
    (msg,) = err.value.problems
    assert msg.startswith("jobs.jsonl line 2: bytes that are not utf-16 text")


# -- 5. output names Windows can write -------------------------------------------------------------

@pytest.mark.parametrize("output,says", [
    ("con.png", "'con' is a device name on Windows"),
    ("NUL", "'NUL' is a device name on Windows"),
    ("Com1.backup.png", "'Com1' is a device name on Windows"),
    ("lpt9.png", "'lpt9' is a device name on Windows"),
    ("aux", "'aux' is a device name on Windows"),
    ("sub/prn.png", "'prn' is a device name on Windows"),
    ("a?b.png", "Windows does not allow '?' in file names"),
    ("img:1.png", "Windows does not allow ':' in file names"),
    ('say "hi".png', "Windows does not allow '\"' in file names"),
    ("a<b>|*.png", "Windows does not allow '*' '<' '>' '|' in file names"),
    ("tab\there.png", "Windows does not allow '\\t' in file names"),
    ("name.png.", "ends in a dot or a space"),
    ("folder./x.png", "ends in a dot or a space"),
    ("folder /x.png", "ends in a dot or a space"),
])
def test_names_windows_cannot_write_are_refused_at_check_time(tmp_path, capsys, output, says):
    from nodes.cli import command

    rows = [{"prompt": "fine", "output": "ok.png"}, {"prompt": "x", "output": output}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n", encoding="utf-8")
    code = command.main(["--tiny", "--manifest", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == command.EXIT_USAGE
    assert f"jobs.jsonl line 2: output '{output}': {says}" in err, err
    assert "nothing was generated" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["console.png", "com10.png", "nulled.png", "con_0.png", "cat.png", "a.b.png"])
def test_names_close_to_reserved_ones_pass(output):
    from nodes.jobs.manifest import windows_name_problem

    assert windows_name_problem(output) is None


@pytest.mark.parametrize("prompt", ["con", "NUL", "a?b: c*", "trailing dots...", "com1", "\u732b \u2713", ""])
def test_prompt_derived_names_are_windows_safe(prompt):
    from nodes.jobs import runner
    from nodes.jobs.backend import Backend
    from nodes.jobs.manifest import Job, windows_name_problem

    job = Job(index=1, where="line 1", prompt=prompt, subject=None if prompt else "aux.jpg", styles=(), seed=0,
              width=64, height=64, keep_size=False, steps=4, guidance=4.0, batch_size=2, style_crop="reference",
              long_side=64, shift="reference", extra_references=False, negative_prompt="", output=None)
    for numbered in (False, True):
        for path in runner.output_paths(job, "", Backend(tiny=True), numbered):
            assert windows_name_problem(path) is None, path
            assert __import__("re").fullmatch(r"[a-z0-9_-]+\.png", path), path


def test_resume_does_not_take_a_case_variant_as_the_jobs_output(tmp_path, monkeypatch):
    """On NTFS `cat.png` "exists" when only `Cat.png` is there; imitated with a case-blind exists."""
    from nodes.jobs import runner

    (tmp_path / "Cat.png").write_bytes(b"another job's image")
    real_exists = os.path.exists

    def ntfs_exists(path):
        folder, name = os.path.split(str(path))
        try:
            return any(n.casefold() == name.casefold() for n in os.listdir(folder or "."))
        except OSError:
            return real_exists(path)

    monkeypatch.setattr(os.path, "exists", ntfs_exists)
    assert os.path.exists(str(tmp_path / "cat.png"))  # the imitation holds
    assert not runner.is_finished([str(tmp_path / "cat.png")], overwrite=False)
    assert runner.is_finished([str(tmp_path / "Cat.png")], overwrite=False)


# -- 2. no model file left memory-mapped after loading ---------------------------------------------

def _mapped_model_files(paths) -> set[str]:
    """The files among `paths` that this process has memory-mapped (Linux's /proc/self/maps; on
    Windows a mapped file cannot be overwritten, renamed or deleted)."""
    wanted = {os.path.realpath(p) for p in paths}
    with open("/proc/self/maps") as f:
        mapped = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return {p for p in wanted if p in mapped}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("precision,transformer", [("fp32", "flux_bfl"), ("bf16", "flux_bfl"),
                                                   ("auto", "flux_bfl"), ("auto", "flux_gguf")])
def test_no_model_file_stays_mapped_after_loading(tiny_models, tmp_path, precision, transformer):
    import gc

    from nodes.engine import EngineOptions, ModelFiles, USOPipeline

    if transformer not in tiny_models.paths:
        pytest.skip(f"no {transformer} file: {tiny_models.skipped}")

    # Copies, so renaming and overwriting them leaves the shared session models alone.
    names = {"transformer": transformer, "vae": "ae", "t5": "t5_fp16", "clip_l": "clip_l", "siglip": "siglip_file",
             "uso_lora": "lora_comfy", "projector": "projector_comfy"}
    copies = {}
    for slot, key in names.items():
        copies[slot] = str(tmp_path / os.path.basename(str(tiny_models.paths[key])))
        shutil.copy(tiny_models.paths[key], copies[slot])
    user_lora = str(tmp_path / "mine.safetensors")
    shutil.copy(tiny_models.paths["user_lora_kohya"], user_lora)
    files = ModelFiles(**copies, tokenizer_dir=str(tiny_models.paths["tokenizer_t5"].parent))
    pipe = USOPipeline.from_files(files, EngineOptions(precision=precision, device="cpu"))
    pipe = pipe.with_lora(user_lora, 0.8)
    gc.collect()
    assert _mapped_model_files([*copies.values(), user_lora]) == set()
    for path in [*copies.values(), user_lora]:
        os.replace(path, path + ".old")          # rename
        shutil.copy(path + ".old", path)         # overwrite in place
        os.remove(path + ".old")                 # delete
    del pipe


# -- 6. benchmarks, compile check and the pip command on Windows -----------------------------------

def test_benchmarks_import_without_resource_and_loadavg(monkeypatch):
    """Windows has no `resource` module and no os.getloadavg."""
    import importlib

    import psutil  # noqa: F401  (Linux's psutil itself imports resource; Windows' does not)

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    monkeypatch.delattr(os, "getloadavg")
    for name in ("nodes.benchmarks.speed", "nodes.benchmarks.ray_throughput"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    speed = importlib.import_module("nodes.benchmarks.speed")
    ray_throughput = importlib.import_module("nodes.benchmarks.ray_throughput")
    assert ray_throughput._load() == "n/a"
    monkeypatch.setattr(speed, "open", _no_proc(open), raising=False)  # no /proc/self/status either
    assert speed._peak_rss_bytes() > 0


def _no_proc(real_open):
    def opener(file, *a, **k):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(file)
        return real_open(file, *a, **k)
    return opener


def test_cpu_compile_check_looks_for_msvc_on_windows(monkeypatch):
    import shutil as shutil_module

    import torch

    from nodes.engine import speed

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(shutil_module, "which", lambda name: "C:\\VS\\cl.exe" if name == "cl" else None)
    assert speed.compile_available(torch.device("cpu")) is None
    monkeypatch.setattr(shutil_module, "which", lambda name: None)
    assert "MSVC's cl.exe" in speed.compile_available(torch.device("cpu"))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil_module, "which", lambda name: "/usr/bin/cl" if name == "cl" else None)
    assert "g++ or clang++" in speed.compile_available(torch.device("cpu"))


def test_pip_command_runs_in_powershell(monkeypatch):
    from nodes.comfyui import requirements

    monkeypatch.setattr(requirements, "REQUIREMENTS_FILE", "C:\\Users\\Ann Lee\\comfyui-uso\\requirements.txt")
    import types

    monkeypatch.setattr(requirements, "os", types.SimpleNamespace(name="nt"))  # Windows, for this module
    monkeypatch.setattr(sys, "executable", "C:\\Users\\Ann Lee\\Documents\\ComfyUI\\.venv\\Scripts\\python.exe")
    assert requirements.install_command() == (
        '& "C:\\Users\\Ann Lee\\Documents\\ComfyUI\\.venv\\Scripts\\python.exe" -m pip install -r '
        '"C:\\Users\\Ann Lee\\comfyui-uso\\requirements.txt"')
    # No spaces: unquoted, which cmd.exe and PowerShell both run.
    monkeypatch.setattr(sys, "executable", "C:\\ComfyUI_windows_portable\\python_embeded\\python.exe")
    monkeypatch.setattr(requirements, "REQUIREMENTS_FILE", "C:\\p\\requirements.txt")
    assert requirements.install_command() == (
        "C:\\ComfyUI_windows_portable\\python_embeded\\python.exe -m pip install -r C:\\p\\requirements.txt")
