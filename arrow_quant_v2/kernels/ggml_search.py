"""ggml's block types: the encoders' parameter searches and the packers (encoder-only).

The format is fixed by ggml (decoded by :mod:`.ggml_decode`); the search is ours. The
encoders (``encode_*``) search the parameters and the packers (``pack_*``, the inverse of
the decoders' byte reads) write the blocks. The encoders only *propose* bytes; what those
bytes mean is defined by the decoders, and the encoding computes its error statistics from
the decoded values. So the encoders may use relaxed floating point; the packers are exact.

Encoder ideas, relative to ggml's reference quantizer (``ggml_quantize_chunk``
without an importance matrix): we minimise the plain squared error (ggml weights
each element by ``mean|x| + |x|``); every sub-block tries a few candidate ranges,
each followed by a least-squares re-fit of (scale, min) to its codes; the
super-block scales are then re-fitted by least squares *given* the integer
sub-scales (ggml's reference keeps ``max / 63``), the sub-scales re-chosen between
their two nearest integers, and the codes re-rounded, a few times. Each block keeps
the best state seen, and plain round-to-nearest (min-max ranges) is always one of
the states, so the encoder is never worse than it on any block.

Where the time goes (``benchmarks/bench_ggml_types.py`` measures it): every candidate is one
pass over its (sub-)block, so the passes are kept lean. A candidate is evaluated without
storing codes (``_err_*``: error and the sums the least-squares re-fit needs, float32, one
vectorised loop); a block's codes are written once, for the state that won (``_assign_*``,
rounding exactly as the evaluation did); the range searches round all their candidates in
one pass over the elements (candidates in the inner loop); no array slices in the loops
(each costs a view and a generic reduction); half-precision rounding is integer arithmetic
on the float32 bits (``ggml_decode.f16_bits``), not ``frexp``/``ldexp``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import INLINE
from . import JIT as EXACT
from .ggml_decode import IQ4NL_GRID, QK_K, f16_bits, f16_value

#: Encoders: only proposals (see the module docstring). Re-associated sums (vectorised);
#: the flags are deterministic for a given build, so the same input gives the same bytes.
SEARCH = dict(nogil=True, cache=True, fastmath={"reassoc", "nsz", "arcp"})

_IQ4NL_LEVELS = IQ4NL_GRID.astype(np.float32)
_IQ4NL_MID = ((_IQ4NL_LEVELS[1:] + _IQ4NL_LEVELS[:-1]) / 2).astype(np.float32)
#: The index of the level nearest to the bucket ``[-128 + b / 2, -128 + (b + 1) / 2)`` (the
#: number of midpoints at or below its lower edge), and that level's value.
_IQ4NL_BUCKET_INDEX = np.searchsorted(_IQ4NL_MID, -128.0 + 0.5 * np.arange(512), side="right").astype(np.int16)
_IQ4NL_BUCKET_LEVEL = _IQ4NL_LEVELS[_IQ4NL_BUCKET_INDEX]


@njit(**INLINE)
def _put16(b, o, h):
    b[o] = h & 0xFF
    b[o + 1] = (h >> 8) & 0xFF


# -- encoder building blocks --------------------------------------------------------


#: Candidate lanes of the range searches come in whole vectors of 8 float32 (256 bits): a count
#: that is not a multiple leaves remainder loops (narrower vectors, scalars) that cost more than
#: the unused lanes, which hold inert candidates, never read. Measured (search only, 256x4096,
#: same bytes): Q4_K/Q5_K +10%, Q6_K/Q3_K +2-10%; whole vectors of 16 gained less.
LANES = 8


@njit(**INLINE)
def _lanes(n):
    """``n`` candidates rounded up to whole vectors of :data:`LANES`."""
    return (n + LANES - 1) // LANES * LANES


@njit(**INLINE)
def _assign_sym(x, a, n, s, qmin, qmax, q):
    """Nearest codes of ``x[a:a+n]`` on ``s * k`` (k in [qmin, qmax]) into ``q[a:]``: the
    chosen state's codes, rounded exactly as ``_err_sym`` evaluated them."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    for i in range(a, a + n):
        q[i] = np.int16(min(max(np.floor(x[i] * inv + np.float32(0.5)), np.float32(qmin)), np.float32(qmax)))


@njit(**INLINE)
def _assign_aff(x, a, n, s, o, nmax, q):
    """Nearest codes of ``x[a:a+n]`` on ``s * k + o`` (k in [0, nmax]) into ``q[a:]``: the
    chosen state's codes, rounded exactly as ``_err_aff`` evaluated them."""
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    for i in range(a, a + n):
        q[i] = np.int16(min(max(np.floor((x[i] - o) * inv + np.float32(0.5)), np.float32(0.0)), np.float32(nmax)))


@njit(**INLINE)
def _sums_aff(x, a, n, s, o, nmax):
    """(sum k, sum k*k, sum x*k) of the nearest codes on ``s * k + o``, without storing them:
    the search's inner loop, in float32 so that it vectorises."""
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    sq = np.float32(0.0)
    sqq = np.float32(0.0)
    sxq = np.float32(0.0)
    for i in range(a, a + n):
        k = min(max(np.floor((x[i] - o) * inv + np.float32(0.5)), np.float32(0.0)), np.float32(nmax))
        sq += k
        sqq += k * k
        sxq += x[i] * k
    return float(sq), float(sqq), float(sxq)


