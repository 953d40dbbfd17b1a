"""Fixtures of the real-ComfyUI stage (run with `pytest --real-comfyui tests/real_comfyui`).

One ComfyUI 0.8.0 folder per session (unpacked by ../shared/tools/comfyui_here.sh under pytest's
temp dir) with the pack linked as custom_nodes/comfyui-uso, the tiny models in its model folders and
test images in its input folder. Servers:

- `bare_comfy` (module): ComfyUI's venv as ComfyUI installs it, without the pack's requirements.
- `comfy` (session): a venv with the pack's requirements installed by the command the pack prints,
  torch left as it was. Tests post prompts with `comfy.run(prompt)` (a `Run`: /history entry, images).
- `second_comfy` (module): another process on the same folder and venv (its own port and output).

Every server is stopped by its fixture's finalizer, also when a test fails.
"""
from __future__ import annotations

import signal
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

import real_comfyui as rc
from fake_remote_servers import FakeFal


@dataclass
class Stage:
    root: Path
    comfy_dir: Path
    base_venv: Path
    tiny_models: object
    fal: FakeFal
    server_env: dict

    @property
    def models_dir(self) -> Path:
        return self.comfy_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.comfy_dir / "input"

    @property
    def pack_link(self) -> Path:
        return self.comfy_dir / "custom_nodes" / rc.PACK_NAME

    def server(self, name: str, venv: Path, port: int | None = None) -> rc.ComfyServer:
        return rc.ComfyServer(self.comfy_dir, venv, self.root / f"state_{name}", port or rc.free_port(),
                              self.root / f"output_{name}", env=self.server_env)


@pytest.fixture(scope="session")
def comfy_stage(tmp_path_factory, tiny_models):
    # A CI timeout's SIGTERM becomes a KeyboardInterrupt, so the finalizers (or, during a fixture's
    # setup, real_comfyui's atexit handler) still stop the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = tmp_path_factory.mktemp("real_comfyui")
    comfy_dir = root / "comfyui"
    t0 = time.perf_counter()
    rc.setup_comfyui(comfy_dir, rc.DEFAULT_BASE_VENV, root / "state_setup")
    print(f"\n[stage] ComfyUI set up in {comfy_dir} in {time.perf_counter() - t0:.1f} s")
    link = comfy_dir / "custom_nodes" / rc.PACK_NAME
    link.symlink_to(rc.PACK_ROOT, target_is_directory=True)
    # The tiny models under the names the workflows use (tiny_models writes a ComfyUI models/ tree).
    rc.place_tree(tiny_models.models_dir, comfy_dir / "models")
    # Native nodes load ae.safetensors too (VAE Loader -> VAE Encode in uso_restyle_latent); the tiny
    # workflows take their own VAE from the checkpoint.
    (comfy_dir / "models" / "vae" / "ae.safetensors").unlink()
    t0 = time.perf_counter()
    rc.write_native_flux_vae(comfy_dir / "models" / "vae" / "ae.safetensors")
    print(f"[stage] native-loadable FLUX VAE written in {time.perf_counter() - t0:.1f} s")
    (comfy_dir / "input").mkdir(exist_ok=True)
    for name in sorted(rc.workflow_image_names()):
        w, h = rc.IMAGE_SIZES.get(name, rc.IMAGE_SIZES["uso_subject.png"])
        tiny_models.make_image(w, h, seed=zlib.crc32(name.encode()) % 1000).save(comfy_dir / "input" / name)
    fal = FakeFal(queue_polls=1, progress_polls=1, max_lifetime_s=3600).start()
    env = {
        # The tiny text encoders have tiny vocabularies: ComfyUI's shipped tokenizers (49408 / 32100
        # tokens) do not fit them and are refused, so the tiny tokenizers are named here.
        "USO_TOKENIZER_DIR": str(tiny_models.paths["tokenizer_t5"].parent),
        "USO_FAL_QUEUE_URL": fal.url,
        "FAL_KEY": fal.key,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    yield Stage(root, comfy_dir, rc.DEFAULT_BASE_VENV, tiny_models, fal, env)
    fal.stop()


def _started(server: rc.ComfyServer, request) -> rc.ComfyServer:
    request.addfinalizer(server.stop)
    server.start()
    print(f"\n[stage] ComfyUI {server.state_dir.name} up on port {server.port} in {server.start_seconds:.1f} s")
    return server


@pytest.fixture(scope="module")
def bare_comfy(comfy_stage, request):
    """ComfyUI with the pack linked but its requirements not installed (diffusers absent)."""
    venv = rc.clone_venv(comfy_stage.base_venv, comfy_stage.root / "venv_bare")
    if rc.has_module(venv, "diffusers"):  # a base venv someone installed it into: take it out of our copy
        subprocess.run([str(rc.venv_python(venv)), "-m", "pip", "uninstall", "-y", "-q", "diffusers"], check=True)
    assert not rc.has_module(venv, "diffusers")
    return _started(comfy_stage.server("bare", venv), request)


@pytest.fixture(scope="session")
def comfy_venv(comfy_stage):
    """A copy of ComfyUI's venv with the pack's requirements installed (torch pinned)."""
    t0 = time.perf_counter()
    venv = rc.clone_venv(comfy_stage.base_venv, comfy_stage.root / "venv")
    torch_before = rc.package_version(venv, "torch")
    requirements = comfy_stage.pack_link / "requirements.txt"
    rc.pip_install_requirements([str(rc.venv_python(venv)), "-m", "pip", "install", "-r", str(requirements)],
                                venv, comfy_stage.root / "constraints")
    assert rc.package_version(venv, "torch") == torch_before
    print(f"\n[stage] pack requirements installed into a copy of ComfyUI's venv in {time.perf_counter() - t0:.1f} s "
          f"(torch {torch_before} kept)")
    return venv


@pytest.fixture(scope="session")
def comfy(comfy_stage, comfy_venv, request):
    """The ComfyUI server with the installed pack, for the whole session."""
    return _started(comfy_stage.server("main", comfy_venv), request)


@pytest.fixture(scope="module")
def second_comfy(comfy_stage, comfy_venv, request):
    """A second ComfyUI process on the same folder and venv (own port, own output folder)."""
    return _started(comfy_stage.server("second", comfy_venv), request)
