"""Render the README's and the docs' measured figures from the benchmarks' JSON results.

    python scripts/render_figures.py            # rewrite the blocks in place
    python scripts/render_figures.py --check    # exit 1 if a block differs from what the JSON gives

A figure block sits between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` in README.md
or a page of docs/; NAME is a renderer below, which reads ``benchmarks/results/<benchmark>.json``
(written by the benchmark itself, see ``benchmarks/_record.py``). So a number in the README is
always one a benchmark measured, with the commit, the machine, the repeats and the load it was
measured under; ``tests/test_figures.py`` checks the committed text against the committed JSON.
To change a figure, rerun its benchmark and then this script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- figures:([\w-]+) -->\n)(.*?)(<!-- /figures:\2 -->)", re.S)


def result(name: str, results_dir: Path = RESULTS) -> dict:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/{name}.py` first")
    return json.loads(path.read_text(encoding="utf-8"))


def provenance(r: dict) -> str:
    """Where and how the figures were measured, said once under each block."""
    m, load = r["machine"], r["load_average"]
    where = f"{m['cpu']}, {m['usable_cores']} usable cores"
    loaded = f"load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after"
    dirty = " + uncommitted changes" if r.get("uncommitted_changes") else ""
    return (f"*Measured by `{r['command']}` at commit {r['commit'][:10]}{dirty} on {where} ({loaded}; "
            f"the machine is shared, so timings are noisy); {r['statistic']}. "
            f"Raw numbers: `benchmarks/results/{r['benchmark']}.json`.*")


# --------------------------------------------------------------------------- encodings

ENCODING_ROWS = [  # (kind, encoding, bits, group, label)
    ("ours", "kquant_nl", 2, 8, "**kquant_nl g8** (default)"),
    ("ours", "kquant", 2, 16, "kquant g16"),
    ("ours", "affine", 2, 64, "affine g64 (plain rounding)"),
    ("llama.cpp", "Q2_K", 2, None, "llama.cpp Q2_K"),
    ("ours", "kquant_nl", 4, 16, "**kquant_nl g16** (default)"),
    ("ours", "kquant", 4, 32, "kquant g32"),
    ("ours", "affine", 4, 64, "affine g64 (plain rounding)"),
    ("llama.cpp", "Q4_K", 4, None, "llama.cpp Q4_K"),
    ("llama.cpp", "Q4_0", 4, None, "llama.cpp Q4_0"),
    ("ours", "affine_opt", 8, 64, "**affine_opt g64** (default)"),
    ("llama.cpp", "Q8_0", 8, None, "llama.cpp Q8_0"),
]


def _find(rows: List[dict], kind, encoding, bits, group, **extra) -> dict:
    for row in rows:
        if (row["kind"], row["encoding"], row["bits"], row["group"]) == (kind, encoding, bits, group) and \
                all(row.get(k) == v for k, v in extra.items()):
            return row
    return {}


def render_encodings(results_dir: Path = RESULTS) -> str:
    r = result("bench_encodings", results_dir)
    acc, speed = r["results"]["accuracy"], r["results"]["throughput"]
    lines = ["| bits | encoding | bpw | relF Gaussian | relF Student-t | MB per CPU-second | wall MB/s, 1 / 2 threads |",
             "|---|---|---|---|---|---|---|"]
    for kind, enc, bits, group, label in ENCODING_ROWS:
        g, t = _find(acc, kind, enc, bits, group, matrix="Gaussian"), _find(acc, kind, enc, bits, group, matrix="Student-t")
        s = _find(speed, kind, enc, bits, group)
        if not g:
            continue
        cpu = f"{max(s['mb_per_s_per_busy_core']):.0f}" if s else "—"
        rate = f"{max(s['mb_per_s_1_thread']):.0f} / {max(s['mb_per_s_2_threads']):.0f}" if s else "—"
        lines.append(f"| {bits} | {label} | {g['bpw']:.3f} | {g['rel_error']:.4f} | {t['rel_error']:.4f} | {cpu} | {rate} |")
    rows, cols = r["results"]["matrices"]["rows"], r["results"]["matrices"]["cols"]
    text = "\n".join(lines) + "\n\n"
    ours, ref = _find(speed, "ours", "kquant_nl", 4, 16), _find(speed, "llama.cpp", "Q4_K", 4, None)
    ours2, ref2 = _find(speed, "ours", "kquant_nl", 2, 8), _find(speed, "llama.cpp", "Q2_K", 2, None)
    if ours and ref:
        rate = "mb_per_s_per_busy_core"
        one, base = max(ours[rate]), max(ref[rate])
        text += (f"Per CPU-second the int4 default encodes {one:.0f} MB of float32, {one / base:.1f}× llama.cpp's "
                 f"own Q4_K quantizer ({base:.0f} MB, `ggml_quantize_chunk` as llama-quantize runs it)")
        if ours2 and ref2:
            a, b = max(ours2[rate]), max(ref2[rate])
            text += f"; at int2, {a:.0f} MB against Q2_K's {b:.0f} ({a / b:.1f}×)"
        text += (". MB per CPU-second (MB over the CPU time the two threads spent) is what a core gives when it "
                 "is not shared; wall-clock rates on this shared machine are lower and noisier. ")
    text += (f"Matrices: {rows}×{cols} float32, Gaussian σ=0.02 and Student-t (df 4) with a per-row scale spread; "
             "relF = ‖W−Ŵ‖/‖W‖; bpw counts every stored byte.\n\n" + provenance(r) + "\n")
    return text


# --------------------------------------------------------------------------- budget

def render_budget(results_dir: Path = RESULTS) -> str:
    r = result("bench_budget", results_dir)
    parts = []
    for model in r["results"]:
        b = model["budgets"][0]
        got, target = b["budget"]["mb"], b["target_mb"]
        gains = [100 * (1 - b["budget"]["wrelF2"] / mix["wrelF2"]) for mix in b["mixes"].values()]
        parts.append(f"{model['model']} {got:.3f} MiB on disk for a {target:.3f} MiB target "
                     f"({100 * (got - target) / target:+.2f}%), parameter-weighted relF² {min(gains):.1f}–{max(gains):.1f}% "
                     f"lower than int2/int4 mixes of the same size")
    return ("A target halfway between the all-int2 and all-int4 sizes: " + "; ".join(parts) + ".\n\n"
            + provenance(r) + "\n")


# --------------------------------------------------------------------------- memory

def render_memory(results_dir: Path = RESULTS) -> str:
    r = result("bench_memory", results_dir)
    lines = ["| run | parameters | largest tensor | encoded chunks waiting | int4 wall time | peak RSS | store |",
             "|---|---|---|---|---|---|---|"]
    for label, run in r["results"].items():
        waiting = "spooled beyond 64 MiB" if run.get("chunk_spool") else "all in memory"
        lines.append(f"| {label} | {run['params'] / 1e9:.2f}B ({run['source_gb']:.2f} GB BF16) | {run['largest']} "
                     f"({run['largest_f32_mb']:.0f} MiB as float32) | {waiting} | {run['wall_s']:.1f} s "
                     f"({run['source_gb'] / run['wall_s']:.3f} GB/s) | **{run['peak_rss_mb']:.0f} MiB** | "
                     f"{run['size_mb']:.0f} MiB (commit {run['commit'][:10]}, load {run['load_average_after'][0]:.1f}) |")
    m = r["machine"]
    return ("\n".join(lines) + f"\n\n*Measured by `python benchmarks/bench_memory.py --embedding N --code-commit C` (one "
            f"run per row, each in a fresh process, with the package of the commit in its row) on {m['cpu']}, "
            f"{m['usable_cores']} usable cores; {r['statistic']}. Raw numbers: `benchmarks/results/bench_memory.json`.*\n")


# --------------------------------------------------------------------------- async

def render_async(results_dir: Path = RESULTS) -> str:
    r = result("bench_async", results_dir)
    res = r["results"]
    one = res["concurrent_vs_sequential"]["1"]
    busy = res["heartbeat"]["busy"]
    cancels = res["cancellation"]
    lat = [c["latency_ms"] for c in cancels]
    after = max(c["cpu_after"] for c in cancels)
    return (f"Two models concurrently take {one['ratio']:.2f}× the time of one after the other (median of "
            f"{r['repeats']} pairs, one kernel thread per job); the event loop's worst stall while three models "
            f"quantize is {busy['worst_ms']:.1f} ms (p99 {busy['p99_ms']:.1f} ms); `task.cancel()` on a "
            f"105M-element tensor returns in {min(lat):.0f}–{max(lat):.0f} ms and the process uses at most "
            f"{after:.0f}% CPU the second after.\n\n" + provenance(r) + "\n")


# --------------------------------------------------------------------------- profiles

def render_profiles(results_dir: Path = RESULTS) -> str:
    r = result("profiles", results_dir)
    lines = ["| model | profile | size | compression | bits/weight | mean / min weight cosine | output cosine mean / worst |",
             "|---|---|---|---|---|---|---|"]
    last = None
    for row in r["results"]:
        model = "" if row["model"] == last else f"{row['model']} ({row['params'] / 1e6:.1f}M parameters, {row['source_mb']:.2f} MiB)"
        last = row["model"]
        e2e = row["e2e"]
        out = f"{e2e['mean_cosine']:.4f} / {e2e['worst_cosine']:.4f}" if e2e else "—"
        lines.append(f"| {model} | {row['profile']} | {row['size_mb']:.2f} MiB | {row['ratio']:.2f}× | {row['bpw']:.2f} | "
                     f"{row['cos']:.5f} / {row['min_cos']:.5f} | {out} |")
    return "\n".join(lines) + "\n\n" + provenance(r) + "\n"


# --------------------------------------------------------------------------- many tiny tensors

def render_many_tensors(results_dir: Path = RESULTS) -> str:
    after, before = result("many_tensors", results_dir), result("many_tensors_before", results_dir)
    rows = [("quantize (int4)", "quantize_s", "{:.1f} s"), ("peak RSS while quantizing", "peak_rss_mb", "{:.0f} MiB"),
            ("open the store", "open_s", "{:.2f} s"), ("dequantize one tensor", "dequantize_one_ms", "{:.1f} ms"),
            ("store size", "store_bytes", "{:.1f} MB")]

    def cell(r: dict, key: str, fmt: str) -> str:
        v = r["median"][key]
        return fmt.format(v / 1e6 if key == "store_bytes" else v)

    def load(r: dict) -> str:
        loads = [x for run in r["runs"] for x in (run["loadavg_before"][0], run["loadavg_after"][0])]
        return f"{min(loads):.1f}–{max(loads):.1f}"

    lines = [f"| {after['tensors']:,} tiny tensors ({after['model_bytes'] / 1e6:.1f} MB float32) | "
             f"before (commit {before['commit'][:10]}, {before['repeats']} run, load {load(before)}) | "
             f"now (commit {after['commit'][:10]}, median of {after['repeats']}, load {load(after)}) |",
             "|---|---|---|"]
    lines += [f"| {label} | {cell(before, key, fmt)} | **{cell(after, key, fmt)}** |" for label, key, fmt in rows]
    return ("\n".join(lines) + f"\n\n*Measured by `python benchmarks/bench_many_tensors.py`, each step in a fresh "
            f"process; {after['statistic']}. Raw numbers: `benchmarks/results/many_tensors.json` and "
            f"`many_tensors_before.json`.*\n")

# --------------------------------------------------------------------------- ggml block types

def render_ggml_types(results_dir: Path = RESULTS) -> str:
    r = result("ggml_types", results_dir)
    rows, goals = r["results"]["rows"], r["results"]["goals_gaussian"]
    by = {(row["matrix"], row["type"]): row for row in rows}
    types = list(dict.fromkeys(row["type"] for row in rows))
    has_ggml = all("ggml_relF" in row for row in rows)

    def rel(row: dict) -> str:
        ours = f"**{row['ours_relF']:.5f}**" if has_ggml and row["ours_relF"] < min(
            row["ggml_relF"], row["ggml_flat_imatrix_relF"]) else f"{row['ours_relF']:.5f}"
        return f"{ours} / {row['ggml_relF']:.5f} / {row['ggml_flat_imatrix_relF']:.5f}" if has_ggml else ours

    lines = ["| type | bpw | relF Gaussian: ours / ggml / ggml + flat imatrix | goal | "
             "relF heavy-tailed: ours / ggml / ggml + flat imatrix | MB per CPU-second: ours / ggml (Gaussian) |",
             "|---|---|---|---|---|---|"]
    for t in types:
        g, h = by[("gaussian", t)], by[("student_t_col_spread", t)]
        goal = goals.get(g["encoding"])
        goal_cell = "—" if goal is None else f"{goal} {'✓' if g['ours_relF'] <= goal else '✗'}"
        speed = f"{g['ours_MBps_per_core']:.0f} / {g['ggml_MBps_per_core']:.0f}" if has_ggml else f"{g['ours_MBps_per_core']:.0f}"
        lines.append(f"| {t} | {g['bpw']:g} | {rel(g)} | {goal_cell} | {rel(h)} | {speed} |")
    beaten = has_ggml and all(row["ours_relF"] < min(row["ggml_relF"], row["ggml_flat_imatrix_relF"]) for row in rows)
    exact = has_ggml and all(row["ggml_decodes_ours_max_ulps"] == 0 for row in rows)
    g = rows[0]
    text = "\n".join(lines) + "\n\n"
    text += (f"Matrices {g['rows']}×{g['cols']} float32: Gaussian σ=0.02, and Student-t (df 4) with a log-normal "
             "per-column scale spread. Bold: lower than ggml's reference both without and with a flat importance "
             "matrix" + ("; it is so at every type on both matrices" if beaten else "") + ". "
             + ("ggml's own dequantizer decodes our bytes to exactly our values at every type. " if exact else "")
             + "Speed is MB of float32 input per CPU-second of the quantizing thread (what one core gives; the "
             "other load on the machine is not counted).\n\n" + provenance(r) + "\n")
    return text

# --------------------------------------------------------------------------- cluster

def render_cluster(results_dir: Path = RESULTS) -> str:
    r = result("cluster", results_dir)

    def loads(part: dict) -> str:
        values = [x for side in part.values() if isinstance(side, dict) and "runs" in side
                  for run in side["runs"] for x in (run["loadavg_before"][0], run["loadavg_after"][0])]
        return f"{min(values):.1f}–{max(values):.1f}"

    def sentence(part: dict, serial: str, parallel: str, what: str, baseline: str) -> str:
        a, b = part[serial], part[parallel]
        met = "met" if part["ratio_median"] <= part["target"] else "not met"
        return (f"{what}: {b['median_wall_s']:.1f} s against {a['median_wall_s']:.1f} s {baseline} "
                f"(**{part['ratio_median']:.3f}×**, median of {part['complete_pairs']} pair"
                f"{'s' if part['complete_pairs'] != 1 else ''}; target ≤ {part['target']}×: {met}), peak RSS "
                f"{b['peak_rss_mib_per_worker_max']:.0f} MiB per worker (load average {loads(part)}, "
                f"commit {part['run']['commit'][:10]})")

    fleet, big = r["fleet"], r["big_model"]
    configured = isinstance(fleet["run"].get("worker_config"), dict)  # older runs: Dask's defaults
    return ("LocalCluster of one-thread workers on this 2-core machine"
            + (", every worker of both sides started with `arrow_quant_v2.cluster.WORKER_CONFIG`" if configured
               else ", workers with Dask's default configuration") + ": "
            + sentence(fleet, "one_worker_one_after_the_other", "two_workers_fleet",
                       f"{fleet['models']} models ({fleet['source_mib_per_model']:.0f} MiB BF16 each, "
                       f"{fleet['config']}) as a fleet on 2 workers", "one after the other on 1 worker")
            + "; "
            + sentence(big, "one_worker", "two_workers",
                       f"a {big['source_mib']:.0f} MiB model ({big['config']}) split over 2 workers", "on 1 worker")
            + "." + _cluster_breakdown(fleet, "one_worker_one_after_the_other", "two_workers_fleet")
            + "\n\n*Measured by `python benchmarks/bench_cluster.py`; "
            + f"{r['statistic']}. Raw numbers, every run with its load: `benchmarks/results/cluster.json`.*\n")


def _cluster_breakdown(part: dict, serial: str, parallel: str) -> str:
    """Where the fleet's time goes, from the runs' CPU split and task timelines (when recorded)."""
    runs = {side: part[side]["runs"] for side in (serial, parallel)}
    if not all("cpu_s" in run and "timeline" in run for side in runs.values() for run in side):
        return ""

    def cpu(side: str) -> float:
        return sum(run["cpu_s"]["this_process"] + run["cpu_s"]["nannies"] + sum(
            w["total"] for w in run["cpu_s"]["workers"].values()) for run in runs[side]) / len(runs[side])

    def cores(side: str) -> float:
        return cpu(side) * len(runs[side]) / sum(run["wall_s"] for run in runs[side])

    def kind_share(side: str, kind: str) -> float:
        threads = [w.get("by_thread_kind", {}) for run in runs[side] for w in run["cpu_s"]["workers"].values()]
        return sum(t.get(kind, 0.0) for t in threads) / max(sum(t.get("kernel", 0.0) for t in threads), 1e-9)

    idle = max(w["idle_before_first_s"] + w["idle_between_s"] + w["idle_after_last_s"]
               for run in runs[parallel] for w in run["timeline"]["workers"].values())
    client = sum(run["cpu_s"]["this_process"] for run in runs[serial]) / sum(run["wall_s"] for run in runs[serial])
    warm = part.get("warmup_s", {}).get(parallel)
    return (f" Where the fleet's time goes: both sides do about the same CPU work ({cpu(serial):.1f} and "
            f"{cpu(parallel):.1f} CPU-seconds a run), so the ratio is about the cores each kept busy: "
            f"{cores(serial):.2f} for one worker alone, {cores(parallel):.2f} for the fleet of 2 on 2 cores. "
            + ("One worker alone uses more than its one thread" if cores(serial) > 1 else
               "Other programs held most of the cores (see the load) but, per CPU-second, one worker alone")
            + f": beside its kernel thread (which also reads and widens "
            f"the weights), the job's own thread (collecting the chunks, writing and hashing the Parquet shard) "
            f"uses {kind_share(serial, 'job'):.0%} as much CPU, the worker's event loop (Dask's heartbeats and "
            f"monitors) {kind_share(serial, 'event_loop'):.0%}, and the client, scheduler and nannies "
            f"{client:.2f} cores, all on the core the fleet's second worker needs. No worker of the "
            f"fleet idles more than {idle:.1f} s in a run"
            + (f"; a fresh worker's first job pays the imports and the kernels' first load, outside both sides' "
               f"times ({warm[0]:.1f} s for the warm-up's first small model per worker against {warm[1]:.1f} s for "
               f"the second)" if warm else "") + ".")


# --------------------------------------------------------------------------- app

def render_app(results_dir: Path = RESULTS) -> str:
    r = result("app", results_dir)
    res = r["results"]
    serve, rates = res["serve"], res.get("progress_updates_per_s")  # --skip-progress: not measured
    layouts = {"block": "block × module", "metric": "layer × metric"}

    def heatmap(m: dict) -> str:
        server = (m["tables_ms"] + m["holoviews_ms"] + m["bokeh_ms"]) / 1000
        return (f"{m['tensors']} tensors as {layouts.get(m['layout'], m['layout'])} ({m['cells']} cells): {server:.2f} s "
                f"server-side (tables, HoloViews, Bokeh model) and {m['browser_ms'] / 1000:.2f} s to load and draw in "
                "Chromium")

    return (f"The page is interactive {serve['interactive_s']:.1f} s after `panel serve` starts (first HTTP answer "
            f"after {serve['first_http_s']:.1f} s; a second page {serve['second_page_s']:.1f} s). "
            + (f"Two jobs side by side reach the page {rates['median'][0]:.1f} and {rates['median'][1]:.1f} times a "
               f"second each (median of {rates['repeats']} windows of {rates['windows_s']:g} s). " if rates else "")
            + "Synthetic heatmaps: " + "; ".join(heatmap(m) for m in res["heatmap"]) + ".\n\n" + provenance(r) + "\n")

# --------------------------------------------------------------------------- calibration

CALIBRATION_RUNS = {"edge": "edge (int2)", "local": "local (int4)", "edge-gguf": "edge, `target_runtime=\"gguf\"`",
                    "local-gguf": "local, `target_runtime=\"gguf\"`"}


def render_calibration(results_dir: Path = RESULTS) -> str:
    r = result("bench_calibration", results_dir)
    rows = {row["label"]: row for row in r["rows"]}

    def fidelity(row: dict) -> str:
        e = row["e2e"]
        return f"{e['mean_cosine']:.5f} / {e['worst_cosine']:.5f} / {e['worst_sample_cosine']:.5f}"

    def load(row: dict) -> str:
        after = row.get("loadavg_after_quantize") or row["loadavg_before"]
        return f"{min(row['loadavg_before'][0], after[0]):.1f}–{max(row['loadavg_before'][0], after[0]):.1f}"

    lines = ["| profile | bits/weight without → with | output cosine mean / worst level / worst sample: without | "
             "with `calibration=\"graph\"` | quantize with calibration (of it, calibration) | peak RSS | load | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for run, name in CALIBRATION_RUNS.items():
        plain, cal = rows.get(f"{run} calibration=None"), rows.get(f"{run} calibration=graph")
        if not (plain and cal):
            continue
        stage = f" ({cal['calibration_s']:.0f} s)" if cal.get("calibration_s") else ""
        lines.append(f"| {name} | {plain['bits_per_weight']:.3f} → {cal['bits_per_weight']:.3f} | {fidelity(plain)} | "
                     f"**{fidelity(cal)}** | {cal['quantize_wall_s']:.0f} s{stage} | {cal['peak_rss_mb']:.0f} MiB | "
                     f"{load(cal)} | {cal.get('commit') or r['commit']} |")
    return ("\n".join(lines) + f"\n\n*Measured by `python benchmarks/bench_calibration.py` on the terrain U-Net "
            f"({r['cores']} cores); {r['statistic']}; held out: {r['held_out']}. The load column is the machine's "
            "load average around the calibrated quantization: times above a load of about 2 are those of a shared "
            "machine. Raw numbers: `benchmarks/results/bench_calibration.json`.*\n")


RENDERERS: Dict[str, Callable[..., str]] = {
    "profiles": render_profiles,
    "encodings": render_encodings,
    "budget": render_budget,
    "memory": render_memory,
    "async": render_async,
    "many_tensors": render_many_tensors,
    "ggml_types": render_ggml_types,
    "cluster": render_cluster,
    "calibration": render_calibration,
    "app": render_app,
}


def documents() -> List[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(text: str, results_dir: Path = RESULTS) -> str:
    """``text`` with every figure block rendered afresh from the JSON results."""
    def block(m: re.Match) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise KeyError(f"unknown figure block {name!r}; known: {', '.join(RENDERERS)}")
        return m.group(1) + RENDERERS[name](results_dir) + m.group(4)

    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    verb = "differ from the results" if args.check else "rewritten"
    print(f"{', '.join(map(str, stale))}: {verb}" if stale else "every figure block matches the results")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
