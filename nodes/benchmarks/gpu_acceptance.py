"""GPU acceptance run (a script, not a test): every precision x memory mode on one card.

    python -m nodes.benchmarks.gpu_acceptance                 # on a CUDA machine: full size, 1024², 28 steps
    python -m nodes.benchmarks.gpu_acceptance --files-dir /models   # real files instead of random weights
    python -m nodes.benchmarks.gpu_acceptance --size tiny --width 64 --height 48 --steps 3   # CPU smoke run

Builds the USO models once (random weights in the real architecture, nodes/engine/random_models.py,
or the real files when given), then for each row of the matrix makes a fresh pipeline over a copy
of them and generates one image (1 style + 1 subject) after a warm-up at the same size. Per row:
seconds per step, end-to-end seconds, peak VRAM (`torch.cuda.max_memory_allocated`) and the
device's own figure (`torch.cuda.mem_get_info`, sampled after every step: what other processes
would see as used), peak host RAM (RSS high-water mark), pinned host bytes (the caching host
allocator's own count, as it rounds blocks), and the largest difference of the image to the
reference row of the same precision (memory modes must agree to --tolerance; compile to
--compile-tolerance, mean). Compile rows give the speed-up over the same precision without it.

The rows run in order of importance and the run stops itself before --budget-s (default 540 s,
so one H100 finishes within 10 minutes with the build): a row whose estimate does not fit is
skipped and listed. Writes acceptance.json and acceptance.md to --out.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time

import torch

from ..engine import EngineOptions, USOPipeline, memory, speed
from ..engine.model_set import ModelFiles, load_models
from ..engine.random_models import build_random_models
from .speed import PROMPT, WARMUP_PROMPT, Peaks, _image, _sync

_GIB = 1024 ** 3

#: (precision, memory mode, compile), most important first: what users run by default, then the
#: offload modes small cards need, then compile (the slowest rows: a cold compile each).
MATRIX = (("bf16", "gpu", False), ("fp8_e4m3fn", "gpu", False), ("bf16", "model_offload", False),
          ("fp8_e4m3fn", "model_offload", False), ("bf16", "group_offload", False),
          ("fp8_e4m3fn", "group_offload", False), ("bf16", "gpu", True), ("fp8_e4m3fn", "gpu", True))
#: Row time relative to the plain row of its precision, for the budget (compile adds its build).
_COST = {"gpu": 1.0, "model_offload": 1.3, "group_offload": 3.0}
_COMPILE_COST = 2.5


def _row_name(precision: str, mode: str, compiled: bool) -> str:
    return f"{precision} {mode}{' compile' if compiled else ''}"


def _pinned_bytes() -> int | None:
    """Bytes the caching host allocator holds page-locked now (its blocks as rounded), or None
    without CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        stats = torch.cuda.host_memory_stats()
    except (RuntimeError, AttributeError):
        return None
    for key in ("reserved_bytes.all.current", "allocated_bytes.all.current"):
        if key in stats:
            return int(stats[key])
    return None


