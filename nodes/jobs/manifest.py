"""Jobs from a manifest or the command line, checked before any model loads.

A manifest is JSON Lines (one object per line; blank lines and lines starting with # are skipped)
or CSV with a header row. Keys / columns (all optional; unset ones take the command line's values):

  prompt, subject (image path), styles (JSON list or 'a.png;b.png'), seed, width, height, keep_size,
  steps, guidance, batch_size, output (file name inside --out), style_crop, long_side, shift,
  extra_references (local), negative_prompt (--provider only), loras (local: JSON list of "FILE[:STRENGTH]"
  or [FILE, STRENGTH], or 'a.safetensors:0.8;b.safetensors'), init_image and denoise (local: image to image)

Relative image paths are relative to the manifest's folder. Every row is checked and every problem
reported at once, as "<manifest> line N: ...". Image files are checked by their header only; a file
whose data is broken fails when its job runs.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import json
import math
import ntpath
import os
import re
from dataclasses import dataclass

from ..engine import limits
from ..engine.limits import Limit
from ..files.image_files import probe_image
from ..remote import request as remote_request
from .backend import Backend

_FAL_AIML = "fal/AIML's range"
#: Limits per backend: the engine's (`engine.limits`) and the providers' (`remote.request`).
LIMITS = {
    "local": dict(width=limits.WIDTH, height=limits.HEIGHT, steps=limits.STEPS, guidance=limits.GUIDANCE,
                  batch_size=limits.BATCH_SIZE, styles=limits.MAX_REFERENCE_STYLES),
    "remote": dict(width=Limit("width", *remote_request.SIDE_RANGE, None, 16, _FAL_AIML),
                   height=Limit("height", *remote_request.SIDE_RANGE, None, 16, _FAL_AIML),
                   steps=Limit("steps", *remote_request.STEPS_RANGE, None, hint=_FAL_AIML),
                   guidance=Limit("guidance", *remote_request.GUIDANCE_RANGE, None, hint=_FAL_AIML),
                   batch_size=Limit("batch_size", *remote_request.NUM_IMAGES_RANGE, None,
                                    hint="fal/AIML's num_images"),
                   styles=remote_request.MAX_STYLES),
}
FIELDS = ("prompt", "subject", "styles", "seed", "width", "height", "keep_size", "steps", "guidance",
          "batch_size", "output", "style_crop", "long_side", "shift", "extra_references", "negative_prompt",
          "loras", "init_image", "denoise")
LOCAL_ONLY = ("style_crop", "long_side", "shift", "extra_references", "loras", "init_image", "denoise")
REMOTE_ONLY = ("negative_prompt",)
ALIASES = {"style": "styles", "crop": "style_crop", "num_images": "batch_size", "image": "subject", "lora": "loras"}
CHOICES = {"style_crop": ("reference", "center"), "shift": ("reference", "flux")}


class ManifestError(ValueError):
    """Problems found while checking jobs; one line each, with its location."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Job:
    index: int                      # 1-based position among the jobs
    where: str                      # "jobs.csv line 4" or "command line"
    prompt: str
    subject: str | None
    styles: tuple[str, ...]
    seed: int
    width: int
    height: int
    keep_size: bool
    steps: int
    guidance: float
    batch_size: int
    style_crop: str
    long_side: int
    shift: str
    extra_references: bool
    negative_prompt: str
    output: str | None
    loras: tuple[tuple[str, float], ...] = ()   # (file, strength), local only
    init_image: str | None = None               # image to image (local only)
    denoise: float = 1.0

    def generate_kwargs(self, backend: Backend) -> dict:
        common = dict(prompt=self.prompt, subject=self.subject, styles=list(self.styles), width=self.width,
                      height=self.height, keep_size=self.keep_size, steps=self.steps, guidance=self.guidance,
                      seed=self.seed, batch_size=self.batch_size)
        if backend.is_local:
            return dict(common, style_crop=self.style_crop, long_side=self.long_side, shift=self.shift,
                        extra_references=self.extra_references, loras=list(self.loras), init_image=self.init_image,
                        denoise=self.denoise)
        return dict(common, negative_prompt=self.negative_prompt)


# -- reading ----------------------------------------------------------------------------------------

def read_rows(path: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, raw row) per job of a .jsonl / .json / .csv manifest, and (line, problem)
    for each row that cannot be read. ManifestError when the file itself cannot be."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read the manifest ({exc.strerror or exc})."]) from None
    text = decode_manifest(name, data)
    if path.lower().endswith(".csv"):
        return _csv_rows(name, text)
    if path.lower().endswith((".jsonl", ".ndjson", ".json")):
        return _jsonl_rows(name, text)
    raise ManifestError([f"{path}: a manifest ends in .jsonl (JSON Lines) or .csv."])


