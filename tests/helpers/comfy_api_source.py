"""ComfyUI 0.8.0's `comfy_api` for the plain suite, which runs without a ComfyUI install.

The node classes are ComfyUI V3 nodes (`comfy_api.v0_0_2.io.ComfyNode`), so defining them needs
ComfyUI's own `comfy_api`. The tests take it from the ComfyUI source snapshot the real-ComfyUI
stage uses (../shared/vendor/comfyui-*.tar.gz), unpacking only `comfy_api` and the few modules it
imports at module level. `comfy.model_management`, `server`, `nodes` ... stay absent, so the bridge
still sees no ComfyUI and the suite runs the pack's outside-ComfyUI side (the real-ComfyUI stage
runs the inside).
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
VENDOR_DIR = PACK_ROOT.parent / "shared" / "vendor"
#: What `import comfy_api.v0_0_2` reads (ComfyUI 0.8.0): the package, the execution helpers it
#: imports, and three top-level modules. Paths inside the snapshot, after its top folder.
MEMBERS = ("comfy_api/", "comfy_execution/", "protocol.py", "folder_paths.py", "comfy/cli_args.py",
           "comfy/options.py")


def snapshot() -> Path:
    found = sorted(VENDOR_DIR.glob("comfyui-*.tar.gz"))
    if not found:
        raise RuntimeError(f"no ComfyUI source snapshot in {VENDOR_DIR}: the tests define the V3 nodes with "
                           "ComfyUI 0.8.0's comfy_api from ../shared/vendor/comfyui-*.tar.gz")
    return found[-1]


def source_dir() -> Path:
    """A folder to put on sys.path that holds comfy_api (unpacked once per snapshot, shared by runs)."""
    tarball = snapshot()
    stat = tarball.stat()
    target = Path(tempfile.gettempdir()) / f"uso-tests-{tarball.name[:-len('.tar.gz')]}-{stat.st_size}"
    if (target / "comfy_api" / "v0_0_2" / "__init__.py").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    with tarfile.open(tarball) as archive:
        chosen = []
        for member in archive.getmembers():
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if any(inner == m or (m.endswith("/") and inner.startswith(m)) for m in MEMBERS):
                member.name = inner
                chosen.append(member)
        archive.extractall(staging, members=chosen, filter="data")
    try:
        os.rename(staging, target)  # atomic: a parallel run either wins or finds it there
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
