"""One image on several processes with context parallelism (a script, not a test).

    # here: 2 CPU processes, gloo, tiny random models (Ulysses; ring needs CUDA, see below)
    torchrun --nproc-per-node 2 -m nodes.benchmarks.context_parallel --size tiny
    # the same with the step cache (every rank takes the skip decision from the whole sequence)
    torchrun --nproc-per-node 2 -m nodes.benchmarks.context_parallel --size tiny --step-cache 0.75 --steps 8
    # 2 / 4 GPUs of one machine, full-size random weights in bf16
    torchrun --nproc-per-node 2 -m nodes.benchmarks.context_parallel --size full --precision bf16 \\
        --width 1024 --height 1024 --steps 28 --attention sdpa_cudnn --ulysses 2
    torchrun --nproc-per-node 4 -m nodes.benchmarks.context_parallel --size full --precision bf16 \\
        --width 1024 --height 1024 --steps 28 --attention sdpa_cudnn --ulysses 2 --ring 2

Every rank builds the same random-weight USO (nodes/engine/random_models.py, seed 0), encodes
the same prompt, style image and subject image, and generates once in one process (the
reference, on each rank alone) and then once with the transformer split over the ranks
(`engine.context_parallel`). Rank 0 prints the largest latent difference and the sampling time
of both runs; the exit status is 1 when the difference exceeds --tolerance.

Ring attention needs an attention backend that returns the log-sum-exp: on GPU
--attention sdpa_cudnn (or flash / sage); diffusers' "native" backend (the only one on CPU)
raises "Native attention does not support return_lse=True".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m nodes.benchmarks.context_parallel",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "medium", "full"), default="tiny")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--attention", default="native")
    p.add_argument("--ulysses", type=int, help="Ulysses degree (default: the number of processes)")
    p.add_argument("--ring", type=int, default=1, help="ring degree (CUDA attention backends only)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--step-cache", type=float, default=0.0, help="First Block Cache threshold (0 = off)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest latent difference accepted")
    args = p.parse_args(argv)

    import torch.distributed as dist

    from ..engine import EngineOptions, USOPipeline, context_parallel, speed
    from ..engine.random_models import build_random_models

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ulysses = args.ulysses or max(1, world // args.ring)
    device = f"cuda:{local_rank}" if cuda else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    pipe = USOPipeline(build_random_models(args.size, dtype=dtype),
                       EngineOptions(device=device, precision=args.precision, attention=args.attention,
                                     step_cache=args.step_cache))
    rng = np.random.default_rng(0)
    style = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    subject = Image.fromarray(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))
    call = dict(styles=pipe.encode_style([style]), subjects=pipe.encode_subject([subject], min(512, args.width)),
                width=args.width, height=args.height, steps=args.steps, seeds=[7])
    prompt = "a portrait of a woman with a red hat in watercolor style"

    def timed():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        result = pipe.generate(prompt, **call)
        if cuda:
            torch.cuda.synchronize()
        return result.latents.float().cpu(), time.perf_counter() - started

    pipe.generate(prompt, **dict(call, steps=1))          # warm-up (kernels, caches)
    reference, one_s = timed()
    context_parallel.enable(pipe.transformer, ulysses=ulysses, ring=args.ring)
    pipe.generate(prompt, **dict(call, steps=1))
    with speed.StepCounter(pipe.transformer) as full_steps:   # fewer than --steps with the step cache
        split, split_s = timed()
    diff = (split - reference).abs().max().item()
    if rank == 0:
        print(f"{args.size} {args.width}x{args.height}, {args.steps} steps, {args.precision}, attention "
              f"{args.attention}, {world} processes ({'nccl' if cuda else 'gloo'}), ulysses {ulysses} x ring "
              f"{args.ring}: largest latent difference to one process {diff:.3g} (tolerance {args.tolerance:g}); "
              f"generate {one_s:.2f} s in one process, {split_s:.2f} s split; step cache {args.step_cache:g}: "
              f"{full_steps.calls} of {args.steps} steps ran every block", flush=True)
    dist.destroy_process_group()
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
