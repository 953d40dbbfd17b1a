"""What a ComfyUI user sees of the pack in ComfyUI's real web frontend (1.35.9, the one ComfyUI 0.8.0
pins; one check also on the newest frontend package), in headless Chromium."""
from __future__ import annotations

import json
import re
import urllib.parse

import pytest

import browser_pages as bp
import real_comfyui as rc

TEMPLATES = [p.stem for p in rc.UI_WORKFLOWS]
PACK_MODULE = f"custom_nodes.{rc.PACK_NAME}"


def record_events(page) -> None:
    """Collect ComfyUI's websocket events and the tab titles (where the frontend shows progress)."""
    page.evaluate("""() => {
        window.__events = [];
        for (const ev of ['progress', 'executed', 'execution_error', 'execution_interrupted', 'execution_success'])
            window.comfyAPI.api.api.addEventListener(ev, e => window.__events.push([ev, e.detail]));
        window.__titles = [document.title];
        setInterval(() => { if (window.__titles.at(-1) !== document.title) window.__titles.push(document.title); }, 10);
    }""")


def wait_for_end(page, timeout_ms: int = 180_000) -> str:
    page.wait_for_function("""() => window.__events.some(e =>
        ['execution_success', 'execution_error', 'execution_interrupted'].includes(e[0]))""", timeout=timeout_ms)
    return next(e[0] for e in page.evaluate("window.__events")
                if e[0] in ("execution_success", "execution_error", "execution_interrupted"))


def press_run(page) -> None:
    page.get_by_role("button", name="Run", exact=True).click()


def tiny_generate(page, **overrides) -> None:
    for name, value in {**rc.TINY_OVERRIDES["USOGenerate"], **overrides}.items():
        bp.set_widget(page, "USOGenerate", name, value)


# -- templates ----------------------------------------------------------------------------------------

def test_templates_browser_shows_each_template_with_its_title_and_thumbnail(comfy, page):
    from PIL import Image

    fetched = {}
    page.on("response", lambda r: fetched.setdefault(urllib.parse.urlparse(r.url).path, r.status))
    page.goto(comfy.url + "/")
    bp.wait_for_app(page)
    bp.run_command(page, "Comfy.BrowseTemplates")
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(rc.PACK_NAME, exact=True).click()
    for name in TEMPLATES:
        card = dialog.locator(f"[data-testid='template-workflow-{name}']")
        card.wait_for(state="attached", timeout=30_000)
        card.scroll_into_view_if_needed()  # the grid renders a card's image once it is in view
        # Frontend 1.35.9 titles a pack's template with its file name.
        assert card.get_by_text(name, exact=True).count() == 1, card.inner_text()
        img = card.locator("img").first
        img.wait_for(state="attached", timeout=30_000)
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                               timeout=30_000)
        # The card shows workflows/<name>.jpg, not the frontend's placeholder (default-template.png).
        assert fetched.get(f"/api/workflow_templates/{rc.PACK_NAME}/{name}.jpg") == 200, sorted(fetched)
        with Image.open(rc.WORKFLOWS / f"{name}.jpg") as thumb:
            assert img.evaluate("(i) => [i.naturalWidth, i.naturalHeight]") == list(thumb.size)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_opens_with_no_missing_node_and_every_widget_in_view(comfy, page, name):
    bp.open_template(page, comfy.url, name)
    assert page.get_by_role("dialog").count() == 0, page.get_by_role("dialog").first.inner_text()
    unknown = page.evaluate("() => window.app.graph._nodes.filter(n => !(n.type in LiteGraph.registered_node_types))"
                            ".map(n => n.type)")
    assert unknown == []
    nodes = bp.graph_nodes(page)
    too_small = [(n["title"], n["size"], n["min"]) for n in nodes
                 if n["size"][0] < n["min"][0] or n["size"][1] < n["min"][1]]
    assert too_small == []
    assert bp.overlapping_nodes(nodes) == []


# -- missing models -----------------------------------------------------------------------------------

