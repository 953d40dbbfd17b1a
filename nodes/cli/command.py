"""USO from a shell: ``python -m nodes.cli`` in the pack folder (the folder that holds ``nodes/``).

    python -m nodes.cli --tiny --prompt "a cat" --out out/                  # smoke test, no weights
    python -m nodes.cli --comfy-models ~/ComfyUI/models --prompt "a cat in ink" \\
        --subject me.jpg --style ink.png --seed 7 --out out/
    python -m nodes.cli --comfy-models ~/ComfyUI/models --manifest jobs.jsonl --out out/
    python -m nodes.cli --provider fal --prompt "a cat" --style ink.png --out out/

Exit codes: 0 every job done (or already there), 1 some jobs failed (the others ran; the summary
lists each failure), 2 usage, manifest or model-setup error (nothing generated), 130 cancelled.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time

from .. import api
from ..engine import TokenizerNotFoundError, USOError
from ..engine.memory import MEMORY_MODES, PRECISIONS
from ..files import model_paths
from ..jobs import manifest, ray_runner, runner
from ..jobs.backend import TINY_NOTICE, Backend
from ..jobs.plan import jobs_for
from ..engine import memory_table
from ..jobs.progress import BatchProgress
from ..remote import KeyProblem
from ..remote.keys import resolve_key

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
MODEL_FLAGS = ("comfy_models", "extra_model_paths", "diffusers", "transformer", "vae", "t5", "clip_l", "siglip",
               "uso_lora", "projector", "tokenizers")
JOB_FLAGS = ("prompt", "subject", "styles", "seed", "width", "height", "keep_size", "steps", "guidance",
             "batch_size", "output", "style_crop", "long_side", "shift", "extra_references", "negative_prompt",
             "loras", "init_image", "denoise")


class SetupError(Exception):
    """Models or keys could not be set up: nothing can run (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nodes.cli",
        description="Generate images with USO (FLUX.1-dev + USO LoRA + SigLIP style projector) without "
                    "ComfyUI: one image from flags, or a batch from a JSON Lines / CSV manifest. Unset "
                    "parameters take USO Generate's defaults.",
        epilog="Exit codes: 0 all jobs done or already there; 1 some jobs failed (the others ran); 2 usage, "
               "manifest or model-setup error (nothing generated); 130 cancelled (Ctrl-C). Manifest keys: "
               + ", ".join(manifest.FIELDS) + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    job = p.add_argument_group("what to generate (also the defaults for every manifest row)")
    job.add_argument("--prompt", "-p", help="the prompt; may be empty (with --subject and --keep-size: a restyle)")
    job.add_argument("--subject", metavar="IMAGE", help="subject / content image")
    job.add_argument("--style", dest="styles", metavar="IMAGE", action="extend", nargs="+",
                     help="style image(s); repeat or list several (USO takes up to 2)")
    job.add_argument("--manifest", "-m", metavar="FILE", help="a .jsonl or .csv file with one job per row")
    job.add_argument("--out", "-o", metavar="DIR", default="out", help="output folder (default: out)")
    job.add_argument("--output", metavar="NAME", help="output file name inside --out (single job only; default "
                     "<prompt>_<seed>.png, or <row>_<prompt>_<seed>.png for a manifest)")

    gen = p.add_argument_group("parameters (USO Generate's defaults; --tiny: 64x64, 4 steps, long side 64)")
    gen.add_argument("--width", type=int, help="multiple of 16 (default 1024)")
    gen.add_argument("--height", type=int, help="multiple of 16 (default 1024)")
    gen.add_argument("--keep-size", action=argparse.BooleanOptionalAction, default=None,
                     help="output size from the subject instead of width/height: each side of its encoded "
                          "size x 1024 / --long-side, down to a multiple of 16 (2x at long side 512)")
    gen.add_argument("--steps", type=int, help="denoising steps (default 25; fal/AIML 28)")
    gen.add_argument("--guidance", type=float, help="FLUX guidance (default 4.0)")
    gen.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default 0; "
                     "fal/AIML: 0 lets the provider pick)")
    gen.add_argument("--batch-size", type=int, help="images per job (default 1)")
    gen.add_argument("--style-crop", choices=("reference", "center"),
                     help="reference: squash to 384x384 (USO, default); center: ComfyUI's CLIP Vision Encode")
    gen.add_argument("--long-side", type=int, help="subject long side in px (default 512)")
    gen.add_argument("--shift", choices=("reference", "flux"), help="time shift (default reference)")
    gen.add_argument("--lora", dest="loras", metavar="FILE[:STRENGTH]", action="append",
                     help="a FLUX.1-dev LoRA on top of USO's (kohya, ComfyUI, xlabs or diffusers file; strength "
                          "default 1.0); repeat for more")
    gen.add_argument("--init-image", metavar="IMAGE", help="image to image: start from this image's latent "
                                                           "(center-cropped to multiples of 16; sets the size)")
    gen.add_argument("--denoise", type=float, help="with --init-image: how much to change it, 0..1 (default 1.0 "
                                                   "= from noise)")
    gen.add_argument("--extra-references", action=argparse.BooleanOptionalAction, default=None,
                     help="allow more than two style images")

    models = p.add_argument_group("model files (default: the folders of the ComfyUI installation this pack sits in)")
    models.add_argument("--tiny", action="store_true",
                        help="random tiny models: a seconds-long smoke test of the install; images are noise")
    models.add_argument("--comfy-models", metavar="DIR", action="append",
                        help="a ComfyUI models/ folder, searched for the default file names (repeatable; "
                             "the extra_model_paths.yaml beside it is read too)")
    models.add_argument("--extra-model-paths", metavar="YAML", action="append",
                        help="a ComfyUI extra_model_paths.yaml (repeatable)")
    models.add_argument("--diffusers", metavar="DIR", help="a diffusers FLUX.1-dev folder (transformer, VAE, "
                        "T5, CLIP-L, tokenizers)")
    for slot, flag in model_paths.SLOT_FLAGS.items():
        models.add_argument(flag, dest=slot, metavar="PATH",
                            help=f"{slot} file (a path, or a name inside the ComfyUI folders)")
    models.add_argument("--tokenizers", metavar="DIR", help="folder with t5/ and clip_l/ tokenizer folders")
    models.add_argument("--precision", choices=PRECISIONS, default="auto")
    models.add_argument("--memory", choices=MEMORY_MODES, default="auto")
    models.add_argument("--device", help="cuda, cuda:1, mps, xpu, cpu (default: cuda, else mps, else xpu, else cpu)")
    models.add_argument("--plan", action="store_true", help="print what memory and precision 'auto' pick for "
                        "each file set on 8-80 GB cards and 16-64 GB hosts (the models at full size on meta "
                        "tensors; nothing is loaded), then exit; with --device mps: on 16-128 GB Macs")

    rem = p.add_argument_group("remote (fal / AIML; keys from FAL_KEY / AIML_API_KEY or USO_REMOTE_KEYS_FILE)")
    rem.add_argument("--provider", choices=("fal", "aiml"), help="generate on fal or AIML instead of locally")
    rem.add_argument("--negative-prompt", help="what to avoid (remote only)")
    rem.add_argument("--timeout", type=int, default=600, help="seconds per remote job (default 600)")
    rem.add_argument("--no-safety-checker", action="store_true", help="turn the provider's NSFW checker off")

    run = p.add_argument_group("running")
    run.add_argument("--overwrite", action="store_true", help="regenerate jobs whose outputs exist")
    run.add_argument("--dry-run", action="store_true", help="check the jobs and model files, list the plan, "
                     "generate nothing")
    run.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress bars (auto: on a terminal)")
    run.add_argument("--summary-json", metavar="FILE", help="also write the summary as JSON")

    ray = p.add_argument_group("cluster (Ray: pip install \"ray>=2.60\"; the pack and the model files at the same "
                               "paths on every node)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="spread the jobs over a Ray cluster, one worker per GPU: --ray alone starts a local "
                          "cluster, --ray auto joins the one this node belongs to, or give the head's "
                          "host:port / ray://host:10001")
    ray.add_argument("--ray-workers", type=int, metavar="N",
                     help="at most N workers (default: one per GPU; without GPUs 1 CPU worker)")
    ray.add_argument("--ray-shared-out", action="store_true",
                     help="--out is a shared folder every node sees at the same path: workers write the images "
                          "there instead of sending them back")
    run.add_argument("--verbose", "-v", action="store_true", help="library warnings and tracebacks")
    return p


