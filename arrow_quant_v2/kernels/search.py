"""Encoder-only parameter searches: they *propose* scales, clipping and scale codes.

The encodings round what they propose to what the store keeps (float16, small integer codes),
and then one rounding kernel (:mod:`.rounding`) picks the codes and computes the fused
statistics from exactly the values dequantization will produce. So these kernels may use
relaxed floating point (re-associated sums, which lets LLVM vectorise the reductions)
without affecting exactness."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import INLINE, SEARCH
from .decode import GRID2, GRID3, GRID4, midpoints

# The search needs only the nearest level's value: the count of midpoints below t (as in
# ``rounding``), built from the level steps with no gather.
_MID2, _MID3, _MID4 = (midpoints(g) for g in (GRID2, GRID3, GRID4))
_STEP2 = np.diff(GRID2).astype(np.float32)
_STEP3 = np.diff(GRID3).astype(np.float32)
_STEP4 = np.diff(GRID4).astype(np.float32)
_LO2, _LO3, _LO4 = GRID2[0], GRID3[0], GRID4[0]


@njit(**INLINE)
def _value4(t):
    v = _LO4
    for k in range(15):
        v += _STEP4[k] if t > _MID4[k] else np.float32(0.0)
    return v


@njit(**INLINE)
def _value3(t):
    v = _LO3
    for k in range(7):
        v += _STEP3[k] if t > _MID3[k] else np.float32(0.0)
    return v


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
def _row_sums_n(xr, ng, n, inv, bits, s1, s2):
    for g in range(ng):
        s1[g], s2[g] = _sums_n(xr, g * n, n, inv[g], bits)


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
def _row_moments_n(xr, ng, n, mn, mx, sxx):
    for g in range(ng):
        mn[g], mx[g], sxx[g] = _moments_n(xr, g * n, n)


@njit(**INLINE)
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


@njit(**INLINE)
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


@njit(**INLINE)
def _row_affine_sums_n(xr, ng, n, inv, z, qmax, wide, s0, s1, s2):
    for g in range(ng):
        s0[g], s1[g], s2[g] = _affine_sums_n(xr, g * n, n, inv[g], z[g], qmax, wide)


@njit(**INLINE)
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


@njit(**INLINE)
def _affine_err_n(xr, a, n, s, z, qmax):
    """``sum (x - y)^2`` over ``xr[a:a+n]`` after nearest-level coding on ``y = q * s + z``."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    e = 0.0
    for j in range(a, a + n):
        q = min(max(np.rint((xr[j] - z) * inv), np.float32(0.0)), qmax)
        u = np.float64(xr[j]) - np.float64(q * s + z)
        e += u * u
    return e


@njit(**INLINE)
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

