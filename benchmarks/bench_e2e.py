"""End-to-end fidelity of the terrain U-Net over its noise range, per quantization.

Quantizes the real terrain U-Net (``sample_path("terrain-unet")``) at int8, int4 and int2 (the
profiles' usual settings: default min_accuracy, so the per-layer fallback is active; plus int2
with the fallback off), and under a size budget halfway between all-int2 and all-int4, then
runs the original and dequantized ONNX graph at ``--levels`` noise levels log-spaced over
sigma 0.002..80 (batch 2, 128x128, seed 0) and prints per level the output cosine, relative
error, PSNR and the cosine of the denoising update (output - input). An int4 model with an
output cosine under 0.99 at any level is flagged.

    python benchmarks/bench_e2e.py [--levels 10] [--batch 2]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from arrow_quant_v2 import DiffusionQuantConfig
from arrow_quant_v2.e2e import end_to_end
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.plan import Planner
from arrow_quant_v2.samples import sample_path
from arrow_quant_v2.source import open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model = sample_path("terrain-unet")
    out = Path(tempfile.mkdtemp(prefix="aq-bench-e2e-"))
    runs = [("int8", dict(bit_width=8)), ("int4", dict(bit_width=4)), ("int2", dict(bit_width=2)),
            ("int2 no-fallback", dict(bit_width=2, min_accuracy=0.0))]
    try:
        results = {}
        for label, cfg in runs:
            path = out / label.replace(" ", "-")
            r = quantize_model(model, path, DiffusionQuantConfig(**cfg))
            t = time.perf_counter()
            e = end_to_end(model, path, num_time_groups=args.levels, batch=args.batch, threads=args.threads)
            results[label] = (r, e, time.perf_counter() - t)
        lo = quantize_model(model, out / "u2", DiffusionQuantConfig(bit_width=2, min_accuracy=0.0))["model_size_mb"]
        hi = quantize_model(model, out / "u4", DiffusionQuantConfig(bit_width=4, min_accuracy=0.0))["model_size_mb"]
        for label, target in (("budget 50% int2->int4", (lo + hi) / 2), ("budget = all-int4 size", hi)):
            path = out / f"budget-{int(target * 1000)}"
            r = quantize_model(model, path, DiffusionQuantConfig(target_model_size_mb=target, min_accuracy=0.0))
            t = time.perf_counter()
            e = end_to_end(model, path, num_time_groups=args.levels, batch=args.batch, threads=args.threads)
            results[label] = (r, e, time.perf_counter() - t)
            if label.startswith("budget 50%"):  # a uniform mix of at least that size: int4 for the first layers
                planner = Planner(DiffusionQuantConfig(bit_width=2))
                source = open_model(model)
                ordinary = [n for n, info in source.tensors.items() if planner.plan(info).role == "ordinary"]
                for k in range(len(ordinary) * r["budget"]["tensors_per_width"].get("int4", 0) // len(ordinary),
                               len(ordinary) + 1):
                    rules = {n: 4 for n in ordinary[:k]}
                    r2 = quantize_model(model, out / "mix", DiffusionQuantConfig(bit_width=2, bit_rules=rules,
                                                                                 min_accuracy=0.0), overwrite=True)
                    if r2["model_size_mb"] >= r["model_size_mb"]:
                        break
                t = time.perf_counter()
                e2 = end_to_end(model, out / "mix", num_time_groups=args.levels, batch=args.batch, threads=args.threads)
                results[f"int2 + first {k} layers int4 (uniform mix, same size)"] = (r2, e2, time.perf_counter() - t)

        for label, (r, e, secs) in results.items():
            print(f"\n== terrain-unet {label}: {r['model_size_mb']:.3f} MiB, weight cosine {r['cosine_similarity']:.5f}, "
                  f"{len(r['fallbacks'])} fallbacks, per width {({k: v['tensors'] for k, v in r['per_bits'].items()})}, "
                  f"e2e {secs:.1f}s")
            if not e["available"]:
                print("   unavailable:", e["reason"])
                continue
            print(f"   {'sigma':>9} {'cosine':>9} {'rel_err':>8} {'PSNR dB':>8} {'upd cos':>8}")
            for lv in e["levels"]:
                print(f"   {lv['sigma']:9.4f} {lv['cosine']:9.5f} {lv['rel_error']:8.4f} {lv['psnr_db']:8.2f} "
                      f"{lv.get('update_cosine', float('nan')):8.4f}")
            print(f"   mean cos {e['mean_cosine']:.5f}  worst cos {e['worst_cosine']:.5f} at sigma {e['worst_sigma']:.4g}  "
                  f"mean PSNR {e['mean_psnr_db']:.2f} dB  worst PSNR {e['worst_psnr_db']:.2f} dB  "
                  f"worst update cos {e.get('worst_update_cosine', float('nan')):.4f}")
            if label == "int4" and e["worst_cosine"] < 0.99:
                print(f"   FINDING: int4 output cosine {e['worst_cosine']:.5f} < 0.99 at sigma {e['worst_sigma']:.4g}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