@njit(**INLINE)
def _sums_sym(x, a, n, s, qmin, qmax):
    """(sum x*k, sum k*k) of the nearest codes on ``s * k`` (k in [qmin, qmax]), not stored."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    sxq = np.float32(0.0)
    sqq = np.float32(0.0)
    for i in range(a, a + n):
        k = min(max(np.floor(x[i] * inv + np.float32(0.5)), np.float32(qmin)), np.float32(qmax))
        sxq += x[i] * k
        sqq += k * k
    return float(sxq), float(sqq)


@njit(**INLINE)
def _fit_aff(n, sx, sxx, sq, sqq, sxq, neg=True):
    """Least-squares (scale, offset) for fixed codes, the offset <= 0 when ``neg`` (k-quants
    subtract ``dmin * m`` with ``m >= 0``); returns (s, o, squared error)."""
    det = n * sqq - sq * sq
    s = 0.0
    o = 0.0
    if det > 0:
        s = (n * sxq - sq * sx) / det
        o = (sx - s * sq) / n
    if (neg and o > 0) or det <= 0:
        o = 0.0
        s = sxq / sqq if sqq > 0 else 0.0
    if s < 0:
        s = 0.0
        o = min(sx / n, 0.0) if neg else sx / n
    e = sxx - 2 * s * sxq - 2 * o * sx + s * s * sqq + 2 * s * o * sq + n * o * o
    return s, o, e


@njit(**INLINE)
def _range(x, a, n, neg=True):
    """(min, max, sum, sum of squares) of ``x[a:a+n]``; the min is at most 0 when ``neg``."""
    mn = np.float32(0.0) if neg else x[a]
    mx = x[a]
    sx = 0.0
    sxx = 0.0
    for i in range(a, a + n):
        v = x[i]
        mn = min(mn, v)
        mx = max(mx, v)
        sx += v
        sxx += v * v
    return mn, mx, sx, sxx


@njit(**INLINE)
def _search_aff(x, a, n, nmax, deltas, iters, work, mn, mx, sx, sxx, neg=True):
    """A sub-block's (scale >= 0, offset; <= 0 when ``neg``), given its :func:`_range`.
    Candidates: the range spread over ``nmax + delta`` steps, anchored at the minimum
    (clipping the top when delta < 0) and at the maximum (clipping the bottom); all rounded
    in one pass over the elements (``work``: float32 scratch of 5 x ``_lanes(2 * len(deltas))``),
    each least-squares re-fitted; the best refined by ``iters`` more round/re-fit steps."""
    if mx <= mn:
        return 0.0, float(mn)
    nd = deltas.size
    nc = 2 * nd
    nl = work.shape[1]
    inv, off, sq, sqq, sxq = work[0], work[1], work[2], work[3], work[4]
    inv[nc:] = 0.0
    off[nc:] = 0.0
    for k in range(nd):
        # one division pair per spread, shared by its two anchors
        s = (float(mx) - mn) / (nmax + deltas[k])
        o = float(mx) - nmax * s
        off[k] = min(float(mn), 0.0) if neg else float(mn)
        off[nd + k] = min(o, 0.0) if neg else o
        inv[k] = inv[nd + k] = 1.0 / s
    sq[:] = 0.0
    sqq[:] = 0.0
    sxq[:] = 0.0
    top = np.float32(nmax)
    zero = np.float32(0.0)
    half = np.float32(0.5)
    # two elements per pass over the candidates: half the accumulator loads and stores
    # (``n`` is even: sub-blocks of 16 or 32)
    for i in range(a, a + n, 2):
        v = x[i]
        w = x[i + 1]
        for k in range(nl):
            q = np.float32(np.int32(min(max((v - off[k]) * inv[k], zero), top) + half))
            p = np.float32(np.int32(min(max((w - off[k]) * inv[k], zero), top) + half))
            sq[k] += q + p
            sqq[k] += q * q + p * p
            sxq[k] += v * q + w * p
    best_s = (float(mx) - mn) / nmax
    best_o = float(mn)
    best_e = math.inf
    for k in range(nc + iters):
        if k < nc:
            s, o, e = _fit_aff(n, sx, sxx, float(sq[k]), float(sqq[k]), float(sxq[k]), neg)
        else:
            t0, t1, t2 = _sums_aff(x, a, n, np.float32(best_s), np.float32(best_o), nmax)
            s, o, e = _fit_aff(n, sx, sxx, t0, t1, t2, neg)
        if e < best_e and s > 0:
            best_s, best_o, best_e = s, o, e
    return best_s, best_o


@njit(**INLINE)
def _search_sym(x, a, n, qmin, qmax, offs, iters, work, m):
    """A sub-block's signed scale on the grid [qmin, qmax]: the extreme element mapped to
    ``qmin + off`` and to ``qmax + off`` (either orientation of the asymmetric grid) for each
    offset, all rounded in one pass (``work``: float32 scratch of 3 x ``_lanes(2 * len(offs))``),
    each least-squares re-fitted; the best refined by ``iters`` round/re-fit steps. ``m``: the
    sub-block's first element of the largest magnitude."""
    if m == 0:
        return 0.0
    nc = 2 * offs.size
    nl = work.shape[1]
    inv, sxq, sqq = work[0], work[1], work[2]
    sxq[:] = 0.0
    sqq[:] = 0.0
    inv[nc:] = 0.0
    for k in range(nc):
        end = qmin if k < offs.size else qmax
        inv[k] = (end + offs[k % offs.size]) / m
    lo = np.float32(qmin)
    hi = np.float32(qmax)
    shift = np.float32(0.5 - qmin)
    # two elements per pass over the candidates, as in ``_search_aff`` (``n`` is even)
    for i in range(a, a + n, 2):
        v = x[i]
        w = x[i + 1]
        for k in range(nl):
            q = np.float32(np.int32(min(max(v * inv[k], lo), hi) + shift)) + lo
            p = np.float32(np.int32(min(max(w * inv[k], lo), hi) + shift)) + lo
            sxq[k] += v * q + w * p
            sqq[k] += q * q + p * p
    best_s = m / float(qmin)
    best_e = math.inf
    for k in range(nc + iters):
        if k < nc:
            t0, t1 = float(sxq[k]), float(sqq[k])
        else:
            t0, t1 = _sums_sym(x, a, n, np.float32(best_s), qmin, qmax)
        if t1 > 0:
            s = t0 / t1
            e = -s * t0  # the squared error less the sub-block's sum of squares, the same for all
            if e < best_e:
                best_s, best_e = s, e
    return best_s


