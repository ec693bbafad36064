"""The LSB-first bitstream of codes (see the package docstring for the layout)."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import INLINE, JIT


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits in the LSB-first bitstream."""
    return (n * bits + 7) // 8


def groups_per_row(cols: int, group: int) -> int:
    return (cols + group - 1) // group


@njit(**INLINE)
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


@njit(**INLINE)
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

