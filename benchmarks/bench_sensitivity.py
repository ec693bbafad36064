"""Output sensitivity on the terrain U-Net: does the H estimate agree with the network, and does it allocate better?

1. **Agreement.** The real terrain U-Net is calibrated once (:func:`arrow_quant_v2.calibration.collect`,
   its own input stream). Every calibrated layer is quantized alone at int2 (the width's default
   encoding, plain rounding) and its H estimate ``tr(dW H dW^T) / tr(W H W^T)`` computed
   (:mod:`arrow_quant_v2.sensitivity`), next to its weight relF². For a subset of layers
   (evenly spaced over the network, plus the boundary and time-conditioning layers) the network
   output is measured directly (:func:`sensitivity.measure_directly`: that layer alone swapped
   for its int2 values, validation inputs, ``--direct-levels`` noise levels): the Spearman rank
   correlation of each estimate with the direct 1 - output cosine is the figure.
2. **Allocation.** Under a size budget halfway between all-int2 and all-int4 (sizes of the stores
   ``DiffusionQuantConfig(bit_width=2|4, min_accuracy=0)`` writes), the budget allocates by weight
   relF² (no graph) and by output sensitivity (``calibration="graph"``: the calibration above), the
   latter without and with the boundary layers' name-list floors; each
   allocation is written with plain codes and with error-compensated codes (the same calibration),
   and validated end to end on the held-out inputs (:func:`arrow_quant_v2.e2e.end_to_end`, 10
   noise levels, batch 3, the validation stream).

Writes ``benchmarks/results/bench_sensitivity.json`` (after every step).

    python benchmarks/bench_sensitivity.py [--samples 1] [--direct-layers 40] [--skip-compensated]
"""
from __future__ import annotations

