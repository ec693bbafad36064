"""The served app, used as a person would, in Debian's Chromium.

Run apart from the asyncio tests:  python -m pytest -m ui tests/ui
"""
from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

from .conftest import (PAGE_WAIT, SERVER_START_S, cut_off_controls, heatmap_data, no_sideways_scroll, progress, select_model,
                       start, status, tab, wait_until)

pytestmark = pytest.mark.ui

#: Seconds a job may take: generous, because the suite must also pass on a loaded 2-core machine
#: (two 168M-parameter jobs with validation share the cores with whatever else runs there).
JOB_TIMEOUT = 1200


def drawn(page) -> None:
    """Wait until the browser has painted what it holds (two animation frames)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def hover_cell_tooltip(page, fig_index=0) -> str:
    """Move over a few points of a figure until a tooltip with text shows; its text."""
    fig = page.locator(".bk-Figure:visible").nth(fig_index)  # hidden tabs hold figures too
    expect(fig).to_be_visible(timeout=PAGE_WAIT * 1000)
    fig.scroll_into_view_if_needed()
    drawn(page)
    box = fig.bounding_box()
    tip = page.locator(".bk-tooltip-content")
    for fx, fy in ((0.3, 0.5), (0.45, 0.4), (0.25, 0.6), (0.5, 0.55)):
        page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
        try:
            wait_until(lambda: tip.count() and tip.first.inner_text().strip(), 5, what="a tooltip")
            return tip.first.inner_text()
        except AssertionError:
            continue
    return ""


def test_page_is_local_and_offline(server, open_page, artifacts):
    """Every asset comes from the Panel server: no CDN, no web fonts."""
    with urllib.request.urlopen(server.url, timeout=SERVER_START_S) as r:
        html = r.read().decode()
    external = [u for u in re.findall(r"""(?:src|href)=["']([^"']+)""", html)
                if re.match(r"(https?:)?//", u) and not re.match(r"https?://(127\.0\.0\.1|localhost)[:/]", u)]
    assert not external, external
    assert "fonts.googleapis" not in html and "cdn.jsdelivr" not in html and "unpkg.com" not in html
    w = open_page()
    # before the first job, the Jobs tab says what to do
    expect(w.page.get_by_text("No jobs yet")).to_be_visible(timeout=PAGE_WAIT * 1000)
    expect(w.page.get_by_text(re.compile("press ▶ Start quantizing"))).to_be_visible()
    hosts = {re.sub(r"^\w+://([^/]+)/.*$", r"\1", u) for u in w.requests if u.startswith("http")}
    assert hosts == {server.url.split("/")[2]}, hosts
    w.page.screenshot(path=str(artifacts / "app-start.png"), full_page=True)


def test_sample_models_are_ready_from_the_first_start(open_page):
    w = open_page()
    page = w.page
    tab(page, "Models").click()
    # tiny-dream is generated offline at server start; its row then shows dtype and shards
    wait_until(lambda: page.get_by_text("BF16").count() > 0, JOB_TIMEOUT, what="tiny-dream to be built")
    assert page.get_by_text("tiny-dream").count() and page.get_by_text("dream-medium").count()


