"""Drive a real ComfyUI (0.8.0, CPU, loopback) for the real-ComfyUI test stage (tests/real_comfyui/).

ComfyUI itself comes from ``../shared/tools/comfyui_here.sh`` (a source snapshot unpacked into a
folder of ours, a venv with ComfyUI's requirements); this module only prepares folders, starts and
stops servers through that script, and talks to them over ComfyUI's HTTP API and websocket.

Each server gets its own COMFY_STATE (pid file, log) and port; several can share one ComfyUI
folder (their outputs go to separate --output-directory folders).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
#: The folder name the README's install uses (custom_nodes/comfyui-uso).
PACK_NAME = "comfyui-uso"
HERE_SH = PACK_ROOT.parent / "shared" / "tools" / "comfyui_here.sh"
#: The shared ComfyUI venv (ComfyUI's requirements, no pack requirements). Never modified here:
#: each stage works in a hard-linked clone of it.
DEFAULT_BASE_VENV = Path(os.environ.get("COMFY_VENV", "/tmp/comfyenv"))


class StageError(RuntimeError):
    """The stage could not prepare or start ComfyUI (not a failure of the pack)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None, timeout=900, what=""):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise StageError(f"{what or cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def setup_comfyui(comfy_dir: Path, base_venv: Path, state_dir: Path) -> None:
    """Unpack ComfyUI into comfy_dir and make sure base_venv holds ComfyUI's requirements
    (comfyui_here.sh setup: reuses a ready venv, otherwise creates it, ~90 s)."""
    if not HERE_SH.is_file():
        raise StageError(f"{HERE_SH} not found: the real-ComfyUI stage needs ../shared/tools beside the pack")
    env = {**os.environ, "COMFY_DIR": str(comfy_dir), "COMFY_VENV": str(base_venv), "COMFY_STATE": str(state_dir)}
    env.pop("COMFY_MIRROR", None)
    _run(["bash", str(HERE_SH), "setup"], env=env, what="comfyui_here.sh setup")


def clone_venv(base: Path, dest: Path) -> Path:
    """A hard-linked copy of `base` (seconds, no extra disk): pip in the copy replaces files, it
    never writes into the linked ones, so the base venv stays as it is."""
    if dest.exists():
        shutil.rmtree(dest)
    _run(["cp", "-al", str(base), str(dest)], what="cp -al venv")
    return dest


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_module(venv: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([str(venv_python(venv)), "-c", probe]).returncode == 0


def package_version(venv: Path, dist: str) -> str:
    return _run([str(venv_python(venv)), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                what=f"version of {dist}").stdout.strip()


def pip_install_requirements(argv: list[str], venv: Path, constraints_dir: Path) -> subprocess.CompletedProcess:
    """Run a `python -m pip install -r requirements.txt` argv with ComfyUI's torch pinned (a
    constraint file: pip may add packages but never replace torch / torchvision / torchaudio)."""
    pins = [f"{d}=={package_version(venv, d)}" for d in ("torch", "torchvision", "torchaudio")
            if subprocess.run([str(venv_python(venv)), "-c", f"import importlib.metadata as m; m.version({d!r})"],
                              capture_output=True).returncode == 0]
    constraints_dir.mkdir(parents=True, exist_ok=True)
    constraint = constraints_dir / "keep_torch.txt"
    constraint.write_text("\n".join(pins) + "\n")
    env = {**os.environ, "PIP_CONSTRAINT": str(constraint), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return _run(argv + ["-q"], env=env, timeout=900, what="pip install -r requirements.txt")


def place_tree(src: Path, dest: Path) -> list[Path]:
    """Hard-link (or copy) every file under src into dest, keeping relative paths."""
    placed = []
    for path in sorted(src.rglob("*")):
        if path.is_dir():
            continue
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        placed.append(target)
    return placed


@dataclass
class Run:
    """One finished prompt as ComfyUI's /history records it."""
    prompt_id: str
    entry: dict
    output_dir: Path

    @property
    def status(self) -> str:
        return self.entry["status"]["status_str"]

    @property
    def messages(self) -> list:
        return self.entry["status"]["messages"]

    def message(self, kind: str) -> dict | None:
        return next((m[1] for m in self.messages if m[0] == kind), None)

    @property
    def error(self) -> dict | None:
        return self.message("execution_error")

    def image_paths(self, node: str | None = None) -> list[Path]:
        """The files SaveImage nodes wrote (those of `node` only, if given)."""
        paths = []
        for nid, node_out in self.entry.get("outputs", {}).items():
            if node is not None and nid != node:
                continue
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    paths.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return paths

    def describe(self) -> str:
        err = self.error
        if err:
            return (f"{self.status}: {err.get('node_type')} (node {err.get('node_id')}) raised "
                    f"{err.get('exception_type')}: {err.get('exception_message')}")
        return f"{self.status}: {[m[0] for m in self.messages]}"


class PromptRejected(Exception):
    """POST /prompt answered 400 (ComfyUI's validation): `.body` holds error + node_errors."""

    def __init__(self, body: dict):
        super().__init__(json.dumps(body)[:2000])
        self.body = body


#: Servers started and not yet stopped. Fixture finalizers stop them; this list is the safety net
#: for an interrupt (Ctrl-C, a CI timeout's SIGTERM) during a fixture's setup, where pytest runs no
#: finalizer but the interpreter still runs its atexit handlers.
_running: list["ComfyServer"] = []


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()


@dataclass
class ComfyServer:
    """One ComfyUI process started by comfyui_here.sh."""
    comfy_dir: Path
    venv: Path
    state_dir: Path
    port: int
    output_dir: Path
    env: dict = field(default_factory=dict)
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "server.log"

    def _script_env(self) -> dict:
        env = {**os.environ, **self.env, "COMFY_DIR": str(self.comfy_dir), "COMFY_VENV": str(self.venv),
               "COMFY_STATE": str(self.state_dir), "COMFY_PORT": str(self.port),
               "COMFY_EXTRA_ARGS": f"--output-directory {self.output_dir}"}
        env.pop("COMFY_MIRROR", None)
        return env

    def start(self) -> "ComfyServer":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _running.append(self)
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", str(HERE_SH), "start"], env=self._script_env(), capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise StageError(f"ComfyUI did not start on port {self.port}:\n{proc.stderr[-4000:]}\n{self.log()[-4000:]}")
        self.start_seconds = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        subprocess.run(["bash", str(HERE_SH), "stop"], env=self._script_env(), capture_output=True, timeout=60)
        if self in _running:
            _running.remove(self)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- HTTP ----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body!r:.500}"
        return body

    def object_info(self, node: str | None = None) -> dict:
        if node is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{urllib.parse.quote(node)}")[node]

    def queue(self, prompt: dict) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(body if isinstance(body, dict) else {"raw": str(body)})
        if body.get("node_errors"):
            raise PromptRejected(body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> Run:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:  # ComfyUI records a prompt in /history once it has finished
                return Run(prompt_id, hist[prompt_id], self.output_dir)
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s; log tail:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> Run:
        """POST the prompt and wait for its /history entry."""
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        status, _ = self.request("POST", "/interrupt", {})
        assert status == 200

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        status, _ = self.request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})
        assert status == 200

    def websocket(self):
        """ComfyUI's websocket for this server's client id (progress, executing, ... messages)."""
        import websocket  # websocket-client, what ComfyUI's own script_examples use

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=30)
        return ws


# -- the pack's workflows at tiny sizes -------------------------------------------------------------

WORKFLOWS = PACK_ROOT / "workflows"
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
#: Test images: the subject is 128x96 so that long side 64 gives 64x48 exactly (keep_size: 1024x768)
#: and VAE Encode gives a latent FLUX can patch (multiples of 16 px).
IMAGE_SIZES = {"uso_subject.png": (128, 96), "uso_style.png": (112, 72), "uso_style_2.png": (128, 72)}

#: Widget values changed so a workflow runs in about a second on a CPU; everything else as shipped.
TINY_OVERRIDES = {
    "USOGenerate": {"width": 64, "height": 48, "steps": 2},
    "USOEncodeSubject": {"long_side": 64},
    "USORemoteGenerate": {"size": "custom", "width": 256, "height": 256, "timeout_s": 60},
}


def run_probe(script: str, config: dict, work: Path, comfy_venv: Path, env: dict) -> dict:
    """Run tests/real_comfyui/<script> in ComfyUI's Python with `config` (written to work/config.json)
    and return the JSON it prints on its `PROBE ` line."""
    path = work / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([str(venv_python(comfy_venv)), str(PACK_ROOT / "tests" / "real_comfyui" / script),
                           str(path)], capture_output=True, text=True, cwd=work, timeout=600,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


def load_workflow(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def workflow_image_names() -> set[str]:
    """Every LoadImage file an API workflow names, plus the standard test images."""
    names = set(IMAGE_SIZES)
    for path in API_WORKFLOWS:
        for node in load_workflow(path).values():
            if node["class_type"] == "LoadImage":
                names.add(node["inputs"]["image"])
    return names


def tiny_prompt(prompt: dict, **generate_overrides) -> dict:
    """A copy of an API prompt with TINY_OVERRIDES (and `generate_overrides` on USOGenerate)."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        node["inputs"].update(TINY_OVERRIDES.get(node["class_type"], {}))
        if node["class_type"] == "USOGenerate":
            node["inputs"].update(generate_overrides)
    return out


def node_id(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type} node, found {ids}"
    return ids[0]


# -- a VAE that ComfyUI's own VAE Loader can build ----------------------------------------------------

#: ComfyUI's native VAE Loader (0.8.0, comfy/sd.py) builds an LDM VAE file with fixed widths (ch 128,
#: ch_mult 1-2-4-4, 2 res blocks) and reads only z_channels from the file, so the tiny VAE cannot load
#: there. A random VAE of FLUX's full architecture (z 16, 84 M parameters, bf16) can.
NATIVE_FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                       use_post_quant_conv=False, mid_block_add_attention=True)


def write_native_flux_vae(path: Path, seed: int = 0) -> Path:
    """A random-weight FLUX VAE in the ae.safetensors layout, loadable by ComfyUI's VAE Loader."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from tiny_models import diffusers_to_ldm_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**NATIVE_FLUX_VAE)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_to_ldm_vae(vae.state_dict()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
