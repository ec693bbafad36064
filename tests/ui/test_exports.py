"""Shipping a result from the served app: the output's path, Export actions, GGUF checks.

Run apart from the asyncio tests:  python -m pytest -m ui tests/ui
"""
from __future__ import annotations

import pytest

from .conftest import PAGE_WAIT, Watched, select_model, start, start_server, status, stop_server, tab, wait_until

pytestmark = pytest.mark.ui

JOB_TIMEOUT = 180


def test_a_finished_job_shows_its_path_and_exports_run_as_jobs(browser, tmp_path, artifacts):
    from arrow_quant_v2.samples import generate_dream

    root = tmp_path / "models"
    generate_dream(root / "small-dream", hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    srv = start_server(tmp_path, root)
    try:
        ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        w = Watched(ctx.new_page())
        page = w.page
        page.goto(srv.url)
        page.wait_for_selector("text=Start quantizing", timeout=60_000)
        select_model(page, "small-dream")
        start(page, "cloud")
        wait_until(lambda: status(page, 1) == "done", JOB_TIMEOUT, every=0.5, what="the job")
        store = tmp_path / "outputs" / "small-dream-cloud"
        path = page.locator(".aq-path-1 input")
        wait_until(lambda: path.count() > 0, PAGE_WAIT, what="the output path")
        assert path.input_value() == str(store.resolve())
        # safetensors: a job with its file and size; GGUF of ArrowQuant encodings: the error and its fix
        page.locator(".aq-export-st-1 button").click()
        done = page.locator(".aq-export-path")
        wait_until(lambda: done.count() > 0, JOB_TIMEOUT, what="the safetensors export")
        assert done.first.inner_text() == str(store.parent / "small-dream-cloud-float16")
        assert (store.parent / "small-dream-cloud-float16" / "config.json").is_file()
        page.locator(".aq-export-gguf-1 button").click()
        error = page.locator(".aq-export .aq-error")
        wait_until(lambda: error.count() > 0, JOB_TIMEOUT, what="the GGUF export's error")
        assert "target_runtime" in error.first.inner_text()
        assert not list(store.parent.glob("*.gguf"))
        # a path outside the roots is refused on the Quality tab's GGUF check
        tab(page, "Quality").click()
        page.locator(".aq-gguf-path input").fill("/etc/hosts.gguf")
        page.locator(".aq-gguf-check button").click()
        wait_until(lambda: page.get_by_text("outside the allowed").count() > 0, PAGE_WAIT, what="the refusal")
        page.screenshot(path=str(artifacts / "app-exports.png"), full_page=True)
        ctx.close()
        assert not w.errors, w.errors
    finally:
        stop_server(srv)
    assert not srv.problems(), srv.log_text()[-4000:]
