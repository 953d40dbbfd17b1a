"""Speed options (nodes/engine/speed.py) on tiny random-weight models: each is off or the safe
default unless asked for, fails clearly when it cannot run here, and changes the result only as
stated:
- attention "sdpa_math" vs "native" (fp32): same math, another kernel -> within 1e-5 relative;
- regional compile (checked with torch.compile's "eager" backend: the same graph capture and
  guards, no C++ build) -> identical;
- step cache threshold 0 -> identical and no hooks; threshold > 0 -> fewer full steps, a bounded
  change, and still deterministic (fresh cache per image and per run).
"""
from __future__ import annotations

import pytest
import random_pipelines
import torch

from nodes.engine import EngineOptions, USOPipeline, speed
from nodes.engine.errors import InputError
from nodes.engine.random_models import build_random_models

W, H, STEPS = 64, 48, 6


def make_pipeline(**options) -> USOPipeline:
    return random_pipelines.make_pipeline(torch.float32, **options)


def run(pipe, seeds=(3,), steps=STEPS):
    return random_pipelines.run(pipe, seeds, steps)


@pytest.fixture(scope="module")
def plain():
    pipe = make_pipeline()
    return pipe, run(pipe, seeds=(3, 4))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_defaults_are_native_attention_no_compile_no_cache(plain):
    pipe, _ = plain
    assert EngineOptions().attention == "native" and EngineOptions().compile is False
    assert EngineOptions().step_cache == 0.0
    assert pipe.speed == {"attention": "native", "step_cache": 0.0, "compile": False}
    assert speed.attention_backend_of(pipe.transformer) == "native"
    assert not speed.step_cache_enabled(pipe.transformer)


# -- attention ------------------------------------------------------------------------------

def test_another_attention_kernel_gives_the_same_image_and_leaves_the_global_default(plain):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry.get_active_backend()[0]
    pipe = make_pipeline(attention="sdpa_math")
    assert speed.attention_backend_of(pipe.transformer) == "_native_math"
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
    assert rel(run(pipe), plain[1][:1]) < 1e-5


@pytest.mark.parametrize("name,message", [
    ("fastest", "not an attention backend"),
    ("flash_hub", "downloads its kernels"),
    ("flash", "needs an NVIDIA GPU"),
    ("sage", "needs an NVIDIA GPU"),
])
def test_unusable_attention_backends_fail_at_load_with_a_clear_message(name, message):
    with pytest.raises(InputError, match=message):
        make_pipeline(attention=name)


@pytest.mark.parametrize("name,package", [("sage", "sageattention"), ("xformers", "xformers"),
                                          ("flash", "flash-attn")])
def test_a_missing_backend_package_is_named(name, package):
    import importlib.util

    if importlib.util.find_spec({"flash": "flash_attn"}.get(name, name.replace("sage", "sageattention"))):
        pytest.skip(f"{package} is installed here")
    models = build_random_models("tiny")
    # A CUDA device is only named: the package check comes before anything touches the device.
    with pytest.raises(InputError, match=package):
        speed.set_attention(models.transformer, name, torch.device("cuda"), torch.bfloat16)


# -- regional compile -----------------------------------------------------------------------

def test_regional_compile_compiles_each_repeated_block_and_keeps_the_result(plain, monkeypatch):
    original = speed.enable_regional_compile
    counts = []

    def eager_compile(transformer, device, **kwargs):
        counts.append(original(transformer, device, backend="eager", **kwargs))
        return counts[-1]

    monkeypatch.setattr(speed, "enable_regional_compile", eager_compile)
    pipe = make_pipeline(compile=True)
    assert pipe.speed["compile"] is True and counts == [4]  # 2 double + 2 single blocks
    assert torch.equal(run(pipe), plain[1][:1])