def decode_manifest(name: str, data: bytes) -> str:
    """A manifest's text as Windows tools save it: UTF-8 with or without a BOM (Notepad, Excel's
    "CSV UTF-8"), UTF-16 with a BOM (PowerShell 5.1's `>` and `Out-File`, Excel's "Unicode Text"),
    else cp1252 (Excel's "CSV (Comma delimited)" on Western Windows). Bytes none of these read are
    named by their line, with the fix."""
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise ManifestError([_undecodable(name, data, exc, encoding)]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as utf8_error:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            raise ManifestError([_undecodable(name, data, utf8_error, "UTF-8 or cp1252")]) from None


def _undecodable(name: str, data: bytes, exc: UnicodeDecodeError, tried: str) -> str:
    start = exc.start
    if tried == "utf-16":  # line breaks are two bytes there
        line = data[:start].decode("utf-16", errors="replace").count("\n") + 1
    else:
        line = data[:start].count(b"\n") + 1
    return (f"{name} line {line}: bytes that are not {tried} text ({data[start:start + 4]!r}). "
            "Save the manifest as UTF-8 (Excel: \"CSV UTF-8\"; Notepad: encoding UTF-8; PowerShell: "
            "Out-File -Encoding utf8).")


def _jsonl_rows(name: str, text: str):
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            problems.append((n, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(value, dict):
            problems.append((n, f"expected a JSON object like {{\"prompt\": \"...\"}}, got "
                                f"{type(value).__name__}"))
            continue
        rows.append((n, value))
    return rows, problems


def _csv_rows(name: str, text: str):
    reader = csv.reader(text.splitlines(keepends=True))
    rows, problems = [], []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record) or record[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [h.strip() for h in record]
                if len(set(header)) != len(header):
                    problems.append((line, "a column name appears twice in the header"))
                continue
            if len(record) > len(header):
                problems.append((line, f"{len(record)} values but the header has {len(header)} columns "
                                       "(quote values that contain commas)"))
                continue
            rows.append((line, {h: v for h, v in zip(header, record) if v.strip() != ""}))
    except csv.Error as exc:
        problems.append((reader.line_num, str(exc)))
    if header is None and not problems:
        raise ManifestError([f"{name}: empty; a CSV manifest starts with a header row such as "
                             "'prompt,subject,seed'."])
    return rows, problems


# -- checking ---------------------------------------------------------------------------------------

def _int(name, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a whole number")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"{name} {value!r} is not a whole number")


def _float(name, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} {value!r} is not a finite number")
    return out


def _bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise ValueError(f"{name} {value!r} is not true or false")


def _text(name, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {json.dumps(value)}")
    return value


def _styles(value) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(";") if s.strip()]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s.strip() for s in value if s.strip()]
    raise ValueError(f"styles must be a list of image paths or 'a.png;b.png', got {json.dumps(value)}")


def _loras(value) -> list[tuple[str, float]]:
    """`loras`: "a.safetensors:0.8;b.safetensors", or a list of "FILE[:STRENGTH]" / [FILE, STRENGTH]."""
    from ..engine.user_lora import parse_lora_spec

    items = [s for s in value.split(";") if s.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"loras must be a list of 'FILE[:STRENGTH]' or 'a.safetensors:0.8;b.safetensors', "
                         f"got {json.dumps(value)}")
    out = []
    for item in items:
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0].strip(), _float("lora strength", item[1])))
        elif isinstance(item, str):
            out.append(parse_lora_spec(item))
        else:
            raise ValueError(f"loras: {json.dumps(item)} is not 'FILE[:STRENGTH]' or [FILE, STRENGTH]")
    return tuple(out)


def _within(limit: Limit, value):
    if (problem := limit.problem(value)) is not None:
        raise ValueError(problem)
    return value


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-")


def windows_path_problem(path: str) -> str | None:
    """Why `path` is refused, on every OS alike (a manifest means the same everywhere), or None:
    a network (UNC) path, `\\\\server\\share\\x.png` or `//server/share/x.png`, which Windows would
    open over the network; or a drive-relative one, `C:x.png`, which Windows resolves against
    drive C's own current folder, not the folder it seems to name. Read with `ntpath` on any OS."""
    drive, rest = ntpath.splitdrive(path)
    if not drive:
        return None
    if drive[:2] in ("\\\\", "//"):
        return "is a network (UNC) path; use a local folder or a mapped drive (Z:\\...) instead"
    if not rest.startswith(("\\", "/")):
        return (f"is relative to drive {drive}'s own current folder, not to a folder it names; write the full "
                f"path ({drive}\\folder\\{rest or 'name'}) or a path without a drive")
    return None


