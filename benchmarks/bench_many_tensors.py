"""Scale in tensor count: a model of many tiny tensors (default 100,000).

    python benchmarks/bench_many_tensors.py [--tensors 100000] [--repeats 3] [--workdir DIR]

Writes a float32 safetensors model of ``--tensors`` tensors (shapes cycling through
(16, 8), (32,), (8, 4), (4, 4, 2): tiny, like norms, biases and small projections),
then, in a fresh child process each, (1) quantizes it at int4 and records wall time
and peak RSS (``ru_maxrss``), (2) opens the store (``load_quantized``) and dequantizes
single tensors, recording the open time and the per-tensor time. Results go to
``benchmarks/results/many_tensors.json`` (raw numbers of every repeat, the median,
commit, versions, load average).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(16, 8), (32,), (8, 4), (4, 4, 2)]

QUANTIZE = r"""
import json, resource, sys, time
from arrow_quant_v2 import DiffusionQuantConfig
from arrow_quant_v2.engine import quantize_model
t = time.perf_counter()
r = quantize_model(sys.argv[1], sys.argv[2], DiffusionQuantConfig(bit_width=4, min_accuracy=0.0), overwrite=True)
print(json.dumps({"quantize_s": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "model_size_mb": r["model_size_mb"], "num_tensors": r["num_tensors"]}))
"""

OPEN = r"""
import json, resource, sys, time
t = time.perf_counter()
from arrow_quant_v2 import load_quantized
imported = time.perf_counter() - t
t = time.perf_counter()
store = load_quantized(sys.argv[1])
open_s = time.perf_counter() - t
names = list(store)
picks = [names[i * (len(names) - 1) // 9] for i in range(10)]
times = []
for n in picks:
    t = time.perf_counter()
    store.dequantize(n)
    times.append(time.perf_counter() - t)
print(json.dumps({"open_s": open_s, "import_s": imported, "dequantize_one_s": times, "tensors": len(names),
                  "open_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_model(folder: Path, count: int) -> None:
    """A safetensors model of ``count`` tiny float32 tensors (deterministic values)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i // 100}.t{i % 100}.weight": rng.standard_normal(SHAPES[i % len(SHAPES)]).astype(np.float32)
               for i in range(count)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "many-tiny"}))


def child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "arrow-quant-many")
    ap.add_argument("--label", default="", help="a note stored with the figures (e.g. 'before')")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "many_tensors.json")
    args = ap.parse_args()
    model = args.workdir / f"tiny-{args.tensors}"
    if not (model / "model.safetensors").is_file():
        make_model(model, args.tensors)
    store = args.workdir / f"tiny-{args.tensors}-int4"
    runs = []
    for _ in range(args.repeats):
        shutil.rmtree(store, ignore_errors=True)
        load_before = os.getloadavg()
        q = child(QUANTIZE, str(model), str(store))
        o = child(OPEN, str(store))
        runs.append(dict(q, **o, loadavg_before=load_before, loadavg_after=os.getloadavg(),
                         store_bytes=sum(f.stat().st_size for f in store.iterdir())))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    versions = child("import json, numpy, numba, pyarrow; print(json.dumps({'numpy': numpy.__version__, "
                     "'numba': numba.__version__, 'pyarrow': pyarrow.__version__}))")
    median = {k: statistics.median(r[k] for r in runs) for k in ("quantize_s", "peak_rss_mb", "open_s", "store_bytes")}
    median["dequantize_one_ms"] = statistics.median(t * 1000 for r in runs for t in r["dequantize_one_s"])
    result = {"benchmark": "many_tensors", "label": args.label, "tensors": args.tensors, "shapes": SHAPES,
              "model_bytes": (model / "model.safetensors").stat().st_size, "commit": commit,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "versions": versions, "repeats": args.repeats, "statistic": "median over repeats (dequantize: over 10 tensors x repeats)",
              "median": median, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median"], indent=1))
    shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
