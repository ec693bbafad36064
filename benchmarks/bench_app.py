"""How fast the app comes up, how often progress reaches the page, and how fast it draws a big heatmap.

    python benchmarks/bench_app.py [--skip-serve] [--skip-progress] [--tensors 600] [--repeats 5]

Prints, and writes ``benchmarks/results/app.json`` through ``benchmarks/_record.py`` (commit, machine,
versions, load average before and after, raw numbers, repeats); the README's App paragraph is
rendered from it (``scripts/render_figures.py``):
* the time from starting ``panel serve app`` to an interactive page in Chromium
  (the "Start quantizing" button visible), and to the server's first HTTP answer;
* how many times a second each of two side-by-side jobs' progress bars changes in the
  browser (sampled every 10 ms, ``--repeats`` windows of 1.5 s, median and all values):
  a speed, so it is measured here and not asserted by the browser tests;
* the time to build and render the per-layer heatmap of a synthetic 600-tensor validation
  report, for a transformer (block × module) and for a non-transformer (layer × metric):
  table layout (pandas), HoloViews element, Bokeh model (Python side), and in the browser
  (a standalone page with inline resources, until the plot is drawn).

Uses Debian's Chromium (/usr/bin/chromium) through Playwright; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import Record  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def synthetic_report(n: int, transformer: bool = True, seed: int = 0) -> dict:
    """A validation report of ``n`` quantized tensors with realistic cosines (int2..int8)."""
    rng = np.random.default_rng(seed)
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = []
    if transformer:
        names = ["model.embed_tokens.weight", "lm_head.weight"]
        i = 0
        while len(names) < n:
            names.append(f"model.layers.{i // len(modules)}.{modules[i % len(modules)]}.weight")
            i += 1
    else:
        names = [f"network.{part}.{i}.0.{kind}.weight" for i in range(n)
                 for part, kind in [("input_blocks", "in_layers.2")]][:n]
    per_layer = {}
    for name in names[:n]:
        bits = int(rng.choice([2, 4, 8], p=[0.5, 0.4, 0.1]))
        cos = 1 - 10 ** -(rng.normal({2: 1.1, 4: 2.3, 8: 4.2}[bits], 0.15))
        per_layer[name] = dict(cosine=float(cos), rel_error=float(np.sqrt(2 * (1 - cos))), sqnr_db=float(-10 * np.log10(2 * (1 - cos))),
                               bits=bits, encoding="kquant_nl", shape=[4096, 4096], numel=4096 * 4096,
                               bits_per_weight=bits + 0.5, reason=f"int{bits} g64", threshold=0.9, passed=True)
    return {"per_layer": per_layer}


RESULTS: dict = {}


def bench_heatmap(n: int, transformer: bool, browser) -> None:
    import holoviews as hv
    import panel as pn

    from arrow_quant_v2.ui.plots import quality_heatmap
    from arrow_quant_v2.ui.quality import QualityReport

    pn.extension(inline=True)
    hv.extension("bokeh", logo=False)
    report = synthetic_report(n, transformer)
    t0 = time.perf_counter()
    q = QualityReport(report=report)
    cells, layout = q.cells()
    t1 = time.perf_counter()
    plot = quality_heatmap(cells, layout, title=f"{n} tensors")
    t2 = time.perf_counter()
    hv.render(plot, backend="bokeh")
    t3 = time.perf_counter()
    label = "block × module" if layout == "block" else "layer × metric"
    print(f"heatmap, {n} tensors, {label} ({len(cells)} cells):")
    print(f"  tables (pandas)        {1000 * (t1 - t0):8.1f} ms")
    print(f"  HoloViews element      {1000 * (t2 - t1):8.1f} ms")
    print(f"  Bokeh model (render)   {1000 * (t3 - t2):8.1f} ms")
    if browser is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "heatmap.html"
        pn.pane.HoloViews(plot).save(html, resources="inline")
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t4 = time.perf_counter()
        page.goto(html.as_uri())
        page.locator(".bk-Figure").first.wait_for(timeout=60_000)
        page.wait_for_function("() => document.readyState === 'complete'")
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        t5 = time.perf_counter()
        page.close()
    print(f"  browser: load + draw   {1000 * (t5 - t4):8.1f} ms  (standalone page, inline resources)")
    RESULTS.setdefault("heatmap", []).append(
        {"tensors": n, "layout": layout, "cells": len(cells), "tables_ms": 1000 * (t1 - t0),
         "holoviews_ms": 1000 * (t2 - t1), "bokeh_ms": 1000 * (t3 - t2), "browser_ms": 1000 * (t5 - t4)})


def stop(proc: subprocess.Popen) -> None:
    """End a server this benchmark started (one still running jobs may take a while to stop)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_serve(browser) -> None:
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="aq-bench-app-")
    env = dict(os.environ, PYTHONPATH=str(ROOT), ARROW_QUANT_OUTPUT_ROOT=str(Path(tmp) / "out"),
               ARROW_QUANT_PREPARE_SAMPLES="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "app", "--port", str(port), "--address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:  # a static file: a page request that times out and is asked again leaves the server
                # building pages for nobody (on a loaded machine it never catches up)
                urllib.request.urlopen(f"http://127.0.0.1:{port}/static/js/bokeh.min.js", timeout=10).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit("panel serve exited")
                time.sleep(0.05)
        t1 = time.perf_counter()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/app")
        page.get_by_role("button", name="Start quantizing").wait_for(timeout=120_000)
        t2 = time.perf_counter()
        page.close()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        t3 = time.perf_counter()
        page.goto(f"http://127.0.0.1:{port}/app")
        page.get_by_role("button", name="Start quantizing").wait_for(timeout=120_000)
        t4 = time.perf_counter()
        page.close()
    finally:
        stop(proc)
    RESULTS["serve"] = {"first_http_s": t1 - t0, "interactive_s": t2 - t0, "second_page_s": t4 - t3}
    print("panel serve app:")
    print(f"  start -> first HTTP answer      {t1 - t0:6.2f} s")
    print(f"  start -> interactive page       {t2 - t0:6.2f} s  (first session: imports, Start button visible)")
    print(f"  second page load -> interactive {t4 - t3:6.2f} s")


#: Two jobs of this model run for long enough to sample their progress (about 40M parameters).
PROGRESS_MODEL = dict(hidden=768, intermediate=2048, layers=8, heads=8, kv_heads=2, vocab=8000, seed=1)


def bench_progress(browser, repeats: int) -> None:
    """Two jobs side by side in one page: how often each progress bar changes, per 1.5-s window."""
    from arrow_quant_v2.samples import generate_dream

    tmp = Path(tempfile.mkdtemp(prefix="aq-bench-progress-"))
    generate_dream(tmp / "models" / "bench-lm", **PROGRESS_MODEL)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), ARROW_QUANT_OUTPUT_ROOT=str(tmp / "out"),
               ARROW_QUANT_MODEL_ROOTS=str(tmp / "models"), ARROW_QUANT_PREPARE_SAMPLES="0")
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", "app", "--port", str(port), "--address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rates = []
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        for _ in range(600):
            try:
                page.goto(f"http://127.0.0.1:{port}/app")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.2)
        page.get_by_role("button", name="Start quantizing").wait_for(timeout=120_000)
        select = page.locator(".aq-model select")
        label = next(t for t in select.evaluate("e => Array.from(e.options).map(o => o.text)") if t.startswith("bench-lm"))
        select.select_option(label=label)
        for profile, job in (("edge", 1), ("local", 2)):
            page.get_by_role("button", name=profile, exact=True).click()
            page.get_by_role("button", name="Start quantizing").click()
            page.locator(f".aq-progress-{job} progress").wait_for(timeout=60_000)
        bars = [page.locator(f".aq-progress-{j} progress") for j in (1, 2)]  # in shadow roots: locators reach them
        deadline = time.monotonic() + 600
        while not all(bar.evaluate("e => e.value") > 20 for bar in bars):
            if time.monotonic() > deadline:
                raise SystemExit("the two jobs did not get under way within 10 minutes")
            time.sleep(0.2)
        handles = [bar.element_handle() for bar in bars]
        for _ in range(repeats):
            counts = page.evaluate(
                """([els, ms]) => Promise.all(els.map(e => new Promise(done => {
                     let n = 0, last = e.value; const t0 = performance.now();
                     const id = setInterval(() => {
                       if (e.value !== last) { n++; last = e.value; }
                       if (performance.now() - t0 > ms) { clearInterval(id); done(n); }
                     }, 10);
                   })))""", [handles, 1500])
            rates.append([n / 1.5 for n in counts])
        page.close()
    finally:
        stop(proc)
    per_job = [sorted(r[i] for r in rates) for i in (0, 1)]
    medians = [v[len(v) // 2] for v in per_job]
    RESULTS["progress_updates_per_s"] = {"windows_s": 1.5, "repeats": repeats, "raw": rates, "median": medians,
                                         "model_params": "bench-lm " + json_safe(PROGRESS_MODEL)}
    print(f"progress updates reaching the page (median of {repeats} windows): {medians[0]:.1f}/s and {medians[1]:.1f}/s")


def json_safe(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=600)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--skip-progress", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="1.5-s windows of progress updates to sample")
    ap.add_argument("--out-dir", default=None, help="where app.json goes (default benchmarks/results)")
    args = ap.parse_args()
    record = Record("app", script="benchmarks/bench_app.py")
    browser = pw = None
    if not args.no_browser and Path(CHROMIUM).exists():
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    try:
        if not args.skip_serve and browser is not None:
            bench_serve(browser)
        if not args.skip_progress and browser is not None:
            bench_progress(browser, args.repeats)
        bench_heatmap(args.tensors, True, browser)
        bench_heatmap(args.tensors, False, browser)
    finally:
        if browser is not None:
            browser.close()
            pw.stop()
    from importlib.metadata import version

    RESULTS["ui_versions"] = {m: version(m) for m in ("panel", "bokeh", "holoviews", "playwright")}
    record.write(RESULTS, repeats=args.repeats, out_dir=args.out_dir,
                 statistic=f"one run each for start-up and heatmap times; progress updates: median of {args.repeats} "
                           "1.5-s windows")


if __name__ == "__main__":
    main()