def _console_never_raises() -> None:
    """A Windows console redirected to a file or pipe encodes in the ANSI code page (cp1252): a name
    or prompt outside it would raise UnicodeEncodeError after the image is written and end the batch
    without its summary. Such characters are printed as escapes (\\u732b) instead."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if reconfigure is not None and encoding not in ("utf8", "utf8sig"):
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change its error handler: left as is
                pass


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _backend(args) -> Backend:
    return Backend(provider=args.provider, tiny=args.tiny)


def _check_flags(args) -> list[str]:
    problems = []
    given_models = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if getattr(args, f)]
    if args.tiny and args.provider:
        problems.append("--tiny and --provider exclude each other")
    if (args.tiny or args.provider) and given_models:
        what = "--tiny builds its own models" if args.tiny else "--provider runs remotely"
        problems.append(f"{what}; drop {', '.join(given_models)}")
    if args.manifest and args.output:
        problems.append("--output names the single job's file; a manifest row sets its own 'output'")
    if (out_problem := manifest.windows_path_problem(args.out)) is not None:
        problems.append(f"--out '{args.out}' {out_problem}")
    if args.timeout < 10 or args.timeout > 3600:
        problems.append(f"--timeout {args.timeout} is outside 10..3600")
    if args.ray and args.provider:
        problems.append("--ray runs local models on the cluster; with --provider the jobs already run remotely")
    if not args.ray and (args.ray_workers is not None or args.ray_shared_out):
        problems.append("--ray-workers and --ray-shared-out go with --ray")
    if args.ray_workers is not None and args.ray_workers < 1:
        problems.append(f"--ray-workers {args.ray_workers}: give 1 or more")
    return problems


def plan_jobs(args, backend: Backend) -> list[manifest.Job]:
    """The checked jobs; manifest.ManifestError lists every problem."""
    return jobs_for({f: getattr(args, f) for f in JOB_FLAGS}, args.manifest, backend)


class _Interrupts:
    """First Ctrl-C cancels the running job (and the remote request); the second stops at once."""

    def __init__(self):
        self.uso = None
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, _sig, _frame):
        if self.requested or self.uso is None:
            raise KeyboardInterrupt
        self.requested = True
        _err("\nCancelling the running job (press Ctrl-C again to stop at once)...")
        self.uso.cancel()


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """Library chatter (diffusers/transformers warnings, the remote logger) off unless --verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    for k in saved_env:  # read when the library is first imported, which may be later
        os.environ.setdefault(k, "error")
    saved = []
    for name in ("diffusers", "transformers", "uso", "uso.remote", "huggingface_hub"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _open_uso(args, backend: Backend, resolved):
    """The USO that runs the jobs (`api.open_backend`, with the model files `_run` found), with a
    setup failure as SetupError."""
    def on_load(what: str) -> None:
        _err(f"loading {what} ...")

    started = time.monotonic()
    try:
        uso = api.open_backend(backend, precision=args.precision, memory=args.memory, device=args.device,
                               on_load_step=on_load, timeout_s=args.timeout,
                               safety_checker=not args.no_safety_checker, resolved=resolved)
    except TokenizerNotFoundError as exc:
        raise SetupError(f"{exc} On the command line: --tokenizers DIR (a folder holding t5/ and clip_l/), or "
                         "--diffusers DIR, or --comfy-models pointing into a ComfyUI installation, whose own "
                         "tokenizer files are then used.") from exc
    except (USOError, OSError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    if backend.is_local:
        pipe = uso.pipeline
        memory = f", memory {pipe.memory_mode}" if pipe.device.type != "cpu" else ""
        _err(f"models ready in {time.monotonic() - started:.1f} s on {pipe.device} "
             f"({str(pipe.precision.compute).replace('torch.', '')}{memory})")
    return uso


def _check_remote_key(provider: str) -> None:
    root = model_paths.enclosing_comfyui()
    try:
        resolve_key(provider, os.path.join(root, "user") if root else None, in_comfyui=False)
    except KeyProblem as exc:
        raise SetupError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    _console_never_raises()
    args = build_parser().parse_args(argv)
    if args.plan:
        if (args.device or "").startswith("mps"):
            print(memory_table.mac_markdown(memory_table.mac_plan_table()), end="")
        else:
            print(memory_table.markdown(memory_table.plan_table()), end="")
        return 0
    problems = _check_flags(args)
    if problems:
        for p in problems:
            _err(f"error: {p}")
        return EXIT_USAGE
    with _quiet_libraries(args.verbose):
        return _run(args, _backend(args))


def _run(args, backend: Backend) -> int:
    try:
        jobs = plan_jobs(args, backend)
    except manifest.ManifestError as exc:
        for p in exc.problems:
            _err(f"error: {p}")
        _err(f"{len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}; nothing was generated.")
        return EXIT_USAGE

    resolved = None
    try:
        if not backend.is_local:
            _check_remote_key(backend.provider)
        elif not backend.tiny:   # a missing file is reported before anything loads
            resolved = api.resolve_files(**{f: getattr(args, f) for f in MODEL_FLAGS})
            for note in resolved.notes:
                _err(f"  {note}")
        if args.ray:
            ray_runner.import_ray()
    except (model_paths.ModelPathError, SetupError, ray_runner.RaySetupError) as exc:
        for line in str(exc).splitlines():
            _err(f"error: {line}")
        return EXIT_USAGE

    out_dir = os.path.abspath(args.out)
    numbered = bool(args.manifest)
    if args.dry_run:
        for job in jobs:
            paths = runner.output_paths(job, out_dir, backend, numbered)
            state = "exists" if all(os.path.exists(p) for p in paths) and not args.overwrite else "to do"
            print(f"job {job.index} ({job.where}) [{state}]: {', '.join(runner.display_path(p) for p in paths)}")
        print(f"dry run: {len(jobs)} job{'s' if len(jobs) != 1 else ''} checked; nothing generated.")
        return EXIT_OK
    if backend.tiny:  # only when images are about to be made: they are the noise it warns of
        _err("=" * 78 + f"\n{TINY_NOTICE}\n" + "=" * 78)

    interrupts = _Interrupts()

    def open_uso():
        interrupts.uso = _open_uso(args, backend, resolved)
        return interrupts.uso

    progress = BatchProgress(len(jobs), {"auto": None, "on": True, "off": False}[args.progress])
    started = time.monotonic()
    try:
        if args.ray:   # Ctrl-C raises KeyboardInterrupt in the driver, which stops the workers
            outcomes = ray_runner.run_on_ray(
                jobs, backend, functools.partial(_open_uso, args, backend, resolved), out_dir, address=args.ray,
                workers=args.ray_workers, overwrite=args.overwrite, numbered=numbered, progress=progress,
                tracebacks=args.verbose, verbose=args.verbose, write_on_workers=args.ray_shared_out)
        else:
            with interrupts:
                outcomes = runner.run_jobs(jobs, backend, open_uso, out_dir, overwrite=args.overwrite,
                                           numbered=numbered, progress=progress,
                                           on_cancel_check=lambda: interrupts.requested, tracebacks=args.verbose)
    except (SetupError, ray_runner.RaySetupError) as exc:
        progress.close()
        _err(f"error: {exc}")
        _err("The models could not be loaded; nothing was generated.")
        return EXIT_USAGE
    except KeyboardInterrupt:
        progress.close()
        _err("Stopped.")
        return EXIT_CANCELLED
    progress.close()

    seconds = time.monotonic() - started
    print(runner.summary(outcomes, seconds, out_dir), flush=True)
    if backend.tiny:
        works = all(o.status in ("done", "skipped") for o in outcomes)
        print(f"(--tiny smoke test: the images are noise by design{'; the install works' if works else ''}.)")
    if args.summary_json:
        data = {"backend": backend.name, "seconds": round(seconds, 3), "out": out_dir,
                "jobs": [o.as_dict() for o in outcomes]}
        os.makedirs(os.path.dirname(os.path.abspath(args.summary_json)), exist_ok=True)
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if any(o.status in ("cancelled", "not run") for o in outcomes):
        return EXIT_CANCELLED
    return EXIT_FAILED if any(o.status == "failed" for o in outcomes) else EXIT_OK

