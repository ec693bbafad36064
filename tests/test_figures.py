"""The README's and the docs' measured figures are artifacts: each figure block is exactly what
scripts/render_figures.py renders from the committed benchmark results (no benchmark runs here),
and every result file says what was measured, on what, how often and under which load."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("render_figures", ROOT / "scripts" / "render_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_figure_block_is_what_the_committed_results_give(figures):
    stale = [str(p.relative_to(ROOT)) for p in figures.documents()
             if figures.render(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]
    assert not stale, f"{stale}: figures differ from benchmarks/results; run python scripts/render_figures.py"


def test_every_renderer_has_a_block_and_a_result(figures):
    text = "".join(p.read_text(encoding="utf-8") for p in figures.documents())
    used = set(re.findall(r"<!-- figures:([\w-]+) -->", text))
    assert used == set(figures.RENDERERS)


def test_results_record_how_they_were_measured(figures):
    for name in ("bench_encodings", "bench_budget", "bench_memory", "bench_async", "profiles", "ggml_types", "app"):
        r = figures.result(name)
        assert r["commit"] and r["statistic"] and r["repeats"] >= 1, name
        assert {"cpu", "cores", "usable_cores"} <= set(r["machine"]), name
        assert {"python", "numpy", "numba", "pyarrow", "arrow_quant_v2"} <= set(r["versions"]), name
        assert len(r["load_average"]["before"]) == 3 and len(r["load_average"]["after"]) == 3, name


def test_a_missing_result_names_the_benchmark_to_run(figures, tmp_path):
    with pytest.raises(FileNotFoundError, match="python benchmarks/bench_budget.py"):
        figures.render("<!-- figures:budget -->\nold\n<!-- /figures:budget -->", tmp_path)


def test_a_rerun_changes_the_rendered_figure(figures, tmp_path):
    """The block follows the JSON: a different measurement renders a different text."""
    shutil.copy(figures.RESULTS / "bench_budget.json", tmp_path)
    block = "<!-- figures:budget -->\n<!-- /figures:budget -->"
    before = figures.render(block, tmp_path)
    data = json.loads((tmp_path / "bench_budget.json").read_text())
    data["results"][0]["budgets"][0]["budget"]["mb"] *= 1.5
    (tmp_path / "bench_budget.json").write_text(json.dumps(data))
    assert figures.render(block, tmp_path) != before