#: Names Windows keeps for devices, with any extension and in any case (`con.png`, `NUL`, `Com1.x`).
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in (*"123456789", "\u00b9", "\u00b2", "\u00b3"))}
_FORBIDDEN = set('<>:"|?*') | {chr(c) for c in range(32)}


def windows_name_problem(part: str) -> str | None:
    """Why Windows cannot create a file or folder named `part`, or None; checked on every OS, so a
    manifest that runs here runs on Windows too (and fails before generating, not after)."""
    bad = sorted({c for c in part if c in _FORBIDDEN})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        return f"Windows does not allow {shown} in file names; use letters, digits, '-', '_' or '.'"
    if part.endswith((".", " ")):
        return "ends in a dot or a space, which Windows drops from file names; remove it"
    if part.split(".")[0].rstrip(" ").upper() in _RESERVED:
        return (f"'{part.split('.')[0]}' is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9, "
                "with any extension); choose another name")
    return None


def _output_name(value: str) -> str:
    name = value.strip().replace("\\", "/")
    if not name or os.path.isabs(name) or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"output '{value}' must be a file name inside the output folder (no absolute path, no '..')")
    if ntpath.splitdrive(name)[0]:  # C:x.png, C:/x.png: Windows would write outside the output folder
        raise ValueError(f"output '{value}' must be a file name inside the output folder (no drive such as C:)")
    for part in name.split("/"):
        problem = windows_name_problem(part)
        if problem:
            raise ValueError(f"output '{value}': {problem}")
    stem, ext = os.path.splitext(name)
    if not ext:
        name += ".png"
    elif ext.lower() != ".png":
        raise ValueError(f"output '{value}': images are written as PNG; use a .png name")
    return name


def check_fields(values: dict, backend: Backend, base_dir: str, defaults: dict) -> tuple[dict, list[str]]:
    """Typed, checked values of one job (defaults filled in) and the problems of each field.

    `values` holds what the row (or the command line) set; `defaults` the rest. Paths are made
    absolute against `base_dir`.
    """
    kind_limits = LIMITS["local" if backend.is_local else "remote"]
    problems: list[str] = []
    out = dict(defaults)
    setters = {
        "prompt": lambda v: _text("prompt", v),
        "subject": lambda v: _text("subject", v).strip() or None,
        "styles": _styles,
        "seed": lambda v: _within(limits.SEED, _int("seed", v)),
        "width": lambda v: _int("width", v),
        "height": lambda v: _int("height", v),
        "keep_size": lambda v: _bool("keep_size", v),
        "steps": lambda v: _within(kind_limits["steps"], _int("steps", v)),
        "guidance": lambda v: _within(kind_limits["guidance"], _float("guidance", v)),
        "batch_size": lambda v: _within(kind_limits["batch_size"], _int("batch_size", v)),
        "output": lambda v: _output_name(_text("output", v)) if str(v).strip() else None,
        "style_crop": lambda v: _choice("style_crop", v),
        "long_side": lambda v: _within(limits.LONG_SIDE, _int("long_side", v)),
        "shift": lambda v: _choice("shift", v),
        "extra_references": lambda v: _bool("extra_references", v),
        "negative_prompt": lambda v: _text("negative_prompt", v),
        "loras": _loras,
        "init_image": lambda v: _text("init_image", v).strip() or None,
        "denoise": lambda v: _within(limits.DENOISE, _float("denoise", v)),
    }
    for key, raw in values.items():
        if raw is None:
            continue
        try:
            out[key] = setters[key](raw)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if backend.is_local and key in REMOTE_ONLY and out[key]:
            problems.append(f"{key} is only sent to fal/AIML (--provider); the local USO has no {key}")
        if not backend.is_local and key in LOCAL_ONLY and out[key] != defaults.get(key):
            problems.append(f"{key} is a local setting; fal/AIML do not take it (drop it with --provider)")
    if values.get("subject") is not None and out.get("subject"):
        out["subject"] = _check_image("subject", out["subject"], base_dir, problems)
    if values.get("styles") is not None:
        out["styles"] = tuple(_check_image("style", s, base_dir, problems) for s in out.get("styles") or ())
    out["styles"] = tuple(out.get("styles") or ())
    if values.get("init_image") is not None and out.get("init_image"):
        out["init_image"] = _check_image("init_image", out["init_image"], base_dir, problems)
    if values.get("loras") is not None:
        out["loras"] = tuple((_check_file("lora", path, base_dir, problems), strength)
                             for path, strength in out.get("loras") or ())
    out["loras"] = tuple(out.get("loras") or ())

    return out, problems


