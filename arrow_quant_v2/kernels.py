"""Numba kernels: bit packing, group-wise quantization with fused error statistics.

Every kernel is serial, ``nogil=True`` and ``cache=True``. Parallelism comes from
calling them from several Python threads on disjoint row blocks (see
``engine.map_row_blocks``) and from several jobs at once. We deliberately avoid
``parallel=True``: numba's default ``workqueue`` threading layer aborts when two
Python threads launch parallel kernels concurrently, which is exactly what the
async API does.

Layouts (the one place they are written down):

* Codes are an LSB-first bitstream over the chunk in row-major order: code ``i``
  occupies bits ``[i*b, (i+1)*b)`` of the stream, bit ``k`` of the stream is bit
  ``k % 8`` of byte ``k // 8``. At 2 bits that is 4 codes per byte, at 4 bits 2.
  The stream is padded with zero bits to a whole byte.
* Groups run along the last axis: row ``r`` has ``ceil(cols / g)`` groups, the last
  one possibly shorter; group parameters are stored row-major ``(rows, groups)``.
* The grids of the non-uniform encoding (``GRIDS``) are format too; each encoding's
  docstring in ``encodings`` states how its blobs use these pieces.

Two families: the rounding kernels (``quantize_affine``, ``quantize_grid``) take
parameters exactly as stored and produce codes plus fused statistics; the search
kernels (``search_affine``, ``search_grid_scales``, ``choose_*``) only propose
parameters (HQQ-style split), so they may use relaxed floating point.
"""
from __future__ import annotations

import numpy as np
from numba import njit

