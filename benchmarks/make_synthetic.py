"""Write a synthetic Dream-layout (Qwen2) diffusion LM of a chosen size, streaming.

    python benchmarks/make_synthetic.py OUT --preset {tiny,2gb,7b} [--seed N] [--overwrite]

Presets (BF16):
    tiny   hidden 512,  intermediate 1408,  8 layers, vocab 8192     ~31M params,  ~62 MB
    2gb    hidden 2048, intermediate 5632, 20 layers, vocab 32000    ~1.0B params, ~2.0 GB
    7b     hidden 3584, intermediate 18944, 28 layers, vocab 152064  ~7.6B params, ~15 GB
           (the Dream-v0-Base-7B / Qwen2.5-7B shapes, in 4 GB shards)

The model is written tensor by tensor (each tensor in chunks), so memory stays flat whatever
the size: the script prints the peak RSS at the end to show it. The folder is assembled under
a temporary sibling name and renamed to OUT when complete.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrow_quant_v2.samples import DREAM_PRESETS, generate_dream  # noqa: E402


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="model folder to create")
    ap.add_argument("--preset", choices=sorted(DREAM_PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["BF16", "F16", "F32"], default="BF16")
    ap.add_argument("--max-shard-bytes", type=int, default=None,
                    help="override the preset's shard size (bytes)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="override the preset's vocabulary (the embedding and head have vocab x hidden parameters)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)

    out: Path = args.out.resolve()
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    preset = dict(DREAM_PRESETS[args.preset])
    if args.max_shard_bytes:
        preset["max_shard_bytes"] = args.max_shard_bytes
    if args.vocab:
        preset["vocab"] = args.vocab

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing preset {args.preset!r} ({args.dtype}, seed {args.seed}) to {out}", flush=True)
    t0 = time.perf_counter()
    try:
        info = generate_dream(tmp, seed=args.seed, dtype=args.dtype, **preset)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t0

    total = 0
    for f in sorted(out.iterdir()):
        size = f.stat().st_size
        total += size
        print(f"  {f.name:<40} {size / 2**20:>10.1f} MiB")
    print(f"parameters:   {info['params']:,}")
    print(f"weight bytes: {info['weight_bytes']:,} ({info['weight_bytes'] / 2**30:.2f} GiB)")
    print(f"on disk:      {total:,} bytes")
    print(f"elapsed:      {elapsed:.1f} s ({info['weight_bytes'] / 2**20 / elapsed:.0f} MiB/s)")
    print(f"peak RSS:     {peak_rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
