"""Fixtures of the browser stage (`pytest --browser tests/browser`): ComfyUI's real web frontend in
headless Chromium (Debian's package, driven by Playwright), against a real ComfyUI server started
exactly as the real-ComfyUI stage starts it (its fixtures, tests/real_comfyui/conftest.py: ComfyUI
0.8.0, the pack linked as custom_nodes/comfyui-uso, the tiny models under the workflows' names).

A failing test leaves a screenshot of the page in the artifacts folder (BROWSER_ARTIFACTS, default
out/browser_artifacts), which is printed at the end of the run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

import browser_pages as bp
import real_comfyui as rc

# The real-ComfyUI stage's fixtures (comfy_stage, comfy_venv, comfy), one definition for both stages.
_spec = importlib.util.spec_from_file_location(
    "real_comfyui_stage_fixtures", Path(__file__).resolve().parents[1] / "real_comfyui" / "conftest.py")
_stage = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _stage  # its dataclasses look their module up there
_spec.loader.exec_module(_stage)
comfy_stage = _stage.comfy_stage
comfy_venv = _stage.comfy_venv
comfy = _stage.comfy

ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", bp.PACK_ROOT / "out" / "browser_artifacts"))
_failures: list[Path] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def pytest_terminal_summary(terminalreporter):
    if _failures:
        terminalreporter.write_line(f"[browser] screenshots of {len(_failures)} failing check(s) in {ARTIFACTS}:")
        for path in _failures:
            terminalreporter.write_line(f"  {path}")


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = bp.launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / (request.node.name.replace("/", "_").replace("[", "-").replace("]", "") + ".png")
        try:
            page.screenshot(path=str(path), full_page=True)
            _failures.append(path)
        except Exception as exc:  # a crashed page: the test's own error says what failed
            print(f"[browser] no screenshot for {request.node.name}: {exc}")
    context.close()


def _post_setting(server: rc.ComfyServer, key: str, value) -> None:
    req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


@pytest.fixture()
def missing_models_warning(comfy):
    """The missing-models dialog switched on (comfyui_here.sh setup switches it off for screenshots)."""
    _post_setting(comfy, "Comfy.Workflow.ShowMissingModelsWarning", True)
    yield
    _post_setting(comfy, "Comfy.Workflow.ShowMissingModelsWarning", False)


@pytest.fixture()
def remove_models(comfy_stage):
    """`remove_models([(folder, name), ...])` takes those files out of ComfyUI's model folders for the
    test; they are put back afterwards, also when the test fails."""
    moved: list[tuple[Path, Path]] = []
    away = comfy_stage.root / "models_removed"

    def remove(files):
        for folder, name in files:
            src = comfy_stage.models_dir / folder / name
            dst = away / folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
            moved.append((dst, src))

    yield remove
    for dst, src in moved:
        dst.rename(src)


class _FrontendServer(rc.ComfyServer):
    """A ComfyUI server that serves another frontend build (`--front-end-root`)."""
    front_end_root: Path | None = None

    def _script_env(self) -> dict:
        env = super()._script_env()
        env["COMFY_EXTRA_ARGS"] += f" --front-end-root {self.front_end_root}"
        return env


@pytest.fixture(scope="session")
def latest_frontend(tmp_path_factory) -> Path:
    """The newest `comfyui-frontend-package` wheel from PyPI, unpacked (its static/ folder is the
    built frontend)."""
    root = tmp_path_factory.mktemp("latest_frontend")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "comfyui-frontend-package", "-d", str(root)], check=True, timeout=600)
    wheel = next(root.glob("comfyui_frontend_package-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root / "unpacked")
    static = root / "unpacked" / "comfyui_frontend_package" / "static"
    assert (static / "index.html").is_file(), f"no index.html in {wheel.name}"
    print(f"\n[browser] latest frontend: {wheel.name}")
    return static


@pytest.fixture(scope="session")
def latest_comfy(comfy_stage, comfy_venv, latest_frontend, request):
    """ComfyUI (same folder, venv and pack) serving the latest frontend package."""
    server = _FrontendServer(comfy_stage.comfy_dir, comfy_venv, comfy_stage.root / "state_latest_frontend",
                             rc.free_port(), comfy_stage.root / "output_latest_frontend", env=comfy_stage.server_env)
    server.front_end_root = latest_frontend
    return _stage._started(server, request)