def _uso_style_models() -> list[dict]:
    return bp.declared_models(bp.load_template("uso_style"))


def _removal_sets():
    models = _uso_style_models()
    checkpoint = [m for m in models if m["directory"] == "checkpoints"]
    return {"all_four": models, "checkpoint_only": checkpoint}


@pytest.mark.parametrize("which", ["all_four", "checkpoint_only"])
def test_missing_models_dialog_lists_every_removed_file_with_its_download(comfy, page, missing_models_warning,
                                                                        remove_models, which):
    removed = _removal_sets()[which]
    assert len(removed) == (4 if which == "all_four" else 1)
    remove_models([(m["directory"], m["name"]) for m in removed])
    bp.open_template(page, comfy.url, "uso_style")
    dialog = page.get_by_role("dialog").filter(has_text="Missing Models")
    dialog.wait_for(state="visible", timeout=30_000)
    listed = dialog.locator("span[title]")
    entries = {listed.nth(i).inner_text().strip(): listed.nth(i).get_attribute("title") for i in range(listed.count())}
    assert entries == {f"{m['directory']} / {m['name']}": m["url"] for m in removed}
    for m in removed:
        assert dialog.locator(f"button[title='{m['url']}']").get_by_text("Download").count() == 1


@pytest.mark.parametrize("which", ["others", "checkpoint"])
def test_latest_frontend_lists_removed_models_with_folder_and_download(latest_comfy, page, missing_models_warning,
                                                                      remove_models, which):
    models = _uso_style_models()
    removed = [m for m in models if (m["directory"] == "checkpoints") == (which == "checkpoint")]
    remove_models([(m["directory"], m["name"]) for m in removed])
    bp.open_template(page, latest_comfy.url, "uso_style")
    page.get_by_text("View details").click()
    page.get_by_text("Missing Models", exact=True).wait_for(state="visible", timeout=30_000)
    text = page.inner_text("body")
    # Each missing file is shown as: its name, its model folder, a Download button.
    for m in removed:
        assert re.search(rf"(^|\n){re.escape(m['name'])}\n{re.escape(m['directory'])}\nDownload", text), text


# -- running ------------------------------------------------------------------------------------------

