"""Size budgets on the sample models: is the target met on disk, and does the allocator beat a
uniform mixed assignment of the same size?

For each model: quantize all-int2 and all-int4 (fallback off: min_accuracy=0, so both are pure),
set ``target_model_size_mb`` halfway between their measured sizes, quantize under that budget,
and compare with two hand-made int2+int4 mixes that get at least as many bytes: the first
ordinary tensors in file order at int4 ("first-k"), and int4 layers spread evenly over depth
("spread"). Figures are measured on the written stores (full tensors, not samples):

* ``wrelF``  parameter-weighted mean relative Frobenius error over the tensors that are
  quantized in the all-int2 store (lossless ones count 0);
* ``wrelF2`` the same for relF**2 (what the allocator minimises);
* ``cos``    the quantize result's parameter-weighted cosine.

Then the same budget with the default min_accuracy (fallback on) to show how the two interact.

    python benchmarks/bench_budget.py [--models tiny-dream terrain-unet] [--fractions 0.5]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from arrow_quant_v2 import ConfigurationError, DiffusionQuantConfig, load_quantized
from arrow_quant_v2.budget import measure_model
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.plan import Planner
from arrow_quant_v2.samples import sample_path
from arrow_quant_v2.source import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402


def store_figures(path, names):
    store = load_quantized(path)
    n = np.array([store.tensors[k].numel for k in names], float)
    rel = np.array([store.tensors[k].rel_error if store.tensors[k].quantized else 0.0 for k in names])
    bits = {}
    for e in store.tensors.values():
        key = f"int{e.bits}" if e.quantized else "lossless"
        bits[key] = bits.get(key, 0) + 1
    return {"mb": store.weight_bytes / 2**20, "wrelF": float((n * rel).sum() / n.sum()),
            "wrelF2": float((n * rel**2).sum() / n.sum()), "bits": bits}


def run(model: str, fractions, out: Path) -> dict:
    """Prints the comparison and returns its figures."""
    path = sample_path(model)
    rec = {"model": model, "budgets": []}
    source = open_model(path)
    pure = dict(min_accuracy=0.0)
    print(f"\n=== {model}: {source.total_bytes / 2**20:.2f} MiB source, {len(source.tensors)} tensors")
    uniform = {}
    for bits in (2, 4):
        t = time.perf_counter()
        r = quantize_model(path, out / f"u{bits}", DiffusionQuantConfig(bit_width=bits, **pure), overwrite=True)
        uniform[bits] = r["model_size_mb"]
        print(f"all-int{bits}: {r['model_size_mb']:.4f} MiB  cos {r['cosine_similarity']:.5f}  ({time.perf_counter() - t:.2f}s)")
    names = [n for n, e in load_quantized(out / "u2").tensors.items() if e.quantized]
    rec["uniform_mb"] = {f"int{b}": mb for b, mb in uniform.items()}

    planner = Planner(DiffusionQuantConfig(bit_width=2, **pure))
    ordinary = [n for n, info in source.tensors.items() if planner.plan(info).role == "ordinary"]
    curves = measure_model(source, DiffusionQuantConfig(**pure))

    def step(n):  # estimated disk bytes int2 -> int4 of one tensor
        by = {o.bits: o.disk_bytes for o in curves[n].options}
        return by[4] - by[2]

    for frac in fractions:
        target = uniform[2] + frac * (uniform[4] - uniform[2])
        t = time.perf_counter()
        r = quantize_model(path, out / "budget", DiffusionQuantConfig(target_model_size_mb=target, **pure), overwrite=True)
        b = r["budget"]
        fb = store_figures(out / "budget", names)
        print(f"\n-- budget {frac:.0%} of the way int2 -> int4: target {target:.4f} MiB")
        print(f"budget   : {fb['mb']:.4f} MiB on disk ({b['error_vs_target_pct']:+.3f}% vs target; estimate "
              f"{b['estimated_mb']:.4f}, off {b['estimate_error_pct']:+.3f}%), plan {b['planning_time_s']:.2f}s, "
              f"total {time.perf_counter() - t:.2f}s")
        print(f"           wrelF {fb['wrelF']:.5f}  wrelF2 {fb['wrelF2']:.6f}  cos {r['cosine_similarity']:.5f}  {fb['bits']}")
        entry = {"fraction": frac, "target_mb": target, "budget": dict(fb, cosine=r["cosine_similarity"],
                                                                      estimated_mb=b["estimated_mb"],
                                                                      planning_time_s=b["planning_time_s"]),
                 "mixes": {}}
        rec["budgets"].append(entry)
        for label, order in (("first-k", ordinary),
                             ("spread", [ordinary[i] for i in np.argsort((np.arange(len(ordinary)) * 0.618034) % 1.0)])):
            need = fb["mb"] * 2**20 - uniform[2] * 2**20
            chosen, got = [], 0.0
            for n in order:
                if got >= need:
                    break
                chosen.append(n)
                got += step(n)
            rules = {n: 4 for n in chosen}
            r2 = quantize_model(path, out / label, DiffusionQuantConfig(bit_width=2, bit_rules=rules, **pure), overwrite=True)
            f2 = store_figures(out / label, names)
            entry["mixes"][label] = dict(f2, int4_tensors=len(chosen), cosine=r2["cosine_similarity"])
            print(f"{label:9s}: {f2['mb']:.4f} MiB on disk ({len(chosen)} int4 tensors)  wrelF {f2['wrelF']:.5f}  "
                  f"wrelF2 {f2['wrelF2']:.6f}  cos {r2['cosine_similarity']:.5f}  -> budget is "
                  f"{100 * (1 - fb['wrelF'] / f2['wrelF']):.1f}% lower wrelF, {100 * (1 - fb['wrelF2'] / f2['wrelF2']):.1f}% lower wrelF2")
        some = [(n, p["reason"]) for n, p in r_reasons(out / "budget")][:4]
        for n, why in some:
            print(f"   e.g. {n}: {why}")

        try:
            r3 = quantize_model(path, out / "budget-default", DiffusionQuantConfig(target_model_size_mb=target),
                                overwrite=True)
            b3 = r3["budget"]
            entry["default_min_accuracy"] = {"measured_mb": b3["measured_mb"], "fallbacks": len(r3["fallbacks"]),
                                             "excluded": b3["excluded_for_min_accuracy"],
                                             "cosine": r3["cosine_similarity"]}
            print(f"default min_accuracy: {b3['measured_mb']:.4f} MiB ({b3['error_vs_target_pct']:+.3f}%), "
                  f"{b3['excluded_for_min_accuracy']} candidate widths excluded as predicted fallbacks, "
                  f"{len(r3['fallbacks'])} fallbacks taken, cos {r3['cosine_similarity']:.5f}")
        except ConfigurationError as e:
            print(f"default min_accuracy: ConfigurationError: {e}")
            entry["default_min_accuracy"] = {"error": str(e)}
    return rec


def r_reasons(path):
    store = load_quantized(path)
    seen, out = set(), []
    for e in store.tensors.values():
        key = e.reason.split(":")[0]
        if e.quantized and key not in seen:
            seen.add(key)
            out.append((e.name, {"reason": e.reason}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-dream", "terrain-unet"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.5])
    args = ap.parse_args()
    record = Record("bench_budget")
    out = Path(tempfile.mkdtemp(prefix="aq-bench-budget-"))
    try:
        results = [run(m, args.fractions, out) for m in args.models]
        record.write(results, repeats=1, statistic="one deterministic run per model and budget; sizes are the "
                     "written stores' weight files, errors re-read from them (whole tensors)")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