import argparse
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
from arrow_quant_v2.plan import TIME_MODULES, Planner, _boundary_hit, _module_hit  # noqa: E402
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
    for name in sorted(cal.hessians):
        w2d, q2d = quantized(source, name, 2, cfg)
        layer = cal.layers[name]
        st = sensitivity.view_stats(w2d, q2d, cal.hessians[name], layer.transposed, np.arange(w2d.shape[0]))
        rows[name] = {"numel": int(w2d.size), "estimate": sensitivity.rel_error2(st),
                      "output_cosine": sensitivity.figures(st)["cosine"],
                      "weight_rel_error2": float(np.sum((q2d.astype(np.float64) - w2d) ** 2) / np.sum(w2d.astype(np.float64) ** 2))}
    names = sorted(rows)
    special = [n for n in names if _boundary_hit(n) or _module_hit(n, TIME_MODULES)]
    step = max(1, len(names) // max(args.direct_layers - len(special), 1))
    chosen = sorted(set(special) | set(names[::step]))
    started = time.perf_counter()
    variants = {}
    for n in chosen:
        w2d, q2d = quantized(source, n, 2, cfg)
        variants[n] = {n: q2d}
    direct = sensitivity.measure_directly(model, variants, num_levels=args.direct_levels, batch=1)
    for n in chosen:
        rows[n]["direct"] = direct[n]
    measured = [n for n in chosen]
    d = [rows[n]["direct"]["mean_error"] for n in measured]
    dw = [rows[n]["direct"]["worst_error"] for n in measured]
    out = {
        "width": "int2 (the width's default encoding, plain rounding)",
        "layers_estimated": len(rows), "layers_measured": len(measured),
        "direct_levels": args.direct_levels, "direct_seconds": time.perf_counter() - started,
        "spearman_vs_direct_mean_error": {
            "output_sensitivity (H estimate)": spearman([rows[n]["estimate"] for n in measured], d),
            "output_sensitivity x numel": spearman([rows[n]["estimate"] * rows[n]["numel"] for n in measured], d),
            "weight relF2": spearman([rows[n]["weight_rel_error2"] for n in measured], d),
            "weight relF2 x numel": spearman([rows[n]["weight_rel_error2"] * rows[n]["numel"] for n in measured], d),
        },
        "spearman_vs_direct_worst_error": {
            "output_sensitivity (H estimate)": spearman([rows[n]["estimate"] for n in measured], dw),
            "weight relF2": spearman([rows[n]["weight_rel_error2"] for n in measured], dw),
        },
        "boundary_or_time_layers": special,
        "layers": rows,
    }
    for k, v in out["spearman_vs_direct_mean_error"].items():
        print(f"spearman vs direct (mean over levels) {k:34s} {v:+.3f}", flush=True)
    record("agreement", out)
    return out


def allocations(model: Path, cal, args, record, work: Path) -> None:
    sizes = {}
    for b in (2, 4):
        r = engine.quantize_model(model, work / f"u{b}", DiffusionQuantConfig(bit_width=b, min_accuracy=0.0))
        sizes[f"int{b}"] = r["model_size_mb"]
    target = (sizes["int2"] + sizes["int4"]) / 2
    source = open_model(model)
    plans = {}
    for label, cfg, c in (("weight relF2", DiffusionQuantConfig(target_model_size_mb=target, min_accuracy=0.0), None),
                          # without the boundary name list (the terrain U-Net has no embedding or head names
                          # protect_embeddings would also cover; time conditioning keeps its floor)
                          ("output sensitivity", DiffusionQuantConfig(target_model_size_mb=target, min_accuracy=0.0,
                                                                      calibration="graph", protect_embeddings=False), cal),
                          ("output sensitivity + boundary names", DiffusionQuantConfig(
                              target_model_size_mb=target, min_accuracy=0.0, calibration="graph",
                              sensitive_layers=BOUNDARY_GLOBS), cal)):
        b = budget.allocate(source, cfg, Planner(cfg), calibration=c)
        plans[label] = b
        print(f"allocation by {label}: estimated {b.estimated_bytes / budget.MIB:.3f} MiB of target {target:.3f}", flush=True)
    engine.calibrate = lambda *a, **k: cal  # the calibration above, for every compensated run (it does not depend on widths)
    rows = []
    for codes in (["plain"] + ([] if args.skip_compensated else ["compensated"])):
        for label, b in plans.items():
            if codes == "compensated" and "boundary" in label:
                continue  # the plain rows say whether the name list still matters; compensated runs are slow
            rules = {n: p.bits for n, p in b.plans.items()}
            cfg = DiffusionQuantConfig(bit_rules=rules, min_accuracy=0.0,
                                       calibration="graph" if codes == "compensated" else None)
            load = os.getloadavg()
            t = time.perf_counter()
            out = work / f"{label}-{codes}".replace(" ", "_")
            r = engine.quantize_model(model, out, cfg, overwrite=True)
            wall = time.perf_counter() - t
            e = end_to_end(model, out, num_time_groups=10)
            row = {"allocation": label, "codes": codes, "loadavg_before": list(load), "quantize_wall_s": wall,
                   "model_size_mb": r["model_size_mb"], "bits_per_weight": r["bits_per_weight"],
                   "tensors_per_width": b.summary()["tensors_per_width"],
                   "widths": {n: p.bits for n, p in b.plans.items() if not p.lossless or p.role != "lossless"},
                   "e2e": {k: e[k] for k in ("mean_cosine", "worst_cosine", "worst_sigma", "worst_sample_cosine", "reason")},
                   "levels": [{k: lv[k] for k in ("sigma", "cosine", "worst_sample_cosine")} for lv in e["levels"]]}
            rows.append(row)
            print(f"{label:20s} {codes:12s} {r['model_size_mb']:.3f} MiB bpw {r['bits_per_weight']:.3f} output cos mean "
                  f"{e['mean_cosine']:.5f} worst {e['worst_cosine']:.5f}  load {load[0]:.1f}", flush=True)
            record("budget", {"target_mb": target, "all_int2_mb": sizes["int2"], "all_int4_mb": sizes["int4"],
                              "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1, help="calibration samples per noise level")
    ap.add_argument("--levels", type=int, default=10, help="calibration noise levels")
    ap.add_argument("--direct-layers", type=int, default=40)
    ap.add_argument("--direct-levels", type=int, default=4)
    ap.add_argument("--skip-compensated", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    model = sample_path("terrain-unet")
    result = {"benchmark": "benchmarks/bench_sensitivity.py", "version": __version__, **environment(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(), "model": "terrain-unet",
              "loadavg_start": list(os.getloadavg()),
              "held_out": "direct and end-to-end measurements on e2e.VALIDATION_STREAM inputs; calibration on "
                          "e2e.CALIBRATION_STREAM", "args": {k: str(v) for k, v in vars(args).items()}}

    def record(key, value) -> None:
        result[key] = value
        result["loadavg_end"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")

    names = [n for n, p in Planner(DiffusionQuantConfig()).plan_model(open_model(model)).items() if not p.lossless]
    load = os.getloadavg()
    cal = calibration.collect(model, names, samples=args.samples, num_levels=args.levels)
    print(f"calibration: {len(cal.hessians)} layers in {cal.seconds:.0f} s (load {load[0]:.1f})", flush=True)
    record("calibration", dict(cal.summary(), loadavg_before=list(load)))
    agreement(model, cal, args, record)
    with tempfile.TemporaryDirectory(prefix="aq-bench-sens-") as tmp:
        allocations(model, cal, args, record, Path(tmp))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