JIT = dict(nogil=True, cache=True, fastmath=False)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits in the LSB-first bitstream."""
    return (n * bits + 7) // 8


def groups_per_row(cols: int, group: int) -> int:
    return (cols + group - 1) // group


@njit(nogil=True, cache=True, inline="always")
def _pack8_n(codes, out, nblk, bits):
    # 8 codes of ``bits`` bits fill exactly ``bits`` bytes: build them in a 64-bit
    # word and store its low ``bits`` bytes (LSB first). With a literal ``bits``
    # both inner loops unroll and LLVM vectorises across blocks.
    mask = np.uint64((1 << bits) - 1)
    for i in range(nblk):
        v = np.uint64(0)
        for k in range(8):
            v |= (np.uint64(codes[8 * i + k]) & mask) << np.uint64(k * bits)
        for k in range(bits):
            out[i * bits + k] = np.uint8((v >> np.uint64(8 * k)) & np.uint64(0xFF))


@njit(nogil=True, cache=True, inline="always")
def _unpack8_n(packed, out, nblk, bits):
    mask = np.uint64((1 << bits) - 1)
    for i in range(nblk):
        v = np.uint64(0)
        for k in range(bits):
            v |= np.uint64(packed[i * bits + k]) << np.uint64(8 * k)
        for k in range(8):
            out[8 * i + k] = np.uint8((v >> np.uint64(k * bits)) & mask)


@njit(**JIT)
def pack_codes(codes, bits):
    """Pack uint8 codes (< 2**bits, 1 <= bits <= 8) into the LSB-first bitstream."""
    n = codes.size
    out = np.zeros((n * bits + 7) // 8, dtype=np.uint8)
    nblk = n // 8
    if bits == 4:
        _pack8_n(codes, out, nblk, 4)
    elif bits == 2:
        _pack8_n(codes, out, nblk, 2)
    elif bits == 8:
        _pack8_n(codes, out, nblk, 8)
    elif bits == 3:
        _pack8_n(codes, out, nblk, 3)
    elif bits == 6:
        _pack8_n(codes, out, nblk, 6)
    else:
        _pack8_n(codes, out, nblk, bits)
    mask = (1 << bits) - 1
    for i in range(nblk * 8, n):  # the last < 8 codes, bit by bit
        bit = i * bits
        v = np.uint32(codes[i] & mask) << np.uint32(bit % 8)
        out[bit // 8] |= np.uint8(v & 0xFF)
        if (bit % 8) + bits > 8:
            out[bit // 8 + 1] |= np.uint8(v >> 8)
    return out


@njit(**JIT)
def unpack_codes(packed, bits, n):
    """Inverse of :func:`pack_codes`: the first ``n`` codes as uint8."""
    out = np.empty(n, dtype=np.uint8)
    nblk = n // 8
    if bits == 4:
        _unpack8_n(packed, out, nblk, 4)
    elif bits == 2:
        _unpack8_n(packed, out, nblk, 2)
    elif bits == 8:
        _unpack8_n(packed, out, nblk, 8)
    elif bits == 3:
        _unpack8_n(packed, out, nblk, 3)
    elif bits == 6:
        _unpack8_n(packed, out, nblk, 6)
    else:
        _unpack8_n(packed, out, nblk, bits)
    mask = (1 << bits) - 1
    for i in range(nblk * 8, n):
        bit = i * bits
        v = np.uint32(packed[bit // 8]) >> np.uint32(bit % 8)
        if (bit % 8) + bits > 8:
            v |= np.uint32(packed[bit // 8 + 1]) << np.uint32(8 - bit % 8)
        out[i] = np.uint8(v & mask)
    return out


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
def dequantize_affine(codes, scales, offsets, rows, cols, group):
    out = np.empty((rows, cols), dtype=np.float32)
    ng = (cols + group - 1) // group
    for r in range(rows):
        for g in range(ng):
            s = scales[r, g]
            z = offsets[r, g]
            for j in range(g * group, min(g * group + group, cols)):
                out[r, j] = np.float32(codes[r * cols + j]) * s + z
    return out


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



# ---------------------------------------------------------------------------
# Parameter search and non-uniform grids.
#
# Search kernels only *propose* parameters. The encodings round them to what the
# store keeps (float16, small integer codes), and then one rounding kernel
# (``quantize_affine`` / ``quantize_grid``) picks the codes and computes the fused
# statistics from exactly the values dequantization will produce. So the search
# kernels may use relaxed floating point (re-associated sums, which lets LLVM
# vectorise the reductions) without affecting exactness.
# ---------------------------------------------------------------------------

SEARCH = dict(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp", "nnan"})
# Final rounding kernels: the dequantized value ``y`` is one exact float32 product,
# as in dequantization; only the float64 statistics sums may be re-associated
# (so they vectorise). No "contract": it could fuse the product into an FMA.
FINAL = dict(nogil=True, cache=True, fastmath={"reassoc"})

# Grids of the ``kquant_nl`` encoding: sorted float32 levels, y = level[q] * scale.
# GRID2/3/4 were fitted to Gaussian weights by alternating (Lloyd-style) the
# encoding's own per-group scale search with a least-squares update of the levels
# (script: benchmarks/bench_encodings.py --train-grids). They are deliberately not
# symmetric: a group's scale may be negative, which mirrors the grid, so each
# group picks the orientation that fits its tails best (one free bit per group).
# These arrays are part of the on-disk format: never change them in place.
GRID2 = np.array([-0.6779, -0.1266, 0.3511, 1.0], dtype=np.float32)
GRID3 = np.array([-0.8593, -0.5181, -0.268, -0.0566, 0.1423, 0.3495, 0.5986, 1.0], dtype=np.float32)
GRID4 = np.array([-0.9156, -0.7382, -0.5902, -0.4682, -0.3624, -0.2654, -0.1694, -0.0723,
                  0.0259, 0.1259, 0.2293, 0.3389, 0.4563, 0.5877, 0.7484, 1.0], dtype=np.float32)
GRIDS = {2: GRID2, 3: GRID3, 4: GRID4}

# Rounding to the nearest level is a count of the midpoints below t. With the
# midpoints as compile-time constants (numba freezes global arrays) the count is
# an unrolled run of compares that LLVM vectorises: ~10x faster than a table
# lookup or a binary search. The search kernels need only the level's value,
# built the same way from the level steps (no gather).
_MID2 = ((GRID2[1:] + GRID2[:-1]) / 2).astype(np.float32)
_MID3 = ((GRID3[1:] + GRID3[:-1]) / 2).astype(np.float32)
_MID4 = ((GRID4[1:] + GRID4[:-1]) / 2).astype(np.float32)
_STEP2 = np.diff(GRID2).astype(np.float32)
_STEP3 = np.diff(GRID3).astype(np.float32)
_STEP4 = np.diff(GRID4).astype(np.float32)
_LO2, _LO3, _LO4 = GRID2[0], GRID3[0], GRID4[0]


# Rounding to the nearest level is a count of the midpoints below t. With the
# midpoints as compile-time constants (numba freezes global arrays) and a literal
# trip count, the count is an unrolled run of compares that LLVM vectorises: ~10x
# faster than a table lookup or a binary search. The loops below are written once
# per grid because LLVM only vectorises them when the grid is known inside the
# loop (a ``bits`` switch per element halves the speed). The search needs only
# the level's value, built the same way from the level steps (no gather).


@njit(nogil=True, cache=True, inline="always")
def _code4(t):
    q = 0
    for k in range(15):
        q += t > _MID4[k]
    return q


@njit(nogil=True, cache=True, inline="always")
def _code3(t):
    q = 0
    for k in range(7):
        q += t > _MID3[k]
    return q


@njit(nogil=True, cache=True, inline="always")
def _code2(t):
    q = 0
    for k in range(3):
        q += t > _MID2[k]
    return q


@njit(nogil=True, cache=True, inline="always")
def _value4(t):
    v = _LO4
    for k in range(15):
        v += _STEP4[k] if t > _MID4[k] else np.float32(0.0)
    return v


@njit(nogil=True, cache=True, inline="always")
def _value3(t):
    v = _LO3
    for k in range(7):
        v += _STEP3[k] if t > _MID3[k] else np.float32(0.0)
    return v


@njit(nogil=True, cache=True, inline="always")
def _value2(t):
    v = _LO2
    for k in range(3):
        v += _STEP2[k] if t > _MID2[k] else np.float32(0.0)
    return v


# Groups are short (8-64 elements), and a loop whose trip count LLVM does not know
# runs mostly in its scalar remainder. So the kernels work a row at a time: the
# ``_row_*`` helpers run one pass over every group of a row with the group length
# as a *literal* for the common sizes (the dispatch happens once per row, so the
# per-group loop is straight vector code with its constants kept in registers),
# the short last group separately; the per-group decisions (best candidate so
# far, ...) are then made in separate loops over the row's groups.


@njit(nogil=True, cache=True, inline="always")
def _sums_n(xr, a, n, inv, bits):
    """``(sum x*L, sum L*L)`` over ``xr[a:a+n]``, ``L`` the level nearest to ``x * inv``."""
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    if bits == 4:
        for j in range(a, a + n):
            lv = _value4(xr[j] * inv)
            s1 += xr[j] * lv
            s2 += lv * lv
    elif bits == 3:
        for j in range(a, a + n):
            lv = _value3(xr[j] * inv)
            s1 += xr[j] * lv
            s2 += lv * lv
    else:
        for j in range(a, a + n):
            lv = _value2(xr[j] * inv)
            s1 += xr[j] * lv
            s2 += lv * lv
    return np.float64(s1), np.float64(s2)


@njit(nogil=True, cache=True, inline="always")
def _row_sums_n(xr, ng, n, inv, bits, s1, s2):
    for g in range(ng):
        s1[g], s2[g] = _sums_n(xr, g * n, n, inv[g], bits)


@njit(nogil=True, cache=True, inline="always")
def _row_sums(xr, cols, group, inv, bits, s1, s2):
    """``_sums_n`` of every group of the row ``xr`` at the scales ``1 / inv[g]``, into ``s1, s2``."""
    ng = (cols + group - 1) // group
    start = cols // group
    if group == 16:
        _row_sums_n(xr, start, 16, inv, bits, s1, s2)
    elif group == 32:
        _row_sums_n(xr, start, 32, inv, bits, s1, s2)
    elif group == 8:
        _row_sums_n(xr, start, 8, inv, bits, s1, s2)
    else:
        start = 0
    for g in range(start, ng):  # other group sizes, and the short last group
        a = g * group
        s1[g], s2[g] = _sums_n(xr, a, min(group, cols - a), inv[g], bits)


@njit(nogil=True, cache=True, inline="always")
def _moments_n(xr, a, n):
    mn = xr[a]
    mx = xr[a]
    sxx = 0.0
    for j in range(a, a + n):
        v = xr[j]
        mn = v if v < mn else mn
        mx = v if v > mx else mx
        sxx += np.float64(v) * v
    return mn, mx, sxx


@njit(nogil=True, cache=True, inline="always")
def _row_moments_n(xr, ng, n, mn, mx, sxx):
    for g in range(ng):
        mn[g], mx[g], sxx[g] = _moments_n(xr, g * n, n)


@njit(nogil=True, cache=True, inline="always")
def _row_moments(xr, cols, group, mn, mx, sxx):
    """Per group of the row: min, max and sum of squares."""
    ng = (cols + group - 1) // group
    start = cols // group
    if group == 16:
        _row_moments_n(xr, start, 16, mn, mx, sxx)
    elif group == 32:
        _row_moments_n(xr, start, 32, mn, mx, sxx)
    elif group == 8:
        _row_moments_n(xr, start, 8, mn, mx, sxx)
    elif group == 64:
        _row_moments_n(xr, start, 64, mn, mx, sxx)
    else:
        start = 0
    for g in range(start, ng):
        a = g * group
        mn[g], mx[g], sxx[g] = _moments_n(xr, a, min(group, cols - a))


@njit(nogil=True, cache=True, inline="always")
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


@njit(nogil=True, cache=True, inline="always")
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
def dequantize_grid(codes, scales, offsets, rows, cols, group, bits):
    """``y = GRIDS[bits][q] * scale + offset`` per group, in float32 exactly as ``quantize_grid``."""
    levels = GRID4 if bits == 4 else (GRID3 if bits == 3 else GRID2)
    out = np.empty((rows, cols), dtype=np.float32)
    ng = (cols + group - 1) // group
    for r in range(rows):
        for g in range(ng):
            s = scales[r, g]
            o = offsets[r, g]
            for j in range(g * group, min(g * group + group, cols)):
                out[r, j] = levels[codes[r * cols + j]] * s + o
    return out


@njit(**SEARCH)
def search_grid_scales(x, group, bits, ts, iters):
    """Per-group scale ``d`` (float32 ``(rows, groups)``) that makes ``d * GRIDS[bits][q]`` fit best.

    Start from the smallest scale that covers the group's min and max without
    clipping, in both orientations of the grid (a negative scale mirrors it; only
    one when the grid is symmetric); divide it by each ``t`` in ``ts`` (``t > 1``
    clips the tails: usually better, since the extreme value is one element while
    the step shrinks for all); round, and re-fit the scale by least squares: for
    codes with levels ``L`` the best scale is ``sum x*L / sum L^2`` and its squared
    error ``sum x^2 - (sum x*L)^2 / sum L^2``. Keep the candidate with the lowest
    error, then run ``iters`` more round/re-fit (Lloyd) steps on it. A zero group
    gets scale 0.
    """
    levels = GRID4 if bits == 4 else (GRID3 if bits == 3 else GRID2)
    top = levels[levels.size - 1]
    bot = -levels[0]
    nsides = 2 if top != bot else 1
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    out = np.empty((rows, ng), dtype=np.float32)
    mn = np.empty(ng, dtype=np.float32)
    mx = np.empty(ng, dtype=np.float32)
    sxx = np.empty(ng, dtype=np.float64)
    inv = np.empty(ng, dtype=np.float32)
    s1 = np.empty(ng, dtype=np.float64)
    s2 = np.empty(ng, dtype=np.float64)
    best_e = np.empty(ng, dtype=np.float64)
    for r in range(rows):
        xr = x[r]
        best_d = out[r]
        _row_moments(xr, cols, group, mn, mx, sxx)
        for g in range(ng):
            best_d[g] = max(mx[g] / top, -mn[g] / bot)  # 0 for a zero group, which stays 0
            best_e[g] = np.inf
        for k in range(nsides * ts.size + iters):
            for g in range(ng):
                if k < ts.size:
                    d = max(mx[g] / top, -mn[g] / bot) / ts[k]
                elif k < nsides * ts.size:  # the mirrored grid (negative scale)
                    d = -max(mx[g] / bot, -mn[g] / top) / ts[k - ts.size]
                else:  # a Lloyd step from the best so far
                    d = best_d[g]
                inv[g] = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            _row_sums(xr, cols, group, inv, bits, s1, s2)
            for g in range(ng):
                if s2[g] > 0.0 and s1[g] != 0.0:
                    e = sxx[g] - s1[g] * s1[g] / s2[g]
                    if e < best_e[g]:
                        best_e[g] = e
                        best_d[g] = np.float32(s1[g] / s2[g])
    return out


@njit(**SEARCH)
def choose_scale_codes(x, group, bits, d, super_scales, per_super, cmin, cmax, refine):
    """Integer sub-scale codes ``c`` (int32 ``(rows, groups)``) so that ``c * D`` fits each group.

    ``D = super_scales[r, g // per_super]`` is the group's super-block scale, already
    rounded to what is stored. Without ``refine`` ``c`` is ``round(d / D)``. With it
    both codes around ``d / D`` are tried with a rounding pass and the one with the
    lower squared error is kept: with coarse codes (4-bit sub-scales) the nearer
    code may clip the group's largest element, which costs more than it saves.
    """
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    out = np.empty((rows, ng), dtype=np.int32)
    c0 = np.empty(ng, dtype=np.float32)
    bigs = np.empty(ng, dtype=np.float32)
    inv = np.empty(ng, dtype=np.float32)
    a1 = np.empty(ng, dtype=np.float64)
    b1 = np.empty(ng, dtype=np.float64)
    best_e = np.empty(ng, dtype=np.float64)
    for r in range(rows):
        xr = x[r]
        for g in range(ng):
            big = super_scales[r, g // per_super]
            bigs[g] = big
            f = d[r, g] / big if big != 0 else np.float32(0.0)
            out[r, g] = np.int32(min(max(np.rint(f), cmin), cmax))
            c0[g] = min(max(np.floor(f), cmin), cmax)
            best_e[g] = np.inf
        if not refine:
            continue
        for k in range(2):  # the codes below and above d / D
            for g in range(ng):
                s = min(max(c0[g] + k, cmin), cmax) * bigs[g]
                inv[g] = np.float32(1.0) / s if s != 0 else np.float32(0.0)
            _row_sums(xr, cols, group, inv, bits, a1, b1)
            for g in range(ng):
                c = min(max(c0[g] + k, cmin), cmax)
                s = np.float64(c * bigs[g])
                # sum (x - s L)^2 = sum x^2 - 2 s sum xL + s^2 sum L^2; sum x^2 is common to
                # both candidates, so it is left out (and s = 0 gives exactly 0).
                e = s * (s * b1[g] - 2.0 * a1[g])
                if e < best_e[g]:
                    best_e[g] = e
                    out[r, g] = np.int32(c)
    return out


@njit(nogil=True, cache=True, inline="always")
def _affine_sums_n(xr, a, n, inv, z, qmax, wide):
    """``(sum q, sum q^2, sum x*q)`` over ``xr[a:a+n]`` with ``q = clip(rint((x - z) * inv), 0, qmax)``."""
    if wide:  # float64: at 8 bits the error is ~1e-5 of sum x^2, float32 sums would cancel
        d0 = 0.0
        d1 = 0.0
        d2 = 0.0
        for j in range(a, a + n):
            q = min(max(np.rint((xr[j] - z) * inv), np.float32(0.0)), qmax)
            d0 += np.float64(q)
            d1 += np.float64(q) * q
            d2 += np.float64(xr[j]) * q
        return d0, d1, d2
    f0 = np.float32(0.0)
    f1 = np.float32(0.0)
    f2 = np.float32(0.0)
    for j in range(a, a + n):
        q = min(max(np.rint((xr[j] - z) * inv), np.float32(0.0)), qmax)
        f0 += q
        f1 += q * q
        f2 += xr[j] * q
    return np.float64(f0), np.float64(f1), np.float64(f2)


@njit(nogil=True, cache=True, inline="always")
def _row_affine_sums_n(xr, ng, n, inv, z, qmax, wide, s0, s1, s2):
    for g in range(ng):
        s0[g], s1[g], s2[g] = _affine_sums_n(xr, g * n, n, inv[g], z[g], qmax, wide)


@njit(nogil=True, cache=True, inline="always")
def _row_affine_sums(xr, cols, group, inv, z, qmax, wide, s0, s1, s2):
    ng = (cols + group - 1) // group
    start = cols // group
    if group == 16:
        _row_affine_sums_n(xr, start, 16, inv, z, qmax, wide, s0, s1, s2)
    elif group == 32:
        _row_affine_sums_n(xr, start, 32, inv, z, qmax, wide, s0, s1, s2)
    elif group == 64:
        _row_affine_sums_n(xr, start, 64, inv, z, qmax, wide, s0, s1, s2)
    else:
        start = 0
    for g in range(start, ng):
        # other sizes, and the short last group: float64 (float32 sums of q^2 stop
        # being exact past 2^24, i.e. for groups longer than ~256 at 8 bits)
        a = g * group
        s0[g], s1[g], s2[g] = _affine_sums_n(xr, a, min(group, cols - a), inv[g], z[g], qmax, True)


@njit(**SEARCH)
def search_affine(x, group, bits, ts, iters):
    """Per-group ``(scale, offset)`` (float32 ``(rows, groups)`` each) for ``y = q * scale + offset``.

    Least-squares clipping search (the idea behind llama.cpp's ``make_qkx2_quants``
    and HQQ, simplified): shrink the group's [min, max] about its centre by each
    ``t`` in ``ts``, round, then solve the 2x2 least-squares problem for the scale
    and offset that best fit the codes just chosen; keep the lowest squared error;
    then ``iters`` round/re-fit (Lloyd) steps on the winner. Min-max is the
    ``t = 1`` candidate. A constant group gets scale 0 and offset its value.
    """
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    qmax = np.float32((1 << bits) - 1)
    wide = bits > 4
    scales = np.empty((rows, ng), dtype=np.float32)
    offsets = np.empty((rows, ng), dtype=np.float32)
    mn = np.empty(ng, dtype=np.float32)
    mx = np.empty(ng, dtype=np.float32)
    sxx = np.empty(ng, dtype=np.float64)
    sx = np.empty(ng, dtype=np.float64)
    cnt = np.empty(ng, dtype=np.float64)
    inv = np.empty(ng, dtype=np.float32)
    zc = np.empty(ng, dtype=np.float32)
    s0 = np.empty(ng, dtype=np.float64)
    s1 = np.empty(ng, dtype=np.float64)
    s2 = np.empty(ng, dtype=np.float64)
    best_e = np.empty(ng, dtype=np.float64)
    for r in range(rows):
        xr = x[r]
        best_s = scales[r]
        best_z = offsets[r]
        _row_moments(xr, cols, group, mn, mx, sxx)
        for g in range(ng):
            a = g * group
            b = min(a + group, cols)
            t = 0.0
            for j in range(a, b):
                t += np.float64(xr[j])
            sx[g] = t
            cnt[g] = b - a
            best_s[g] = (mx[g] - mn[g]) / qmax
            best_z[g] = mn[g]
            best_e[g] = np.inf
        for k in range(ts.size + iters):
            for g in range(ng):
                if k < ts.size:
                    half = (np.float64(mx[g]) - mn[g]) / 2
                    sc = np.float32(2 * half / ts[k] / qmax)
                    zc[g] = np.float32((np.float64(mx[g]) + mn[g]) / 2 - half / ts[k])
                else:
                    sc = best_s[g]
                    zc[g] = best_z[g]
                inv[g] = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
            _row_affine_sums(xr, cols, group, inv, zc, qmax, wide, s0, s1, s2)
            for g in range(ng):
                if mx[g] == mn[g]:
                    continue
                n = cnt[g]
                det = n * s1[g] - s0[g] * s0[g]
                if det > 0:
                    sl = (n * s2[g] - sx[g] * s0[g]) / det
                    off = (sx[g] - sl * s0[g]) / n
                    # least-squares residual: sum x^2 - s sum xq - z sum x
                    e = sxx[g] - sl * s2[g] - off * sx[g]
                    if e < best_e[g] and sl > 0:
                        best_e[g] = e
                        best_s[g] = np.float32(sl)
                        best_z[g] = np.float32(off)
        for g in range(ng):
            if mx[g] == mn[g]:
                best_s[g] = 0.0
                best_z[g] = mn[g]
    return scales, offsets


@njit(nogil=True, cache=True, inline="always")
def _affine_err_n(xr, a, n, s, z, qmax):
    """``sum (x - y)^2`` over ``xr[a:a+n]`` after nearest-level coding on ``y = q * s + z``."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    e = 0.0
    for j in range(a, a + n):
        q = min(max(np.rint((xr[j] - z) * inv), np.float32(0.0)), qmax)
        u = np.float64(xr[j]) - np.float64(q * s + z)
        e += u * u
    return e


@njit(nogil=True, cache=True, inline="always")
def _better_scale_code(xr, a, n, f, big, z, qmax, cmax):
    c0 = min(max(np.floor(f), np.float32(0.0)), cmax)
    c1 = min(c0 + 1, cmax)
    if c1 == c0:
        return c0
    e0 = _affine_err_n(xr, a, n, c0 * big, z, qmax)
    e1 = _affine_err_n(xr, a, n, c1 * big, z, qmax)
    return c0 if e0 <= e1 else c1


@njit(**SEARCH)
def choose_affine_scale_codes(x, group, bits, s, zq, super_scales, per_super, cmax, refine):
    """Unsigned sub-scale codes ``c`` (int32 ``(rows, groups)``) so that ``c * D`` fits each group.

    ``zq`` are the group offsets as stored (float32), ``D = super_scales[r, g //
    per_super]``. Without ``refine``: ``round(s / D)``. With it the two codes around
    ``s / D`` are tried with a rounding pass each and the one with the lower
    squared error is kept (the offset was rounded too, so the nearer scale code
    can leave the group's top uncovered).
    """
    rows, cols = x.shape
    ng = (cols + group - 1) // group
    qmax = np.float32((1 << bits) - 1)
    cm = np.float32(cmax)
    out = np.empty((rows, ng), dtype=np.int32)
    for r in range(rows):
        xr = x[r]
        for g in range(ng):
            big = super_scales[r, g // per_super]
            f = s[r, g] / big if big != 0 else np.float32(0.0)
            if not refine or big == 0:
                out[r, g] = np.int32(min(max(np.rint(f), np.float32(0.0)), cm))
                continue
            a = g * group
            n = min(group, cols - a)
            z = zq[r, g]
            if n == 16:
                c = _better_scale_code(xr, a, 16, f, big, z, qmax, cm)
            elif n == 32:
                c = _better_scale_code(xr, a, 32, f, big, z, qmax, cm)
            elif n == 64:
                c = _better_scale_code(xr, a, 64, f, big, z, qmax, cm)
            else:
                c = _better_scale_code(xr, a, n, f, big, z, qmax, cm)
            out[r, g] = np.int32(c)
    return out


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