def check_job(out: dict, backend: Backend) -> list[str]:
    """Problems between the fields of one job (after `check_fields`)."""
    kind_limits = LIMITS["local" if backend.is_local else "remote"]
    problems: list[str] = []
    if not out["keep_size"]:
        for key in ("width", "height"):
            if isinstance(out[key], int) and (problem := kind_limits[key].problem(out[key])):
                problems.append(problem)
    max_styles = kind_limits["styles"]
    if len(out["styles"]) > max_styles and not (backend.is_local and out.get("extra_references")):
        problems.append(f"styles: {len(out['styles'])} images; USO takes at most {max_styles}"
                        + (" (set extra_references to allow more)" if backend.is_local else " on fal/AIML"))
    if out["keep_size"] and not out.get("subject"):
        problems.append("keep_size needs a subject image (the output size comes from it)")
    if out.get("denoise", 1.0) < 1.0 and not out.get("init_image"):
        problems.append(f"denoise {out['denoise']} needs an init_image to start from (or denoise 1.0)")
    if not backend.is_local and not out.get("subject") and not out["styles"]:
        problems.append("fal/AIML need at least one image: give a subject and/or styles")
    return problems


def _choice(name, value):
    if value not in CHOICES[name]:
        raise ValueError(f"{name} '{value}' is not one of {', '.join(CHOICES[name])}")
    return value


def _check_image(what: str, path: str, base_dir: str, problems: list[str]) -> str:
    if (problem := windows_path_problem(path)) is not None:
        problems.append(f"{what} '{path}' {problem}")
        return path
    full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
    try:
        probe_image(full)
    except ValueError as exc:
        looked = f" (looked for {full})" if full != path else ""
        problems.append(f"{what} '{path}' {exc}{looked}")
    return full


def _check_file(what: str, path: str, base_dir: str, problems: list[str]) -> str:
    if (problem := windows_path_problem(path)) is not None:
        problems.append(f"{what} '{path}' {problem}")
        return path
    full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
    if not os.path.isfile(full):
        looked = f" (looked for {full})" if full != path else ""
        problems.append(f"{what} '{path}' does not exist{looked}")
    return full


def normalize_keys(row: dict) -> tuple[dict, list[str]]:
    out, problems = {}, []
    for key, value in row.items():
        k = str(key).strip().lower()
        k = ALIASES.get(k, k)
        if k not in FIELDS:
            close = difflib.get_close_matches(k, FIELDS + tuple(ALIASES), n=1)
            problems.append(f"unknown field '{key}'" + (f" (did you mean '{close[0]}'?)" if close else
                                                         f"; known: {', '.join(FIELDS)}"))
            continue
        if k in out:
            problems.append(f"'{key}' is given twice")
            continue
        out[k] = value
    return out, problems


def _make_job(index: int, where: str, values: dict) -> Job:
    plain = {k: values.get(k) for k in FIELDS if k not in ("styles", "loras", "denoise")}
    return Job(index=index, where=where, **plain, styles=tuple(values.get("styles") or ()),
               loras=tuple(values.get("loras") or ()), denoise=float(values.get("denoise", 1.0)))


def jobs_from_manifest(path: str, backend: Backend, defaults: dict) -> list[Job]:
    """Every row checked (all problems at once, as ManifestError) into Jobs."""
    name = os.path.basename(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    rows, unreadable = read_rows(path)
    if not rows and not unreadable:
        raise ManifestError([f"{name}: no jobs in the manifest."])
    jobs, problems, outputs = [], list(unreadable), {}
    for index, (line, row) in enumerate(rows, 1):
        where = f"{name} line {line}"
        values, key_problems = normalize_keys(row)
        checked, value_problems = check_fields(values, backend, base_dir, defaults)
        # A field that failed keeps its (valid) default, so the checks between fields still run
        # and every kind of problem of the row is listed at once.
        value_problems += check_job(checked, backend)
        problems.extend((line, p) for p in key_problems + value_problems)
        if checked.get("output"):
            if checked["output"] in outputs:
                problems.append((line, f"output '{checked['output']}' is also the output of {outputs[checked['output']]}"))
            outputs.setdefault(checked["output"], where)
        if not key_problems and not value_problems:
            jobs.append(_make_job(index, where, checked))
    if problems:
        problems.sort(key=lambda p: p[0])  # stable: a row's problems stay in order
        raise ManifestError([f"{name} line {line}: {p}" for line, p in problems])
    return jobs


def job_from_values(values: dict, backend: Backend, defaults: dict) -> Job:
    """The one job of a command line without --manifest (paths relative to the current folder)."""
    checked, problems = check_fields({k: v for k, v in values.items() if v is not None}, backend, os.getcwd(), defaults)
    problems = problems + check_job(checked, backend)
    if problems:
        raise ManifestError(problems)
    return _make_job(1, "command line", checked)
