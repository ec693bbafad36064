"""Accuracy and speed of every encoding, side by side with plain rounding and gguf.

    python benchmarks/bench_encodings.py            # 4096x4096 matrices (about 2-4 minutes)
    python benchmarks/bench_encodings.py --quick    # 1024x4096, fewer rows in the table
    python benchmarks/bench_encodings.py --models DIR [DIR ...]   # also every float tensor of these models
    python benchmarks/bench_encodings.py --train-grids   # re-fit kquant_nl's grids (prints them)

Prints the machine, then one table per matrix kind (Gaussian sigma 0.02; Student-t
df 4 with a per-row scale spread) with relF = ||W - W_hat||_F / ||W||_F, the cosine
and the bits per weight counted from every stored byte, for our encodings and for
the gguf package's Python quantizers (Q4_0, Q4_1, Q5_0, Q8_0: their bpw from the
byte size of their output). Then the quantize throughput in MB/s of float32 on 1
and 2 Python threads (the matrix split in 2 row blocks, as the engine does),
against gguf's quantizer in the same run. The machine is shared, so the load
average is printed and CPU-time throughput (per busy core) is given beside the
wall-clock one.

llama.cpp's own quantizers (``ggml_quantize_chunk`` of libggml-base, what ``llama-quantize``
runs: Q2_K, Q3_K, Q4_K, Q6_K, Q4_0, Q8_0) are measured on the same matrices, accuracy and speed,
when ``--llama-cpp DIR`` (or ``$LLAMA_CPP_LIB``) names the folder holding ``libggml-base.so``
(llama-cpp-python's ``llama_cpp/lib``); without it those rows are absent and the run says so.
Everything is written to ``benchmarks/results/bench_encodings.json`` (see ``_record.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arrow_quant_v2 import encodings as E  # noqa: E402
from arrow_quant_v2.metrics import figures  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

#: llama.cpp types measured through ggml_quantize_chunk, with their ggml_type numbers.
LLAMA_TYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q6_K": 14, "Q4_0": 2, "Q8_0": 8}
#: ... and the bits label each sits under in the tables.
LLAMA_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q6_K": 6, "Q4_0": 4, "Q8_0": 8}
TARGETS = {4: (4.5, 0.070), 2: (2.625, 0.29), 8: (8.5, 0.0053)}


# --------------------------------------------------------------------------- machine

def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    import numba
    return (f"cpu: {model}; cores: {os.cpu_count()} (usable {usable}); load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; python {platform.python_version()}, "
            f"numpy {np.__version__}, numba {numba.__version__}")


# --------------------------------------------------------------------------- data

def gaussian(rows, cols, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)


def student_t(rows, cols, seed=1, df=4.0):
    """Heavy tails (Student-t, df 4) and a per-row scale spread (log-normal, sigma 0.5)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df, (rows, cols)) * 0.02 * np.exp(rng.normal(0.0, 0.5, (rows, 1)))
    return x.astype(np.float32)


def figures_of(x, y):
    xd = x.astype(np.float64).ravel()
    yd = y.astype(np.float64).ravel()
    xx, yy, xy = xd @ xd, yd @ yd, xd @ yd
    rel = math.sqrt(((xd - yd) ** 2).sum() / xx) if xx else 0.0
    cos = xy / math.sqrt(xx * yy) if xx and yy else 1.0
    return rel, cos


# --------------------------------------------------------------------------- runners

def run_ours(x, name, bits, group):
    enc = E.get_encoding(name, bits, group)
    t0 = time.perf_counter()
    blobs, stats = E.quantize(x, enc)
    dt = time.perf_counter() - t0
    nbytes = sum(b.size for b in blobs.values())
    assert nbytes == enc.nbytes(*x.shape)
    f = figures(stats)  # fused in the kernel; equal to a recomputation (tests check it)
    return nbytes * 8 / x.size, f["rel_error"], f["cosine"], dt