def test_compile_needs_a_compiler(monkeypatch):
    monkeypatch.setattr(speed.shutil, "which", lambda _name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in speed.compile_available(torch.device("cpu"))
    with pytest.raises(InputError, match="compile"):
        make_pipeline(compile=True)
    monkeypatch.setattr(speed.importlib.util, "find_spec", lambda _name: None)
    assert "triton" in speed.compile_available(torch.device("cuda"))


# -- step cache -----------------------------------------------------------------------------

def test_step_cache_skips_steps_within_a_bounded_change_and_stays_deterministic(plain):
    pipe = make_pipeline(step_cache=1.0)
    assert speed.step_cache_enabled(pipe.transformer)
    with speed.StepCounter(pipe.transformer) as counter:
        batch = run(pipe, seeds=(3, 4))
    assert counter.calls < 2 * STEPS                     # some steps reused the cached residual
    assert counter.calls >= 2                            # the first step of each image always runs
    change = ((batch - plain[1]).abs().mean() / plain[1].std()).item()
    assert 0 < change < 0.5
    # image 1 of the batch == a single run with its seed; a second run repeats the first.
    assert torch.equal(run(pipe, seeds=(4,)), batch[1:])
    assert torch.equal(run(pipe, seeds=(3, 4)), batch)


def test_step_cache_off_installs_nothing(plain):
    pipe = make_pipeline(step_cache=0.0)
    assert not speed.step_cache_enabled(pipe.transformer)
    with speed.StepCounter(pipe.transformer) as counter:
        run(pipe, seeds=(3,))
    assert counter.calls == STEPS


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "fast"])
def test_step_cache_threshold_is_checked(bad):
    with pytest.raises(InputError, match="step_cache"):
        speed.check_step_cache(bad)


def test_compile_flag_must_be_a_bool():
    with pytest.raises(InputError, match="compile"):
        speed.apply(build_random_models("tiny").transformer, speed.SpeedSettings(compile="yes"),
                    torch.device("cpu"), torch.float32)


def test_benchmark_script_runs_at_tiny_size(capsys, tmp_path):
    """The benchmark is a script, not a test; this only keeps it working (tiny, 2 steps, small)."""
    import json

    from nodes.benchmarks import speed as benchmark

    out = tmp_path / "figures.json"
    assert benchmark.main(["--size", "tiny", "--steps", "2", "--width", "128", "--height", "96",
                           "--subject", "64", "--style-size", "64", "--baseline-iters", "1",
                           "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ratio USO / baseline" in text and "TFLOP/step" in text
    figures = json.loads(out.read_text())
    assert figures["tokens"] == {"noise": 48, "subject": 16, "image": 64, "style": 24, "text": 536,
                                 "total": 600}
    assert figures["uso"]["ms_per_step"] > 0 and figures["baseline"]["ms_per_step"] > 0


def test_gpu_acceptance_script_runs_on_the_cpu_and_writes_its_tables(tmp_path, capsys):
    """The GPU acceptance script at tiny size on the CPU (four rows of its matrix, compile with the
    "eager" backend, no C++ build): JSON and Markdown hold every figure, memory modes give the
    same image, compile gives the same image with a speed-up figure."""
    import json

    from nodes.benchmarks import gpu_acceptance

    rows = "bf16 gpu,bf16 group_offload,fp8_e4m3fn gpu,fp8_e4m3fn gpu compile"
    assert gpu_acceptance.main(["--size", "tiny", "--width", "64", "--height", "48", "--steps", "3",
                                "--subject", "64", "--style-size", "64", "--compile-backend", "eager",
                                "--rows", rows, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "acceptance.json").read_text())
    # In the matrix's order of importance, whatever the order asked for.
    assert [r["name"] for r in report["rows"]] == ["bf16 gpu", "fp8_e4m3fn gpu", "bf16 group_offload",
                                                   "fp8_e4m3fn gpu compile"] and report["skipped"] == []
    for row in report["rows"]:
        for field in ("s_per_step", "e2e_s", "peak_vram_allocated", "peak_vram_device", "peak_host_ram",
                      "pinned_bytes", "image_max_abs_diff", "image_mean_abs_diff", "agrees"):
            assert field in row, field
        assert row["s_per_step"] > 0 and row["e2e_s"] > 0 and row["peak_host_ram"] > 0
        assert row["agrees"] and row["image_max_abs_diff"] == 0.0   # same image in every mode
    assert report["rows"][3]["compile_speedup"] > 0 and report["all_agree"]
    assert report["fp8_vs_bf16_mean_abs_diff"] > 0
    table = (tmp_path / "acceptance.md").read_text()
    assert "| fp8_e4m3fn | gpu | yes |" in table and table.count("\n| bf16 |") == 2


def test_gpu_acceptance_stops_at_its_time_budget_and_lists_what_it_skipped(tmp_path, capsys):
    import json

    from nodes.benchmarks import gpu_acceptance

    assert gpu_acceptance.main(["--size", "tiny", "--width", "64", "--height", "48", "--steps", "2",
                                "--budget-s", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "acceptance.json").read_text())
    assert report["rows"] == [] and len(report["skipped"]) == len(gpu_acceptance.MATRIX)
    assert all("time budget" in s["why"] for s in report["skipped"])
    assert "Skipped: bf16 gpu (time budget" in (tmp_path / "acceptance.md").read_text()
