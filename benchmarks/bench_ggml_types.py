"""Our ggml block-type encoders against ggml's own reference quantizer, side by side.

    LLAMA_CPP_LIB=/work/vendor-site/llama_cpp/lib python benchmarks/bench_ggml_types.py
    ... --quick          # 1024x4096 matrices instead of 4096x4096
    ... --types q4_k q8_0

For every ggml type this project encodes, on a 4096x4096 float32 Gaussian (sigma 0.02)
and a heavy-tailed matrix (Student-t df 4 with a log-normal per-column scale spread):

* relF = ||W - W_hat||_F / ||W||_F of ours, of ggml's ``ggml_quantize_chunk`` without an
  importance matrix, and of ggml's with a flat all-ones importance matrix;
* quantize throughput in MB/s of float32 input on one thread (CPU time of that thread,
  so other load on the shared machine does not count; wall time is recorded too);
* a cross-check that ggml's own dequantizer (``to_float`` of the type's traits) decodes
  our bytes to exactly the values our decoder gives (max |difference| in float32 ulps).

ggml's library is loaded from ``$LLAMA_CPP_LIB`` (a folder holding ``libggml-base.so``,
e.g. the ``llama_cpp/lib`` folder of an installed llama-cpp-python) or ``--lib``; without
it only our figures are measured and the JSON says ggml was absent. Results:
``benchmarks/results/ggml_types.json`` (``_record.py``: machine, commit, versions, load average, raw numbers;
speed is the best of ``--repeats`` runs, relF is deterministic).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arrow_quant_v2 import encodings as E  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

TYPES = ["q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs", "iq4_nl", "q5_1", "q5_0", "q4_0"]
#: The issue's goals on the Gaussian matrix (relF), where it set one.
GOALS = {"q4_k": 0.0695, "q3_k": 0.141, "q2_k": 0.260, "q5_k": 0.0350, "q6_k": 0.0172, "q8_0": 0.0053}


class GGML:
    """ggml's reference quantizer and dequantizer through ctypes."""

    class Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    def __init__(self, folder: Path):
        self.lib = ctypes.CDLL(str(folder / "libggml-base.so"))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(self.Traits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.to_float_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def quantize(self, qtype: int, x: np.ndarray, imatrix=None) -> np.ndarray:
        rows, cols = x.shape
        tr = self.lib.ggml_get_type_traits(qtype).contents
        out = np.zeros(rows * cols // tr.blck_size * tr.type_size, np.uint8)
        im = None if imatrix is None else imatrix.ctypes.data
        self.lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, rows, cols, im)
        return out

    def dequantize(self, qtype: int, data: np.ndarray, n: int) -> np.ndarray:
        out = np.empty(n, np.float32)
        fn = self.to_float_type(self.lib.ggml_get_type_traits(qtype).contents.to_float)
        fn(np.ascontiguousarray(data).ctypes.data, out.ctypes.data, n)
        return out


def matrices(rows: int, cols: int):
    rng = np.random.default_rng(0)
    gauss = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    spread = np.exp(rng.normal(0.0, 0.7, (1, cols)))
    heavy = (rng.standard_t(4, (rows, cols)) * 0.02 * spread).astype(np.float32)
    return {"gaussian": gauss, "student_t_col_spread": heavy}


def rel_f(x: np.ndarray, y: np.ndarray) -> float:
    x64 = x.astype(np.float64).ravel()
    return float(np.linalg.norm(x64 - y.astype(np.float64).ravel()) / np.linalg.norm(x64))


def timed(fn, repeats: int):
    """(result, best CPU seconds of this thread, best wall seconds)."""
    best_cpu = best_wall = float("inf")
    out = None
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = fn()
        best_cpu = min(best_cpu, time.thread_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return out, best_cpu, best_wall


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = np.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int(np.abs(ia - ib).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024x4096 matrices")
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lib", default=os.environ.get("LLAMA_CPP_LIB"), help="folder with libggml-base.so")
    ap.add_argument("--out", default=None, help="folder for ggml_types.json (default benchmarks/results)")
    args = ap.parse_args(argv)
    record = Record("ggml_types", argv, script="benchmarks/bench_ggml_types.py")

    from gguf import GGMLQuantizationType as T

    ggml = None
    if args.lib and (Path(args.lib) / "libggml-base.so").is_file():
        ggml = GGML(Path(args.lib))
    else:
        print("ggml's library not found: set LLAMA_CPP_LIB to a folder holding libggml-base.so "
              "(e.g. llama_cpp/lib of llama-cpp-python); measuring ours only")
    rows, cols = (1024, 4096) if args.quick else (4096, 4096)
    results = []
    for kind, x in matrices(rows, cols).items():
        print(f"\n{kind} {rows}x{cols} float32")
        print(f"{'type':8} {'bpw':>7} {'ours':>8} {'ggml':>8} {'ggml+1s':>8} {'goal':>7} "
              f"{'ours MB/s':>9} {'ggml MB/s':>9} {'decode':>9}")
        for name in args.types:
            enc = E.get_encoding(name, E._REGISTRY[name].supported_bits[0], 0)
            qt = int(T[enc.ggml_type])
            enc.quantize(x[:8])  # compile / load the kernels outside the timing
            (blobs, stats), cpu, wall = timed(lambda: enc.quantize(x), args.repeats)
            ours = enc.dequantize(blobs, rows, cols)
            row = {"matrix": kind, "rows": rows, "cols": cols, "type": enc.ggml_type, "encoding": name,
                   "bpw": enc.bits_per_weight(rows, cols), "ours_relF": rel_f(x, ours),
                   "ours_cpu_s": cpu, "ours_wall_s": wall, "ours_MBps_per_core": x.nbytes / cpu / 1e6}
            if ggml is not None:
                ref, gcpu, gwall = timed(lambda: ggml.quantize(qt, x), args.repeats)
                flat = ggml.quantize(qt, x, np.ones(cols, np.float32))
                theirs_on_ours = ggml.dequantize(qt, blobs["codes"], x.size)
                row.update({
                    "ggml_relF": rel_f(x, ggml.dequantize(qt, ref, x.size)),
                    "ggml_flat_imatrix_relF": rel_f(x, ggml.dequantize(qt, flat, x.size)),
                    "ggml_cpu_s": gcpu, "ggml_wall_s": gwall, "ggml_MBps_per_core": x.nbytes / gcpu / 1e6,
                    "ggml_decodes_ours_max_ulps": ulps(theirs_on_ours, ours.ravel()),
                    "ggml_bytes_equal_size": int(ref.size) == int(blobs["codes"].size),
                })
            results.append(row)
            goal = GOALS.get(name) if kind == "gaussian" else None
            print(f"{enc.ggml_type:8} {row['bpw']:7.4f} {row['ours_relF']:8.5f} "
                  f"{row.get('ggml_relF', float('nan')):8.5f} {row.get('ggml_flat_imatrix_relF', float('nan')):8.5f} "
                  f"{goal if goal else '':>7} {row['ours_MBps_per_core']:9.1f} "
                  f"{row.get('ggml_MBps_per_core', float('nan')):9.1f} "
                  f"{'exact' if row.get('ggml_decodes_ours_max_ulps') == 0 else row.get('ggml_decodes_ours_max_ulps', '-'):>9}",
                  flush=True)
    record.write({"rows": results, "goals_gaussian": GOALS, "ggml_library": str(args.lib) if ggml else None,
                  "relF": "||W - W_hat||_F / ||W||_F in float64"},
                 repeats=args.repeats, out_dir=args.out,
                 statistic="relF: one deterministic run per type and matrix; speed: best of `repeats` runs, "
                           "CPU time of the quantizing thread (MB of float32 input per CPU-second)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