# -- single-level blocks of 32: Q8_0, Q4_0, Q5_0 (symmetric), Q5_1 (affine), IQ4_NL --


@njit(**INLINE)
def _err_sym(x, a, n, s, qmin, qmax):
    """(squared error, sum x*k, sum k*k) of the nearest codes of ``x[a:a+n]`` on ``s * k``
    (k in [qmin, qmax]), without storing them: a candidate's whole evaluation."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    lo = np.float32(qmin)
    hi = np.float32(qmax)
    err = np.float32(0.0)
    sxq = np.float32(0.0)
    sqq = np.float32(0.0)
    for i in range(a, a + n):
        v = x[i]
        k = min(max(np.floor(v * inv + np.float32(0.5)), lo), hi)
        r = v - s * k
        err += r * r
        sxq += v * k
        sqq += k * k
    return float(err), float(sxq), float(sqq)


@njit(**INLINE)
def _extreme(x, a, n):
    """The element of ``x[a:a+n]`` with the largest magnitude (the positive one on a tie)."""
    mn = x[a]
    mx = x[a]
    for i in range(a, a + n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
    return mx if mx >= -mn else mn


@njit(**SEARCH)
def encode_sym32(x, qmin, qmax, offs):
    """Per block of 32: fp16 scale ``d`` and codes ``k`` in [qmin, qmax] for ``y = d * k``.

    Candidates: ggml's (``max|x| / qmax``: plain rounding) and the extreme mapped to
    ``qmin + off``; each fp16-rounded and evaluated (codes, error) without storing codes,
    then least-squares re-fitted, fp16-rounded and evaluated again; the lowest squared error
    wins and only its codes are written. Returns (d bits, codes)."""
    nb = x.size // 32
    dbits = np.empty(nb, np.uint16)
    q = np.empty(x.size, np.int16)
    for i in range(nb):
        a = 32 * i
        m = _extreme(x, a, 32)
        best_e = math.inf
        best_h = 0
        for k in range(offs.size + 1):
            s = m / (qmin + offs[k]) if k < offs.size else abs(m) / qmax
            for refit in range(2):
                h = f16_bits(s)
                e, sxq, sqq = _err_sym(x, a, 32, f16_value(h), qmin, qmax)
                if e < best_e:
                    best_e, best_h = e, h
                if sqq <= 0:
                    break
                s = sxq / sqq
        dbits[i] = best_h
        _assign_sym(x, a, 32, f16_value(best_h), qmin, qmax, q)
    return dbits, q


@njit(**SEARCH)
def encode_aff32(x, nmax, deltas, iters):
    """Per block of 32: fp16 scale ``d`` and offset ``m`` and codes in [0, nmax] for
    ``y = d * k + m`` (Q5_1). Candidates: ggml's min-max, and the searched range (as the
    k-quants' sub-blocks, offset of any sign) with its least-squares re-fit; each rounded
    to fp16 and re-coded; the lowest exact error wins. Returns (d bits, m bits, codes)."""
    nb = x.size // 32
    dbits = np.empty(nb, np.uint16)
    mbits = np.empty(nb, np.uint16)
    q = np.empty(x.size, np.int16)
    work = np.empty((5, _lanes(2 * deltas.size)), np.float32)
    for i in range(nb):
        a = 32 * i
        mn, mx, sx, sxx = _range(x, a, 32, False)
        best_e = math.inf
        for k in range(2):
            if k == 0:
                s, o = (float(mx) - mn) / nmax, float(mn)
            else:
                s, o = _search_aff(x, a, 32, nmax, deltas, iters, work, mn, mx, sx, sxx, False)
            hs, ho = f16_bits(s), f16_bits(o)
            e, _, _, _ = _err_aff(x, a, 32, f16_value(hs), f16_value(ho), nmax)
            if e < best_e:
                best_e = e
                dbits[i], mbits[i] = hs, ho
        _assign_aff(x, a, 32, f16_value(dbits[i]), f16_value(mbits[i]), nmax, q)
    return dbits, mbits, q


@njit(**INLINE)
def _grid_bucket(t):
    """``t``'s bucket of width 1/2 on [-128, 128) (clamped). The midpoints between IQ4_NL's
    levels are multiples of 1/2, so no bucket straddles one: a bucket has one nearest level
    (a ``t`` exactly on a midpoint takes the upper level, as near as the lower)."""
    return np.int32((min(max(t, np.float32(-128.0)), np.float32(127.75)) + np.float32(128.0)) * np.float32(2.0))


@njit(**INLINE)
def _err_grid(x, a, n, s):
    """(squared error, sum x*g, sum g*g) of the nearest IQ4_NL levels ``g`` of ``x[a:a+n] / s``."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    err = np.float32(0.0)
    sxg = np.float32(0.0)
    sgg = np.float32(0.0)
    for i in range(a, a + n):
        v = x[i]
        g = _IQ4NL_BUCKET_LEVEL[_grid_bucket(v * inv)]
        r = v - s * g
        err += r * r
        sxg += v * g
        sgg += g * g
    return float(err), float(sxg), float(sgg)


