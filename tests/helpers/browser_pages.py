"""Drive ComfyUI's real web frontend in headless Chromium (Playwright) for the browser stage
(tests/browser) and for the templates' thumbnails.

Chromium is Debian's package (`apt-get install chromium`); Playwright drives it through
`executable_path`, so Playwright never downloads a browser. Everything here reads what a user sees:
the page, its dialogs, and the graph as the frontend holds it (`window.app`).

`python tests/helpers/browser_pages.py thumbnails URL` writes workflows/<name>.jpg, a screenshot of
each template's graph as the frontend shows it, from a ComfyUI at URL that has the pack installed
as custom_nodes/comfyui-uso.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-uso"
#: LiteGraph draws a node's title bar above its `pos` (LiteGraph.NODE_TITLE_HEIGHT in 1.35.9).
TITLE_HEIGHT = 30


class BrowserMissing(RuntimeError):
    pass


def load_template(name: str) -> dict:
    return json.loads((PACK_ROOT / "workflows" / f"{name}.json").read_text("utf-8"))


def declared_models(wf: dict) -> list[dict]:
    """The `properties.models` / `models` entries ComfyUI's frontend (1.35.9) reads for its
    missing-models dialog: a node's entry only where its `name` equals one of that node's widget
    values, then every workflow-level entry."""
    kept = []
    for node in wf["nodes"]:
        values = {v for v in node.get("widgets_values", []) if isinstance(v, str)}
        kept += [m for m in node.get("properties", {}).get("models", []) if m["name"] in values]
    return kept + wf.get("models", [])


def chromium_path() -> str:
    """Debian's Chromium (`apt-get install chromium`); CHROMIUM names another binary."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise BrowserMissing("Chromium not found: `apt-get update && apt-get install -y chromium` "
                         "(or set CHROMIUM to a Chromium binary)")


def launch(playwright):
    # --no-sandbox: CI runs as root, where Chromium refuses its sandbox.
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def wait_for_app(page, timeout_ms: int = 90_000) -> None:
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=timeout_ms)


def open_template(page, base_url: str, name: str, source: str = PACK_NAME) -> None:
    """Open a template the way the template browser does (`?template=NAME&source=PACK`) and wait
    until its nodes are on the canvas."""
    ids = sorted(n["id"] for n in load_template(name)["nodes"])
    page.goto(f"{base_url}/?template={name}&source={source}")
    wait_for_app(page)
    # The default graph is on the canvas first; the template replaces it.
    page.wait_for_function("""(ids) => JSON.stringify(window.app.graph._nodes.map(n => Number(n.id)).sort((a, b) => a - b))
                               === JSON.stringify(ids) && window.app.graph._nodes.some(n => n.type.startsWith('USO'))""",
                           arg=ids, timeout=60_000)
    page.wait_for_timeout(500)  # the frontend resizes nodes to their computed size right after loading


def graph_nodes(page) -> list[dict]:
    """Every node as the frontend holds it: type, title, mode, pos, size and its computed minimum
    size (what it needs to show every widget)."""
    return page.evaluate("""() => window.app.graph._nodes.map(n => ({
        id: n.id, type: n.type, title: n.title, mode: n.mode,
        pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]], min: n.computeSize()}))""")


def overlapping_nodes(nodes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes (title bar included) overlap: the lower one hides part of the other."""
    boxes = [(f"{n['title']} (#{n['id']})", n["pos"][0], n["pos"][1] - TITLE_HEIGHT,
              n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in nodes]
    pairs = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]:
                pairs.append((a[0], b[0]))
    return pairs


def set_widget(page, node_type: str, widget: str, value) -> None:
    """Set a widget's value on the (single) node of `node_type`, as typing into it would."""
    ok = page.evaluate("""([type, name, value]) => {
        const nodes = window.app.graph._nodes.filter(n => n.type === type);
        if (nodes.length !== 1) return `expected one ${type}, found ${nodes.length}`;
        const w = (nodes[0].widgets || []).find(w => w.name === name);
        if (!w) return `${type} has no widget ${name}`;
        w.value = value;
        if (w.callback) w.callback(value);
        window.app.graph.setDirtyCanvas(true, true);
        return true;
    }""", [node_type, widget, value])
    assert ok is True, ok


def run_command(page, command_id: str) -> None:
    """Start a frontend command, as its menu entry or key does (not waiting for it: some commands
    wait for the user, e.g. for a file name)."""
    page.evaluate("(id) => { window.app.extensionManager.command.execute(id); }", command_id)


def save_thumbnail(page, path: Path, width: int = 1024) -> None:
    """A picture of the graph alone (what the template holds: its nodes, widgets and input images):
    focus mode hides the menus, the view fits the graph at a zoom where LiteGraph still draws text,
    and the screenshot is clipped to the nodes, then scaled to `width` pixels."""
    from PIL import Image

    run_command(page, "Workspace.ToggleFocusMode")
    page.wait_for_timeout(300)
    run_command(page, "Comfy.Canvas.FitView")
    page.wait_for_timeout(300)
    clip = page.evaluate("""(title) => {
        const c = window.app.canvas, ds = c.ds;
        c.show_info = false;
        const ns = window.app.graph._nodes;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const r = c.canvas.getBoundingClientRect(), pad = 16 * ds.scale;
        const sx = x => r.left + (x + ds.offset[0]) * ds.scale, sy = y => r.top + (y + ds.offset[1]) * ds.scale;
        c.setDirty(true, true);
        return {x: sx(x0) - pad, y: sy(y0) - pad, width: (x1 - x0) * ds.scale + 2 * pad, height: (y1 - y0) * ds.scale + 2 * pad};
    }""", TITLE_HEIGHT)
    page.wait_for_timeout(800)
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), clip=clip)
    run_command(page, "Workspace.ToggleFocusMode")
    with Image.open(raw) as im:
        im = im.convert("RGB")
        im.resize((width, round(im.height * width / im.width)), Image.LANCZOS).save(path, quality=85)
    raw.unlink()


def write_thumbnails(base_url: str, out_dir: Path = PACK_ROOT / "workflows") -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as p:
        browser = launch(p)
        # Large enough that the fitted graph stays above LiteGraph's low-quality zoom (no text below it).
        page = browser.new_page(viewport={"width": 2200, "height": 1700})
        for ui in sorted(out_dir.glob("*.json")):
            open_template(page, base_url, ui.stem)
            target = out_dir / f"{ui.stem}.jpg"
            save_thumbnail(page, target)
            written.append(target)
        browser.close()
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "thumbnails":
        sys.exit(__doc__)
    for path in write_thumbnails(sys.argv[2].rstrip("/")):
        print(path)
