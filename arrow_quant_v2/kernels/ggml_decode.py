"""ggml's block types (Q8_0, Q4_K, ...): the format's half-precision conversion and decoders.

This is all a reader of a ggml-typed store (or a GGUF file) runs. The byte layouts are
ggml's (``ggml-common.h``); each encoding class in ``ggml_types`` states its layout in its
docstring. The decoders read a chunk's block bytes and return float32 values computed with
exactly the operations, in exactly the order, of gguf-py's reference
``gguf.quants.dequantize`` (e.g. Q4_K: ``(d * sc) * q - (dmin * m)``, all float32, no fused
multiply-add), so the values are bit-identical to it.

The encoders (:mod:`.ggml_search`) use the half-precision helpers and the IQ4_NL grid
below. Like the grids of :mod:`.decode`, they are format constants (IEEE binary16, ggml's
``kvalues_iq4nl``) that never change in place, so sharing them across modules does not
defeat numba's per-file cache.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import INLINE, JIT

QK_K = 256

#: IQ4_NL's non-uniform grid (ggml's ``kvalues_iq4nl``; part of the format).
IQ4NL_GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
#: Q4_0's levels: nibble ``u`` is ``u - 8`` (as float32 exactly, so ``d * level`` is ggml's product).
Q4_0_LEVELS = np.arange(-8, 8, dtype=np.float32)
_IQ4NL_LEVELS = IQ4NL_GRID.astype(np.float32)


# -- float16 ---------------------------------------------------------------------


@intrinsic
def _f32_bits(typingctx, v):
    """The IEEE bits of a float32 as uint32 (a register move, no memory)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, b):
    """The float32 whose IEEE bits are the uint32 ``b``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(**INLINE)
def f16_value(h):
    """float32 value of the IEEE half-precision bit pattern ``h`` (exact): the same sign,
    exponent re-biased from 15 to 127, mantissa widened; subnormals as ``f * 2**-24``."""
    h = int(h)
    e = (h >> 10) & 0x1F
    f = h & 0x3FF
    sign = np.uint32((h & 0x8000) << 16)
    if e == 0:
        return _bits_f32(_f32_bits(np.float32(f) * np.float32(2.0 ** -24)) | sign)
    if e == 31:
        return _bits_f32(sign | np.uint32(0x7F800000 | (f << 13)))
    return _bits_f32(sign | np.uint32(((e + 112) << 23) | (f << 13)))


@njit(**INLINE)
def f16_bits(v):
    """Half-precision bits of ``float32(v)`` rounded to nearest-even, saturating at +-65504
    (never inf; callers never pass NaN). Integer arithmetic on the float32 bits: adding
    ``0xFFF`` plus the lowest kept bit rounds the 13 dropped mantissa bits to nearest-even
    (a carry moves into the exponent), then the exponent is re-biased from 127 to 15."""
    b = _f32_bits(np.float32(v))
    sign = int(b >> np.uint32(16)) & 0x8000
    a = int(b & np.uint32(0x7FFFFFFF))
    if a >= 0x477FF000:  # >= 65520, which rounds past 65504
        return sign | 0x7BFF
    if a < 0x38800000:  # below 2**-14: subnormal, quantum 2**-24 (the product is exact)
        return sign | int(np.rint(_bits_f32(np.uint32(a)) * np.float32(2.0 ** 24)))
    a += 0xFFF + ((a >> 13) & 1)
    return sign | ((a >> 13) - (112 << 10))


@njit(**INLINE)
def _u16(b, o):
    return int(b[o]) | (int(b[o + 1]) << 8)


@njit(**INLINE)
def _i8(v):
    v = int(v)
    return v - 256 if v >= 128 else v


# -- decoders (bit-identical to gguf.quants.dequantize) ---------------------------


@njit(**JIT)
def decode_q8_0(b, n):
    out = np.empty(n, np.float32)
    for i in range(n // 32):
        o = 34 * i
        d = f16_value(_u16(b, o))
        for l in range(32):
            out[32 * i + l] = np.float32(_i8(b[o + 2 + l])) * d
    return out


@njit(**JIT)
def _decode_nibbles32(b, n, levels):
    """Blocks of 32 in 18 bytes: fp16 ``d``, then nibbles (element ``l`` low, ``16 + l`` high)
    selecting ``levels``; ``y = d * levels[u]``."""
    out = np.empty(n, np.float32)
    for i in range(n // 32):
        o = 18 * i
        d = f16_value(_u16(b, o))
        for l in range(16):
            v = int(b[o + 2 + l])
            out[32 * i + l] = d * levels[v & 0xF]
            out[32 * i + 16 + l] = d * levels[v >> 4]
    return out


def decode_q4_0(b, n):
    return _decode_nibbles32(b, n, Q4_0_LEVELS)


def decode_iq4_nl(b, n):
    return _decode_nibbles32(b, n, _IQ4NL_LEVELS)


@njit(**JIT)
def decode_q5(b, n, has_m):
    """Q5_1 when ``has_m`` (24-byte blocks, ``y = d * u + m``), else Q5_0 (22 bytes, ``y = d * (u - 16)``)."""
    size = 24 if has_m else 22
    head = 8 if has_m else 6
    out = np.empty(n, np.float32)
    for i in range(n // 32):
        o = size * i
        d = f16_value(_u16(b, o))
        m = f16_value(_u16(b, o + 2)) if has_m else np.float32(0.0)
        qh = int(b[o + head - 4]) | (int(b[o + head - 3]) << 8) | (int(b[o + head - 2]) << 16) | (int(b[o + head - 1]) << 24)
        for l in range(16):
            v = int(b[o + head + l])
            lo = (v & 0xF) | (((qh >> l) & 1) << 4)
            hi = (v >> 4) | (((qh >> (l + 16)) & 1) << 4)
            if has_m:
                out[32 * i + l] = d * np.float32(lo) + m
                out[32 * i + 16 + l] = d * np.float32(hi) + m
            else:
                out[32 * i + l] = d * np.float32(lo - 16)
                out[32 * i + 16 + l] = d * np.float32(hi - 16)
    return out


@njit(**INLINE)
def _scale_min_k4(b, o, j):
    """Sub-block ``j``'s 6-bit (scale, min) from the 12 packed bytes at ``b[o:]`` (Q4_K/Q5_K)."""
    if j < 4:
        return int(b[o + j]) & 63, int(b[o + j + 4]) & 63
    sc = (int(b[o + j + 4]) & 0xF) | ((int(b[o + j - 4]) >> 6) << 4)
    m = (int(b[o + j + 4]) >> 4) | ((int(b[o + j]) >> 6) << 4)
    return sc, m