@njit(**SEARCH)
def encode_iq4_nl(x, offs, refits):
    """Per block of 32: fp16 scale and IQ4_NL level indices. The extreme element is mapped
    to the grid's end (-127, or +113 mirrored) moved by each offset, fp16-rounded and
    evaluated without storing codes; the ``refits`` best of these are least-squares
    re-fitted, fp16-rounded and evaluated again; the lowest squared error wins and only its
    codes are written. Returns (d bits, indices)."""
    nb = x.size // 32
    nc = 2 * offs.size
    dbits = np.empty(nb, np.uint16)
    q = np.empty(x.size, np.int16)
    err = np.empty(nc)
    fit = np.empty(nc)
    for i in range(nb):
        a = 32 * i
        m = _extreme(x, a, 32)
        best_e = math.inf
        best_h = 0
        for k in range(nc):
            end = -127.0 if k < offs.size else 113.0
            h = f16_bits(m / (end + (offs[k % offs.size] if end < 0 else -offs[k % offs.size])))
            e, sxg, sgg = _err_grid(x, a, 32, f16_value(h))
            err[k] = e
            fit[k] = sxg / sgg if sgg > 0 else 0.0
            if e < best_e:
                best_e, best_h = e, h
        for r in range(min(refits, nc)):
            k = np.argmin(err)
            if err[k] == math.inf or fit[k] == 0:
                break
            err[k] = math.inf
            h = f16_bits(fit[k])
            e, _, _ = _err_grid(x, a, 32, f16_value(h))
            if e < best_e:
                best_e, best_h = e, h
        dbits[i] = best_h
        d = f16_value(best_h)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        for l in range(a, a + 32):
            q[l] = _IQ4NL_BUCKET_INDEX[_grid_bucket(x[l] * inv)]
    return dbits, q


# -- two-level k-quants ---------------------------------------------------------------


@njit(**INLINE)
def _err_aff(x, a, n, s, o, nmax):
    """(squared error, sum k, sum k*k, sum x*k) of the nearest codes of ``x[a:a+n]`` on
    ``s * k + o`` (k in [0, nmax]), without storing them: a candidate's whole evaluation."""
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    top = np.float32(nmax)
    err = np.float32(0.0)
    sq = np.float32(0.0)
    sqq = np.float32(0.0)
    sxq = np.float32(0.0)
    for i in range(a, a + n):
        v = x[i]
        k = min(max(np.floor((v - o) * inv + np.float32(0.5)), np.float32(0.0)), top)
        r = v - (s * k + o)
        err += r * r
        sq += k
        sqq += k * k
        sxq += v * k
    return float(err), float(sq), float(sqq), float(sxq)


@njit(**INLINE)
def _aff_state(x, a, nsub, sub, nmax, d, dm, sc, mn, sums):
    """Evaluate one super-block for integer sub-scales/mins under (d, dm): per sub-block
    (sum k, sum k*k, sum x*k) into ``sums``; returns the total squared error."""
    err = 0.0
    for j in range(nsub):
        s = np.float32(d * np.float32(sc[j]))
        o = -np.float32(dm * np.float32(mn[j]))
        e, sq, sqq, sxq = _err_aff(x, a + sub * j, sub, s, o, nmax)
        err += e
        sums[j, 0], sums[j, 1], sums[j, 2] = sq, sqq, sxq
    return err


@njit(**INLINE)
def _pick_codes_aff(x, a, sub, nmax, smax, d, dm, s, o):
    """A sub-block's integer (scale, min) codes under (d, dm): the best, after re-rounding
    the codes, of the floor/ceil neighbours of its continuous (s, o) (each evaluated in one
    pass, duplicates skipped); returns (sc, m, error, sq, sqq, sxq)."""
    fs = math.floor(s / d) if d > 0 else 0.0
    fm = math.floor(-o / dm) if dm > 0 else 0.0
    c0 = int(min(max(fs, 0), smax))
    m0 = int(min(max(fm, 0), smax))
    best = (0, 0, math.inf, 0.0, 0.0, 0.0)
    for k in range(4):
        c = int(min(max(fs + (k >> 1), 0), smax))
        m = int(min(max(fm + (k & 1), 0), smax))
        if ((k >> 1) and c == c0) or ((k & 1) and m == m0):
            continue
        e, sq, sqq, sxq = _err_aff(x, a, sub, np.float32(d * np.float32(c)), -np.float32(dm * np.float32(m)), nmax)
        if e < best[2]:
            best = (c, m, e, sq, sqq, sxq)
    return best


@njit(**INLINE)
def _keep(src, dst, base, n):
    for j in range(n):
        dst[base + j] = src[j]