def gguf_types():
    try:
        from gguf import GGMLQuantizationType as T
        from gguf import quants
    except ImportError:
        return None, {}
    return quants, {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q8_0": T.Q8_0}


def run_gguf(x, qname):
    quants, types = gguf_types()
    t0 = time.perf_counter()
    q = quants.quantize(x, types[qname])
    dt = time.perf_counter() - t0
    y = quants.dequantize(q, types[qname]).reshape(x.shape)
    rel, cos = figures_of(x, y)
    return q.nbytes * 8 / x.size, rel, cos, dt


class LlamaCpp:
    """ggml's reference quantizers (``ggml_quantize_chunk``, as llama-quantize runs them) via ctypes;
    their output is decoded with gguf-py's ``quants.dequantize`` to measure the error."""

    def __init__(self, libdir) -> None:
        import ctypes

        self.lib = ctypes.CDLL(str(Path(libdir) / "libggml-base.so"))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    def quantize(self, x, name):
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        t = LLAMA_TYPES[name]
        out = np.empty(rows * self.lib.ggml_row_size(t, cols), np.uint8)
        n = self.lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        return out[:n]

    def run(self, x, name):
        from gguf import GGMLQuantizationType, quants

        t0 = time.perf_counter()
        q = self.quantize(x, name)
        dt = time.perf_counter() - t0
        y = quants.dequantize(q.reshape(x.shape[0], -1), GGMLQuantizationType(LLAMA_TYPES[name])).reshape(x.shape)
        rel, cos = figures_of(x, y)
        return q.nbytes * 8 / x.size, rel, cos, dt


def find_llama_cpp(option):
    where = option or os.environ.get("LLAMA_CPP_LIB")
    if not where:
        print("llama.cpp: not measured (pass --llama-cpp DIR or set LLAMA_CPP_LIB to the folder with libggml-base.so)")
        return None
    if not (Path(where) / "libggml-base.so").is_file():
        print(f"llama.cpp: not measured ({where} holds no libggml-base.so)")
        return None
    return LlamaCpp(where)


def table_rows(quick):
    """(bits label, kind, name, group) in print order: plain rounding first, then the searched ones."""
    d = E.DEFAULT_GROUP_SIZE
    rows = []
    for bits in (2, 3, 4, 8):
        rows += [(bits, "ours", "affine", 64), (bits, "ours", "symmetric", 32), (bits, "ours", "affine_opt", 64)]
        groups = [g for g in (8, 16, 32, 64) if g >= d[bits] or g == 8 and bits == 2] if not quick else []
        if bits in E.KQuantNL.supported_bits:
            rows += [(bits, "ours", "kquant_nl", g) for g in dict.fromkeys([d[bits]] + groups)]
        kq = {2: 16, 3: 32, 4: 32, 8: 64}[bits]  # the group giving llama.cpp k-quant sizes
        rows += [(bits, "ours", "kquant", g) for g in dict.fromkeys([kq] + ([] if quick else [64]))]
        if E.DEFAULT_ENCODING[bits] == "affine_opt" and d[bits] != 64:
            rows += [(bits, "ours", "affine_opt", d[bits])]
        if bits == 4:
            rows += [(4, "gguf", "Q4_0", None), (4, "gguf", "Q4_1", None), (5, "gguf", "Q5_0", None)]
        if bits == 8:
            rows += [(8, "gguf", "Q8_0", None)]
        rows += [(b, "llama.cpp", n, None) for n, b in LLAMA_BITS.items() if b == bits]
    return rows


def accuracy_tables(mats, quick, llama):
    quants, _ = gguf_types()
    results = {}
    rows_out = []
    header = f"{'bits':>4} {'encoding':<22} {'bpw':>7}"
    for label in mats:
        header += f" | {label + ' relF':>15} {'cos':>9}"
    header += f" | {'1-thread MB/s':>13}"
    print(header)
    print("-" * len(header))
    for bits, kind, name, group in table_rows(quick):
        if kind == "gguf" and quants is None or kind == "llama.cpp" and llama is None:
            continue
        line, first_dt, bpw = "", None, None
        for label, x in mats.items():
            if kind == "ours":
                bpw, rel, cos, dt = run_ours(x, name, bits, group)
            elif kind == "llama.cpp":
                bpw, rel, cos, dt = llama.run(x, name)
            else:
                bpw, rel, cos, dt = run_gguf(x, name)
            results[(label, kind, name, bits, group)] = (bpw, rel, cos)
            rows_out.append({"matrix": label, "kind": kind, "encoding": name, "bits": bits, "group": group,
                             "bpw": bpw, "rel_error": rel, "cosine": cos})
            first_dt = dt if first_dt is None else first_dt
            line += f" | {rel:>15.4f} {cos:>9.6f}"
        first = next(iter(mats.values()))
        desc = f"{name} g{'row' if group == 0 else group}" if kind == "ours" else f"{kind} {name}"
        print(f"{bits:>4} {desc:<22} {bpw:>7.4f}{line} | {first.nbytes / 1e6 / first_dt:>13.0f}", flush=True)
    print("  (the last column is one timed call; the throughput table below is the one to quote)")
    return results, rows_out


def check_targets(results, label):
    print(f"Targets on the {label} matrix (default encodings, DEFAULT_GROUP_SIZE):")
    for bits, (max_bpw, max_rel) in sorted(TARGETS.items()):
        key = (label, "ours", E.DEFAULT_ENCODING[bits], bits, E.DEFAULT_GROUP_SIZE[bits])
        if key not in results:
            continue
        bpw, rel, _ = results[key]
        ok = bpw <= max_bpw and rel <= max_rel
        print(f"  int{bits}: {E.DEFAULT_ENCODING[bits]} g{E.DEFAULT_GROUP_SIZE[bits]} relF {rel:.4f} at "
              f"{bpw:.4f} bpw (target <= {max_rel} at <= {max_bpw}): {'met' if ok else 'NOT MET'}")


# --------------------------------------------------------------------------- throughput

def _timed(fn, parts, threads):
    """Wall seconds and summed thread CPU seconds of fn over parts on `threads` threads."""
    def work(p):
        c0 = time.thread_time()
        fn(p)
        return time.thread_time() - c0

    with ThreadPoolExecutor(threads) as ex:
        t0 = time.perf_counter()
        cpu = sum(ex.map(work, parts))
        return time.perf_counter() - t0, cpu


def _ours(name, bits, group):
    enc = E.get_encoding(name, bits, group)
    return lambda p: enc.quantize(p)


def throughput(x, repeats, llama):
    """Every job timed ``repeats`` times on 1 and on 2 threads; returns the raw rates."""
    quants, types = gguf_types()
    halves = [np.ascontiguousarray(x[: x.shape[0] // 2]), np.ascontiguousarray(x[x.shape[0] // 2:])]
    mb = x.nbytes / 1e6
    jobs = [(("ours", E.DEFAULT_ENCODING[b], b, E.DEFAULT_GROUP_SIZE[b]),
             _ours(E.DEFAULT_ENCODING[b], b, E.DEFAULT_GROUP_SIZE[b])) for b in (2, 3, 4, 8)]
    jobs += [(("ours", n, b, g), _ours(n, b, g)) for n, b, g in
             (("affine", 2, 64), ("affine", 4, 64), ("affine_opt", 4, 64), ("kquant", 4, 32), ("kquant", 2, 16))]
    if quants is not None:
        jobs += [(("gguf", "Q4_0", 4, None), lambda p: quants.quantize(p, types["Q4_0"])),
                 (("gguf", "Q8_0", 8, None), lambda p: quants.quantize(p, types["Q8_0"]))]
    if llama is not None:
        jobs += [(("llama.cpp", n, LLAMA_BITS[n], None), (lambda n: lambda p: llama.quantize(p, n))(n))
                 for n in LLAMA_TYPES]
    print(f"{'quantize (MB/s of float32)':<40} {'1 thread':>9} {'2 threads':>10} {'CPU-time/core':>14}")
    out = []
    for (kind, name, bits, group), fn in jobs:
        fn(x[:8])  # compile / warm up
        one, two, cpu = [], [], []
        for _ in range(repeats):
            w1, _ = _timed(fn, [x], 1)
            w2, c2 = _timed(fn, halves, 2)
            one.append(mb / w1)
            two.append(mb / w2)
            cpu.append(mb / c2)
        label = f"{kind} {name} int{bits}" + (f" g{group}" if group is not None else "")
        print(f"{label:<40} {max(one):>9.0f} {max(two):>10.0f} {max(cpu):>14.0f}", flush=True)
        out.append({"kind": kind, "encoding": name, "bits": bits, "group": group, "mb": mb,
                    "mb_per_s_1_thread": one, "mb_per_s_2_threads": two, "mb_per_s_per_busy_core": cpu})
    print("  (wall-clock best of", repeats, "runs; CPU-time/core = MB / CPU seconds spent by the 2 threads:"
          " the rate each core gives when not shared)")
    return out


# --------------------------------------------------------------------------- models

def _safetensors_tensors(path):
    """(name, float32 2-D array) for every float tensor with >= 2 dims in a .safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__" or len(info["shape"]) < 2:
            continue
        a, b = info["data_offsets"]
        raw = mm[base + a: base + b]
        dt = info["dtype"]
        if dt == "F32":
            arr = raw.view(np.float32)
        elif dt == "F16":
            arr = raw.view(np.float16).astype(np.float32)
        elif dt == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dt == "F64":
            arr = raw.view(np.float64).astype(np.float32)
        else:
            continue
        shape = info["shape"]
        yield name, np.ascontiguousarray(arr.reshape(shape[0], -1), dtype=np.float32)


def models_table(dirs):
    configs = []
    for bits, plain_group in ((2, 32), (4, 64), (8, 128)):
        configs += [("affine", bits, plain_group), (E.DEFAULT_ENCODING[bits], bits, plain_group),
                    (E.DEFAULT_ENCODING[bits], bits, E.DEFAULT_GROUP_SIZE[bits])]
    configs = list(dict.fromkeys(configs))
    for d in dirs:
        files = sorted(Path(d).rglob("*.safetensors")) if Path(d).is_dir() else [Path(d)]
        acc = {c: [0.0, 0.0, 0.0, 0.0, 0] for c in configs}  # err, xx, bytes, min cos, n
        n_el = 0
        for f in files:
            for name, x in _safetensors_tensors(f):
                if x.size < 4096 or not np.all(np.isfinite(x)):
                    continue
                n_el += x.size
                for c in configs:
                    enc = E.get_encoding(*c)
                    blobs, st = E.quantize(x, enc)
                    a = acc[c]
                    a[0] += st[3]
                    a[1] += st[1]
                    a[2] += sum(b.size for b in blobs.values())
                    cos = figures(st)["cosine"]
                    a[3] = cos if a[4] == 0 else min(a[3], cos)
                    a[4] += 1
        print(f"model {d}: {n_el / 1e6:.1f}M quantizable weights in {len(files)} file(s)")
        for c, (err, xx, nb, mincos, n) in acc.items():
            if n:
                print(f"  {c[0]:<10} int{c[1]} g{c[2]:<4} bpw {nb * 8 / n_el:.4f}  relF {math.sqrt(err / xx):.4f}  "
                      f"min tensor cosine {mincos:.5f}  ({n} tensors)")


# --------------------------------------------------------------------------- grid training

def train_grids(quick):
    """Re-fit the 2/3/4-bit grids as kquant_nl's were made (prints them; changing them breaks the format).

    Alternate (Lloyd-style) on Gaussian groups: (a) for every group the scale d of the
    encoding's own search (both orientations, clip factors, least-squares re-fit),
    (b) every level moved to the least-squares value sum(x*d) / sum(d*d) over the
    elements coded to it; normalise so the top level is 1.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256 if quick else 1024, 4096))
    setups = {4: (16, (1.0, 1.1)), 3: (16, (1.0, 1.1, 1.2)), 2: (8, (1.0, 1.1, 1.2))}
    for bits, (n, ts) in setups.items():
        levels = (np.arange(1 << bits) - ((1 << bits) - 1) / 2) / (((1 << bits) - 1) / 2)
        blocks = x.reshape(-1, n)
        for _ in range(10 if quick else 30):
            d = _np_search(blocks, levels, ts)
            q = _np_nearest(blocks, levels, d)
            dd = np.broadcast_to(d[:, None], blocks.shape)
            num = np.bincount(q.ravel(), (blocks * dd).ravel(), levels.size)
            den = np.bincount(q.ravel(), (dd * dd).ravel(), levels.size)
            levels = np.sort(np.where(den > 0, num / np.maximum(den, 1e-300), levels))
            levels = levels / levels.max()
        print(f"GRID{bits} (group {n}, clip factors {ts}):", np.round(levels, 4).tolist())


def _np_nearest(blocks, levels, d):
    mids = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(mids, blocks / np.where(d == 0, 1e-30, d)[:, None])


def _np_search(blocks, levels, ts):
    top, bot = levels[-1], -levels[0]
    mx, mn = blocks.max(1), blocks.min(1)
    best_e = np.full(len(blocks), np.inf)
    best_d = np.zeros(len(blocks))
    for d0 in (np.maximum(mx / top, -mn / bot), -np.maximum(mx / bot, -mn / top)):
        for t in ts:
            lv = levels[_np_nearest(blocks, levels, d0 / t)]
            sxl, sll = (blocks * lv).sum(1), (lv * lv).sum(1)
            d = sxl / np.maximum(sll, 1e-30)
            e = (blocks * blocks).sum(1) - sxl * d
            better = e < best_e
            best_e, best_d = np.where(better, e, best_e), np.where(better, d, best_d)
    return best_d


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024x4096 matrices, fewer table rows and repeats")
    ap.add_argument("--models", nargs="+", metavar="DIR", help="also run over every float tensor of these models")
    ap.add_argument("--train-grids", action="store_true", help="re-fit the kquant_nl grids and print them")
    ap.add_argument("--rows", type=int, default=None, help="matrix rows (default 4096, 1024 with --quick)")
    ap.add_argument("--speed-only", action="store_true", help="only the throughput table")
    ap.add_argument("--repeats", type=int, default=None, help="throughput runs (best kept; default 3, 2 with --quick)")
    ap.add_argument("--llama-cpp", metavar="DIR", help="folder with llama.cpp's libggml-base.so (else $LLAMA_CPP_LIB)")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/results/bench_encodings.json")
    args = ap.parse_args(argv)
    record = Record("bench_encodings", argv)
    print(machine())
    llama = find_llama_cpp(args.llama_cpp)
    if args.train_grids:
        train_grids(args.quick)
        return
    rows = args.rows or (1024 if args.quick else 4096)
    print(f"matrices: {rows}x4096 float32 ({rows * 4096 * 4 / 1e6:.0f} MB each); groups run along rows")
    mats = {"Gaussian": gaussian(rows, 4096), "Student-t": student_t(rows, 4096)}
    for x in mats.values():  # compile / load every kernel before timing anything
        for bits, kind, name, group in table_rows(True):
            if kind == "ours":
                E.get_encoding(name, bits, group).quantize(x[:4])
    accuracy = []
    if not args.speed_only:
        results, accuracy = accuracy_tables(mats, args.quick, llama)
        check_targets(results, "Gaussian")
        print()
    repeats = args.repeats or (2 if args.quick else 3)
    speed = throughput(mats["Gaussian"], repeats, llama)
    if args.models:
        print()
        models_table(args.models)
    if not args.no_record:
        record.write({"matrices": {"rows": rows, "cols": 4096, "kinds": list(mats)}, "accuracy": accuracy,
                      "throughput": speed, "llama_cpp": llama is not None}, repeats=repeats,
                     statistic="accuracy: one deterministic run per matrix; speed: each job timed `repeats` times "
                               "on 1 and on 2 threads (the 2-thread run splits the matrix in two row blocks); "
                               "the figures quote the best (max MB/s), the least disturbed run on a shared machine")


if __name__ == "__main__":
    main()
