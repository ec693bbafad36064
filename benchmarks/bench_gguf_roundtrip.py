"""GGUF export round trip: every tensor of the exported file, read with ``gguf.GGUFReader`` and
dequantized by gguf-py's reference ``gguf.quants.dequantize``, against ``QuantizedModel.dequantize``.

    python benchmarks/bench_gguf_roundtrip.py            # tiny-dream, terrain-unet, a 4096x4096 Gaussian

For each model, quantize with ``target_runtime="gguf"`` at every bit width (the library's ggml block
types, with their own decoders; when the config has the field) and with gguf-py's reference Q8_0 /
Q4_0 quantizer behind the same interface (tests/gguf_helpers.py; tensors whose rows are not whole
blocks kept lossless, as it has no fallback), export with ``to_gguf``, and count tensors that are
bit-identical, with the largest difference in float32 ulps and in absolute value. For the reference
encodings the store decodes with gguf-py itself, so only the byte transport is tested; for the
library's types, its decoders against gguf-py's.
Also records export time and the file size. Writes benchmarks/results/gguf_roundtrip.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gguf  # noqa: E402
from importlib.metadata import version as _version  # noqa: E402
import gguf_helpers  # noqa: E402,F401  (registers gguf_ref_q8_0 / gguf_ref_q4_0)
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig, __version__, load_quantized  # noqa: E402
from arrow_quant_v2.samples import sample_path  # noqa: E402
from arrow_quant_v2.source import open_model  # noqa: E402


def variants(folder: Path) -> list:
    """(label, config kwargs): the library's ggml types through ``target_runtime="gguf"`` at every bit
    width when the config has it, and gguf-py's reference Q8_0 / Q4_0 behind the same interface."""
    from arrow_quant_v2.config import BIT_WIDTHS

    out = []
    if "target_runtime" in DiffusionQuantConfig.__dataclass_fields__:
        out += [(f"target_runtime=gguf int{b}", dict(bit_width=b, target_runtime="gguf"))
                for b in sorted(BIT_WIDTHS, reverse=True)]
    for enc, bits in (("gguf_ref_q8_0", 8), ("gguf_ref_q4_0", 4)):
        out.append((f"gguf-py reference {enc[-4:].upper()}",
                    dict(bit_width=bits, encoding=enc, min_accuracy=0.0, sensitive_bits=bits,
                         bit_rules=unfit_rules(folder, 32))))
    return out


def gaussian(folder: Path, n: int = 4096) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    w = (np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) * np.float32(0.02))
    save_file({"blocks.0.proj.weight": w}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "GaussianMatrix"}))
    return folder


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in float32 units in the last place (ordered integer view)."""
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.abs(ia - ib).max()) if ia.size else 0


def unfit_rules(folder: Path, block: int) -> dict:
    """bit_rules keeping lossless the tensors whose rows are not whole ggml blocks."""
    src = open_model(folder)
    return {n: 0 for n, t in src.tensors.items() if len(t.shape) > 1 and math.prod(t.shape[1:]) % block}


def round_trip(store, path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    record = json.loads(str(reader.get_field("arrowquant.tensors").contents()))
    exact, worst_ulps, worst_abs, quantized = 0, 0, 0.0, 0
    from arrow_quant_v2.gguf_io import runtime

    target = runtime.describe(store.path, list(store.tensors), {}, with_metadata=False)
    for t in reader.tensors:
        name = record[t.name]["source"]
        want = store.dequantize(name)
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(want.shape)
        if name in target.permute_heads:
            got = runtime.permute_qk(got, target.permute_heads[name], inverse=True)
        quantized += store.tensors[name].quantized
        if np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            exact += 1
        else:
            worst_ulps = max(worst_ulps, ulps(got, want))
            worst_abs = max(worst_abs, float(np.abs(got - want).max()))
    return {"tensors": len(reader.tensors), "quantized_tensors": quantized, "bit_identical": exact,
            "max_ulps": worst_ulps, "max_abs_diff": worst_abs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_roundtrip.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-rt-"))
    models = {"tiny-dream": sample_path("tiny-dream"), "terrain-unet": sample_path("terrain-unet"),
              "gaussian-4096": gaussian(work / "gaussian")}
    results = []
    try:
        for label, folder in models.items():
            for name, cfg in variants(folder):
                store_path = work / "store"
                t0 = time.perf_counter()
                ArrowQuantV2().quantize_diffusion_model(folder, store_path, DiffusionQuantConfig(**cfg))
                quantize_s = time.perf_counter() - t0
                store = load_quantized(store_path)
                t0 = time.perf_counter()
                info = store.to_gguf(work / "model.gguf")
                export_s = time.perf_counter() - t0
                row = dict(round_trip(store, work / "model.gguf"), model=label, variant=name,
                           architecture=info["architecture"], ggml_types=info["ggml_types"],
                           file_bytes=info["bytes"], quantize_s=quantize_s, export_s=export_s)
                print(json.dumps(row))
                results.append(row)
                shutil.rmtree(store_path)
                (work / "model.gguf").unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"benchmark": "bench_gguf_roundtrip", "commit": commit, "machine": platform.machine(),
              "python": platform.python_version(), "arrow_quant": __version__, "gguf": _version("gguf"),
              "loadavg": os.getloadavg(), "statistic": "one run per model and type; exactness is deterministic",
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