@njit(**SEARCH)
def encode_kquant_affine(x, sub, nmax, smax, deltas, iters, rounds):
    """Two-level affine k-quant (Q4_K, Q5_K, Q2_K) over super-blocks of 256 elements.

    ``y = (d * sc_j) * k - (dmin * m_j)``, k in [0, nmax], sc/m in [0, smax], d/dmin fp16.
    States are evaluated without storing codes (sums only); each super-block keeps its best
    state's scales, and its codes are written once at the end.
    Returns (d bits, dmin bits, sc (uint8, per sub-block), m (uint8), codes (int16))."""
    nsup = x.size // QK_K
    nsub = QK_K // sub
    dbits = np.zeros(nsup, np.uint16)
    mbits = np.zeros(nsup, np.uint16)
    sc_out = np.zeros(nsup * nsub, np.uint8)
    m_out = np.zeros(nsup * nsub, np.uint8)
    q = np.zeros(x.size, np.int16)
    s_sub = np.empty(nsub)
    o_sub = np.empty(nsub)
    sc = np.zeros(nsub, np.int64)
    mn = np.zeros(nsub, np.int64)
    sums = np.zeros((nsub, 3))
    sx = np.empty(nsub)
    sxx = np.empty(nsub)
    lo = np.empty(nsub, np.float32)
    hi = np.empty(nsub, np.float32)
    work = np.empty((5, _lanes(2 * deltas.size)), np.float32)
    for i in range(nsup):
        a0 = QK_K * i
        base = nsub * i
        for j in range(nsub):
            lo[j], hi[j], sx[j], sxx[j] = _range(x, a0 + sub * j, sub)
            # state 0 (plain rounding): min-max ranges, nearest sub-codes
            s_sub[j] = (float(hi[j]) - lo[j]) / nmax
            o_sub[j] = lo[j]
        best_e = math.inf
        # state 0: plain rounding; state 1: searched ranges
        for start in range(2):
            if start == 1:
                for j in range(nsub):
                    s_sub[j], o_sub[j] = _search_aff(x, a0 + sub * j, sub, nmax, deltas, iters, work,
                                                     lo[j], hi[j], sx[j], sxx[j])
            hd = f16_bits(s_sub.max() / smax)
            hm = f16_bits(-o_sub.min() / smax)
            d, dm = f16_value(hd), f16_value(hm)
            for j in range(nsub):
                sc[j] = int(min(max(np.rint(s_sub[j] / d), 0), smax)) if d > 0 else 0
                mn[j] = int(min(max(np.rint(-o_sub[j] / dm), 0), smax)) if dm > 0 else 0
            e = _aff_state(x, a0, nsub, sub, nmax, d, dm, sc, mn, sums)
            if e < best_e:
                best_e = e
                dbits[i], mbits[i] = hd, hm
                _keep(sc, sc_out, base, nsub)
                _keep(mn, m_out, base, nsub)
            if start == 0:
                continue
            for r in range(rounds):
                # super-block scales by least squares given the integer sub-codes and codes
                a11 = 0.0
                a12 = 0.0
                a22 = 0.0
                r1 = 0.0
                r2 = 0.0
                for j in range(nsub):
                    a11 += sc[j] * sc[j] * sums[j, 1]
                    a12 += sc[j] * mn[j] * sums[j, 0]
                    a22 += mn[j] * mn[j] * sub
                    r1 += sc[j] * sums[j, 2]
                    r2 += mn[j] * sx[j]
                det = a11 * a22 - a12 * a12
                if a11 <= 0:
                    break
                if det > 1e-12 * a11 * a22 and a22 > 0:
                    nd = (r1 * a22 - a12 * r2) / det
                    nm = (a12 * r1 - a11 * r2) / det
                else:
                    nd, nm = r1 / a11, 0.0
                if nm < 0:
                    nd, nm = r1 / a11, 0.0
                hd, hm = f16_bits(nd), f16_bits(nm)
                d, dm = f16_value(hd), f16_value(hm)
                if d <= 0:
                    break
                # sub-codes re-chosen between their neighbours for each sub-block's own fit
                e = 0.0
                for j in range(nsub):
                    a = a0 + sub * j
                    s_fit, o_fit, _ = _fit_aff(sub, sx[j], sxx[j], sums[j, 0], sums[j, 1], sums[j, 2])
                    c, m, ej, sq, sqq, sxq = _pick_codes_aff(x, a, sub, nmax, smax, d, dm, s_fit, o_fit)
                    sc[j], mn[j] = c, m
                    sums[j, 0], sums[j, 1], sums[j, 2] = sq, sqq, sxq
                    e += ej
                if e < best_e:
                    best_e = e
                    dbits[i], mbits[i] = hd, hm
                    _keep(sc, sc_out, base, nsub)
                    _keep(mn, m_out, base, nsub)
                else:
                    break
        d, dm = f16_value(dbits[i]), f16_value(mbits[i])
        for j in range(nsub):
            s = np.float32(d * np.float32(sc_out[base + j]))
            o = -np.float32(dm * np.float32(m_out[base + j]))
            _assign_aff(x, a0 + sub * j, sub, s, o, nmax, q)
    return dbits, mbits, sc_out, m_out, q


@njit(**INLINE)
def _pick_code_sym(x, a, sub, qmin, qmax, smin, smax, d, s, sxx, sums):
    """A sub-block's integer scale under ``d``: the better floor/ceil neighbour of ``s / d``,
    judged on its current codes (``sums``: sum x*k, sum k*k), then evaluated once with its
    codes re-rounded; returns (sc, error, sxq, sqq)."""
    f = s / d
    best_c, best_e = 0, math.inf
    for cs in (math.floor(f), math.floor(f) + 1):
        c = int(min(max(cs, smin), smax))
        ss = float(np.float32(d * np.float32(c)))
        e = sxx - 2 * ss * sums[0] + ss * ss * sums[1]
        if e < best_e:
            best_c, best_e = c, e
    e, sxq, sqq = _err_sym(x, a, sub, np.float32(d * np.float32(best_c)), qmin, qmax)
    return best_c, e, sxq, sqq


