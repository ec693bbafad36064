"""Graph calibration on the terrain U-Net: output fidelity on held-out inputs, with and without.

For the edge (int2) and local (int4) profiles, the same under ``target_runtime="gguf"`` (ggml's
block types: ``edge-gguf``, ``local-gguf``), and under a size budget halfway between
all-int2 and all-int4, the real terrain U-Net is quantized with ``calibration=None`` and with
``calibration="graph"`` (same config otherwise), each quantization in its own process so its
peak memory (VmHWM) is its own. Every store is then checked end to end on the validation
inputs (:mod:`arrow_quant_v2.e2e`: 10 noise levels log-spaced over sigma 0.002..80, 3 samples per
level at difficulty 0.1/0.5/0.9, the validation random stream), which calibration never sees
(it draws from another stream, with random difficulties). Writes
``benchmarks/results/bench_calibration.json``. Each row records the quantization's wall time,
the calibration stage's own seconds (graph passes and H), the process's peak RSS (VmHWM)
and the load average before and after: calibration's cost target (terrain U-Net in at most
3 minutes on 2 cores, at most 2 GB) is read from these.

    python benchmarks/bench_calibration.py [--samples 2] [--runs edge local edge-gguf local-gguf budget]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrow_quant_v2 import DiffusionQuantConfig, __version__, load_quantized  # noqa: E402
from arrow_quant_v2.e2e import end_to_end  # noqa: E402
from arrow_quant_v2.samples import sample_path  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bench_calibration.json"
CHILD = """
import json, resource, sys, time
from arrow_quant_v2 import DiffusionQuantConfig
from arrow_quant_v2.engine import quantize_model
model, out, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t = time.perf_counter()
r = quantize_model(model, out, DiffusionQuantConfig.from_dict(cfg), overwrite=True)
r["wall_s"] = time.perf_counter() - t
# VmHWM: this process image's own peak (ru_maxrss would carry the parent's peak across fork+exec)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
r["peak_rss_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(r, default=str))
"""


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def quantize(model: Path, out: Path, config: DiffusionQuantConfig) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), config.to_json()], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: Path, out: Path, label: str, config: DiffusionQuantConfig) -> dict:
    load = os.getloadavg()
    r = quantize(model, out, config)
    e = end_to_end(model, out, num_time_groups=config.num_time_groups)
    row = {
        "label": label, "config": config.to_dict(), "loadavg_before": list(load),
        "bits_per_weight": r["bits_per_weight"], "model_size_mb": r["model_size_mb"],
        "fallbacks": r["fallbacks"], "weight_cosine": r["cosine_similarity"],
        "quantize_wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "calibration": r.get("calibration"),
        "calibration_s": (r.get("calibration") or {}).get("seconds"), "loadavg_after_quantize": list(os.getloadavg()),
        "encodings": sorted({t.encoding for t in load_quantized(out).tensors.values() if t.quantized}),
        "e2e": {k: e[k] for k in ("mean_cosine", "worst_cosine", "worst_sigma", "worst_sample_cosine", "reason",
                                  "batch", "seed", "conditioning")},
        "levels": [{k: lv[k] for k in ("sigma", "cosine", "worst_sample_cosine", "sample_cosines")} for lv in e["levels"]],
    }
    print(f"{label:34s} bpw {row['bits_per_weight']:.4f}  output cos mean {e['mean_cosine']:.5f} worst "
          f"{e['worst_cosine']:.5f} worst sample {e['worst_sample_cosine']:.5f}  quantize {r['wall_s']:.1f} s "
          f"(calibration {(r.get('calibration') or {}).get('seconds', 0):.1f} s)  peak {r['peak_rss_mb']:.0f} MiB  "
          f"load {load[0]:.1f}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=DiffusionQuantConfig.calibration_samples)
    ap.add_argument("--runs", nargs="+", default=["edge", "local", "edge-gguf", "local-gguf", "budget"],
                    choices=["edge", "local", "edge-gguf", "local-gguf", "budget"])
    ap.add_argument("--keep", action="store_true", help="add to the existing JSON's rows (replacing same labels)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    model = sample_path("terrain-unet")
    rows: list = json.loads(args.out.read_text())["rows"] if args.keep and args.out.exists() else []

    def keep(row: dict) -> None:  # written after every run, so a long benchmark leaves what it measured
        rows[:] = [r for r in rows if r["label"] != row["label"]] + [row]
        save(args.out, rows)

    with tempfile.TemporaryDirectory(prefix="aq-bench-cal-") as tmp:
        work = Path(tmp)
        for run in [r for r in args.runs if r != "budget"]:
            profile, _, runtime = run.partition("-")
            target = {"target_runtime": runtime} if runtime else {}
            for cal in (None, "graph"):
                cfg = DiffusionQuantConfig.from_profile(profile, calibration=cal, calibration_samples=args.samples,
                                                        **target)
                keep(measure(model, work / f"{run}-{cal}", f"{run} calibration={cal}", cfg))
        if "budget" in args.runs:
            sizes = [quantize(model, work / f"u{b}", DiffusionQuantConfig(bit_width=b, min_accuracy=0.0))["model_size_mb"]
                     for b in (2, 4)]
            target = sum(sizes) / 2
            for cal in (None, "graph"):
                cfg = DiffusionQuantConfig(target_model_size_mb=target, min_accuracy=0.0, calibration=cal,
                                           calibration_samples=args.samples)
                keep(dict(measure(model, work / f"budget-{cal}", f"budget {target:.3f} MiB calibration={cal}",
                                         cfg), all_int2_mb=sizes[0], all_int4_mb=sizes[1]))
    print(f"wrote {args.out}")


def save(out: Path, rows: list) -> None:
    import numpy
    import onnxruntime

    result = {
        "benchmark": "benchmarks/bench_calibration.py", "commit": _commit(), "version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
        "cores": os.cpu_count(), "python": platform.python_version(), "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__, "loadavg_end": list(os.getloadavg()),
        "model": "terrain-unet", "repeats": 1,
        "statistic": "one run each (quantization and validation are deterministic; times are single wall times)",
        "held_out": "validation inputs from e2e.VALIDATION_STREAM, calibration from e2e.CALIBRATION_STREAM",
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
