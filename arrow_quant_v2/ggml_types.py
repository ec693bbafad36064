"""ggml's block types as encodings: a store quantized with them exports to GGUF losslessly.

Each class is registered under the lower-case ggml type name (``q8_0``, ``q4_k``, ...)
and has ``ggml_type``, the ``gguf.GGMLQuantizationType`` member name. Its ``codes``
blob for a chunk of ``rows`` rows is exactly ggml's block bytes for those rows, rows
in order (each row is ``cols / block`` blocks, ``cols`` a multiple of ``block``);
there are no other blobs. So a GGUF tensor's data is the concatenation of its
chunks' ``codes`` blobs, and decoding equals ``gguf.quants.dequantize`` bit for bit.

The byte layouts (each class docstring) are ggml's; the decoders in
``kernels.ggml_decode`` reproduce gguf-py's reference arithmetic exactly; the encoders are
our own search (``kernels.ggml_search``), measured against ggml's reference quantizer by
``benchmarks/bench_ggml_types.py``.

Calibration (``calibration="graph"``) uses the grid interface of :class:`encodings.Encoding`:
:meth:`GGMLEncoding.grid` exposes a chunk's block parameters as the float32 (scale, offset) per
sub-block the decoder computes, and :meth:`GGMLEncoding.compensated` re-runs the encoder on
each block as the error-compensating sweep reaches it; the bytes stay ggml's.

Which type a bit width becomes under ``target_runtime="gguf"``, what a row length that a
type's block does not divide falls back to, and the finer steps a size budget may take are
:data:`GGUF_TYPE_FOR_BITS`, :data:`ROW_FALLBACK` and :data:`FINER_STEPS` below (the policy reads them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

import numpy as np

from .kernels import ggml_decode as D
from .kernels import ggml_search as S
from .kernels import rounding
from .encodings import Encoding, Grid, register
from .errors import ConfigurationError, ValidationError


#: Elements a :meth:`GGMLEncoding.quantize` call encodes at a time (a piece of whole rows): small
#: enough for a core's cache, large enough that the per-piece call overhead is negligible.
_PIECE_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class GGMLEncoding(Encoding):
    """Base of the ggml block types: ``block`` elements in ``type_size`` bytes, one blob.

    ``group_size`` is ignored (the block is the group); a row length that ``block``
    does not divide raises :class:`ConfigurationError` (the planner never asks for one).
    """

    ggml_type: ClassVar[str] = ""
    block: ClassVar[int] = 32
    type_size: ClassVar[int] = 0

    def group_for(self, cols: int) -> int:
        return self.block

    def fits(self, cols: int) -> bool:
        """Whether a row of ``cols`` elements is a whole number of this type's blocks."""
        return cols > 0 and cols % self.block == 0

    def _check(self, cols: int) -> None:
        if not self.fits(cols):
            raise ConfigurationError(
                f"encoding {self.name!r} (ggml {self.ggml_type}) needs a row length that is a multiple of "
                f"{self.block}, got {cols}; plan with target_runtime='gguf' to get llama.cpp's fallback type"
            )

    def nbytes(self, rows: int, cols: int) -> int:
        self._check(cols)
        return rows * (cols // self.block) * self.type_size

    def quantize(self, x):
        rows, cols = x.shape
        self._check(cols)
        x = np.ascontiguousarray(x, dtype=np.float32)
        # a few rows at a time: each piece's search, decoding and statistics run on data still in
        # the core's cache, and no buffer is big enough to be a fresh mapping (page faults on
        # every call); blocks never straddle rows, so the bytes are those of one whole call
        step = max(1, _PIECE_ELEMENTS // cols)
        blobs = []
        stats = np.zeros(4)
        for r in range(0, rows, step):
            part = x[r:r + step]
            blob = self._encode(part.reshape(-1))
            stats += rounding.error_stats(part, self._decode(blob, part.size).reshape(part.shape))
            blobs.append(blob)
        return {"codes": blobs[0] if len(blobs) == 1 else np.concatenate(blobs)}, stats

    def dequantize(self, blobs, rows, cols):
        self._check(cols)
        codes = blobs.get("codes")
        if codes is None or codes.size != self.nbytes(rows, cols):
            got = "no codes" if codes is None else f"{codes.size} bytes"
            raise ValidationError(f"{self.ggml_type} chunk of {rows}x{cols} needs {self.nbytes(rows, cols)} bytes of codes, got {got}")
        return self._decode(np.ascontiguousarray(codes), rows * cols).reshape(rows, cols)

    @property
    def label(self) -> str:
        return f"int{self.bits} {self.name}"

    def _encode(self, x: np.ndarray) -> np.ndarray:
        *params, codes = self._search(x)
        return self._pack(tuple(params), codes)

    def _search(self, x: np.ndarray) -> tuple:
        """The encoder: the block parameters as the packer takes them, then the codes (int16)."""
        raise NotImplementedError

    def _pack(self, params: tuple, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, blob: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    # -- the grid interface (calibration picks the codes; see encodings.Grid) ---------------
    #: The grid's levels in the order of the packer's codes: code ``levels_min + i`` (or
    #: index ``i`` for a non-uniform grid) is level ``i``.
    LEVELS: ClassVar[np.ndarray] = np.zeros(0, np.float32)
    #: The code the packer takes for level index 0.
    CODE0: ClassVar[int] = 0
    #: Elements sharing one (scale, offset): the sub-block.
    SUB: ClassVar[int] = 32

    def grid(self, x):
        """The encoder's parameters for ``x``, as the per-sub-block float32 (scale, offset) the
        decoder multiplies and adds (``level * scale + offset`` is the decoded value bit for bit)."""
        rows, cols = x.shape
        self._check(cols)
        *params, codes = self._search(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
        return self.grid_of(tuple(params), rows, cols, codes)

    def grid_of(self, params: tuple, rows: int, cols: int, codes=None) -> "BlockGrid":
        scales, offsets = self._sub_scales(params)
        own = None if codes is None else (np.asarray(codes, np.int64) - self.CODE0).astype(np.uint8)
        return BlockGrid(self.LEVELS, scales.reshape(rows, -1), offsets.reshape(rows, -1), self.SUB, {},
                         params=params, codes=own)

    def _sub_scales(self, params: tuple) -> Tuple[np.ndarray, np.ndarray]:
        """float32 (scale, offset) per sub-block, computed as the decoder computes them; here
        one float16 ``d`` per block and no offset (Q8_0, Q4_0, Q5_0, IQ4_NL)."""
        d = _f16(params[0])
        return d, np.zeros_like(d)

    def round_to_grid(self, x, grid):
        """The encoder's own codes (its search picks them with the parameters: exactly what
        :meth:`quantize` stores) and their statistics."""
        codes = grid.codes
        y = grid.values(codes.reshape(x.shape))
        return codes, rounding.error_stats(x, y)

    def pack(self, grid, codes):
        q = np.asarray(codes, np.int16).reshape(-1) + np.int16(self.CODE0)
        return {"codes": self._pack(grid.params, q)}

    def quantize_codes(self, x, grid, codes):
        blobs = self.pack(grid, codes)
        y = self._decode(blobs["codes"], x.size).reshape(x.shape)  # the statistics of what a reader decodes
        return blobs, rounding.error_stats(x, y)

    def compensated(self, x: np.ndarray, prep) -> Tuple["BlockGrid", np.ndarray]:
        """Calibrated codes for ``x`` (rows = outputs, blocks along the inputs): the solver sweeps
        the inputs a block at a time and this encoder fits each block's parameters (d, dmin,
        sub-scales) to the weights as compensated so far, just before that block's codes are
        chosen (:func:`kernels.solver.solve_fitting_blocks`; ``prep`` in natural column order).
        Returns the stitched grid and the codes (level indices, row-major ``(rows, cols)``)."""
        from .kernels import solver

        rows, cols = x.shape
        self._check(cols)
        fitted: list = []

        def fit(block: np.ndarray):
            *params, _ = self._search(np.ascontiguousarray(block, dtype=np.float32).reshape(-1))
            fitted.append(params)
            return self.grid_of(tuple(params), rows, block.shape[1]).per_element(block.shape[1])

        codes = solver.solve_fitting_blocks(x, prep, self.block, self.LEVELS, fit)
        # each parameter array holds k entries per row of a block: block b's go to row r's b-th place
        params = tuple(np.concatenate([p[k].reshape(rows, -1) for p in fitted], axis=1).reshape(-1)
                       for k in range(len(fitted[0])))
        return self.grid_of(params, rows, cols), codes

    def quantize_compensated(self, x, prep, grid, plain, stats):
        """Encode ``x`` with :meth:`compensated` codes, or with the encoder's own (``grid``, ``plain``
        codes and their ``stats``) when those give the lower output error on ``prep``'s H (ties
        keep them): calibrated rounding is never worse than plain on its own inputs."""
        from .kernels import solver

        fitted, codes = self.compensated(x, prep)
        if solver.output_error(fitted.values(codes) - x, prep.h) < \
                solver.output_error(grid.values(plain.reshape(x.shape)) - x, prep.h):
            return self.quantize_codes(x, fitted, codes)
        return self.pack(grid, plain), stats


@dataclass(frozen=True)
class BlockGrid(Grid):
    """A ggml chunk's grid with the encoder's own parameters (as the packer takes them) and codes."""

    params: tuple = ()
    codes: Optional[np.ndarray] = None


def _f16(bits: np.ndarray) -> np.ndarray:
    """float32 values of float16 bit patterns (exact, as the decoders' ``f16_value``)."""
    return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)


def _levels(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=np.float32)


def _f64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


@register
@dataclass(frozen=True)
class Q8_0(GGMLEncoding):
    """ggml Q8_0: blocks of 32 elements in 34 bytes (8.5 bpw).

    Block: float16 ``d`` (2 bytes, little-endian), then 32 int8 codes ``k``.
    Dequantization: ``y[l] = float32(k[l]) * d``.
    Encoder: ggml's ``d = max|x| / 127`` and the extreme mapped to -128 + off (the extra
    negative level: a finer step), each least-squares re-fitted, rounded to float16 and
    re-coded; the lowest squared error wins.
    """

    name: ClassVar[str] = "q8_0"
    ggml_type: ClassVar[str] = "Q8_0"
    supported_bits: ClassVar[Tuple[int, ...]] = (8,)
    block: ClassVar[int] = 32
    type_size: ClassVar[int] = 34
    #: encoder effort (not format): the extreme element is tried at level -128 + off for each off.
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": (-0.5, 0.0, 0.5)}

    LEVELS: ClassVar[np.ndarray] = _levels(-128, 127)
    CODE0: ClassVar[int] = -128

    def _search(self, x):
        return S.encode_sym32(x, -128, 127, _f64(self.SEARCH["offsets"]))

    def _pack(self, params, q):
        return S.pack_q8_0(params[0], q)

    def _decode(self, blob, n):
        return D.decode_q8_0(blob, n)


@register
@dataclass(frozen=True)
class Q4_0(GGMLEncoding):
    """ggml Q4_0: blocks of 32 elements in 18 bytes (4.5 bpw).

    Block: float16 ``d``; 16 bytes ``qs``: element ``l < 16`` is the low nibble of
    ``qs[l]``, element ``16 + l`` the high nibble; nibble ``u`` is code ``u - 8``.
    Dequantization: ``y = d * float32(u - 8)``.
    Encoder: the extreme mapped to -8 + off for offsets in [-1, 1] (clipping it, or not),
    least-squares re-fitted, float16, re-coded; the lowest squared error wins (ggml without
    an importance matrix: ``max / -8`` only).
    """

    name: ClassVar[str] = "q4_0"
    ggml_type: ClassVar[str] = "Q4_0"
    supported_bits: ClassVar[Tuple[int, ...]] = (4,)
    block: ClassVar[int] = 32
    type_size: ClassVar[int] = 18
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": tuple(np.linspace(-1, 1, 9).tolist())}

    LEVELS: ClassVar[np.ndarray] = _levels(-8, 7)
    CODE0: ClassVar[int] = -8

    def _search(self, x):
        return S.encode_sym32(x, -8, 7, _f64(self.SEARCH["offsets"]))

    def _pack(self, params, q):
        return S.pack_nibbles32(params[0], q, 8)

    def _decode(self, blob, n):
        return D.decode_q4_0(blob, n)


@register
@dataclass(frozen=True)
class Q5_0(GGMLEncoding):
    """ggml Q5_0: blocks of 32 elements in 22 bytes (5.5 bpw).

    Block: float16 ``d``; ``qh`` (4 bytes, a little-endian uint32): bit ``l`` is the
    high bit of element ``l``'s code; 16 bytes ``qs`` holding the low nibbles as in
    Q4_0. The 5-bit value ``u`` is code ``u - 16``. Dequantization: ``y = d * float32(u - 16)``.
    Encoder: as Q4_0's, on levels -16..15.
    """

    name: ClassVar[str] = "q5_0"
    ggml_type: ClassVar[str] = "Q5_0"
    supported_bits: ClassVar[Tuple[int, ...]] = (5,)
    block: ClassVar[int] = 32
    type_size: ClassVar[int] = 22
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": tuple(np.linspace(-1, 1, 9).tolist())}

    LEVELS: ClassVar[np.ndarray] = _levels(-16, 15)
    CODE0: ClassVar[int] = -16

    def _search(self, x):
        return S.encode_sym32(x, -16, 15, _f64(self.SEARCH["offsets"]))

    def _pack(self, params, q):
        return S.pack_q5(params[0], np.empty(0, np.uint16), q, 16)

    def _decode(self, blob, n):
        return D.decode_q5(blob, n, False)


@register
@dataclass(frozen=True)
class Q5_1(GGMLEncoding):
    """ggml Q5_1: blocks of 32 elements in 24 bytes (6 bpw).

    Block: float16 ``d``, float16 ``m``, ``qh`` (uint32) and ``qs`` (16 bytes) as in Q5_0;
    the 5-bit value ``u`` is the code. Dequantization: ``y = d * float32(u) + m``.
    Encoder: ggml's min-max, and the range searched as for the k-quants' sub-blocks
    (anchored at either end, least-squares re-fitted); float16, re-coded; the lower error wins.
    """

    name: ClassVar[str] = "q5_1"
    ggml_type: ClassVar[str] = "Q5_1"
    supported_bits: ClassVar[Tuple[int, ...]] = (5,)
    block: ClassVar[int] = 32
    type_size: ClassVar[int] = 24
    SEARCH: ClassVar[Dict[str, Any]] = {"deltas": tuple(np.linspace(-3, 1, 9).tolist()), "iters": 1}

    LEVELS: ClassVar[np.ndarray] = _levels(0, 31)

    def _search(self, x):
        return S.encode_aff32(x, 31, _f64(self.SEARCH["deltas"]), self.SEARCH["iters"])

    def _pack(self, params, q):
        return S.pack_q5(params[0], params[1], q, 0)

    def _sub_scales(self, params):
        return _f16(params[0]), _f16(params[1])

    def _decode(self, blob, n):
        return D.decode_q5(blob, n, True)


@register
@dataclass(frozen=True)
class IQ4_NL(GGMLEncoding):
    """ggml IQ4_NL: blocks of 32 elements in 18 bytes (4.5 bpw), non-uniform levels.

    Block: float16 ``d``; 16 bytes ``qs`` with the nibbles placed as in Q4_0; nibble
    ``u`` selects level ``G[u]`` of ggml's grid ``G = kernels.ggml_decode.IQ4NL_GRID``
    (-127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113).
    Dequantization: ``y = d * float32(G[u])``.
    Encoder: the extreme mapped to either end of the grid (the sign of ``d`` mirrors
    it) moved by a few offsets, float16, re-coded; the best few least-squares re-fitted.
    """

    name: ClassVar[str] = "iq4_nl"
    ggml_type: ClassVar[str] = "IQ4_NL"
    supported_bits: ClassVar[Tuple[int, ...]] = (4,)
    block: ClassVar[int] = 32
    type_size: ClassVar[int] = 18
    #: encoder effort (not format): the extreme tried at each end moved by each offset; the
    #: ``refits`` best of those re-fitted by least squares.
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": (-12.0, -8.0, -4.0, 0.0, 4.0), "refits": 3}

    LEVELS: ClassVar[np.ndarray] = D.IQ4NL_GRID.astype(np.float32)

    def _search(self, x):
        return S.encode_iq4_nl(x, _f64(self.SEARCH["offsets"]), self.SEARCH["refits"])

    def _pack(self, params, q):
        return S.pack_nibbles32(params[0], q, 0)

    def _decode(self, blob, n):
        return D.decode_iq4_nl(blob, n)


@dataclass(frozen=True)
class _KQuantAffine(GGMLEncoding):
    """Shared encoder of Q4_K / Q5_K / Q2_K (see ``kernels.ggml_search.encode_kquant_affine``)."""

    block: ClassVar[int] = 256
    SUB: ClassVar[int] = 32
    NMAX: ClassVar[int] = 15
    SMAX: ClassVar[int] = 63
    #: encoder effort (not format): range spreads (levels + delta), refinement steps per
    #: sub-block, super-block re-fit rounds.
    SEARCH: ClassVar[Dict[str, Any]] = {"deltas": (0.0,), "iters": 1, "rounds": 2}

    def _search(self, x):
        s = self.SEARCH
        return S.encode_kquant_affine(x, self.SUB, self.NMAX, self.SMAX, _f64(s["deltas"]), s["iters"], s["rounds"])

    def _sub_scales(self, params):
        d, dmin, sc, m = params
        per = self.block // self.SUB
        scale = np.repeat(_f16(d), per) * sc.astype(np.float32)   # d * sc, then (level * that) - dmin * m
        return scale, -(np.repeat(_f16(dmin), per) * m.astype(np.float32))


@register
@dataclass(frozen=True)
class Q4_K(_KQuantAffine):
    """ggml Q4_K: super-blocks of 256 elements in 144 bytes (4.5 bpw), 8 sub-blocks of 32.

    Super-block: float16 ``d``, float16 ``dmin``, 12 bytes ``scales``, 128 bytes ``qs``.
    ``scales`` packs a 6-bit scale ``sc[j]`` and min ``m[j]`` per sub-block ``j``: for
    ``j < 4`` ``sc[j] = scales[j] & 63``, ``m[j] = scales[j + 4] & 63``; for ``j >= 4``
    ``sc[j] = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4`` and
    ``m[j] = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4``.
    Codes: element ``l`` of sub-block ``j`` is nibble ``j % 2`` (low first) of
    ``qs[32 * (j // 2) + l]``.
    Dequantization: ``y = (d * sc[j]) * u - (dmin * m[j])`` (float32, in that order).
    """

    name: ClassVar[str] = "q4_k"
    ggml_type: ClassVar[str] = "Q4_K"
    supported_bits: ClassVar[Tuple[int, ...]] = (4,)
    type_size: ClassVar[int] = 144
    SEARCH: ClassVar[Dict[str, Any]] = {"deltas": tuple(np.linspace(-1.5, 1.5, 13).tolist()), "iters": 1, "rounds": 3}

    LEVELS: ClassVar[np.ndarray] = _levels(0, 15)

    def _pack(self, params, q):
        return S.pack_q4_k(*params, q, False)

    def _decode(self, blob, n):
        return D.decode_q4_k(blob, n)


@register
@dataclass(frozen=True)
class Q5_K(_KQuantAffine):
    """ggml Q5_K: super-blocks of 256 elements in 176 bytes (5.5 bpw), 8 sub-blocks of 32.

    Super-block: float16 ``d``, float16 ``dmin``, 12 bytes ``scales`` (packed as in Q4_K),
    32 bytes ``qh``, 128 bytes ``qs``. Element ``l`` of sub-block ``j`` has its low 4
    bits placed as in Q4_K's ``qs`` and its fifth bit at bit ``j`` of ``qh[l]``.
    Dequantization: ``y = (d * sc[j]) * u - (dmin * m[j])``, ``u`` in [0, 31].
    """

    name: ClassVar[str] = "q5_k"
    ggml_type: ClassVar[str] = "Q5_K"
    supported_bits: ClassVar[Tuple[int, ...]] = (5,)
    type_size: ClassVar[int] = 176
    NMAX: ClassVar[int] = 31
    SEARCH: ClassVar[Dict[str, Any]] = {"deltas": tuple(np.linspace(-2, 2, 5).tolist()), "iters": 1, "rounds": 2}

    LEVELS: ClassVar[np.ndarray] = _levels(0, 31)

    def _pack(self, params, q):
        return S.pack_q4_k(*params, q, True)

    def _decode(self, blob, n):
        return D.decode_q4_k(blob, n, True)


@register
@dataclass(frozen=True)
class Q2_K(_KQuantAffine):
    """ggml Q2_K: super-blocks of 256 elements in 84 bytes (2.625 bpw), 16 sub-blocks of 16.

    Super-block: 16 bytes ``scales`` (sub-block ``j``: low nibble scale ``sc[j]``, high
    nibble min ``m[j]``), 64 bytes ``qs``, float16 ``d``, float16 ``dmin``. Element ``e``
    (``h = e // 128``, ``r = e % 128``) is bits ``2 * (r // 32)`` and up of
    ``qs[32 * h + r % 32]`` (2 bits). Sub-block of ``e``: ``j = e // 16``.
    Dequantization: ``y = (d * sc[j]) * u - (dmin * m[j])``, ``u`` in [0, 3].
    """

    name: ClassVar[str] = "q2_k"
    ggml_type: ClassVar[str] = "Q2_K"
    supported_bits: ClassVar[Tuple[int, ...]] = (2,)
    type_size: ClassVar[int] = 84
    SUB: ClassVar[int] = 16
    NMAX: ClassVar[int] = 3
    SMAX: ClassVar[int] = 15
    SEARCH: ClassVar[Dict[str, Any]] = {"deltas": tuple(np.linspace(-0.5, 1.5, 9).tolist()), "iters": 1, "rounds": 2}

    LEVELS: ClassVar[np.ndarray] = _levels(0, 3)

    def _pack(self, params, q):
        return S.pack_q2_k(*params, q)

    def _decode(self, blob, n):
        return D.decode_q2_k(blob, n)


@dataclass(frozen=True)
class _KQuantSymmetric(GGMLEncoding):
    """Shared encoder of Q6_K / Q3_K (see ``kernels.ggml_search.encode_kquant_symmetric``)."""

    block: ClassVar[int] = 256
    SUB: ClassVar[int] = 16
    QMIN: ClassVar[int] = -32
    SMIN: ClassVar[int] = -128
    #: encoder effort (not format): the extreme tried at levels QMIN + off and QMAX + off for
    #: each offset, refinement steps per sub-block, super-block re-fit rounds.
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": (0.0,), "iters": 1, "rounds": 2}

    def _search(self, x):
        s = self.SEARCH
        return S.encode_kquant_symmetric(x, self.SUB, self.QMIN, -self.QMIN - 1, self.SMIN, -self.SMIN - 1,
                                         _f64(s["offsets"]), s["iters"], s["rounds"])

    def _sub_scales(self, params):
        d, sc = params
        scale = np.repeat(_f16(d), self.block // self.SUB) * sc.astype(np.float32)  # d * sc, then level * that
        return scale, np.zeros_like(scale)


@register
@dataclass(frozen=True)
class Q6_K(_KQuantSymmetric):
    """ggml Q6_K: super-blocks of 256 elements in 210 bytes (6.5625 bpw), 16 sub-blocks of 16.

    Super-block: 128 bytes ``ql``, 64 bytes ``qh``, 16 int8 ``scales``, float16 ``d``.
    Element ``e`` (``h = e // 128``, ``r = e % 128``): low 4 bits are nibble ``r // 64``
    of ``ql[64 * h + r % 64]``, high 2 bits are bits ``2 * (r // 32)`` and up of
    ``qh[32 * h + r % 32]``; the 6-bit value ``u`` is code ``u - 32``.
    Dequantization: ``y = (d * scales[e // 16]) * float32(u - 32)``.
    """

    name: ClassVar[str] = "q6_k"
    ggml_type: ClassVar[str] = "Q6_K"
    supported_bits: ClassVar[Tuple[int, ...]] = (6,)
    type_size: ClassVar[int] = 210
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": tuple(np.linspace(-2, 2, 9).tolist()), "iters": 1, "rounds": 2}

    LEVELS: ClassVar[np.ndarray] = _levels(-32, 31)
    CODE0: ClassVar[int] = -32

    def _pack(self, params, q):
        return S.pack_q6_k(*params, q)

    def _decode(self, blob, n):
        return D.decode_q6_k(blob, n)


@register
@dataclass(frozen=True)
class Q3_K(_KQuantSymmetric):
    """ggml Q3_K: super-blocks of 256 elements in 110 bytes (3.4375 bpw), 16 sub-blocks of 16.

    Super-block: 32 bytes ``hmask``, 64 bytes ``qs``, 12 bytes ``scales``, float16 ``d``.
    Element ``e`` (``h = e // 128``, ``r = e % 128``): low 2 bits are bits ``2 * (r // 32)``
    and up of ``qs[32 * h + r % 32]``; its high bit is bit ``e // 32`` of ``hmask[e % 32]``;
    the code is ``low - (0 if high else 4)``, in [-4, 3].
    Sub-block ``j``'s 6-bit scale ``v``: low 4 bits from ``scales[j] & 15`` (``j < 8``) or
    ``scales[j - 8] >> 4``, high 2 bits from ``scales[8 + j % 4] >> (2 * (j // 4))``; the
    signed scale is ``v - 32``. Dequantization: ``y = (d * (v - 32)) * float32(code)``.
    """

    name: ClassVar[str] = "q3_k"
    ggml_type: ClassVar[str] = "Q3_K"
    supported_bits: ClassVar[Tuple[int, ...]] = (3,)
    type_size: ClassVar[int] = 110
    QMIN: ClassVar[int] = -4
    SMIN: ClassVar[int] = -32
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": tuple(np.linspace(-1, 1, 9).tolist()), "iters": 1, "rounds": 2}

    LEVELS: ClassVar[np.ndarray] = _levels(-4, 3)
    CODE0: ClassVar[int] = -4

    def _pack(self, params, q):
        return S.pack_q3_k(*params, q)

    def _decode(self, blob, n):
        return D.decode_q3_k(blob, n)


@register
@dataclass(frozen=True)
class IQ4_XS(GGMLEncoding):
    """ggml IQ4_XS: super-blocks of 256 elements in 136 bytes (4.25 bpw), 8 sub-blocks of 32
    on IQ4_NL's non-uniform grid.

    Super-block: float16 ``d``; ``scales_h`` (uint16, little-endian): bits ``2j`` and ``2j + 1``
    are the top 2 bits of sub-block ``j``'s 6-bit scale ``v``; ``scales_l`` (4 bytes): the low 4
    bits of ``v`` for sub-block ``j`` in nibble ``j % 2`` (low first) of byte ``j // 2``; ``qs``
    (128 bytes): sub-block ``j``'s 32 level indices in ``qs[16j:16j + 16]``, placed as in IQ4_NL
    (element ``l`` the low nibble, ``16 + l`` the high). The signed scale is ``ls = v - 32``.
    Dequantization: ``y = (d * float32(ls)) * float32(G[u])``, ``G`` IQ4_NL's grid.
    Encoder: each sub-block's own scale searched as IQ4_NL's, then the super-block scale and the
    integer sub-scales fitted together (``kernels.ggml_search.encode_iq4_xs``). More error than
    Q4_K at 0.25 fewer bits per weight: a choice (``encoding="iq4_xs"``), not int4's default.
    """

    name: ClassVar[str] = "iq4_xs"
    ggml_type: ClassVar[str] = "IQ4_XS"
    supported_bits: ClassVar[Tuple[int, ...]] = (4,)
    block: ClassVar[int] = 256
    type_size: ClassVar[int] = 136
    #: encoder effort (not format): sub-block offsets as IQ4_NL's; super-block scale starts at the
    #: largest sub-scale over ``-32 + doffset``; least-squares re-fit rounds of the super-block scale.
    SEARCH: ClassVar[Dict[str, Any]] = {"offsets": (-12.0, -8.0, -4.0, 0.0, 4.0), "doffsets": (0.0,), "rounds": 2}

    LEVELS: ClassVar[np.ndarray] = D.IQ4NL_GRID.astype(np.float32)

    def _search(self, x):
        s = self.SEARCH
        return S.encode_iq4_xs(x, _f64(s["offsets"]), _f64(s["doffsets"]), s["rounds"])

    def _pack(self, params, q):
        return S.pack_iq4_xs(*params, q)

    def _sub_scales(self, params):
        d, ls = params
        scale = np.repeat(_f16(d), self.block // self.SUB) * ls.astype(np.float32)  # d * ls, then level * that
        return scale, np.zeros_like(scale)

    def _decode(self, blob, n):
        return D.decode_iq4_xs(blob, n)


#: The ggml type each bit width becomes under ``target_runtime="gguf"``.
GGUF_TYPE_FOR_BITS: Dict[int, str] = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0"}

#: Under ``target_runtime="gguf"``, the finer steps a size budget may also take at a width:
#: fewer bits than the width's own type, more error (IQ4_XS, 4.25 bpw, between Q3_K and Q4_K).
FINER_STEPS: Dict[int, Tuple[str, ...]] = {4: ("iq4_xs",)}

#: llama.cpp's fallback for a row length that a k-quant's 256-element super-block does not
#: divide (``llama-quant.cpp``, ``convert_incompatible_tensor``); a row that the fallback's
#: 32-element block does not divide either stays unquantized (llama.cpp: F16; here: lossless).
ROW_FALLBACK: Dict[str, str] = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def gguf_type_for(bits: int, cols: int) -> Tuple[Optional[str], str]:
    """The ggml encoding for a ``bits``-wide tensor with rows of ``cols`` elements, and why.

    Returns ``(name, note)``; ``name`` is None when no ggml block fits the row (keep it
    lossless). ``note`` is empty for the plain mapping, else the fallback's reason.
    """
    from .encodings import _REGISTRY

    name = GGUF_TYPE_FOR_BITS[bits]
    if cols % _REGISTRY[name].block == 0:
        return name, ""
    why = f"row length {cols} is not a multiple of {_REGISTRY[name].block}"
    fallback = ROW_FALLBACK.get(name)
    if fallback is not None and cols % _REGISTRY[fallback].block == 0:
        return fallback, f"{why}, llama.cpp's fallback for {name.upper()}"
    return None, f"{why} or 32 (llama.cpp keeps such rows in F16)"