@njit(**SEARCH)
def encode_kquant_symmetric(x, sub, qmin, qmax, smin, smax, offs, iters, rounds):
    """Two-level symmetric k-quant (Q6_K, Q3_K) over super-blocks of 256 elements.

    ``y = (d * sc_j) * k``, k in [qmin, qmax], signed sc in [smin, smax], d fp16. States are
    evaluated without storing codes; each super-block keeps its best state's scales, and its
    codes are written once at the end. Returns (d bits, sc (int16 per sub-block), codes (int16))."""
    nsup = x.size // QK_K
    nsub = QK_K // sub
    dbits = np.zeros(nsup, np.uint16)
    sc_out = np.zeros(nsup * nsub, np.int16)
    q = np.zeros(x.size, np.int16)
    s_sub = np.empty(nsub)
    sc = np.zeros(nsub, np.int64)
    sums = np.zeros((nsub, 2))
    sxx = np.empty(nsub)
    ext = np.empty(nsub, np.float32)
    first = np.empty(nsub, np.float32)
    work = np.empty((3, _lanes(2 * offs.size)), np.float32)
    for i in range(nsup):
        a0 = QK_K * i
        base = nsub * i
        for j in range(nsub):
            # one pass: the sum of squares, the extreme (as ``_extreme``), the first largest |x|
            t = np.float32(0.0)
            mn = mx = m = x[a0 + sub * j]
            for l in range(a0 + sub * j, a0 + sub * (j + 1)):
                v = x[l]
                t += v * v
                mn = min(mn, v)
                mx = max(mx, v)
                if abs(v) > abs(m):
                    m = v
            sxx[j] = t
            ext[j] = mx if mx >= -mn else mn
            first[j] = m
        best_e = math.inf
        for start in range(2):
            for j in range(nsub):
                a = a0 + sub * j
                if start == 0:
                    s_sub[j] = ext[j] / float(qmin)
                else:
                    s_sub[j] = _search_sym(x, a, sub, qmin, qmax, offs, iters, work, first[j])
            big = 0.0
            for j in range(nsub):
                if abs(s_sub[j]) > abs(big):
                    big = s_sub[j]
            hd = f16_bits(big / smin)
            d = f16_value(hd)
            e = 0.0
            for j in range(nsub):
                sc[j] = int(min(max(np.rint(s_sub[j] / d), smin), smax)) if d != 0 else 0
                ej, sxq, sqq = _err_sym(x, a0 + sub * j, sub, np.float32(d * np.float32(sc[j])), qmin, qmax)
                e += ej
                sums[j, 0], sums[j, 1] = sxq, sqq
            if e < best_e:
                best_e = e
                dbits[i] = hd
                _keep(sc, sc_out, base, nsub)
            if start == 0 or d == 0:
                continue
            for r in range(rounds):
                num = 0.0
                den = 0.0
                for j in range(nsub):
                    num += sc[j] * sums[j, 0]
                    den += sc[j] * sc[j] * sums[j, 1]
                if den <= 0:
                    break
                hd = f16_bits(num / den)
                d = f16_value(hd)
                if d == 0:
                    break
                e = 0.0
                for j in range(nsub):
                    s_fit = sums[j, 0] / sums[j, 1] if sums[j, 1] > 0 else 0.0
                    c, ej, sxq, sqq = _pick_code_sym(x, a0 + sub * j, sub, qmin, qmax, smin, smax, d, s_fit, sxx[j], sums[j])
                    sc[j] = c
                    sums[j, 0], sums[j, 1] = sxq, sqq
                    e += ej
                if e < best_e:
                    best_e = e
                    dbits[i] = hd
                    _keep(sc, sc_out, base, nsub)
                else:
                    break
        d = f16_value(dbits[i])
        for j in range(nsub):
            _assign_sym(x, a0 + sub * j, sub, np.float32(d * np.float32(sc_out[base + j])), qmin, qmax, q)
    return dbits, sc_out, q


# -- packers (the inverse of the decoders' byte reads) ------------------------------