class DeviceUse:
    """The device's own figure of used memory (all processes, the driver's view), sampled."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def sample(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak or 0, total - free)


def _models_factory(args, device):
    """A function giving a fresh, unplaced model set for one row."""
    if args.files_dir or args.transformer:
        files = _model_files(args)
        return lambda precision: load_models(files, memory.resolve_precision(precision, device), {}, None)
    master = build_random_models(args.size, dtype=torch.bfloat16)
    return lambda _precision: copy.deepcopy(master)


def _model_files(args) -> ModelFiles:
    root = args.files_dir or ""

    def path(value, default):
        chosen = value or (os.path.join(root, default) if root else None)
        if chosen is None or not os.path.exists(chosen):
            raise SystemExit(f"model file not found: {chosen or default} (give --files-dir or the file's option)")
        return chosen

    return ModelFiles(transformer=path(args.transformer, "flux1-dev.safetensors"),
                      siglip=path(args.siglip, "siglip-so400m-patch14-384"),
                      uso_lora=path(args.uso_lora, "uso-flux1-dit-lora-v1.safetensors"),
                      projector=path(args.projector, "uso-flux1-projector-v1.safetensors"),
                      vae=path(args.vae, "ae.safetensors"), t5=path(args.t5, "t5xxl_fp16.safetensors"),
                      clip_l=path(args.clip_l, "clip_l.safetensors"))


def run_row(args, device, make_models, precision: str, mode: str, compiled: bool) -> dict:
    started = time.perf_counter()
    pipe = USOPipeline(make_models(precision), EngineOptions(precision=precision, memory=mode, device=str(device)))
    if compiled:  # last, as speed.apply does, with the chosen backend
        speed.enable_regional_compile(pipe.transformer, device, backend=args.compile_backend)
    style = pipe.encode_style([_image(args.style_size, 100)])
    subject = pipe.encode_subject([_image(args.subject, 200)], long_side=args.subject)
    call = dict(styles=style, subjects=subject, width=args.width, height=args.height, seeds=[0])
    warm = time.perf_counter()
    pipe.generate(WARMUP_PROMPT, steps=2, **call)      # kernels, cuBLAS heuristics, compiled graphs
    _sync(device)
    warmup_s = time.perf_counter() - warm

    peaks, device_use, marks = Peaks(device).start(), DeviceUse(device), []

    def on_step(_done, _total):
        _sync(device)
        marks.append(time.perf_counter())
        device_use.sample()

    t0 = time.perf_counter()
    result = pipe.generate(PROMPT, steps=args.steps, on_step=on_step, **call)
    _sync(device)
    e2e = time.perf_counter() - t0
    device_use.sample()
    peaks.stop()
    steps_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
    row = {"precision": precision, "memory": pipe.memory_plan.mode, "compile": compiled,
           "s_per_step": sum(steps_s) / len(steps_s) if steps_s else None, "e2e_s": e2e, "warmup_s": warmup_s,
           "peak_vram_allocated": peaks.vram if device.type == "cuda" else None,
           "peak_vram_device": device_use.peak, "peak_host_ram": peaks.ram,
           "pinned_bytes": _pinned_bytes(), "pin_budget_bytes": pipe.memory_plan.pin_budget_bytes,
           "transformer_gib": memory.module_bytes(pipe.transformer) / _GIB}
    images = result.images.float()
    del pipe, result
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()   # the next compile row starts cold too
    row["row_s"] = time.perf_counter() - started
    return row, images


def _estimate(rows: list[dict], precision: str, mode: str, compiled: bool) -> float | None:
    """Seconds a row will take, from the plain row of its precision (or any row) already run."""
    same = [r["row_s"] for r in rows if r["precision"] == precision and r["memory"] == "gpu" and not r["compile"]]
    base = same[0] if same else (max(r["row_s"] for r in rows) if rows else None)
    if base is None:
        return None
    return base * _COST.get(mode, 1.0) * (_COMPILE_COST if compiled else 1.0)


def compare(rows: list[dict], images: dict, args) -> float | None:
    """Each row's image against the first row of its precision (its reference), and each compile
    row's speed-up over the same precision and memory mode without compile. Returns the mean
    difference of the fp8 image to the bf16 one (both resident), where both ran."""
    reference: dict[str, str] = {}
    for row in rows:
        reference.setdefault(row["precision"], row["name"])
        ref = images[reference[row["precision"]]]
        diff = (images[row["name"]] - ref).abs()
        row["reference"] = reference[row["precision"]]
        row["image_max_abs_diff"] = diff.max().item()
        row["image_mean_abs_diff"] = diff.mean().item()
        row["agrees"] = (row["image_mean_abs_diff"] <= args.compile_tolerance if row["compile"]
                         else row["image_max_abs_diff"] <= args.tolerance)
        if row["compile"]:
            plain = next((r for r in rows if r["precision"] == row["precision"] and r["memory"] == row["memory"]
                          and not r["compile"]), None)
            row["compile_speedup"] = plain["s_per_step"] / row["s_per_step"] if plain and row["s_per_step"] else None
    bf16, fp8 = images.get("bf16 gpu"), images.get("fp8_e4m3fn gpu")
    return None if bf16 is None or fp8 is None else (fp8 - bf16).abs().mean().item()


def markdown(report: dict) -> str:
    def gib(n):
        return "-" if n is None else f"{n / _GIB:.2f}"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"# GPU acceptance: {report['device_name']}",
             "",
             f"{report['size']} models ({report['weights']}), {report['width']}x{report['height']}, "
             f"{report['steps']} steps, 1 style + 1 subject; torch {report['torch']}; "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
             "",
             "| precision | memory | compile | s/step | e2e s | VRAM peak GiB (allocated / device) | host RAM peak GiB "
             "| pinned GiB | image max / mean abs diff (vs) | agrees | compile speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['precision']} | {r['memory']} | {'yes' if r['compile'] else 'no'} | {num(r['s_per_step'], '.3f')} "
            f"| {r['e2e_s']:.2f} | {gib(r['peak_vram_allocated'])} / {gib(r['peak_vram_device'])} "
            f"| {gib(r['peak_host_ram'])} | {gib(r['pinned_bytes'])} "
            f"| {r['image_max_abs_diff']:.4f} / {r['image_mean_abs_diff']:.5f} ({r['reference']}) "
            f"| {'yes' if r['agrees'] else 'NO'} | {num(r.get('compile_speedup'), '.2f')} |")
    if report["fp8_vs_bf16_mean_abs_diff"] is not None:
        lines += ["", f"fp8 vs bf16 image, mean abs diff: {report['fp8_vs_bf16_mean_abs_diff']:.4f} (fp8 storage "
                      "rounds the weights; not expected to be 0)."]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['name']} ({s['why']})" for s in report["skipped"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m nodes.benchmarks.gpu_acceptance",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="full" if cuda else "medium", choices=("tiny", "medium", "full"))
    p.add_argument("--width", type=int, default=1024 if cuda else 256)
    p.add_argument("--height", type=int, default=1024 if cuda else 256)
    p.add_argument("--steps", type=int, default=28 if cuda else 4)
    p.add_argument("--subject", type=int, default=512 if cuda else 128, help="subject image side in px")
    p.add_argument("--style-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop before this many seconds, building included")
    p.add_argument("--rows", default=None,
                   help="comma-separated row names to run (e.g. 'bf16 gpu,fp8_e4m3fn gpu compile'); default all")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile rows")
    p.add_argument("--tolerance", type=float, default=1 / 255,
                   help="largest image difference (0..1) accepted between memory modes of one precision")
    p.add_argument("--compile-tolerance", type=float, default=0.01,
                   help="largest mean image difference accepted for compile against no compile")
    p.add_argument("--out", default="gpu_acceptance", help="folder for acceptance.json and acceptance.md")
    p.add_argument("--files-dir", default=None, help="real model files in this folder (default names)")
    for name in ("transformer", "t5", "clip-l", "vae", "siglip", "uso-lora", "projector"):
        p.add_argument(f"--{name}", default=None, help=f"the {name} file (real weights)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (seconds per step are measured between steps)")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    started = time.perf_counter()
    device = memory.resolve_device(args.device)
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else None
    matrix = [m for m in MATRIX if wanted is None or _row_name(*m) in wanted]
    print(f"[acceptance] {args.size} on {device}: building the models ...", flush=True)
    make_models = _models_factory(args, device)
    rows, images, skipped = [], {}, []
    for precision, mode, compiled in matrix:
        name = _row_name(precision, mode, compiled)
        elapsed = time.perf_counter() - started
        estimate = _estimate(rows, precision, mode, compiled)
        if elapsed >= args.budget_s or (estimate is not None and elapsed + estimate > args.budget_s):
            skipped.append({"name": name, "why": f"time budget: about {estimate or 0:.0f} s needed, "
                                                 f"{max(0.0, args.budget_s - elapsed):.0f} s left"})
            print(f"[acceptance] skip {name}: over the time budget", flush=True)
            continue
        print(f"[acceptance] {name} ...", flush=True)
        try:
            row, image = run_row(args, device, make_models, precision, mode, compiled)
        except torch.OutOfMemoryError as exc:
            skipped.append({"name": name, "why": f"out of memory: {str(exc).splitlines()[0][:120]}"})
            gc.collect()
            torch.cuda.empty_cache()
            continue
        row["name"] = name
        rows.append(row)
        images[name] = image
        print(f"[acceptance]   {row['s_per_step'] or 0:.3f} s/step, {row['e2e_s']:.2f} s end to end", flush=True)
    fp8_vs_bf16 = compare(rows, images, args)
    report = {"device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "size": args.size,
              "weights": "real files" if (args.files_dir or args.transformer) else "random weights",
              "width": args.width, "height": args.height, "steps": args.steps, "budget_s": args.budget_s,
              "elapsed_s": time.perf_counter() - started, "rows": rows, "skipped": skipped,
              "fp8_vs_bf16_mean_abs_diff": fp8_vs_bf16, "all_agree": all(r["agrees"] for r in rows)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "acceptance.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(args.out, "acceptance.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if report["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
