"""Peak memory while quantizing a large generated model: bounded by chunks, not model size.

    python benchmarks/bench_memory.py [--preset 2gb|7b] [--vocab N] [--bits 4] [--workdir DIR] [--keep]

Generates (once, cached in the work dir) a Dream-layout BF16 model with
benchmarks/make_synthetic.py (``--vocab`` widens its embedding and head: with the 2gb preset's
hidden size 2048, ``--vocab 1000000`` makes each a 2B-parameter tensor), then quantizes it in a
fresh subprocess and prints wall time, throughput in GB/s of source weights, peak RSS, largest
tensor and output size. Each run is added to ``benchmarks/results/bench_memory.json`` under its
model (``--label`` names it; runs of other models stay).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import RESULTS, Record, environment, load  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import arrow_quant_v2
from arrow_quant_v2 import DiffusionQuantConfig, engine
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
                  "size_mb": r["model_size_mb"], "cosine": r["cosine_similarity"], "bpw": r["bits_per_weight"],
                  "chunk_spool": hasattr(engine, "ChunkSpool"), "package": arrow_quant_v2.__file__}))
"""


HIDDEN = 2048


def write_embedding_model(folder: Path, embedding_params: int, layers: int = 8) -> None:
    """A model with ``layers`` 2048x2048 BF16 projections and, when ``embedding_params`` > 0, a token
    embedding of about that many parameters (rows of 2048). The values are a fixed random block
    tiled with a per-block scale: cheap to write, and the quantizer does the same work on them."""
    from arrow_quant_v2.safetensors_writer import TensorSpec, float32_to_bf16_bits, write_safetensors

    block = (np.random.default_rng(0).standard_normal((256, HIDDEN)) * 0.02).astype(np.float32)

    def produce(rows):
        def chunks():
            for r in range(0, rows, 4096):
                n = min(4096, rows - r)
                reps = np.resize(block, (n, HIDDEN)) * np.float32(1 + (r // 4096) % 7 * 0.1)
                yield float32_to_bf16_bits(reps)
        return chunks

    specs = [TensorSpec(f"model.layers.{i}.mlp.up_proj.weight", "BF16", (HIDDEN, HIDDEN), produce(HIDDEN))
             for i in range(layers)]
    if embedding_params:
        rows = embedding_params // HIDDEN
        specs.append(TensorSpec("model.embed_tokens.weight", "BF16", (rows, HIDDEN), produce(rows)))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "model.safetensors", specs)
    (tmp / "config.json").write_text(json.dumps({"model_type": "dream", "hidden_size": HIDDEN}))
    tmp.rename(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2gb", choices=("tiny", "2gb", "7b"))
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "arrow-quant-bench")
    ap.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary")
    ap.add_argument("--embedding", type=int, default=None, metavar="PARAMS",
                    help="instead of a preset: 8 BF16 2048x2048 layers plus a token embedding of PARAMS parameters "
                         "(0: none), quick to write")
    ap.add_argument("--label", default=None, help="the name of this run in the JSON (default: preset[-vocab N])")
    ap.add_argument("--code-commit", default=None,
                    help="the commit of the arrow_quant_v2 on PYTHONPATH when it is not this checkout's (e.g. an "
                         "export of an older commit, to measure before and after a change)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized store")
    args = ap.parse_args()
    record = Record("bench_memory")
    name = f"dream-{args.preset}" + (f"-vocab{args.vocab}" if args.vocab else "")
    if args.embedding is not None:
        name = f"layers8-embedding{args.embedding}"
    model = args.workdir / name
    if not model.exists() and args.embedding is not None:
        print(f"writing {model} ...", flush=True)
        write_embedding_model(model, args.embedding)
    if not model.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(f"generating {model} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_synthetic.py"), str(model),
                        "--preset", args.preset] + (["--vocab", str(args.vocab)] if args.vocab else []), check=True)
    out = args.workdir / f"{name}-int{args.bits}"
    shutil.rmtree(out, ignore_errors=True)
    # cwd: not this checkout, so the child imports the arrow_quant_v2 that PYTHONPATH names
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(args.bits)],
                          capture_output=True, text=True, check=True, cwd=args.workdir)
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
    previous = RESULTS / "bench_memory.json"
    runs = json.loads(previous.read_text())["results"] if previous.is_file() else {}
    runs[args.label or name] = dict(r, preset=None if args.embedding is not None else args.preset, vocab=args.vocab,
                                    embedding_params=args.embedding, bits=args.bits,
                                    commit=args.code_commit or environment()["commit"], load_average_after=load())
    record.write(runs, repeats=1, statistic="one run per model in a fresh process; peak RSS is the child's "
                 "ru_maxrss (the whole process, numba and pyarrow included)",
                 notes="runs of different models may come from different commits: each entry is kept until rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