@njit(**EXACT)
def pack_q8_0(dbits, q):
    out = np.empty(34 * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = 34 * i
        _put16(out, o, int(dbits[i]))
        for l in range(32):
            out[o + 2 + l] = int(q[32 * i + l]) & 0xFF
    return out


@njit(**EXACT)
def pack_nibbles32(dbits, q, bias):
    """Blocks of 32 in 18 bytes (Q4_0 with ``bias`` 8: codes in [-8, 7]; IQ4_NL with 0: level
    indices): fp16 ``d``, then ``k + bias`` of element ``l`` in the low nibble of byte ``l``,
    of element ``16 + l`` in the high nibble."""
    out = np.empty(18 * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = 18 * i
        _put16(out, o, int(dbits[i]))
        for l in range(16):
            out[o + 2 + l] = (int(q[32 * i + l]) + bias) | ((int(q[32 * i + 16 + l]) + bias) << 4)
    return out


@njit(**EXACT)
def pack_q5(dbits, mbits, q, bias):
    """Q5_0 (``mbits`` empty, codes in [-16, 15], ``bias`` 16) or Q5_1 (codes in [0, 31], ``bias`` 0)."""
    has_m = mbits.size > 0
    size = 24 if has_m else 22
    head = 8 if has_m else 6
    out = np.empty(size * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = size * i
        _put16(out, o, int(dbits[i]))
        if has_m:
            _put16(out, o + 2, int(mbits[i]))
        qh = 0
        for l in range(32):
            qh |= ((int(q[32 * i + l]) + bias) >> 4) << l
        for k in range(4):
            out[o + head - 4 + k] = (qh >> (8 * k)) & 0xFF
        for l in range(16):
            lo = (int(q[32 * i + l]) + bias) & 0xF
            hi = (int(q[32 * i + 16 + l]) + bias) & 0xF
            out[o + head + l] = lo | (hi << 4)
    return out


@njit(**INLINE)
def _put_scale_min_k4(out, o, sc, m):
    """Pack 8 six-bit (scale, min) pairs into 12 bytes at ``out[o:]`` (Q4_K/Q5_K)."""
    for j in range(4):
        out[o + j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        out[o + j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
        out[o + j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)


@njit(**EXACT)
def pack_q4_k(dbits, mbits, sc, m, q, five):
    """Q4_K, or Q5_K when ``five`` (then codes are 5-bit and a ``qh`` plane is added)."""
    size = 176 if five else 144
    qs0 = 48 if five else 16
    out = np.zeros(size * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = size * i
        _put16(out, o, int(dbits[i]))
        _put16(out, o + 2, int(mbits[i]))
        _put_scale_min_k4(out, o + 4, sc[8 * i:8 * i + 8].astype(np.int64), m[8 * i:8 * i + 8].astype(np.int64))
        for j in range(8):
            for l in range(32):
                k = int(q[QK_K * i + 32 * j + l])
                out[o + qs0 + 32 * (j >> 1) + l] |= (k & 0xF) << (4 * (j & 1))
                if five:
                    out[o + 16 + l] |= (k >> 4) << j
    return out


@njit(**EXACT)
def pack_q6_k(dbits, sc, q):
    """Codes in [-32, 31] stored as ``k + 32``; int8 sub-scales."""
    out = np.zeros(210 * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = 210 * i
        for e in range(QK_K):
            k = int(q[QK_K * i + e]) + 32
            h, r = e >> 7, e & 127
            out[o + 64 * h + (r & 63)] |= (k & 0xF) << (4 * (r >> 6))
            out[o + 128 + 32 * h + (r & 31)] |= (k >> 4) << (2 * (r >> 5))
        for j in range(16):
            out[o + 192 + j] = int(sc[16 * i + j]) & 0xFF
        _put16(out, o + 208, int(dbits[i]))
    return out


@njit(**EXACT)
def pack_q3_k(dbits, sc, q):
    """Codes in [-4, 3]: low 2 bits of ``k + 4`` in ``qs``, the high bit in ``hmask``;
    signed 6-bit sub-scales stored as ``sc + 32``."""
    out = np.zeros(110 * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = 110 * i
        for e in range(QK_K):
            k = int(q[QK_K * i + e]) + 4
            h, r = e >> 7, e & 127
            out[o + 32 + 32 * h + (r & 31)] |= (k & 3) << (2 * (r >> 5))
            out[o + (e & 31)] |= (k >> 2) << (e >> 5)
        for j in range(16):
            v = int(sc[16 * i + j]) + 32
            if j < 8:
                out[o + 96 + j] |= v & 0xF
            else:
                out[o + 96 + j - 8] |= (v & 0xF) << 4
            out[o + 96 + 8 + (j & 3)] |= (v >> 4) << (2 * (j >> 2))
        _put16(out, o + 108, int(dbits[i]))
    return out


@njit(**EXACT)
def pack_q2_k(dbits, mbits, sc, m, q):
    out = np.zeros(84 * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = 84 * i
        for j in range(16):
            out[o + j] = (int(sc[16 * i + j]) & 0xF) | ((int(m[16 * i + j]) & 0xF) << 4)
        for e in range(QK_K):
            h, r = e >> 7, e & 127
            out[o + 16 + 32 * h + (r & 31)] |= (int(q[QK_K * i + e]) & 3) << (2 * (r >> 5))
        _put16(out, o + 80, int(dbits[i]))
        _put16(out, o + 82, int(mbits[i]))
    return out


# -- IQ4_XS: IQ4_NL's grid under two-level scales -----------------------------------

_IQ4NL_STEP = np.diff(_IQ4NL_LEVELS).astype(np.float32)


@njit(**INLINE)
def _grid_codes(x, a, n, s, q):
    """Nearest IQ4_NL level of ``x[a:a+n]`` under the float32 scale ``s`` into ``q[a:]`` (a tie
    goes to the lower level); returns (squared error, sum x*g, sum g*g). The index is the count
    of grid midpoints below ``x / s`` and the level is summed alongside it (no table look-up),
    so the loop vectorises."""
    inv = np.float32(1.0) / s if s != 0 else np.float32(0.0)
    err = np.float32(0.0)
    sxg = np.float32(0.0)
    sgg = np.float32(0.0)
    for i in range(a, a + n):
        t = x[i] * inv
        k = np.int16(0)
        g = _IQ4NL_LEVELS[0]
        for j in range(15):
            above = t > _IQ4NL_MID[j]
            k += above
            g = g + _IQ4NL_STEP[j] if above else g
        q[i] = k
        r = x[i] - s * g
        err += r * r
        sxg += x[i] * g
        sgg += g * g
    return float(err), float(sxg), float(sgg)


@njit(**INLINE)
def _grid_scale(x, a, offs, tmp):
    """A sub-block of 32's own best scale on the IQ4_NL grid (before the super-block's
    quantization of scales): the extreme element mapped to either end of the grid (-127, or
    +113 mirrored) moved by each offset, each least-squares re-fitted; the lowest error wins."""
    m = np.float32(0.0)
    for l in range(a, a + 32):
        if abs(x[l]) > abs(m):
            m = x[l]
    if m == 0:
        return 0.0
    best_s = m / -127.0
    best_e = math.inf
    for k in range(2 * offs.size):
        off = offs[k % offs.size]
        s = m / (-127.0 + off) if k < offs.size else m / (113.0 - off)
        for refit in range(2):
            e, sxg, sgg = _grid_codes(x, a, 32, np.float32(s), tmp)
            if e < best_e:
                best_s, best_e = s, e
            if sgg <= 0:
                break
            s = sxg / sgg
    return best_s


@njit(**INLINE)
def _pick_sub_scale(x, a, d, f, q):
    """A sub-block's integer scale ``ls`` in [-32, 31] under the super-block scale ``d``: of the
    integers around ``f`` (its own best scale / d), the one whose re-rounded codes give the
    lowest exact error; its codes into ``q[a:]``. Returns (ls, error, sum x*g, sum g*g)."""
    lo = int(min(max(math.floor(f) - 1, -32), 31))
    hi = int(min(max(math.floor(f) + 2, -32), 31))
    best_c = lo
    best_e = math.inf
    for c in range(lo, hi + 1):
        e, _, _ = _grid_codes(x, a, 32, np.float32(d * np.float32(c)), q)
        if e < best_e:
            best_c, best_e = c, e
    e, sxg, sgg = _grid_codes(x, a, 32, np.float32(d * np.float32(best_c)), q)
    return best_c, e, sxg, sgg


@njit(**INLINE)
def _plain_iq4_xs(x, a0, d, s_plain, ls, q):
    """Plain rounding of one IQ4_XS super-block under ``d``: nearest sub-scales, nearest levels;
    returns the squared error."""
    e = 0.0
    for j in range(8):
        ls[j] = int(min(max(np.rint(s_plain[j] / d), -32), 31))
        ej, _, _ = _grid_codes(x, a0 + 32 * j, 32, np.float32(d * np.float32(ls[j])), q)
        e += ej
    return e


@njit(**SEARCH)
def encode_iq4_xs(x, offs, doffs, rounds):
    """IQ4_XS over super-blocks of 256: fp16 ``d``, per sub-block of 32 an integer scale ``ls``
    in [-32, 31] and IQ4_NL level indices; ``y = (d * ls) * G[u]``.

    States, the lowest exact error kept: plain rounding (each sub-block's extreme on the grid's
    end, ``d`` the largest of those over -32, nearest integers, nearest levels); then each
    sub-block's own best scale searched (:func:`_grid_scale`), the super-block scale started at
    the largest of them over ``-32 + off`` for each of ``doffs``, every sub-block taking the best
    integer near its own scale / d with its levels re-rounded (:func:`_pick_sub_scale`), and ``d``
    re-fitted by least squares given those integers and levels, ``rounds`` times.
    Returns (d bits, ls (int16, per sub-block), level indices (int16))."""
    nsup = x.size // QK_K
    dbits = np.zeros(nsup, np.uint16)
    ls_out = np.zeros(nsup * 8, np.int16)
    q = np.zeros(x.size, np.int16)
    cur = np.zeros(x.size, np.int16)
    tmp = np.zeros(x.size, np.int16)
    s_sub = np.empty(8)
    s_plain = np.empty(8)
    ls = np.zeros(8, np.int64)
    sums = np.zeros((8, 2))
    for i in range(nsup):
        a0 = QK_K * i
        big = 0.0
        big_plain = 0.0
        for j in range(8):
            a = a0 + 32 * j
            m = np.float32(0.0)
            for l in range(a, a + 32):
                if abs(x[l]) > abs(m):
                    m = x[l]
            s_plain[j] = m / -127.0
            if abs(s_plain[j]) > abs(big_plain):
                big_plain = s_plain[j]
            s_sub[j] = _grid_scale(x, a, offs, tmp)
            if abs(s_sub[j]) > abs(big):
                big = s_sub[j]
        if big_plain == 0:
            continue  # all zero: d = 0 decodes every element to 0
        best_e = math.inf
        hd = f16_bits(big_plain / -32.0)
        d = f16_value(hd)
        if d != 0:
            best_e = _plain_iq4_xs(x, a0, d, s_plain, ls, cur)
            dbits[i] = hd
            ls_out[8 * i:8 * i + 8] = ls
            q[a0:a0 + QK_K] = cur[a0:a0 + QK_K]
        for t in range(doffs.size):
            d_fit = big / (-32.0 + doffs[t])
            last = -1
            for r in range(rounds + 1):
                hd = f16_bits(d_fit)
                d = f16_value(hd)
                if d == 0 or hd == last:
                    break  # a round is a function of d alone: the same d, the same round again
                last = hd
                e = 0.0
                for j in range(8):
                    c, ej, sxg, sgg = _pick_sub_scale(x, a0 + 32 * j, d, s_sub[j] / d, cur)
                    ls[j] = c
                    sums[j, 0], sums[j, 1] = sxg, sgg
                    e += ej
                if e < best_e:
                    best_e = e
                    dbits[i] = hd
                    ls_out[8 * i:8 * i + 8] = ls
                    q[a0:a0 + QK_K] = cur[a0:a0 + QK_K]
                num = 0.0
                den = 0.0
                for j in range(8):
                    num += ls[j] * sums[j, 0]
                    den += ls[j] * ls[j] * sums[j, 1]
                if den <= 0:
                    break
                d_fit = num / den
    return dbits, ls_out, q


@njit(**EXACT)
def pack_iq4_xs(dbits, ls, q):
    """IQ4_XS blocks of 136 bytes: fp16 ``d``; ``scales_h`` (uint16: the top 2 bits of sub-block
    ``j``'s ``ls + 32`` at bits 2j); ``scales_l`` (4 bytes: the low 4 bits, sub-block ``j`` in
    nibble ``j % 2`` of byte ``j // 2``); 128 bytes of level indices, 16 per sub-block, placed
    as in IQ4_NL (element ``l`` low nibble, ``16 + l`` high)."""
    out = np.zeros(136 * dbits.size, np.uint8)
    for i in range(dbits.size):
        o = 136 * i
        _put16(out, o, int(dbits[i]))
        high = 0
        for j in range(8):
            v = int(ls[8 * i + j]) + 32
            high |= (v >> 4) << (2 * j)
            out[o + 4 + (j >> 1)] |= (v & 0xF) << (4 * (j & 1))
            for l in range(16):
                e = QK_K * i + 32 * j + l
                out[o + 8 + 16 * j + l] = int(q[e]) | (int(q[e + 16]) << 4)
        _put16(out, o + 2, high)
    return out
