"""The command line (`python -m nodes.cli`) end to end on tiny models: single image, batch with a
failing job, resume and --overwrite, manifest problems with line numbers, exit codes, model files
from explicit paths / a ComfyUI models folder / extra_model_paths.yaml, and --provider fal.

Most runs call `cli.main(argv)` in-process (a subprocess costs ~3 s of imports); one real
subprocess run checks the command exactly as the README gives it.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodes import api
from nodes.cli import command as cli
from nodes.files import png_info
from nodes.jobs import manifest
from nodes.jobs import runner as batch
from nodes.jobs.backend import Backend
from nodes.jobs.plan import job_defaults

ROOT = Path(__file__).resolve().parents[2]


def write_image(path: Path, w: int = 96, h: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    """A PNG whose header reads fine (so the manifest check passes) but whose data is cut off."""
    buf = io.BytesIO()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pictures(tmp_path):
    d = tmp_path / "pictures"
    d.mkdir()
    return {"subject": write_image(d / "subject.png", 96, 64, 1), "style": write_image(d / "style.jpg", 50, 70, 2),
            "style2": write_image(d / "style2.png", 40, 40, 4), "broken": write_truncated_png(d / "broken.png"),
            "dir": d}


# -- the command as a newcomer runs it ---------------------------------------------------------------

def test_tiny_single_image_in_a_subprocess(tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nodes.cli", "--tiny", "--prompt", "a red fox", "--seed", "7",
                           "--out", str(out_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SMOKE TEST" in proc.stderr and "noise" in proc.stderr
    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files] == ["a-red-fox_7.png"]
    with Image.open(files[0]) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        assert "a red fox" in img.text["parameters"]
    params = png_info.read_parameters(str(files[0]))
    assert params["prompt"] == "a red fox" and params["seed"] == 7 and params["backend"] == "tiny"
    assert (params["width"], params["height"], params["steps"], params["guidance"]) == (64, 64, 4, 4.0)
    assert "noise" in params["note"]
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert params["software"] == f"comfyui-uso {version}"     # the pack's version, not 'unknown'
    assert "Summary: 1 job: 1 done (1 image), 0 skipped, 0 failed" in proc.stdout


# -- batch, failures, resume -------------------------------------------------------------------------

def test_batch_with_a_failing_job_then_resume_then_overwrite(tmp_path, pictures, capsys):
    manifest = tmp_path / "jobs.jsonl"
    rows = [
        {"prompt": "a cat", "subject": "pictures/subject.png", "styles": ["pictures/style.jpg"], "seed": 3},
        {"prompt": "broken subject", "subject": "pictures/broken.png", "seed": 4},
        "# a comment line and a blank line are skipped",
        "",
        {"prompt": "two cats", "styles": "pictures/style.jpg;pictures/style2.png", "batch_size": 2, "seed": 10,
         "width": 48, "height": 32, "output": "pair.png"},
    ]
    manifest.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    out_dir = tmp_path / "out"
    summary_file = tmp_path / "summary.json"

    code, out, err = run(["--tiny", "--manifest", manifest, "--out", out_dir, "--summary-json", summary_file],
                         capsys)
    assert code == 1
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["0001_a-cat_3.png", "pair_10.png", "pair_11.png"]
    assert "[2/3] FAILED jobs.jsonl line 2:" in out and "cannot be decoded" in out
    assert "Summary: 3 jobs: 2 done (3 images), 0 skipped, 1 failed" in out
    assert "FAILED job 2 (jobs.jsonl line 2):" in out and "broken.png" in out
    with Image.open(out_dir / "pair_11.png") as img:
        assert img.size == (48, 32)
    params = png_info.read_parameters(str(out_dir / "pair_11.png"))
    assert params["seed"] == 11 and params["batch_size"] == 2 and params["image"] == "2/2"
    # File names only, never the absolute paths; what ran (a CPU: nothing placed on a GPU).
    assert params["styles"] == ["style.jpg", "style2.png"]
    first = png_info.read_parameters(str(out_dir / "0001_a-cat_3.png"))
    assert first["subject"] == "subject.png" and first["job"] == 1
    assert (first["device"], first["memory"]) == ("cpu", "none (cpu)")
    assert str(tmp_path) not in (out_dir / "0001_a-cat_3.png").read_bytes().decode("latin-1")
    summary = json.loads(summary_file.read_text())
    assert [j["status"] for j in summary["jobs"]] == ["done", "failed", "done"]
    assert summary["jobs"][1]["where"] == "jobs.jsonl line 2" and "truncated" in summary["jobs"][1]["error"]

    # Resume: the done jobs are skipped, the failed one is tried again (and fails again).
    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    code, out, _ = run(["--tiny", "--manifest", manifest, "--out", out_dir], capsys)
    assert code == 1
    assert "Summary: 3 jobs: 0 done (0 images), 2 skipped, 1 failed" in out
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == stamps

    # Fixed manifest: everything exists, so nothing loads at all.
    manifest.write_text(json.dumps(rows[0]) + "\n")
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", out_dir], capsys)
    assert code == 0 and "1 skipped" in out and "loading" not in err

    # --overwrite regenerates (same seed, same pixels: deterministic).
    before = np.asarray(Image.open(out_dir / "0001_a-cat_3.png"))
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", out_dir, "--overwrite"], capsys)
    assert code == 0 and "1 done (1 image)" in out and "loading" in err
    assert (out_dir / "0001_a-cat_3.png").stat().st_mtime_ns != stamps["0001_a-cat_3.png"]
    assert np.array_equal(np.asarray(Image.open(out_dir / "0001_a-cat_3.png")), before)


def test_manifest_problems_are_reported_with_line_numbers(tmp_path, pictures, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"prompt": "fine", "subject": "pictures/subject.png"}),
        json.dumps({"prompt": "odd size", "width": 1000}),
        json.dumps({"prompt": "missing", "subject": "pictures/nope.png"}),
        '{"prompt": "bad json",',
        json.dumps({"promt": "typo"}),
        json.dumps({"prompt": "restyle", "keep_size": True}),
        json.dumps({"prompt": "neg", "negative_prompt": "blurry", "steps": 0}),
        json.dumps(["not", "an", "object"]),
    ]) + "\n")
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert "not valid JSON" in err and "jobs.jsonl line 4" in err and "line 8" in err
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:3] + manifest.read_text().splitlines()[4:7]))
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "error: jobs.jsonl line 2: width: 1000 is not a multiple of 16 (FLUX works on 16 px patches; 1024 is USO's native size); use 992 or 1008." in lines
    assert any(line.startswith("error: jobs.jsonl line 3: subject 'pictures/nope.png' does not exist") for line in lines)
    assert "error: jobs.jsonl line 4: unknown field 'promt' (did you mean 'prompt'?)" in lines
    assert "error: jobs.jsonl line 5: keep_size needs a subject image (the output size comes from it)" in lines
    assert any("line 6: steps: 0 is outside 1..200 (the reference uses 25)." in line for line in lines)
    assert any("line 6: negative_prompt is only sent to fal/AIML" in line for line in lines)
    assert not any("line 1:" in line for line in lines)
    assert "nothing was generated" in err and not (tmp_path / "out").exists()


def test_a_row_with_several_kinds_of_problems_lists_them_all(tmp_path, pictures, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"prompt": "size and seed", "seed": "x", "width": 1000, "height": 5000}),
        json.dumps({"prompt": "restyle", "steps": 0, "keep_size": True, "guidance": "strong"}),
    ]) + "\n")
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: jobs.jsonl line 1: seed 'x' is not a whole number",
        "error: jobs.jsonl line 1: width: 1000 is not a multiple of 16 (FLUX works on 16 px patches; 1024 is USO's native size); use 992 or 1008.",
        "error: jobs.jsonl line 1: height: 5000 is outside 16..4096 (FLUX works on 16 px patches; 1024 is USO's native size).",
        "error: jobs.jsonl line 2: steps: 0 is outside 1..200 (the reference uses 25).",
        "error: jobs.jsonl line 2: guidance 'strong' is not a number",
        "error: jobs.jsonl line 2: keep_size needs a subject image (the output size comes from it)",
    ]
    # The same on the command line.
    code, out, err = run(["--tiny", "--prompt", "x", "--steps", "0", "--keep-size", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "steps: 0 is outside 1..200 (the reference uses 25)." in err and "keep_size needs a subject image" in err


def test_csv_manifest_types_and_line_numbers(tmp_path, pictures, capsys):
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(
        "prompt,subject,styles,seed,width,height,keep_size,steps,output\n"
        '"a cat, sitting",pictures/subject.png,pictures/style.jpg;pictures/style2.png,5,32,32,no,2,cat\n'
        "# comment row\n"
        '"multi\nline prompt",,,6,32,32,,2,\n'
        "big,,,x,4096,4100,false,2,\n"
        "extra,,,1,32,32,false,2,out.jpg,oops\n")
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert "error: jobs.csv line 6: seed 'x' is not a whole number" in err
    assert "error: jobs.csv line 6: height: 4100 is outside 16..4096" in err  # every kind, not only the first
    assert "error: jobs.csv line 7: 10 values but the header has 9 columns" in err

    manifest.write_text("\n".join(manifest.read_text().split("\n")[:5]) + "\n")
    code, out, err = run(["--tiny", "--manifest", manifest, "--out", tmp_path / "out", "--dry-run"], capsys)
    assert code == 0, err
    assert "SMOKE TEST" not in err  # nothing is generated, so no warning about noise images
    assert "job 1 (jobs.csv line 2) [to do]: " in out and "cat.png" in out
    assert "job 2 (jobs.csv line 4) [to do]: " in out and "0002_multi-line-prompt_6.png" in out
    jobs = cli.plan_jobs(cli.build_parser().parse_args(["--tiny", "--manifest", str(manifest)]), Backend(tiny=True))
    assert jobs[0].prompt == "a cat, sitting" and jobs[0].keep_size is False and jobs[0].steps == 2
    assert [os.path.basename(s) for s in jobs[0].styles] == ["style.jpg", "style2.png"]
    assert jobs[1].prompt == "multi\nline prompt" and jobs[1].subject is None and jobs[1].seed == 6


def test_key_messages_outside_comfyui_do_not_say_restart_comfyui(tmp_path, pictures, capsys, monkeypatch):
    from nodes.remote import KeyProblem
    from nodes.remote.keys import resolve_key

    for name in ("FAL_KEY", "AIML_API_KEY", "USO_REMOTE_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run(["--provider", "fal", "--prompt", "x", "--style", pictures["style"], "--out", tmp_path], capsys)
    assert code == 2 and "no API key found" in err
    assert "restart ComfyUI" not in err and "in the shell or process that runs this" in err
    with pytest.raises(KeyProblem) as exc:
        api.remote("aiml", user_dir=None).generate("x", styles=[pictures["style"]])
    assert "restart ComfyUI" not in str(exc.value) and "export AIML_API_KEY=" in str(exc.value)
    with pytest.raises(KeyProblem) as exc:   # inside ComfyUI a variable is read when it starts
        resolve_key("fal", None)
    assert "restart ComfyUI" in str(exc.value)


def test_usage_errors_exit_2(tmp_path, capsys):
    assert run(["--tiny", "--provider", "fal", "--prompt", "x"], capsys)[0] == 2
    code, _, err = run(["--tiny", "--transformer", "flux.safetensors"], capsys)
    assert code == 2 and "--tiny builds its own models; drop --transformer" in err
    code, _, err = run(["--tiny", "--width", "100"], capsys)
    assert code == 2 and "error: width: 100 is not a multiple of 16" in err
    code, _, err = run(["--tiny", "--manifest", tmp_path / "absent.jsonl"], capsys)
    assert code == 2 and "cannot read the manifest" in err
    code, _, err = run(["--tiny", "--style", tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"], capsys)
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--width", "wide"])
    assert exc.value.code == 2
    capsys.readouterr()
    code, _, err = run(["--comfy-models", tmp_path / "nowhere", "--prompt", "x"], capsys)
    assert code == 2 and "is not a folder" in err


# -- model files -------------------------------------------------------------------------------------

def test_run_manifest_in_this_process_loads_the_files_it_checked(tiny_models, tmp_path, pictures):
    """api.run_manifest without Ray: a missing file stops it before anything runs; else the
    files it found are the ones loaded (and named in the PNGs)."""
    from nodes.files.model_paths import ModelPathError

    p = tiny_models.paths
    files = dict(transformer=p["flux_bfl"], vae=p["ae"], t5=p["t5_fp16"], clip_l=p["clip_l"], siglip=p["siglip_file"],
                 uso_lora=p["lora_comfy"], projector=p["projector_comfy"], tokenizers=p["tokenizer_t5"].parent)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat", "style": str(pictures["style"]), "width": 32, "height": 32,
                                "steps": 2, "long_side": 64, "seed": 5}) + "\n")
    with pytest.raises(ModelPathError, match="missing.safetensors"):
        api.run_manifest(jobs, tmp_path / "out", **{**files, "vae": tmp_path / "missing.safetensors"})
    assert not (tmp_path / "out").exists()
    results = api.run_manifest(jobs, tmp_path / "out", **files)
    assert [r["status"] for r in results] == ["done"], results
    params = png_info.read_parameters(results[0]["outputs"][0])
    assert params["backend"] == "local" and params["seed"] == 5
    assert params["models"]["transformer"] == "flux1-dev.safetensors"


def test_explicit_model_paths(tiny_models, tmp_path, pictures, capsys):
    p = tiny_models.paths
    code, out, err = run([
        "--transformer", p["flux_bfl"], "--vae", p["ae"], "--t5", p["t5_fp16"], "--clip-l", p["clip_l"],
        "--siglip", p["siglip_file"], "--uso-lora", p["lora_comfy"], "--projector", p["projector_comfy"],
        "--tokenizers", p["tokenizer_t5"].parent, "--prompt", "a photo of a cat", "--subject", pictures["subject"],
        "--style", pictures["style"], "--width", 48, "--height", 32, "--steps", 2, "--long-side", 64,
        "--seed", 11, "--out", tmp_path / "out", "--output", "cat.png", "--progress", "on"], capsys)
    assert code == 0, err
    assert "step" in err and "job" in err  # the tqdm bars, forced on without a terminal
    params = png_info.read_parameters(str(tmp_path / "out" / "cat.png"))
    assert params["backend"] == "local" and params["seed"] == 11 and params["steps"] == 2
    assert params["models"]["transformer"] == "flux1-dev.safetensors"
    assert params["models"]["projector"] == "uso-flux1-projector-v1.safetensors"
    assert "transformer: " in err and "(given)" in err


def _comfy_install(tmp_path: Path, tiny_models) -> Path:
    """A ComfyUI-like install with the default file names, loras + model_patches in an extra folder
    listed by extra_model_paths.yaml, and ComfyUI's tokenizer folders in comfy/."""
    p = tiny_models.paths
    comfy = tmp_path / "ComfyUI"
    models = comfy / "models"
    for rel, src in {"unet/flux1-dev.safetensors": p["flux_bfl"], "vae/ae.safetensors": p["ae"],
                     "clip/t5xxl_fp16.safetensors": p["t5_fp16"], "text_encoders/clip_l.safetensors": p["clip_l"],
                     "clip_vision/sigclip_vision_patch14_384.safetensors": p["siglip_file"],
                     "text_encoders/some_other_encoder.safetensors": p["clip_l"]}.items():
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, models / rel)
    extra = tmp_path / "shared_models"
    (extra / "my_loras").mkdir(parents=True)
    (extra / "patches").mkdir()
    os.symlink(p["lora_comfy"], extra / "my_loras" / "uso-flux1-dit-lora-v1.safetensors")
    os.symlink(p["projector_comfy"], extra / "patches" / "uso-flux1-projector-v1.safetensors")
    (comfy / "extra_model_paths.yaml").write_text(
        "# ComfyUI's format\nshared:\n    base_path: ../shared_models\n    is_default: false\n"
        "    loras: |\n        my_loras\n        more_loras\n    model_patches: patches  # trailing comment\n")
    shutil.copytree(p["tokenizer_clip"], comfy / "comfy" / "sd1_tokenizer")
    shutil.copytree(p["tokenizer_t5"], comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    return comfy


def test_comfy_models_folder_with_extra_model_paths(tiny_models, tmp_path, pictures, capsys):
    comfy = _comfy_install(tmp_path, tiny_models)
    code, out, err = run(["--comfy-models", comfy / "models", "--prompt", "a cat", "--style", pictures["style"],
                          "--width", 32, "--height", 32, "--steps", 1, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "extra_model_paths.yaml" in err
    assert "uso_lora: " + str(tmp_path / "shared_models" / "my_loras") in err
    params = png_info.read_parameters(str(tmp_path / "out" / "a-cat_0.png"))
    assert params["models"]["t5"] == "t5xxl_fp16.safetensors" and params["models"]["uso_lora"].startswith("uso-flux1")


def test_model_file_resolution_rules(tiny_models, tmp_path, monkeypatch):
    from nodes.files import model_paths as mp

    monkeypatch.setenv("PWD", str(tmp_path))  # not run from a pack linked into a ComfyUI

    comfy = _comfy_install(tmp_path, tiny_models)
    resolved = api.resolve_files(comfy_models=str(comfy / "models"))
    f = resolved.files
    assert f.transformer.endswith("flux1-dev.safetensors") and f.t5.endswith("t5xxl_fp16.safetensors")
    assert f.uso_lora.endswith("uso-flux1-dit-lora-v1.safetensors") and f.projector.endswith(".safetensors")
    assert set(resolved.comfy_tokenizer_dirs) == {"clip_l", "t5"}

    # The fixture's folder: several files per slot; an all-in-one checkpoint fills VAE/T5/CLIP itself.
    models = str(tiny_models.models_dir)
    aio = api.resolve_files(comfy_models=models, transformer="checkpoints/flux1-dev-fp8.safetensors")
    assert aio.files.transformer.endswith("checkpoints/flux1-dev-fp8.safetensors".replace("/", os.sep))
    assert (aio.files.vae, aio.files.t5, aio.files.clip_l) == (None, None, None)
    named = api.resolve_files(comfy_models=models, t5="t5xxl_fp8_e4m3fn.safetensors",
                              uso_lora="uso_flux_v1.0/dit_lora.safetensors")
    assert named.files.t5.endswith("t5xxl_fp8_e4m3fn.safetensors") and named.files.uso_lora.endswith("dit_lora.safetensors")
    diffusers = api.resolve_files(comfy_models=models, diffusers=str(tiny_models.paths["diffusers_dir"]))
    assert diffusers.files.transformer == str(tiny_models.paths["diffusers_dir"]) and diffusers.files.vae is None

    # No default name: the problem lists what is there and the flag to choose with.
    lonely = tmp_path / "lonely" / "models"
    (lonely / "loras").mkdir(parents=True)
    os.symlink(tiny_models.paths["lora_comfy"], lonely / "loras" / "renamed.safetensors")
    with pytest.raises(mp.ModelPathError) as exc:
        api.resolve_files(comfy_models=str(lonely))
    text = str(exc.value)
    assert "uso_lora: no file found" in text and "found renamed.safetensors" in text and "--uso-lora NAME" in text
    assert "transformer: no file found" in text and "huggingface.co" in text
    assert "vae:" not in text  # unknown until the transformer is known (it may be an all-in-one file)
    with pytest.raises(mp.ModelPathError) as exc:
        api.resolve_files()
    assert "--comfy-models DIR" in str(exc.value)


def test_model_file_hints_name_both_transformer_defaults_and_an_empty_models_folder(tmp_path):
    from nodes.files import model_paths as mp

    with pytest.raises(mp.ModelPathError) as exc:
        api.resolve_files()
    nothing_given = str(exc.value)
    assert "diffusion_models/flux1-dev.safetensors or checkpoints/flux1-dev-fp8.safetensors" in nothing_given
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(mp.ModelPathError) as exc:
        api.resolve_files(comfy_models=str(empty))
    text = str(exc.value)
    # The folder was given: the message says what is wrong with it, not "pass --comfy-models".
    assert "pass --comfy-models" not in text and "--comfy-models DIR" not in text
    assert f"transformer: no file found: {empty} holds none of ComfyUI's model folders" in text
    assert "point --comfy-models at ComfyUI's 'models' folder" in text and "or pass --transformer PATH" in text
    (empty / "diffusion_models").mkdir()
    with pytest.raises(mp.ModelPathError) as exc:
        api.resolve_files(comfy_models=str(empty))
    assert "flux1-dev-fp8.safetensors from https://huggingface.co/Comfy-Org/flux1-dev into checkpoints/" in str(exc.value)


def test_extra_model_paths_parser_matches_yaml(tmp_path):
    from nodes.files import model_paths as mp

    text = ("comfyui:\n     base_path: path/to/comfyui/\n     # is_default: true\n"
            "     checkpoints: models/checkpoints/\n     diffusion_models: |\n                  models/diffusion_models\n"
            "                  models/unet\n\n     loras: 'models/loras'  # note\n"
            "a111:\n    base_path: /abs/sd\n    unet: models/Unet\n    clip: |\n         models/CLIP\n")
    yaml = pytest.importorskip("yaml")
    assert mp.parse_simple_yaml(text) == yaml.safe_load(text)
    path = tmp_path / "extra_model_paths.yaml"
    path.write_text(text)
    folders = mp.read_extra_model_paths(str(path))
    base = str(tmp_path / "path" / "to" / "comfyui")
    assert folders["diffusion_models"] == [os.path.join(base, "models", "diffusion_models"),
                                           os.path.join(base, "models", "unet"), os.path.normpath("/abs/sd/models/Unet")]
    assert folders["text_encoders"] == [os.path.normpath("/abs/sd/models/CLIP")]
    assert folders["loras"] == [os.path.join(base, "models", "loras")]


# -- remote ------------------------------------------------------------------------------------------

@pytest.fixture
def no_remote_env(monkeypatch):
    from remote_helpers import ENV_NAMES

    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setattr(api.RemoteUSO, "POLL_INTERVAL_S", 0.02)
    monkeypatch.setattr(api.RemoteUSO, "BACKOFF_BASE_S", 0.01)


def test_provider_fal_against_the_fake_server(tmp_path, pictures, capsys, monkeypatch, no_remote_env):
    from remote_helpers import fal_server

    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"prompt": "a fox", "subject": "pictures/subject.png", "seed": 42,
                                    "negative_prompt": "blur", "batch_size": 2}) + "\n" +
                        json.dumps({"prompt": "rejected", "styles": ["pictures/style.jpg"]}) + "\n")
    error = (422, {"detail": [{"loc": ["body", "prompt"], "msg": "nope", "type": "value_error"}]})
    with fal_server(monkeypatch) as fal:
        code, out, err = run(["--provider", "fal", "--manifest", manifest, "--out", tmp_path / "out",
                              "--width", 256, "--height", 256], capsys)
        first = fal.calls("POST")[0].json
        assert code == 0, out + err
        fal.submit_errors = [error]
        code2, out2, err2 = run(["--provider", "fal", "--manifest", manifest, "--out", tmp_path / "out",
                                 "--width", 256, "--height", 256, "--overwrite"], capsys)
        key = fal.key
    assert first["negative_prompt"] == "blur" and first["seed"] == 42 and first["num_images"] == 2
    assert first["num_inference_steps"] == 28 and first["image_size"] == {"width": 256, "height": 256}
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["0001_a-fox_42_1.png", "0001_a-fox_42_2.png", "0002_rejected_0.png"]
    params = png_info.read_parameters(str(tmp_path / "out" / "0001_a-fox_42_2.png"))
    assert params["backend"] == "fal" and params["seed"] == 42 and params["request_id"]
    assert params["negative_prompt"] == "blur"
    assert code2 == 1 and "FAILED job 1 (jobs.jsonl line 1)" in out2 and "nope" in out2
    for text in (out, err, out2, err2, *(Image.open(p).text["parameters"] + Image.open(p).text["uso"]
                                        for p in (tmp_path / "out").iterdir())):
        assert key not in text and key.split(":")[1] not in text


