"""Output sensitivity on the terrain U-Net: does the H estimate agree with the network, and does it allocate better?

1. **Agreement.** The real terrain U-Net is calibrated once (:func:`arrow_quant_v2.calibration.collect`,
   its own input stream) and each layer's downstream gain measured at int2
   (:func:`calibration.measure_gains`, what ``downstream_gain=True`` adds). Every calibrated layer is
   quantized alone at int2 (the width's default encoding, plain rounding) and its H estimate
   ``tr(dW H dW^T) / tr(W H W^T)`` computed (:mod:`arrow_quant_v2.sensitivity`), next to its weight
   relF² and the estimate times the gain. For an even subset of layers (every k-th in graph order)
   the network output is measured directly (:func:`sensitivity.measure_directly`: that layer alone
   swapped for its int2 values, validation inputs, ``--direct-levels`` noise levels): the Spearman
   rank correlation of each estimate with the direct 1 - output cosine is the figure.
2. **Allocation.** Under a size budget halfway between all-int2 and all-int4 (sizes of the stores
   ``DiffusionQuantConfig(bit_width=2|4, min_accuracy=0)`` writes), allocations by weight relF²
   (no graph, the name list's floors), by the H estimate with the boundary layers' name-list floors
   (the library's default), by the H estimate alone, and by the estimate times the measured
   gain without the name list (``downstream_gain=True``); each written with plain and/or error-compensated
   codes (the same calibration) and validated end to end on the held-out inputs
   (:func:`arrow_quant_v2.e2e.end_to_end`, 10 noise levels, batch 3, the validation stream).

Writes ``benchmarks/results/bench_sensitivity.json`` (after every step; ``--part`` runs one half, so
the two can run side by side and fill the same file).

    python benchmarks/bench_sensitivity.py [--samples 1] [--direct-layers 40] [--part agreement|budget] [--gain-bits 2]
        [--rows "H estimate + boundary names,estimate x gain"] [--codes compensated]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from arrow_quant_v2 import DiffusionQuantConfig, __version__, budget, calibration, encodings, engine, policy  # noqa: E402
from arrow_quant_v2 import sensitivity  # noqa: E402
from arrow_quant_v2.e2e import end_to_end  # noqa: E402
from arrow_quant_v2.plan import Planner, _boundary_hit  # noqa: E402
from arrow_quant_v2.samples import sample_path  # noqa: E402
from arrow_quant_v2.source import open_model  # noqa: E402
from _record import environment  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bench_sensitivity.json"
#: The terrain U-Net's boundary layers (plan.BOUNDARY_PREFIXES after the "network." wrapper) as
#: sensitive_layers: the floors protect_embeddings gives them anyway, spelled out so the row says what it adds.
BOUNDARY_GLOBS = ("network.input_blocks.0.*", "network.input_blocks.1.*", "network.out.*")


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def quantized(source, name: str, bits: int, config: DiffusionQuantConfig) -> tuple:
    info = source.tensors[name]
    w2d = source.read_rows(name, 0, info.matrix_shape[0])
    c = policy.choose(config, bits, info.matrix_shape[1])
    enc = encodings.get_encoding(c.encoding, c.bits, c.group)
    return w2d, encodings.dequantize(encodings.quantize(w2d, enc)[0], enc, *w2d.shape)


def agreement(model: Path, cal, args, record) -> dict:
    source = open_model(model)
    cfg = DiffusionQuantConfig(min_accuracy=0.0)
    rows = {}
    for name in cal.hessians:  # graph order
        w2d, q2d = quantized(source, name, 2, cfg)
        layer = cal.layers[name]
        st = sensitivity.view_stats(w2d, q2d, cal.hessians[name], layer.transposed, np.arange(w2d.shape[0]))
        est = sensitivity.rel_error2(st)
        rows[name] = {"numel": int(w2d.size), "estimate": est, "gain": cal.gain(name),
                      "gain_probed_with": cal.gains.probed_with.get(name),
                      "estimate_x_gain": sensitivity.felt(est, cal.gain(name)),
                      "output_cosine": sensitivity.figures(st)["cosine"],
                      "weight_rel_error2": float(np.sum((q2d.astype(np.float64) - w2d) ** 2) / np.sum(w2d.astype(np.float64) ** 2))}
    names = list(rows)
    # an even subset: every k-th layer in graph order (boundary and time layers get no extra places)
    chosen = [names[int(i)] for i in np.unique(np.linspace(0, len(names) - 1, args.direct_layers).round())]
    started = time.perf_counter()
    variants = {}
    for n in chosen:
        w2d, q2d = quantized(source, n, 2, cfg)
        variants[n] = {n: q2d}
    direct = sensitivity.measure_directly(model, variants, num_levels=args.direct_levels, batch=1)
    for n in chosen:
        rows[n]["direct"] = direct[n]
    d = [rows[n]["direct"]["mean_error"] for n in chosen]
    dw = [rows[n]["direct"]["worst_error"] for n in chosen]
    by = {"output_sensitivity x downstream gain": "estimate_x_gain", "output_sensitivity (H estimate)": "estimate",
          "downstream gain alone": "gain", "weight relF2": "weight_rel_error2"}
    ranked = sorted(names, key=lambda n: rows[n]["estimate_x_gain"], reverse=True)
    out = {
        "width": "int2 (the width's default encoding, plain rounding)",
        "layers_estimated": len(rows), "layers_measured": len(chosen), "subset": "every k-th layer in graph order",
        "direct_levels": args.direct_levels, "direct_seconds": time.perf_counter() - started,
        "spearman_vs_direct_mean_error": {k: spearman([rows[n][v] for n in chosen], d) for k, v in by.items()},
        "spearman_vs_direct_worst_error": {k: spearman([rows[n][v] for n in chosen], dw) for k, v in by.items()},
        "top_by_estimate_x_gain": ranked[:12],
        "rank_by_estimate": {n: sorted(names, key=lambda m: rows[m]["estimate"], reverse=True).index(n) + 1
                             for n in ranked[:12]},
        "boundary_layers": [n for n in names if _boundary_hit(n)],
        "layers": rows,
    }
    for k, v in out["spearman_vs_direct_mean_error"].items():
        print(f"spearman vs direct (mean over levels) {k:40s} {v:+.3f}", flush=True)
    record("agreement", out)
    return out


#: The allocations compared: label -> (config overrides, whether the calibration's gains are used).
ALLOCATIONS = {
    "weight relF2": ({}, False),
    "H estimate + boundary names": ({"calibration": "graph", "sensitive_layers": BOUNDARY_GLOBS}, False),
    "H estimate": ({"calibration": "graph", "protect_embeddings": False}, False),
    "estimate x gain": ({"calibration": "graph", "protect_embeddings": False}, True),
    "estimate x gain + boundary names": ({"calibration": "graph"}, True),
}


def allocations(model: Path, cal, args, record, work: Path) -> None:
    sizes = {}
    for b in (2, 4):
        r = engine.quantize_model(model, work / f"u{b}", DiffusionQuantConfig(bit_width=b, min_accuracy=0.0))
        sizes[f"int{b}"] = r["model_size_mb"]
    target = (sizes["int2"] + sizes["int4"]) / 2
    source = open_model(model)
    without = dataclasses.replace(cal, gains=None)
    plans = {}
    for label in args.rows.split(","):
        overrides, with_gain = ALLOCATIONS[label]
        cfg = DiffusionQuantConfig(target_model_size_mb=target, min_accuracy=0.0, **overrides)
        c = None if cfg.calibration is None else (cal if with_gain else without)
        b = budget.allocate(source, cfg, Planner(cfg), calibration=c)
        plans[label] = b
        print(f"allocation by {label}: estimated {b.estimated_bytes / budget.MIB:.3f} MiB of target {target:.3f}", flush=True)
    engine.calibrate = lambda *a, **k: cal  # the calibration above, for every compensated run (it does not depend on widths)
    rows = []
    for codes in args.codes.split(","):
        for label, b in plans.items():
            rules = {n: p.bits for n, p in b.plans.items()}
            cfg = DiffusionQuantConfig(bit_rules=rules, min_accuracy=0.0,
                                       calibration="graph" if codes == "compensated" else None)
            load = os.getloadavg()
            t = time.perf_counter()
            out = work / f"{label}-{codes}".replace(" ", "_")
            r = engine.quantize_model(model, out, cfg, overwrite=True)
            wall = time.perf_counter() - t
            e = end_to_end(model, out, num_time_groups=10)
            widths = {n: p.bits for n, p in b.plans.items() if not p.lossless or p.role != "lossless"}
            row = {"allocation": label, "codes": codes, "loadavg_before": list(load), "quantize_wall_s": wall,
                   "model_size_mb": r["model_size_mb"], "bits_per_weight": r["bits_per_weight"],
                   "tensors_per_width": b.summary()["tensors_per_width"], "widths": widths,
                   "widest": sorted(widths, key=widths.get, reverse=True)[:12],
                   "boundary_widths": {n: widths.get(n) for n in widths if _boundary_hit(n)},
                   "boundary_reasons": {n: b.plans[n].reason for n in b.plans if _boundary_hit(n)},
                   "e2e": {k: e[k] for k in ("mean_cosine", "worst_cosine", "worst_sigma", "worst_sample_cosine", "reason")},
                   "levels": [{k: lv[k] for k in ("sigma", "cosine", "worst_sample_cosine")} for lv in e["levels"]]}
            rows.append(row)
            print(f"{label:28s} {codes:12s} {r['model_size_mb']:.3f} MiB bpw {r['bits_per_weight']:.3f} output cos mean "
                  f"{e['mean_cosine']:.5f} worst {e['worst_cosine']:.5f}  load {load[0]:.1f}", flush=True)
            record("budget", {"target_mb": target, "all_int2_mb": sizes["int2"], "all_int4_mb": sizes["int4"],
                              "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1, help="calibration samples per noise level")
    ap.add_argument("--levels", type=int, default=10, help="calibration noise levels")
    ap.add_argument("--direct-layers", type=int, default=40)
    ap.add_argument("--direct-levels", type=int, default=4)
    ap.add_argument("--part", choices=("all", "agreement", "budget"), default="all")
    ap.add_argument("--rows", default="H estimate + boundary names,estimate x gain", help="allocations (ALLOCATIONS keys)")
    ap.add_argument("--codes", default="compensated", help="plain and/or compensated")
    ap.add_argument("--gain-bits", type=int, default=2, help="width every layer is quantized at to measure its gain")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    model = sample_path("terrain-unet")
    result = {"benchmark": "benchmarks/bench_sensitivity.py", "version": __version__, **environment(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(), "model": "terrain-unet",
              "loadavg_start": list(os.getloadavg()),
              "held_out": "direct and end-to-end measurements on e2e.VALIDATION_STREAM inputs; calibration on "
                          "e2e.CALIBRATION_STREAM", "args": {k: str(v) for k, v in vars(args).items()}}

    def record(key, value) -> None:  # merged into the file: the two parts may run side by side
        result[key] = value
        result["loadavg_end"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
        mine = merged.get("parts", {}).get(args.part, {}).get("date")
        if merged.get("commit") != result.get("commit") or mine not in (None, result["date"]):
            merged = {}  # a file of another run (commit, or an earlier run of this part): replaced
        merged.setdefault("parts", {})[args.part] = {k: result[k] for k in ("date", "loadavg_start", "loadavg_end", "args")}
        merged.update({k: v for k, v in result.items() if k not in ("args",)})
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(args.out)

    source = open_model(model)
    names = [n for n, p in Planner(DiffusionQuantConfig()).plan_model(source).items() if not p.lossless]
    load = os.getloadavg()
    cal = calibration.collect(model, names, samples=args.samples, num_levels=args.levels)
    collected = cal.seconds
    calibration.measure_gains(model, source, cal, DiffusionQuantConfig(bit_width=args.gain_bits),
                              {n: args.gain_bits for n in names})
    print(f"calibration: {len(cal.hessians)} layers in {collected:.0f} s, downstream gains {cal.gains.seconds:.0f} s "
          f"({cal.gains.passes} passes of {cal.gains.inputs} inputs; load {load[0]:.1f})", flush=True)
    record(f"calibration_{args.part}", dict(cal.summary(), collect_seconds=collected, loadavg_before=list(load),
                                            loadavg_after=list(os.getloadavg())))
    if args.part in ("all", "agreement"):
        agreement(model, cal, args, record)
    if args.part in ("all", "budget"):
        with tempfile.TemporaryDirectory(prefix="aq-bench-sens-") as tmp:
            allocations(model, cal, args, record, Path(tmp))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