def test_run_on_uso_style_shows_progress_and_the_image_in_save_image(comfy, page):
    bp.open_template(page, comfy.url, "uso_style")
    tiny_generate(page, steps=6)
    record_events(page)
    press_run(page)
    assert wait_for_end(page) == "execution_success"
    # The tab title carries the running node's progress: "[17%] USOGenerate" ... "[100%] USOGenerate".
    steps = [int(m.group(1)) for t in page.evaluate("window.__titles")
             for m in [re.search(r"\[(\d+)%\] USOGenerate$", t)] if m]
    assert any(0 < s < 100 for s in steps), page.evaluate("window.__titles")
    assert steps == sorted(steps)
    saved = [e[1]["output"]["images"][0] for e in page.evaluate("window.__events") if e[0] == "executed"]
    assert len(saved) == 1
    page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'SaveImage');
                                      return n.imgs && n.imgs.length && n.imgs[0].complete; }""", timeout=30_000)
    shown = page.evaluate("""() => window.app.graph._nodes.find(n => n.type === 'SaveImage').imgs
                                .map(i => [i.src, i.naturalWidth, i.naturalHeight])""")
    assert len(shown) == 1
    src, width, height = shown[0]
    assert (width, height) == (64, 48)
    assert urllib.parse.parse_qs(urllib.parse.urlparse(src).query)["filename"] == [saved[0]["filename"]]


def test_cancel_stops_a_long_run(comfy, page):
    bp.open_template(page, comfy.url, "uso_style")
    steps = 200
    tiny_generate(page, width=128, height=128, steps=steps)
    record_events(page)
    press_run(page)
    page.wait_for_function(f"""() => window.__events.some(e => e[0] === 'progress' && e[1].max === {steps}
                                                             && e[1].value >= 1)""", timeout=120_000)
    page.get_by_role("button", name="Cancel current run").click()
    assert wait_for_end(page, timeout_ms=60_000) == "execution_interrupted"
    done = max(e[1]["value"] for e in page.evaluate("window.__events")
               if e[0] == "progress" and e[1]["max"] == steps)
    assert done < steps
    assert not [e for e in page.evaluate("window.__events") if e[0] == "executed"]
    queue = comfy.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []


def test_bad_width_in_an_opened_workflow_shows_one_message_naming_width(comfy, page):
    # A saved workflow with width 1000 (the widget itself snaps typed values to its step of 16).
    workflow = bp.load_template("uso_style")
    generate = next(n for n in workflow["nodes"] if n["type"] == "USOGenerate")
    generate["widgets_values"][1] = 1000
    page.goto(comfy.url + "/")
    bp.wait_for_app(page)
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    page.wait_for_function("""() => window.app.graph._nodes.find(n => n.type === 'USOGenerate')
                                   ?.widgets.find(w => w.name === 'width').value === 1000""", timeout=30_000)
    press_run(page)
    # ComfyUI checks the ranges before queueing; the multiple of 16 is checked when USO Generate
    # runs (generate_node.py says why), so the frontend shows the run's error dialog.
    dialog = page.get_by_role("dialog").filter(has_text="multiple of 16")
    dialog.wait_for(state="visible", timeout=60_000)
    lines = [line for line in dialog.inner_text().splitlines() if "1000" in line]
    assert len(lines) == 1, lines
    assert re.search(r"\bwidth\b", lines[0]) and "multiple of 16" in lines[0], lines[0]
    for other in ("height", "steps", "batch_size"):
        assert other not in lines[0], lines[0]


# -- keys ---------------------------------------------------------------------------------------------

def test_remote_key_never_appears_in_an_exported_workflow(comfy_stage, comfy, page):
    key = comfy_stage.fal.key
    secrets = [key, *key.split(":")]
    bp.open_template(page, comfy.url, "uso_remote")
    for name, value in rc.TINY_OVERRIDES["USORemoteGenerate"].items():
        bp.set_widget(page, "USORemoteGenerate", name, value)
    record_events(page)
    press_run(page)  # against the stage's fake fal, with the key from the server's environment
    assert wait_for_end(page) == "execution_success"
    with page.expect_download(timeout=30_000) as download:
        bp.run_command(page, "Comfy.ExportWorkflow")
        name_box = page.get_by_role("dialog").locator("input").first
        name_box.wait_for(state="visible", timeout=10_000)  # the frontend asks for a file name first
        name_box.press("Enter")
    exported = open(download.value.path(), encoding="utf-8").read()
    assert json.loads(exported)["nodes"], "the export holds the workflow"
    api_prompt = json.dumps(page.evaluate("async () => (await window.app.graphToPrompt()).output"))
    stored = json.dumps(page.evaluate("() => Object.assign({}, window.localStorage, window.sessionStorage)"))
    for secret in secrets:
        assert secret not in exported
        assert secret not in api_prompt
        assert secret not in stored


# -- node help ----------------------------------------------------------------------------------------

def test_every_node_has_a_help_page_naming_its_inputs_and_outputs(comfy, page):
    info = comfy.object_info()
    ours = {name: node for name, node in info.items() if node.get("python_module") == PACK_MODULE}
    assert len(ours) == 7
    page.goto(comfy.url + "/")
    for name, node in ours.items():
        # Where the node library's help panel looks (frontend 1.35.9: /extensions/<pack>/docs/<node>.md).
        resp = page.request.get(f"{comfy.url}/extensions/{rc.PACK_NAME}/docs/{name}.md")
        assert resp.status == 200, name
        text = resp.text()
        assert text.startswith(f"# {node['display_name']}\n"), (name, text[:80])
        inputs = [n for section in ("required", "optional") for n in node["input"].get(section, {})]
        for item in inputs + list(node["output_name"]):
            assert f"`{item}`" in text, (name, item)
