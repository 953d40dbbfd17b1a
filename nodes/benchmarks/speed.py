"""USO speed and memory benchmark (a script, not a test).

    python -m nodes.benchmarks.speed --size medium            # CPU: about 2-3 minutes on 2 cores
    python -m nodes.benchmarks.speed --size full --precision bf16   # one GPU; fp8_e4m3fn, --step-cache 0.1 ...

Builds the USO models with random weights in the real architecture (tiny / medium / full, see
nodes/engine/random_models.py), then in one run measures:

- baseline: a plain diffusers FluxTransformer2DModel (same config and dtype, no LoRA, no hooks)
  forward over the same token counts as USO (noise + subject image tokens, style + T5 text tokens);
- USO: the whole USOPipeline end to end (prompt, style and subject encoding, N steps, VAE decode).

It prints ms/step for both and their ratio, USO's end-to-end seconds, peak RAM (process RSS
high-water mark) and peak VRAM, the TFLOP per step of the model size measured (`flop_per_step`:
every linear layer's multiply-adds per token, plus attention), and the achieved TFLOP/s.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from ..engine import EngineOptions, USOPipeline, fp8, memory, positions, speed
from ..engine.limits import GUIDANCE
from ..engine.architecture import official
from ..engine.random_models import SIZES, build_random_models

_GIB = 1024 ** 3
PROMPT = "a portrait photo of a woman with a red hat in watercolor style"
WARMUP_PROMPT = "a sketch of a dog in the city at night"
#: Targets: H100, full size, 1024², 28 steps, 1 subject + 1 style. For scale: diffusers' FLUX.1-dev runs
#: 1024² x 28 steps in 6.7 s bf16 eager and 4.5 s compiled on an H100 (PyTorch blog "torch.compile and
#: diffusers"); AIML's hosted USO reports 10.55 s of inference for one 1024² image (its API docs' example).
TARGETS = {"cpu_medium_ratio": 1.10, "h100_e2e_s": {"bf16": 4.0, "fp8_e4m3fn": 2.5, "step_cache": 1.6},
           "h100_vram_gb": {"bf16": 24, "fp8_e4m3fn": 14, "group_offload": 8}, "hosted_e2e_s": 10.55}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource  # Unix only
    except ImportError:  # Windows: the peak working set, through psutil (a requirement)
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Peaks:
    """Peak RAM and VRAM of one phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ram = self.vram = 0
        self.rss_resettable = False

    def start(self) -> "Peaks":
        gc.collect()
        self.rss_resettable = _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def vram_now_peak(self, reset: bool = False) -> int:
        if self.device.type != "cuda":
            return 0
        peak = torch.cuda.max_memory_allocated(self.device)
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def stop(self) -> "Peaks":
        self.ram = _peak_rss_bytes()
        self.vram = max(self.vram, self.vram_now_peak())
        return self


def flop_per_step(cfg: dict, tokens: int) -> tuple[float, float]:
    """(linear, attention) FLOP of one transformer forward over `tokens` joint tokens, with this
    model's width h and depth: per token, 2 FLOP per multiply-add of every linear layer (a double
    block: qkv, proj and the 4x MLP of one stream; a single block: linear1 and linear2), and per
    block 4 N² h for the two attention matmuls (QK^T and PV). At full size one double or single
    block is 113.2 M multiply-adds per token."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = int(h * 4)
    d, s = cfg["num_layers"], cfg["num_single_layers"]
    per_token = 2 * (d * (h * 3 * h + h * h + 2 * h * mlp) + s * (h * (3 * h + mlp) + (h + mlp) * h))
    return per_token * tokens, (d + s) * 4 * tokens * tokens * h


def _image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _flux_config(size: str) -> dict:
    cfg = {**official("flux1-dev-transformer"), **SIZES[size]["flux"]}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return cfg


@torch.no_grad()
def _random_init_(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) drawn on the module's own device (fast for the full model)."""
    for i, (name, p) in enumerate(module.named_parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed + i)
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])), generator=g)
        elif "norm" in name and name.endswith(("weight", "scale")):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)


