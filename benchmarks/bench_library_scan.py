"""How long the app's model library takes to list a large Hugging Face cache and a deep model root.

Builds, in a temporary folder, a hub cache of ``--repos`` model repos (huggingface_hub's layout: blobs,
snapshots of symlinks, refs) and a model root with ``--repos`` model folders four levels deep, then
times ``ModelLibrary.scan()``: cold (a new library: every header read), warm (nothing changed: the
cached descriptions and hub listing are reused) and after one repo was added. Each figure is the
median of ``--repeats`` runs; the raw times are kept. Writes benchmarks/results/library_scan.json.

    python benchmarks/bench_library_scan.py [--repos 500] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from arrow_quant_v2 import __version__  # noqa: E402
from arrow_quant_v2.ui.library import ModelLibrary  # noqa: E402
from hubcache import add_snapshot, folder_files  # noqa: E402


def tiny_model(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((64, 32)).astype(np.float32)
               for i in range(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def timed(fn, repeats: int) -> list:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repos", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "library_scan.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = folder_files(tiny_model(tmp / "src", 0))
        for i in range(args.repos):
            add_snapshot(tmp / "hf", f"org/model-{i:04d}", files)
            tiny_model(tmp / "root" / f"team-{i % 10}" / f"project-{i}" / "checkpoints" / "final", i)
        os.environ["HF_HUB_CACHE"] = str(tmp / "hf")
        os.environ["ARROW_QUANT_CACHE"] = str(tmp / "aq")

        def cold():
            lib = ModelLibrary([tmp / "root"], include_samples=False, scan=False)
            assert len(lib.scan()) == 2 * args.repos

        warm_lib = ModelLibrary([tmp / "root"], include_samples=False)
        cold_s = timed(cold, args.repeats)
        warm_s = timed(warm_lib.scan, args.repeats)
        added_s = []
        for r in range(args.repeats):
            add_snapshot(tmp / "hf", f"org/added-{r}", files)
            added_s += timed(warm_lib.scan, 1)
        assert len(warm_lib.scan()) == 2 * args.repos + args.repeats
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "benchmark": "bench_library_scan", "commit": commit, "machine": platform.machine(),
        "processor": platform.processor(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "arrow_quant": __version__, "huggingface_hub": metadata.version("huggingface_hub"),
        "loadavg": os.getloadavg(), "statistic": f"median of {args.repeats} runs (raw times kept)",
        "hub_repos": args.repos, "root_models": args.repos, "root_depth": 4,
        "cold_scan_s": statistics.median(cold_s), "warm_scan_s": statistics.median(warm_s),
        "scan_after_one_repo_added_s": statistics.median(added_s),
        "raw": {"cold_scan_s": cold_s, "warm_scan_s": warm_s, "scan_after_one_repo_added_s": added_s},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=1))


if __name__ == "__main__":
    main()
