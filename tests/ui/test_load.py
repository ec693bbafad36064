"""Several people at once: three browser sessions start a job each, within a second, on one served app.

Run apart from the asyncio tests:  python -m pytest -m ui tests/ui
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from .conftest import PAGE_WAIT, choose_profile, select_model, status, tab, wait_until

pytestmark = pytest.mark.ui

PROFILES = ("edge", "local", "cloud")
JOB_TIMEOUT = 1200  # seconds: three tiny-dream jobs side by side take a few, far more on a loaded machine


def job_ids(page) -> list:
    """The ids of the jobs on this session's board (from the rows' ``aq-job-<id>`` classes)."""
    classes = page.locator('[class*="aq-job-"]').evaluate_all("els => els.map(e => e.className)")
    return sorted({int(m) for c in classes for m in re.findall(r"\baq-job-(\d+)\b", c)})


def row_text(page, job_id) -> str:
    """The row's header and figures (the spans inside Panel's shadow roots, which innerText skips)."""
    return " ".join(page.locator(f".aq-job-{job_id} .aq-muted, .aq-job-{job_id} .aq-kv").all_inner_texts())


def test_three_sessions_start_jobs_at_once(server, open_page, artifacts):
    t0 = time.monotonic()
    pages = [open_page(1280, 900).page for _ in PROFILES]  # each its own browser context: separate sessions
    # the sample model is built offline at server start; wait for it so every job quantizes at once
    tab(pages[0], "Models").click()
    wait_until(lambda: pages[0].get_by_text("BF16").count() > 0, 1200, what="tiny-dream to be built")
    tab(pages[0], "Jobs").click()

    for page, profile in zip(pages, PROFILES):
        select_model(page, "tiny-dream")
        choose_profile(page, profile)
    starts = [p.get_by_role("button", name=re.compile("Start quantizing")) for p in pages]
    for button in starts:  # one after the other, at once: the three jobs overlap
        button.click()

    # every session's board shows all three jobs (the manager is shared)
    for page in pages:
        tab(page, "Jobs").click()
    for i, page in enumerate(pages):
        wait_until(lambda p=page: len(job_ids(p)) == 3, PAGE_WAIT, what=f"three jobs on session {i + 1}'s board")
    ids = job_ids(pages[0])
    assert all(job_ids(p) == ids for p in pages), [job_ids(p) for p in pages]

    # all run and finish, as seen from one session; none failed, was cancelled or went missing
    watcher = pages[0]
    wait_until(lambda: all(status(watcher, j) in ("done", "failed", "cancelled") for j in ids), JOB_TIMEOUT,
               every=0.3, what="the three jobs to end")
    watcher.screenshot(path=str(artifacts / "load-three-jobs.png"), full_page=True)
    assert [status(watcher, j) for j in ids] == ["done"] * 3, {j: row_text(watcher, j) for j in ids}
    for page in pages[1:]:
        wait_until(lambda p=page: all(status(p, j) == "done" for j in ids), PAGE_WAIT, what="'done' in every session")

    # one job per profile, each in its own output folder, all written
    texts = {j: row_text(watcher, j) for j in ids}
    labels = sorted(p for p in PROFILES for t in texts.values() if f"· {p} ·" in t)
    assert labels == sorted(PROFILES), texts
    folders = [re.search(r"→\s*(\S+)", t).group(1) for t in texts.values()]
    assert len(set(folders)) == 3, folders
    out = Path(server.env["ARROW_QUANT_OUTPUT_ROOT"])
    for name in folders:
        manifest = out / name / "manifest.json"
        assert manifest.is_file(), f"{manifest} missing"
        json.loads(manifest.read_text())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(folders)
    print(f"three sessions, three jobs: {time.monotonic() - t0:.1f} s from opening the pages")
    # console errors (open_page) and server tracebacks (server) are checked by the fixtures at teardown