def test_two_jobs_side_by_side_cancel_one_then_quality_and_compare(server, open_page, artifacts):
    w = open_page()
    page = w.page
    select_model(page, "dream-medium")
    start(page, "edge")
    wait_until(lambda: status(page, 1), PAGE_WAIT, what="job #1's row")
    start(page, "local")
    wait_until(lambda: status(page, 2), PAGE_WAIT, what="job #2's row")

    # both bars move (the first run after a kernel change may compile a while); how often the page
    # is updated is a speed, measured by benchmarks/bench_app.py, not asserted here
    wait_until(lambda: progress(page, 1) > 30 and progress(page, 2) > 30, JOB_TIMEOUT, 0.2, what="both jobs under way")
    first = (progress(page, 1), progress(page, 2))
    wait_until(lambda: progress(page, 1) > first[0] and progress(page, 2) > first[1], JOB_TIMEOUT, 0.1,
               what="both progress bars to move on")
    page.screenshot(path=str(artifacts / "jobs-running.png"), full_page=True)

    # a second tab sees the same jobs, and cancels the one that is further from done
    other = open_page(1200, 800).page
    wait_until(lambda: status(other, 1) and status(other, 2), PAGE_WAIT, what="the jobs in a second tab")
    assert progress(other, 1) > 0 and progress(other, 2) > 0
    victim, kept = (1, 2) if progress(other, 1) <= progress(other, 2) else (2, 1)
    assert status(other, victim) == "running", "the jobs ended before one could be cancelled: use a bigger model"
    other.locator(f".aq-cancel-{victim} button").click()
    wait_until(lambda: status(page, victim) == "cancelled", PAGE_WAIT, what=f"job #{victim} cancelled in the first tab")
    expect(page.locator(f".aq-cancel-{victim} button")).to_be_hidden()
    other.screenshot(path=str(artifacts / "second-tab.png"), full_page=True)

    wait_until(lambda: status(page, kept) == "done", JOB_TIMEOUT, every=0.5, what=f"job #{kept} to finish")
    text = " ".join(page.locator(f".aq-job-{kept} .aq-kv").all_inner_texts())
    for word in ("size", "compression", "mean cos", "min cos"):
        assert word in text, text
    out = Path(server.env["ARROW_QUANT_OUTPUT_ROOT"])
    names = {1: "dream-medium-edge", 2: "dream-medium-local"}
    assert (out / names[kept] / "manifest.json").is_file()
    assert not (out / names[victim]).exists()  # the cancelled job left nothing
    page.screenshot(path=str(artifacts / "jobs-done.png"), full_page=True)

    # open the finished job's heatmap and hover a cell
    page.locator(f".aq-open-{kept} button").click()
    wait_until(lambda: page.get_by_text("Worst layers").count() > 0 and page.locator(".bk-Figure").count() > 0, 30,
               what="the quality view")
    # every quantized tensor has a cell (or a row under "Outside the blocks"); colour covers the data
    counted = page.get_by_text(re.compile(r"\d+ quantized tensors")).first.inner_text()
    shown = int(re.search(r"(\d+) quantized tensors", counted).group(1))
    data = heatmap_data(page)
    outside = page.locator(".aq-outside tbody tr").count()
    assert len(set(data["names"])) + outside == shown, (len(set(data["names"])), outside, shown)
    lo, hi = min(data["values"]), max(data["values"])
    low, high = data["mappers"][0]
    # scaled to the data shown (not a fixed 0.9..0.99999): from the worst cell up to at most the best
    assert low <= lo < high <= max(hi, lo + 0.6), (low, high, lo, hi)
    tip = hover_cell_tooltip(page)
    assert "tensor:" in tip and "model.layers." in tip, tip
    for word in ("shape:", "bits:", "reason:", "cosine:", "rel. error:"):
        assert word in tip, tip
    page.screenshot(path=str(artifacts / "quality-hover.png"), full_page=False)
    assert page.get_by_text("Worst layers").count() and page.get_by_text("Fell back to more bits").count()

    # two results of one model, side by side: the sample model at int2 and int4
    select_model(page, "tiny-dream")
    start(page, "edge")
    start(page, "local")
    tab(page, "Jobs").click()
    wait_until(lambda: status(page, 3) == "done" and status(page, 4) == "done", JOB_TIMEOUT, every=0.5,
               what="the tiny-dream jobs")
    tab(page, "Compare").click()
    a = page.locator(".aq-compare-a select")
    b = page.locator(".aq-compare-b select")
    a.select_option(label=next(t for t in a.evaluate("e => Array.from(e.options).map(o => o.text)") if "edge" in t
                               and "tiny-dream" in t))
    wait_until(lambda: "tiny-dream" in b.evaluate("e => e.options[e.selectedIndex]?.text || ''"), PAGE_WAIT,
               what="result B of the same model")
    wait_until(lambda: page.locator(".bk-Figure:visible").count() >= 2, PAGE_WAIT, what="the difference heatmap")
    tip = hover_cell_tooltip(page, fig_index=1)
    assert "cosine #3" in tip and "cosine #4" in tip, tip
    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)

    # the same page in a narrow window: the launcher moves above the tabs, nothing is cut off
    page.set_viewport_size({"width": 820, "height": 700})
    wait_until(lambda: no_sideways_scroll(page), PAGE_WAIT, what="the page to fit 820 px")
    box = page.locator(".aq-compare-b select").bounding_box()
    assert box["x"] + box["width"] <= 820, box
    page.screenshot(path=str(artifacts / "narrow-compare.png"), full_page=False)


