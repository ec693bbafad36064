"""Peak memory while quantizing a large generated model: bounded by chunks, not model size.

    python benchmarks/bench_memory.py [--preset 2gb|7b] [--bits 4] [--workdir DIR] [--keep]

Generates (once, cached in the work dir) a Dream-layout BF16 model with
benchmarks/make_synthetic.py, then quantizes it in a fresh subprocess and prints
wall time, throughput in GB/s of source weights, peak RSS, largest tensor and output size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from arrow_quant_v2 import DiffusionQuantConfig
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.source import open_model
model, out, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = open_model(model)
largest = max(src.tensors.values(), key=lambda t: t.nbytes)
t = time.perf_counter()
r = quantize_model(model, out, DiffusionQuantConfig(bit_width=bits))
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "source_gb": src.total_bytes / 1e9, "largest": largest.name, "largest_mb": largest.nbytes / 2**20,
                  "largest_f32_mb": largest.numel * 4 / 2**20, "params": sum(t.numel for t in src.tensors.values()),
                  "size_mb": r["model_size_mb"], "cosine": r["cosine_similarity"], "bpw": r["bits_per_weight"]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2gb", choices=("tiny", "2gb", "7b"))
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "arrow-quant-bench")
    ap.add_argument("--keep", action="store_true", help="keep the quantized store")
    args = ap.parse_args()
    model = args.workdir / f"dream-{args.preset}"
    if not model.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(f"generating {model} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_synthetic.py"), str(model),
                        "--preset", args.preset], check=True)
    out = args.workdir / f"dream-{args.preset}-int{args.bits}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(args.bits)],
                          capture_output=True, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores")
    print(f"model: {model} ({r['params'] / 1e9:.2f}B params, {r['source_gb']:.2f} GB BF16)")
    print(f"largest tensor: {r['largest']} ({r['largest_mb']:.0f} MiB stored, {r['largest_f32_mb']:.0f} MiB as float32)")
    print(f"int{args.bits}: wall {r['wall_s']:.1f} s, {r['source_gb'] / r['wall_s']:.3f} GB/s of source weights")
    print(f"peak RSS {r['peak_rss_mb']:.0f} MiB = {r['peak_rss_mb'] / r['largest_f32_mb']:.2f} x the largest tensor as float32")
    print(f"output {r['size_mb']:.0f} MiB, bpw of quantized tensors {r['bpw']:.3f}, cosine {r['cosine']:.5f}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
