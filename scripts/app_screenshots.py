"""The quality-view screenshots in assets/: terrain-unet at int2 and int4 (block × module and
layer × metric), tiny-dream, the Compare tab and a narrow window.

    python scripts/app_screenshots.py [--out assets] [--work DIR]

Quantizes and validates the sample models with the app's own JobManager, builds the views as
the app does, saves each as a standalone page (inline resources, offline) and photographs it in
Debian's Chromium through Playwright. Needs the samples (built offline, see README).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"]


async def make_jobs(work: Path):
    from arrow_quant_v2.samples import sample_path
    from arrow_quant_v2.ui import JobManager, ModelLibrary

    manager = JobManager(ModelLibrary([sample_path("terrain-unet").parent]), output_root=work / "out")
    jobs = {}
    for key, model, profile in (("terrain-int2", "terrain-unet", "edge"), ("terrain-int4", "terrain-unet", "local"),
                                ("tiny-int2", "tiny-dream", "edge"), ("tiny-int4", "tiny-dream", "local")):
        from arrow_quant_v2 import DiffusionQuantConfig

        job = await manager.run(model, DiffusionQuantConfig.from_profile(profile), label=profile)
        if job.status != "done":
            raise SystemExit(f"{key}: {job.status}: {job.error}")
        jobs[key] = job
        print(f"{key}: {job.summary()}")
    return manager, jobs


def save(view, path: Path) -> None:
    import panel as pn

    pn.panel(view).save(str(path), resources="inline", embed=False)


def shoot(browser, page_path: Path, png: Path, width: int = 1500, height: int = 1100) -> None:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(page_path.as_uri())
    page.locator(".bk-Figure").first.wait_for(timeout=120_000)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.wait_for_timeout(500)
    page.screenshot(path=str(png), full_page=True)
    page.close()
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets"))
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import holoviews as hv
    import panel as pn
    from playwright.sync_api import sync_playwright

    from arrow_quant_v2.ui.views import CompareView, QualityView

    pn.extension(inline=True)
    hv.extension("bokeh", logo=False)
    work = Path(args.work or tempfile.mkdtemp(prefix="aq-shots-"))
    out = Path(args.out)
    manager, jobs = asyncio.run(make_jobs(work))
    shots = []
    for key in ("terrain-int2", "terrain-int4"):
        for layout, tag in (("block × module", "block"), ("layer × metric", "metric")):
            view = QualityView(manager=manager, job_id=jobs[key].job_id, layout=layout)
            shots.append((view, f"app-{key}-{tag}.png", 1500))
    shots.append((QualityView(manager=manager, job_id=jobs["tiny-int2"].job_id), "app-tiny-dream-int2.png", 1500))
    compare = CompareView(manager=manager)
    compare.compare(jobs["tiny-int2"], jobs["tiny-int4"])
    shots.append((compare, "app-compare-tiny-dream.png", 1500))
    shots.append((QualityView(manager=manager, job_id=jobs["terrain-int4"].job_id), "app-narrow-820.png", 820))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for i, (view, name, width) in enumerate(shots):
            page = work / f"shot-{i}.html"
            save(view, page)
            shoot(browser, page, out / name, width=width)
        browser.close()


if __name__ == "__main__":
    main()
