"""Shipping a result from the served app: the output's path, Export actions, GGUF checks.

Run apart from the asyncio tests:  python -m pytest -m ui tests/ui
"""
from __future__ import annotations

import pytest

from .conftest import PAGE_WAIT, SERVER_START_S, Watched, new_context, select_model, start, start_server, status, stop_server, tab, wait_until

pytestmark = pytest.mark.ui

JOB_TIMEOUT = 180


def test_a_finished_job_shows_its_path_and_exports_run_as_jobs(browser, tmp_path, artifacts):
    from arrow_quant_v2.samples import generate_dream

    root = tmp_path / "models"
    generate_dream(root / "small-dream", hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    srv = start_server(tmp_path, root)
    try:
        ctx = new_context(browser, 1600, 1000)
        w = Watched(ctx.new_page())
        page = w.page
        page.goto(srv.url)
        page.wait_for_selector("text=Start quantizing", timeout=SERVER_START_S * 1000)
        select_model(page, "small-dream")
        page.locator(".aq-runtime button").filter(has_text="GGUF").click()  # the runtime, next to the profile
        start(page, "cloud")
        wait_until(lambda: status(page, 1) == "done", JOB_TIMEOUT, every=0.5, what="the job")
        store = tmp_path / "outputs" / "small-dream-cloud-gguf"
        path = page.locator(".aq-path-1 input")
        wait_until(lambda: path.count() > 0, PAGE_WAIT, what="the output path")
        assert path.input_value() == str(store.resolve())
        # both exports run as jobs under the result and list their file (absolute path) and size
        page.locator(".aq-export-gguf-1 button").click()
        page.locator(".aq-export-st-1 button").click()
        done = page.locator(".aq-export-path")
        wait_until(lambda: done.count() == 2, JOB_TIMEOUT, what="both exports")
        shown = sorted(done.all_inner_texts())
        gguf_file = store.parent / "small-dream-cloud-gguf.gguf"
        assert shown == sorted([str(gguf_file), str(store.parent / "small-dream-cloud-gguf-float16")])
        assert gguf_file.read_bytes()[:4] == b"GGUF"
        sizes = page.locator(".aq-export-path + .aq-kv").all_inner_texts()
        assert len(sizes) == 2 and all(t.endswith(("KiB", "MiB")) for t in sizes), sizes
        # the Quality tab checks a GGUF file against its source; a path outside the roots is refused
        tab(page, "Quality").click()
        page.locator(".aq-gguf-path input").fill("/etc/hosts.gguf")
        page.locator(".aq-gguf-check button").click()
        wait_until(lambda: page.get_by_text("outside the allowed").count() > 0, PAGE_WAIT, what="the refusal")
        tab(page, "Quality").click()
        page.locator(".aq-gguf-model select").select_option("small-dream")
        page.locator(".aq-gguf-path input").fill(str(gguf_file))
        page.locator(".aq-gguf-check button").click()
        wait_until(lambda: status(page, 2) == "done", JOB_TIMEOUT, every=0.5, what="the GGUF check")
        tab(page, "Quality").click()
        wait_until(lambda: page.get_by_text("#2 small-dream · gguf").count() > 0, PAGE_WAIT, what="the check's result")
        page.screenshot(path=str(artifacts / "app-exports.png"), full_page=True)
        ctx.close()
        assert not w.errors, w.errors
    finally:
        stop_server(srv)
    assert not srv.problems(), srv.log_text()[-4000:]