@njit(**JIT)
def decode_q4_k(b, n, five=False):
    """Q4_K, or Q5_K when ``five`` (176-byte blocks with a ``qh`` plane of fifth bits)."""
    size = 176 if five else 144
    qs0 = 48 if five else 16
    out = np.empty(n, np.float32)
    for i in range(n // QK_K):
        o = size * i
        d = f16_value(_u16(b, o))
        dmin = f16_value(_u16(b, o + 2))
        for j in range(8):
            sc, m = _scale_min_k4(b, o + 4, j)
            d1 = d * np.float32(sc)
            m1 = dmin * np.float32(m)
            shift = 4 * (j & 1)
            q0 = o + qs0 + 32 * (j >> 1)
            for l in range(32):
                q = (int(b[q0 + l]) >> shift) & 0xF
                if five:
                    q |= ((int(b[o + 16 + l]) >> j) & 1) << 4
                out[QK_K * i + 32 * j + l] = d1 * np.float32(q) - m1
    return out


@njit(**JIT)
def decode_q6_k(b, n):
    out = np.empty(n, np.float32)
    for i in range(n // QK_K):
        o = 210 * i
        d = f16_value(_u16(b, o + 208))
        for j in range(16):  # sub-blocks of 16: one scale each
            dl = d * np.float32(_i8(b[o + 192 + j]))
            for e in range(16 * j, 16 * j + 16):
                h, r = e >> 7, e & 127
                lo = (int(b[o + 64 * h + (r & 63)]) >> (4 * (r >> 6))) & 0xF
                hi = (int(b[o + 128 + 32 * h + (r & 31)]) >> (2 * (r >> 5))) & 3
                out[QK_K * i + e] = dl * np.float32((lo | (hi << 4)) - 32)
    return out


@njit(**INLINE)
def _scale_q3_k(b, o, j):
    """Sub-block ``j``'s signed 6-bit scale from the 12 packed bytes at ``b[o:]`` (Q3_K)."""
    lo = np.int64(b[o + j] & 0xF) if j < 8 else np.int64(b[o + j - 8] >> 4)
    hi = np.int64((b[o + 8 + (j & 3)] >> (2 * (j >> 2))) & 3)
    return (lo | (hi << 4)) - 32


@njit(**JIT)
def decode_q3_k(b, n):
    out = np.empty(n, np.float32)
    for i in range(n // QK_K):
        o = 110 * i
        d = f16_value(_u16(b, o + 108))
        for j in range(16):  # sub-blocks of 16: one scale each
            dl = d * np.float32(_scale_q3_k(b, o + 96, j))
            for e in range(16 * j, 16 * j + 16):
                h, r = e >> 7, e & 127
                low = (int(b[o + 32 + 32 * h + (r & 31)]) >> (2 * (r >> 5))) & 3
                high = (int(b[o + (e & 31)]) >> (e >> 5)) & 1
                out[QK_K * i + e] = dl * np.float32(low - (0 if high else 4))
    return out


@njit(**JIT)
def decode_q2_k(b, n):
    out = np.empty(n, np.float32)
    for i in range(n // QK_K):
        o = 84 * i
        d = f16_value(_u16(b, o + 80))
        dmin = f16_value(_u16(b, o + 82))
        for j in range(16):  # sub-blocks of 16: one scale and min each
            s = int(b[o + j])
            dl = d * np.float32(s & 0xF)
            ml = dmin * np.float32(s >> 4)
            for e in range(16 * j, 16 * j + 16):
                h, r = e >> 7, e & 127
                q = (int(b[o + 16 + 32 * h + (r & 31)]) >> (2 * (r >> 5))) & 3
                out[QK_K * i + e] = dl * np.float32(q) - ml
    return out




@njit(**JIT)
def decode_iq4_xs(b, n):
    """IQ4_XS: super-blocks of 256 in 136 bytes (see ``ggml_types.IQ4_XS``);
    ``y = (d * float32(ls_j)) * float32(G[u])``, as gguf-py computes it."""
    out = np.empty(n, np.float32)
    for i in range(n // QK_K):
        o = 136 * i
        d = f16_value(_u16(b, o))
        high = _u16(b, o + 2)
        for j in range(8):
            ls = ((int(b[o + 4 + (j >> 1)]) >> (4 * (j & 1))) & 0xF) | (((high >> (2 * j)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            qs = o + 8 + 16 * j
            base = QK_K * i + 32 * j
            for l in range(16):
                v = int(b[qs + l])
                out[base + l] = dl * _IQ4NL_LEVELS[v & 0xF]
                out[base + 16 + l] = dl * _IQ4NL_LEVELS[v >> 4]
    return out