def baseline_transformer(size: str, dtype: torch.dtype, device: torch.device):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**_flux_config(size)).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    _random_init_(model, 1234)
    return model


# ---------------------------------------------------------------------------------------------
# The two measurements
# ---------------------------------------------------------------------------------------------

class Baseline:
    """A plain diffusers FluxTransformer2DModel (same config and dtype as USO's, no LoRA, no
    hooks) and inputs with USO's token counts: noise + subject tokens as hidden states, style +
    T5 tokens as encoder hidden states, the same position ids."""

    def __init__(self, args, device, precision, tokens):
        cfg = _flux_config(args.size)
        self.device = device
        self.model = baseline_transformer(args.size, precision.compute, device)
        if args.attention != "native":
            speed.set_attention(self.model, args.attention, device, precision.compute)
        grid = (args.height // 16, args.width // 16)
        subjects = [(args.subject // 16,) * 2] if args.subject else []
        img_ids = torch.cat([positions.grid_ids(*grid), *positions.subject_ids(grid, subjects)]).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        dt = precision.compute
        self.kwargs = dict(
            hidden_states=torch.randn(1, tokens["image"], cfg["in_channels"], generator=g, device=device).to(dt),
            encoder_hidden_states=torch.randn(1, tokens["text"], cfg["joint_attention_dim"], generator=g,
                                              device=device).to(dt),
            pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=device).to(dt),
            timestep=torch.full((1,), 0.5, device=device, dtype=dt),
            guidance=torch.full((1,), GUIDANCE.default, device=device, dtype=dt),
            img_ids=img_ids, txt_ids=torch.zeros(tokens["text"], 3, device=device), return_dict=False)

    @torch.inference_mode()
    def forward(self) -> float:
        t0 = time.perf_counter()
        self.model(**self.kwargs)
        _sync(self.device)
        return time.perf_counter() - t0


def _rss_now() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class USOStep:
    """One USO denoising step exactly as `generate` runs it: the pipeline's own stages (the
    references encoded, the starting noise, the first timestep pair, the transformer placed with
    its step cache, style hook, subject tokens and LoRA) on the encodings of the timed run."""

    def __init__(self, pipe, args, styles, subjects):
        self.pipe = pipe
        self.conditioning = pipe.encode_references(PROMPT, styles, subjects)
        self.latents = pipe.prepare_latents(0, args.width, args.height)
        self.timesteps = pipe.prepare_timesteps(args.steps, args.width, args.height)[:2]  # one step

    def forward(self) -> float:
        t0 = time.perf_counter()
        self.pipe.denoise_latents(self.latents, self.conditioning, self.timesteps, GUIDANCE.default)
        _sync(self.pipe.device)
        return time.perf_counter() - t0


def run_baseline(args, device, precision, tokens, uso_step: USOStep) -> dict:
    """Build the baseline beside the (still loaded) USO pipeline, record its own memory, then
    time baseline forwards alternated with USO steps, so a busy machine slows both alike."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    vram_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ram_before = _rss_now()
    _reset_peak_rss()
    try:
        base = Baseline(args, device, precision, tokens)
        base.forward()                                    # warm-up
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError exists only from torch 2.5
        return {"error": "out of memory beside the USO models (use --memory group_offload or a larger GPU)"}
    own_vram = torch.cuda.max_memory_allocated(device) - vram_before if device.type == "cuda" else 0
    own_ram = max(0, _peak_rss_bytes() - ram_before)
    uso_step.forward()                                    # warm-up (and onload in offload modes)
    base_t, uso_t = [], []
    for _ in range(args.baseline_iters):
        uso_t.append(uso_step.forward())
        base_t.append(base.forward())
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Best of the rounds on each side (like timeit): the least-disturbed figure on a shared machine;
    # the medians go to the JSON.
    base_ms, uso_ms = 1000 * min(base_t), 1000 * min(uso_t)
    return {"ms_per_step": base_ms, "uso_alternated_ms": uso_ms, "iters": len(base_t), "own_ram": own_ram,
            "own_vram": own_vram, "ratio": uso_ms / base_ms, "baseline_times": base_t, "uso_times": uso_t,
            "median_ratio": statistics.median(uso_t) / statistics.median(base_t)}


def run_uso(args, device, precision) -> dict:
    t0 = time.perf_counter()
    build_dtype = precision.compute
    models = build_random_models(args.size, dtype=build_dtype)
    options = EngineOptions(precision=args.precision, memory=args.memory, encoders=args.encoders,
                            device=str(device), attention=args.attention, compile=args.compile,
                            step_cache=args.step_cache, lora_mode=args.lora_mode)
    pipe = USOPipeline(models, options)
    del models
    _sync(device)
    build_s = time.perf_counter() - t0
    style_images = [_image(args.style_size, 100 + i) for i in range(args.styles)]
    subject_images = [_image(args.subject, 200)] if args.subject else []

    encoded = {}

    def generate(prompt, styles, subjects, steps, seed, on_step=None):
        st = encoded["styles"] = pipe.encode_style(styles) if styles else None
        su = encoded["subjects"] = pipe.encode_subject(subjects, long_side=args.subject) if subjects else None
        return pipe.generate(prompt, styles=st, subjects=su, width=args.width, height=args.height,
                             steps=steps, seeds=[seed], on_step=on_step)

    # Warm-up with other inputs, so the timed run encodes its prompt and images for real. On a GPU
    # (and with compile) at the same sizes: kernels, cuBLAS heuristics, compiled graphs. On the CPU a
    # small size warms the code paths; the first timed step is not counted in ms/step anyway.
    t0 = time.perf_counter()
    small = device.type == "cpu" and not args.compile
    w, h = (256, 256) if small else (args.width, args.height)
    sub = min(args.subject, 256) if small else args.subject
    st = pipe.encode_style([_image(args.style_size, 300 + i) for i in range(args.styles)]) if args.styles else None
    su = pipe.encode_subject([_image(sub, 400)], long_side=sub) if sub else None
    pipe.generate(WARMUP_PROMPT, styles=st, subjects=su, width=w, height=h,
                  steps=2 if args.compile or args.step_cache else 1, seeds=[1])
    _sync(device)
    warmup_s = time.perf_counter() - t0

    peaks = Peaks(device).start()
    marks = []
    segment_vram = []

    def on_step(done, total):
        _sync(device)
        marks.append(time.perf_counter())
        if done == 1 or done == total:  # encode + step 1 | steps 2..N
            segment_vram.append(peaks.vram_now_peak(reset=True))

    with speed.StepCounter(pipe.transformer) as counter:
        t0 = time.perf_counter()
        result = generate(PROMPT, style_images, subject_images, args.steps, 0, on_step)
        _sync(device)
        e2e = time.perf_counter() - t0
    decode_vram = peaks.vram_now_peak()
    peaks.stop()
    steps_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
    assert result.images.shape[1:3] == (args.height, args.width)
    out = {"ms_per_step": 1000 * sum(steps_s) / len(steps_s), "e2e_s": e2e,
           "encode_and_first_step_s": marks[0] - t0, "decode_s": t0 + e2e - marks[-1],
           "build_s": build_s, "warmup_s": warmup_s, "peak_ram": peaks.ram,
           "peak_vram": max(segment_vram + [decode_vram]),
           "peak_vram_denoise": segment_vram[-1] if len(segment_vram) > 1 else None,
           "full_steps": counter.calls, "steps": args.steps,
           "memory": pipe.memory_plan.mode, "encoders": pipe.memory_plan.encoders,
           "memory_reason": pipe.memory_plan.reason, "lora_mode": pipe.lora_mode,
           "speed": pipe.speed, "transformer_gib": memory.module_bytes(pipe.transformer) / _GIB,
           "fp8_layers": len(fp8.fp8_layers(pipe.transformer))}
    return out, USOStep(pipe, args, encoded["styles"], encoded["subjects"])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _gib(n):
    return "-" if not n else f"{n / _GIB:.2f}"


def report(args, device, precision, tokens, cfg, base, uso) -> str:
    linear, attention = flop_per_step(cfg, tokens["total"])
    tflop = (linear + attention) / 1e12
    lines = []
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines.append(f"USO benchmark  size={args.size}  device={device.type} ({dev_name})  torch {torch.__version__}")
    lines.append(f"  precision={args.precision} -> compute {str(precision.compute).replace('torch.', '')}"
                 f"{' + fp8 storage' if precision.fp8_storage else ''}; memory={uso['memory']} "
                 f"(encoders {uso['encoders']}: {uso['memory_reason']}); lora={uso['lora_mode']}; "
                 f"attention={uso['speed']['attention']}; compile={'on' if uso['speed']['compile'] else 'off'}; "
                 f"step_cache={uso['speed']['step_cache'] or 'off'}")
    lines.append(f"  output {args.width}x{args.height}, subject {args.subject}² ({args.styles} style image(s)), "
                 f"{args.steps} steps; transformer weights {uso['transformer_gib']:.2f} GiB")
    lines.append(f"  tokens: image {tokens['noise']} + subject {tokens['subject']} = {tokens['image']}; "
                 f"text 512 + style {tokens['style']} = {tokens['text']}; joint N = {tokens['total']}")
    lines.append(f"  FLOP count (flop_per_step, this size): {tflop:.3f} TFLOP/step "
                 f"(linear {linear / 1e12:.3f} + attention {attention / 1e12:.3f}); "
                 f"{args.steps} steps = {tflop * args.steps:.2f} TFLOP")
    lines.append("")
    head = f"  {'':<24}{'ms/step':>10}{'e2e s':>9}{'peak RAM GiB':>14}{'peak VRAM GiB':>15}{'TFLOP/s':>9}"
    lines.append(head)
    lines.append("  " + "-" * (len(head) - 2))

    def tf(ms):
        return f"{tflop / (ms / 1000):.2f}" if ms else "-"

    vram = _gib(uso["peak_vram"])
    if uso.get("peak_vram_denoise"):
        vram = f"{vram} ({_gib(uso['peak_vram_denoise'])})"
    lines.append(f"  {'USO, end to end':<24}{uso['ms_per_step']:>10.1f}{uso['e2e_s']:>9.2f}{_gib(uso['peak_ram']):>14}"
                 f"{vram:>15}{tf(uso['ms_per_step']):>9}")
    if base and "error" in base:
        lines.append(f"  baseline FLUX forward: {base['error']}")
    elif base:
        lines.append(f"  {'USO step (alternated)':<24}{base['uso_alternated_ms']:>10.1f}{'-':>9}{'':>14}{'':>15}"
                     f"{tf(base['uso_alternated_ms']):>9}")
        lines.append(f"  {'baseline FLUX forward':<24}{base['ms_per_step']:>10.1f}{'-':>9}{_gib(base['own_ram']):>14}"
                     f"{_gib(base['own_vram']):>15}{tf(base['ms_per_step']):>9}")
        target = f"  (target <= {TARGETS['cpu_medium_ratio']:.2f} on CPU at medium size)" \
            if device.type == "cpu" and args.size == "medium" else ""
        lines.append(f"  {'ratio USO / baseline':<24}{base['ratio']:>10.3f}{target}")
    lines.append("")
    if base and "error" not in base:
        lines.append(f"  ratio = best USO step / best baseline forward of {base['iters']} alternated rounds after one "
                     f"warm-up each (median ratio {base['median_ratio']:.3f});")
        lines.append("  baseline RAM/VRAM = its own weights + activations (built beside the loaded USO models)")
    lines.append(f"  USO e2e = encode + step 1: {uso['encode_and_first_step_s']:.2f} s, steps 2..{args.steps}: "
                 f"{(args.steps - 1) * uso['ms_per_step'] / 1000:.2f} s, decode: {uso['decode_s']:.2f} s; "
                 f"steps whose blocks all ran: {uso['full_steps']}/{args.steps}")
    if device.type == "cuda":
        lines.append("  peak VRAM: whole run (denoising steps 2..N in brackets); TFLOP/s = formula FLOP / step time")
    lines.append(f"  build {uso['build_s']:.1f} s, warm-up {uso['warmup_s']:.1f} s; peak RAM = process RSS high-water "
                 "mark of the phase (models in RAM included)")
    if args.size == "full" and device.type == "cuda":
        key = "step_cache" if args.step_cache else args.precision
        goal = TARGETS["h100_e2e_s"].get(key)
        if goal:
            lines.append(f"  H100 target for {key}: e2e <= {goal} s at 28 steps (hosted AIML: "
                         f"{TARGETS['hosted_e2e_s']} s)")
    return "\n".join(lines)


def token_counts(args, cfg) -> dict:
    style_tokens = SIZES[args.size]["style_tokens"] * 3 * args.styles
    noise = (args.height // 16) * (args.width // 16)
    subject = (args.subject // 16) ** 2 if args.subject else 0
    text = 512 + style_tokens
    return {"noise": noise, "subject": subject, "image": noise + subject, "style": style_tokens,
            "text": text, "total": noise + subject + text}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nodes.benchmarks.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="medium",
                   help="model size: tiny (test size), medium (~160 M transformer params), full (FLUX.1-dev)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: 28 on a GPU, 4 on the CPU)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--subject", type=int, default=512, help="subject image side in px (0: no subject)")
    p.add_argument("--styles", type=int, default=1, choices=(0, 1, 2), help="number of style images")
    p.add_argument("--style-size", type=int, default=512, help="style image side in px (resized by SigLIP)")
    p.add_argument("--precision", default="auto", choices=memory.PRECISIONS)
    p.add_argument("--memory", default="auto", choices=memory.MEMORY_MODES)
    p.add_argument("--encoders", default="auto", choices=memory.ENCODER_PLACEMENTS)
    p.add_argument("--attention", default="native", help=f"one of {', '.join(speed.ATTENTION_CHOICES)}")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the repeated blocks")
    p.add_argument("--step-cache", type=float, default=0.0, help="First Block Cache threshold (0 = off)")
    p.add_argument("--lora-mode", default="auto", choices=("auto", "fused", "unfused"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--baseline-iters", type=int, default=None,
                   help="rounds of one USO step then one baseline forward, after one warm-up each "
                        "(default: 10 on a GPU or at tiny size, else 4)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-FLUX baseline")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.width % 16 or args.height % 16 or args.subject % 16:
        p.error("--width, --height and --subject must be multiples of 16")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the random-weight build's dtype notes are noise here
    if args.threads:
        torch.set_num_threads(args.threads)
    device = memory.resolve_device(args.device)
    precision = memory.resolve_precision(args.precision, device)
    if args.steps is None:
        args.steps = 28 if device.type == "cuda" else 4
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (step time is measured between steps)")
    if args.baseline_iters is None:
        args.baseline_iters = 10 if device.type == "cuda" or args.size == "tiny" else 4
    cfg = _flux_config(args.size)
    tokens = token_counts(args, cfg)
    print(f"[benchmark] size={args.size} device={device} precision={args.precision}: USO end to end ...",
          flush=True)
    uso, uso_step = run_uso(args, device, precision)
    base = None
    if not args.no_baseline:
        print(f"[benchmark] baseline FLUX forward, alternated with USO steps x{args.baseline_iters} ...", flush=True)
        base = run_baseline(args, device, precision, tokens, uso_step)
    del uso_step
    text = report(args, device, precision, tokens, cfg, base, uso)
    print(text)
    if args.json:
        linear, attention = flop_per_step(cfg, tokens["total"])
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(device), "tokens": tokens,
                       "tflop_per_step": (linear + attention) / 1e12, "baseline": base,
                       "uso": {k: v for k, v in uso.items()}}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
