"""The encoders' exact last step: codes from parameters exactly as stored, with the fused
statistics ``[sum x*y, sum x*x, sum y*y, sum (x-y)**2]`` of the values decoding will produce."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import FINAL, INLINE, JIT
from .decode import GRID2, GRID3, GRID4, midpoints


@njit(**JIT)
def group_minmax(x, group):
    """Per-group minimum and maximum, float32 ``(rows, groups)`` each."""
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    lo = np.empty((rows, ng), dtype=np.float32)
    hi = np.empty((rows, ng), dtype=np.float32)
    for r in range(rows):
        for g in range(ng):
            a = g * group
            mn = x[r, a]
            mx = x[r, a]
            for j in range(a + 1, min(a + group, cols)):
                v = x[r, j]
                if v < mn:
                    mn = v
                if v > mx:
                    mx = v
            lo[r, g] = mn
            hi[r, g] = mx
    return lo, hi


@njit(**JIT)
def quantize_affine(x, scales, offsets, bits, group):
    """Round to the affine grid ``y = q * scale + offset`` (q in [0, 2**bits - 1]) per group.

    The parameters are given (float32, already rounded to what the store keeps), so any
    parameter search can sit in front of this one rounding kernel. Returns the codes
    (rows*cols uint8, row-major) and the fused statistics
    ``[sum x*y, sum x*x, sum y*y, sum (x-y)**2]`` of the dequantized ``y`` in float64.
    """
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    qmax = np.float32((1 << bits) - 1)
    codes = np.empty(rows * cols, dtype=np.uint8)
    stats = np.zeros(4, dtype=np.float64)
    for r in range(rows):
        for g in range(ng):
            s = scales[r, g]
            z = offsets[r, g]
            inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
            for j in range(g * group, min(g * group + group, cols)):
                v = x[r, j]
                q = min(max(np.rint((v - z) * inv), np.float32(0.0)), qmax)
                codes[r * cols + j] = np.uint8(q)
                y = np.float64(q * s + z)
                stats[0] += v * y
                stats[1] += np.float64(v) * v
                stats[2] += y * y
                stats[3] += (v - y) * (v - y)
    return codes, stats




@njit(**JIT)
def error_stats(x, y):
    """``[sum x*y, sum x*x, sum y*y, sum (x-y)**2]`` in float64 over two equal-shape arrays."""
    xf = x.ravel()
    yf = y.ravel()
    s = np.zeros(4, dtype=np.float64)
    for i in range(xf.size):
        a = np.float64(xf[i])
        b = np.float64(yf[i])
        s[0] += a * b
        s[1] += a * a
        s[2] += b * b
        s[3] += (a - b) * (a - b)
    return s



# Rounding to the nearest level is a count of the midpoints below t. With the
# midpoints as compile-time constants (numba freezes global arrays) and a literal
# trip count, the count is an unrolled run of compares that LLVM vectorises: ~10x
# faster than a table lookup or a binary search. The loops below are written once
# per grid because LLVM only vectorises them when the grid is known inside the
# loop (a ``bits`` switch per element halves the speed).
_MID2, _MID3, _MID4 = (midpoints(g) for g in (GRID2, GRID3, GRID4))


@njit(**INLINE)
def _code4(t):
    q = 0
    for k in range(15):
        q += t > _MID4[k]
    return q


@njit(**INLINE)
def _code3(t):
    q = 0
    for k in range(7):
        q += t > _MID3[k]
    return q


@njit(**INLINE)
def _code2(t):
    q = 0
    for k in range(3):
        q += t > _MID2[k]
    return q



# Groups are short (8-64 elements), and a loop whose trip count LLVM does not know
# runs mostly in its scalar remainder. So the kernels work a row at a time: the
# ``_row_*`` helpers run one pass over every group of a row with the group length
# as a *literal* for the common sizes (the dispatch happens once per row, so the
# per-group loop is straight vector code with its constants kept in registers),
# the short last group separately; the per-group decisions (best candidate so
# far, ...) are then made in separate loops over the row's groups.


@njit(**INLINE)
def _round_n(xr, a, n, inv, s, o, bits, levels, cr):
    """Code ``xr[a:a+n]`` into ``cr`` and return its partial fused statistics."""
    if bits == 4:
        for j in range(a, a + n):
            cr[j] = _code4((xr[j] - o) * inv)
    elif bits == 3:
        for j in range(a, a + n):
            cr[j] = _code3((xr[j] - o) * inv)
    else:
        for j in range(a, a + n):
            cr[j] = _code2((xr[j] - o) * inv)
    p0 = 0.0
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    for j in range(a, a + n):
        v = np.float64(xr[j])
        y = np.float64(levels[cr[j]] * s + o)  # the float32 value dequantization computes
        p0 += v * y
        p1 += v * v
        p2 += y * y
        p3 += (v - y) * (v - y)
    return p0, p1, p2, p3


@njit(**INLINE)
def _row_round_n(xr, ng, n, inv, sc, off, bits, levels, cr, st):
    for g in range(ng):
        p0, p1, p2, p3 = _round_n(xr, g * n, n, inv[g], sc[g], off[g], bits, levels, cr)
        st[0] += p0
        st[1] += p1
        st[2] += p2
        st[3] += p3


@njit(**FINAL)
def quantize_grid(x, scales, offsets, group, bits):
    """Round each element to the nearest point of its group's grid ``y = GRIDS[bits][q] * scale + offset``.

    ``scales`` and ``offsets`` float32 ``(rows, groups)``, exactly what dequantization
    will use. Returns the codes (rows*cols uint8, row-major) and the fused statistics
    ``[sum x*y, sum x*x, sum y*y, sum (x-y)**2]`` of ``y`` in float64.
    """
    levels = GRID4 if bits == 4 else (GRID3 if bits == 3 else GRID2)
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    full = cols // group
    codes = np.empty(rows * cols, dtype=np.uint8)
    stats = np.zeros(4, dtype=np.float64)
    inv = np.empty(ng, dtype=np.float32)
    for r in range(rows):
        xr = x[r]
        cr = codes[r * cols:(r + 1) * cols]
        sc = scales[r]
        off = offsets[r]
        for g in range(ng):
            inv[g] = np.float32(1.0) / sc[g] if sc[g] != 0 else np.float32(0.0)
        start = full
        if group == 16:
            _row_round_n(xr, full, 16, inv, sc, off, bits, levels, cr, stats)
        elif group == 32:
            _row_round_n(xr, full, 32, inv, sc, off, bits, levels, cr, stats)
        elif group == 8:
            _row_round_n(xr, full, 8, inv, sc, off, bits, levels, cr, stats)
        else:
            start = 0
        for g in range(start, ng):  # other group sizes, and the short last group
            a = g * group
            p0, p1, p2, p3 = _round_n(xr, a, min(group, cols - a), inv[g], sc[g], off[g], bits, levels, cr)
            stats[0] += p0
            stats[1] += p1
            stats[2] += p2
            stats[3] += p3
    return codes, stats



@njit(**JIT)
def center_spans(x, span):
    """Subtract from each run of ``span`` elements along the rows its mean rounded to bfloat16.

    Returns ``(x - M, M)``: the float32 difference the grid kernels then work on,
    and ``M`` float32 ``(rows, ceil(cols / span))`` holding bfloat16 values (rounded
    to nearest-even, as ``encodings.to_bf16_bits``). One pass: each run is still in
    cache when it is subtracted.
    """
    rows, cols = x.shape
    ns = (cols + span - 1) // span
    out = np.empty((rows, cols), dtype=np.float32)
    mu = np.empty((rows, ns), dtype=np.float32)
    buf = np.empty(1, dtype=np.float32)
    bits = buf.view(np.uint32)
    for r in range(rows):
        for k in range(ns):
            a = k * span
            b = min(a + span, cols)
            t = 0.0
            for j in range(a, b):
                t += np.float64(x[r, j])
            buf[0] = np.float32(t / (b - a))
            u = bits[0]
            bits[0] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
            m = buf[0]
            mu[r, k] = m
            for j in range(a, b):
                out[r, j] = x[r, j] - m
    return out, mu


@njit(**JIT)
def span_means(x, span):
    """Mean of each run of ``span`` elements along the rows (the last run may be shorter): float32 ``(rows, runs)``."""
    rows, cols = x.shape
    ns = (cols + span - 1) // span
    out = np.empty((rows, ns), dtype=np.float32)
    for r in range(rows):
        for k in range(ns):
            a = k * span
            b = min(a + span, cols)
            t = 0.0
            for j in range(a, b):
                t += np.float64(x[r, j])
            out[r, k] = np.float32(t / (b - a))
    return out


@njit(**JIT)
def subtract_spans(x, mu, span):
    """``x - mu[r, j // span]`` in float32 (the value the grid kernels see once the offset is removed)."""
    rows, cols = x.shape
    out = np.empty((rows, cols), dtype=np.float32)
    for r in range(rows):
        for k in range(mu.shape[1]):
            m = mu[r, k]
            for j in range(k * span, min(k * span + span, cols)):
                out[r, j] = x[r, j] - m
    return out
