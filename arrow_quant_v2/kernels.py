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


@njit(**JIT)
def pack_codes(codes, bits):
    """Pack uint8 codes (< 2**bits) into the LSB-first bitstream."""
    n = codes.size
    out = np.zeros((n * bits + 7) // 8, dtype=np.uint8)
    if bits == 8:
        for i in range(n):
            out[i] = codes[i]
        return out
    per = 8 // bits
    if 8 % bits == 0:
        for i in range(n):
            out[i // per] |= np.uint8(codes[i] << ((i % per) * bits))
        return out
    for i in range(n):  # widths that straddle bytes (3, 5, 6 bits)
        bit = i * bits
        v = np.uint32(codes[i]) << np.uint32(bit % 8)
        out[bit // 8] |= np.uint8(v & 0xFF)
        if (bit % 8) + bits > 8:
            out[bit // 8 + 1] |= np.uint8(v >> 8)
    return out


@njit(**JIT)
def unpack_codes(packed, bits, n):
    """Inverse of :func:`pack_codes`: the first ``n`` codes as uint8."""
    out = np.empty(n, dtype=np.uint8)
    mask = (1 << bits) - 1
    if bits == 8:
        for i in range(n):
            out[i] = packed[i]
        return out
    for i in range(n):
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
