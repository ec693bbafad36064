"""The quickstart notebook, executed and exported to HTML as someone would share it
(``jupyter nbconvert --to html --execute``), read offline in Chromium: every view is filled,
nothing waits for a kernel, the outputs are clean.

Run with the browser tests:  python -m pytest -m ui tests/ui
"""
from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from .conftest import PAGE_WAIT, ROOT, new_context, tab, wait_until

pytestmark = pytest.mark.ui

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
#: Text a view shows while it waits for work or for a tab switch that a static page never does.
WAITING = ("computing the reachable sizes", "No finished job yet", "Finish two jobs", "reachable sizes: shown in the app")
#: BokehJS with Panel is about 3 MB; the notebook must load it once.
BOKEHJS_BYTES = 1_000_000
#: What the launcher's reachable sizes may end as: the range, or (past the cell's bound, on a loaded
#: machine) that they were not computed and how to compute them. Never a waiting text.
RANGE_SHOWN = re.compile(r"Reachable: ≈|reachable sizes not computed: .*size_range\(model, config\) gives them")
#: Every Bokeh plot of the page as BokehJS laid it out: its frame is the area inside the axes where the
#: glyphs are drawn. A plot BokehJS never laid out keeps a 0 x 0 frame in a canvas of the right size: the
#: element looks sized, nothing is drawn. ``shown``: not in a hidden tab (tabs hide with visibility).
PLOT_FRAMES = """() => [...Bokeh.index.all_views()].filter(v => v.model.type === 'Figure').map(v => ({
    id: v.model.id, title: v.model.title ? v.model.title.text : '',
    shown: v.el.checkVisibility({visibilityProperty: true}),
    frame: [Math.round(v.frame.bbox.width), Math.round(v.frame.bbox.height)]}))"""
#: A frame smaller than one heatmap row (26 px) has nothing readable drawn in it.
MIN_FRAME_PX = 20
#: Seconds a plot just shown may take to be laid out.
LAYOUT_WAIT = 10


def plot_frames(page) -> list:
    return page.evaluate(PLOT_FRAMES)


def undrawn(frames) -> list:
    return [f for f in frames if f["shown"] and min(f["frame"]) < MIN_FRAME_PX]


def check_drawn(page, where: str) -> list:
    """The ids of the plots shown now, once each has a drawn frame (fails naming those that have none)."""
    try:
        wait_until(lambda: not undrawn(plot_frames(page)), LAYOUT_WAIT, what="the plots' layout")
    except AssertionError:
        raise AssertionError(f"{where}: plots shown with no drawn frame: {undrawn(plot_frames(page))}") from None
    return [f["id"] for f in plot_frames(page) if f["shown"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, artifacts):
    """``(executed notebook, exported HTML path)``, run in a fresh sample cache and output folder."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    tmp = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    import os

    env = {"ARROW_QUANT_CACHE": str(tmp / "cache"), "ARROW_QUANT_OUTPUT_ROOT": str(tmp / "out"),
           "ARROW_QUANT_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                       ).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    body, _ = HTMLExporter().from_notebook_node(nb)
    html = artifacts / "quickstart.html"
    html.write_text(body)
    return nb, html


def test_outputs_are_clean_and_bokehjs_loads_once(exported):
    nb, _ = exported
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    empty = [o for o in outputs if o.output_type in ("display_data", "execute_result") and not o.get("data")]
    assert not empty, f"{len(empty)} empty outputs"
    loads = [o for o in outputs if len(json.dumps(o.get("data", {}).get("application/javascript", ""))) > BOKEHJS_BYTES]
    assert len(loads) == 1, f"BokehJS loaded {len(loads)} times"


def test_every_view_is_filled_in_the_static_export(exported, browser, artifacts):
    _, html = exported
    text = html.read_text()
    for words in WAITING:
        assert words not in text, words
    ctx = new_context(browser, 1500, 1000, offline=True)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html.as_uri())
    expect(page.get_by_text(RANGE_SHOWN).first).to_be_visible(timeout=PAGE_WAIT * 1000)
    expect(page.get_by_text("Worst layers").first).to_be_visible()
    expect(page.locator(".bk-Figure").first).to_be_visible()
    # every plot is drawn: the notebook's own cells' now, each dashboard tab's when it is shown
    seen = set(check_drawn(page, "the page as it opens"))
    # the dashboard's tabs hold what the live kernel showed: showing one shows its plots
    shown = page.locator(".bk-Figure:visible")
    on_jobs = shown.count()  # the dashboard opens on Jobs, which has none
    for name, more, shot in (("Quality", 1, "notebook-dashboard-quality.png"),
                             ("Compare", 2, "notebook-dashboard-compare.png")):
        tab(page, name).scroll_into_view_if_needed()
        tab(page, name).click()
        wait_until(lambda: shown.count() >= on_jobs + more, PAGE_WAIT, what=f"the {name} tab's plots")
        seen |= set(check_drawn(page, f"the dashboard's {name} tab"))
        page.locator("[class*=Tabs]").last.screenshot(path=str(artifacts / shot))
    never = [f for f in plot_frames(page) if f["id"] not in seen]
    assert not never, f"plots never shown with a drawn frame: {never}"
    shown.last.scroll_into_view_if_needed()  # the Compare tab's Δ heatmap, the last chart of the page
    shown.last.screenshot(path=str(artifacts / "notebook-compare-delta.png"))
    page.screenshot(path=str(artifacts / "notebook-export.png"), full_page=True)
    for words in WAITING:
        assert page.get_by_text(words).count() == 0, words
    ctx.close()
    assert not errors, errors