def test_provider_without_a_key_stops_before_any_request(tmp_path, pictures, capsys, no_remote_env, monkeypatch):
    from fake_remote_servers import FakeAiml

    with FakeAiml() as aiml:
        monkeypatch.setenv("USO_AIML_URL", aiml.url)
        code, out, err = run(["--provider", "aiml", "--prompt", "x", "--subject", pictures["subject"],
                              "--out", tmp_path / "out"], capsys)
        assert aiml.requests == []
    assert code == 2 and "AIML_API_KEY" in err
    code, _, err = run(["--provider", "aiml", "--prompt", "x", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "need at least one image" in err
    code, _, err = run(["--provider", "fal", "--subject", pictures["subject"], "--style-crop", "center"], capsys)
    assert code == 2 and "style_crop is a local setting" in err


# -- runner details ----------------------------------------------------------------------------------

def test_cancel_marks_the_rest_not_run(tmp_path):
    tiny = Backend(tiny=True)

    class CancelledUSO:
        backend = tiny
        calls = 0

        def generate(self, **kwargs):
            CancelledUSO.calls += 1
            raise api.Cancelled("cancelled")

    jobs = [manifest.job_from_values({"prompt": f"p{i}"}, tiny, job_defaults(tiny)) for i in range(3)]
    jobs = [manifest.Job(**{**j.__dict__, "index": i + 1}) for i, j in enumerate(jobs)]
    outcomes = batch.run_jobs(jobs, tiny, CancelledUSO, str(tmp_path))
    assert [o.status for o in outcomes] == ["cancelled", "not run", "not run"] and CancelledUSO.calls == 1
    assert "1 cancelled, 2 not run" in batch.summary(outcomes, 1.0, str(tmp_path))


def test_png_metadata_never_holds_a_key(tmp_path):
    path = tmp_path / "x.png"
    png_info.save_png(Image.new("RGB", (8, 8)), str(path),
                      {"prompt": "p", "api_key": "SECRET1", "nested": {"FAL_KEY": "SECRET2", "ok": 1},
                       "Authorization": "Key SECRET3"})
    with Image.open(path) as img:
        blob = json.dumps(img.text)
    assert "SECRET" not in blob
    assert png_info.read_parameters(str(path)) == {"prompt": "p", "nested": {"ok": 1}}
    assert not list(tmp_path.glob("*.part"))


def test_readme_python_example_runs_as_a_script_saved_elsewhere(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- api-example -->", 1)[1].split("<!-- /api-example -->", 1)[0]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    placeholder = '"~/ComfyUI/custom_nodes/comfyui-uso"'
    assert placeholder in code  # the one line a user changes: where the pack is
    script = tmp_path / "elsewhere" / "fox.py"
    script.parent.mkdir()
    script.write_text(code.replace(placeholder, repr(str(ROOT))))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[7, 8]" in proc.stdout and "(64, 64)" in proc.stdout
    assert png_info.read_parameters(str(tmp_path / "out" / "fox_2.png"))["seed"] == 8
    # Without that line it is the error users met.
    script.write_text(code.replace("sys.path.insert", "(lambda *a: None)"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "No module named 'nodes'" in proc.stderr


def test_readme_shows_the_commands():
    text = (ROOT / "README.md").read_text()
    # Users get the pack, not this project's specs: the README points at nothing under shared/.
    assert "shared/specs" not in text and "performance.md" not in text
    assert "python -m nodes.cli --tiny --prompt" in text
    usage = cli.build_parser().format_help()
    for flag in ("--manifest", "--comfy-models", "--extra-model-paths", "--diffusers", "--tokenizers", "--provider",
                 "--overwrite", "--tiny", "--summary-json"):
        assert flag in usage and flag in text


def test_the_comfyui_installation_around_the_pack_is_the_default(tmp_path, monkeypatch):
    from nodes.files import model_paths as mp

    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    (comfy / "custom_nodes").mkdir()
    (comfy / "extra_model_paths.yaml").write_text("x:\n    loras: /somewhere/loras\n")
    assert mp.enclosing_comfyui(str(comfy / "custom_nodes" / "pack" / "nodes" / "cli" / "model_paths.py")) == str(comfy)
    assert mp.enclosing_comfyui(str(tmp_path / "pack" / "nodes" / "cli" / "model_paths.py")) is None
    # A pack linked into custom_nodes, run from its folder: found through $PWD (getcwd resolves the link).
    os.symlink(ROOT, comfy / "custom_nodes" / "comfyui-uso")
    monkeypatch.setenv("PWD", str(comfy / "custom_nodes" / "comfyui-uso"))
    assert mp.enclosing_comfyui() == str(comfy)
    sources, notes = mp.with_installation_defaults(mp.ModelSources())
    assert sources.comfy_models == [str(comfy / "models")]
    assert sources.extra_model_paths == [str(comfy / "extra_model_paths.yaml")]
    explicit, _ = mp.with_installation_defaults(mp.ModelSources(explicit={"transformer": "x.safetensors"}))
    assert explicit.comfy_models == [str(comfy / "models")]  # explicit files win, the rest from ComfyUI
    other, _ = mp.with_installation_defaults(mp.ModelSources(comfy_models=[str(tmp_path / "models")]))
    assert other.comfy_models == [str(tmp_path / "models")] and other.extra_model_paths == []