@pytest.mark.parametrize("width,height", [(800, 600), (900, 700), (1400, 900)])
def test_any_window_from_800_px(open_page, artifacts, width, height):
    """Every tab fits the window and every control in it, the launcher's (its tuning cards open) included, lies
    inside the window and inside whatever clips it: nothing to scroll sideways, nothing cut off."""
    page = open_page(width, height).page
    for card in ("Tune the config", "Advanced"):  # their controls too
        page.get_by_text(card, exact=True).click()
    expect(page.locator(".aq-field-min_accuracy input")).to_be_visible()
    for name in ("Jobs", "Quality", "Compare", "Models"):
        tab(page, name).click()
        wait_until(lambda: no_sideways_scroll(page), PAGE_WAIT, what=f"the {name} tab to fit {width} px")
        drawn(page)
        assert not cut_off_controls(page), f"{name} tab at {width}x{height}: {cut_off_controls(page)}"
    expect(page.get_by_text("Model roots", exact=True)).to_be_visible()
    for control in (page.get_by_role("button", name=re.compile("Start quantizing")), page.locator(".aq-runtime button").last):
        control.scroll_into_view_if_needed()
        box = control.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, box
    page.screenshot(path=str(artifacts / f"window-{width}.png"), full_page=False)


def test_remote_browsers_are_refused(monkeypatch):
    """``panel serve`` listens on every interface by default: the page itself answers only this machine."""
    from types import SimpleNamespace

    import panel as pn

    from arrow_quant_v2.ui import serving

    assert serving.is_loopback("127.0.0.1") and serving.is_loopback("::1") and serving.is_loopback("localhost")
    assert not serving.is_loopback("192.168.1.20") and not serving.is_loopback(None)

    def doc_from(ip):
        return SimpleNamespace(session_context=SimpleNamespace(request=SimpleNamespace(remote_ip=ip)))

    monkeypatch.delenv(serving.ALLOW_REMOTE_ENV, raising=False)
    monkeypatch.setattr(type(pn.state), "curdoc", property(lambda self: doc_from("192.168.1.20")))
    assert not serving.client_is_local()
    monkeypatch.setenv(serving.ALLOW_REMOTE_ENV, "1")
    assert serving.client_is_local()
    monkeypatch.delenv(serving.ALLOW_REMOTE_ENV)
    monkeypatch.setattr(type(pn.state), "curdoc", property(lambda self: doc_from("127.0.0.1")))
    assert serving.client_is_local()
    monkeypatch.undo()
    monkeypatch.setattr(serving, "client_is_local", lambda: False)
    assert "only answers browsers on the machine" in serving.page().object


def test_budget_range_and_fidelity_chart_for_a_model_with_a_graph(browser, tmp_path, artifacts):
    """terrain-unet (it has a graph): the reachable sizes show by the budget, a budgeted job
    reports its budget, and the quality view draws the per-noise-level fidelity by the heatmap."""
    import shutil

    from arrow_quant_v2.samples import sample_path

    from .conftest import Watched, new_context, start_server, stop_server

    root = tmp_path / "models"
    shutil.copytree(sample_path("terrain-unet"), root / "my-terrain")
    srv = start_server(tmp_path, root)
    try:
        ctx = new_context(browser, 1800, 1000)
        w = Watched(ctx.new_page())
        page = w.page
        page.goto(srv.url)
        page.wait_for_selector("text=Start quantizing", timeout=SERVER_START_S * 1000)
        select_model(page, "my-terrain")
        page.get_by_role("button", name="edge", exact=True).click()
        wait_until(lambda: page.get_by_text("Reachable: ≈").count() > 0, JOB_TIMEOUT, what="the reachable sizes")
        budget = page.locator(".aq-budget input")
        budget.fill("999")
        budget.press("Enter")
        wait_until(lambda: page.get_by_text("cannot be reached").count() > 0, PAGE_WAIT, what="the out-of-range message")
        budget.fill("5")
        budget.press("Enter")
        wait_until(lambda: page.get_by_text("cannot be reached").count() == 0, PAGE_WAIT, what="an in-range budget")
        page.get_by_role("button", name=re.compile("Start quantizing")).click()
        wait_until(lambda: status(page, 1) == "done", JOB_TIMEOUT, every=0.5, what="the terrain-unet job")
        assert "budget" in " ".join(page.locator(".aq-job-1 .aq-kv").all_inner_texts())
        page.locator(".aq-open-1 button").click()
        wait_until(lambda: page.get_by_text("End-to-end fidelity").count() > 0 and page.locator(".bk-Figure").count() >= 2,
                   PAGE_WAIT, what="the fidelity chart")
        drawn(page)
        page.screenshot(path=str(artifacts / "quality-fidelity.png"), full_page=True)
        ctx.close()
        assert not w.errors, w.errors
        assert not w.external, w.external
    finally:
        stop_server(srv)
    assert not srv.problems(), srv.log_text()[-6000:]
