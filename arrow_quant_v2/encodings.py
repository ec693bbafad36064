"""Weight encodings: each one is a small class registered by name.

An encoding turns a float32 matrix chunk ``(rows, cols)`` (groups along ``cols``)
into named byte blobs and back. The store keeps those blobs in the Parquet columns
named in :data:`BLOB_FIELDS`; the encoding class is the single place that says what
each blob holds (its docstring is the byte layout). The public surface is
:func:`get_encoding`, :func:`quantize` and :func:`dequantize`.

Lossless tensors use no encoding: the store keeps their source bytes (``layout.RAW`` rows).

Encodings (bpw for a row length that the group divides):

* ``affine``     plain min-max rounding, fp16 scale + offset per group: bits + 32/g.
* ``symmetric``  plain absmax rounding (Q4_0/Q8_0 style), fp16 scale per group: bits + 16/g.
* ``affine_opt`` ``affine``'s layout with a least-squares clipping search: bits + 32/g.
* ``kquant``     k-quant style: uniform grid, scale and offset codes per group under
                 bf16 super-block scales (256 elements): bits + 2*sb/g + 32/256.
* ``kquant_nl``  learned non-uniform 2/3/4-bit grids, one signed scale code per group
                 under a bf16 scale and a bf16 mean per super-block: bits + sb/g + 32/256.

:data:`DEFAULT_ENCODING` says which one each bit width uses by default, and why.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple, Type

import numpy as np

from .kernels import decode, packing, rounding, search
from .errors import ConfigurationError
from .metrics import figures

#: Parquet binary columns an encoding may fill, in order.
BLOB_FIELDS = ("codes", "scales", "zeros", "aux")

Blobs = Dict[str, np.ndarray]  # field name -> 1-D uint8 array

_REGISTRY: Dict[str, Type["Encoding"]] = {}


def register(cls):
    """Class decorator: make ``cls`` available by its ``name``; a name is registered once."""
    if cls.name in _REGISTRY:
        raise ValueError(f"encoding {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__}); "
                         "choose another name")
    _REGISTRY[cls.name] = cls
    return cls


def encoding_names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def supports(name: str, bits: int) -> bool:
    """Whether encoding ``name`` (registered) has a ``bits``-bit variant."""
    return bits in _REGISTRY[name].supported_bits


def width_of(name: str, bits: int) -> int:
    """``bits`` if encoding ``name`` has that width, else its narrowest one (a fallback
    ggml type can be wider than the width it stands in for: Q2_K -> IQ4_NL)."""
    return bits if supports(name, bits) else min(_REGISTRY[name].supported_bits)


def get_encoding(name: str, bits: int, group_size: int) -> "Encoding":
    """The encoding ``name`` at ``bits`` bits and ``group_size`` (0 = one group per row)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ConfigurationError(
            f"encoding={name!r} is not known; allowed: {', '.join(encoding_names())}"
        ) from None
    return cls(bits, group_size)


def as_u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


@dataclass(frozen=True)
class Grid:
    """A chunk's fixed grid: element ``(r, j)`` may take ``levels[q] * scales[r, j // group] + offsets[r, j // group]``.

    ``levels`` float32 sorted ascending (the code ``q`` is the index); ``scales``/``offsets``
    float32 ``(rows, groups)``, exactly what dequantization uses; ``stored`` the
    encoding's blobs of these parameters (everything but ``codes``).
    """

    levels: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray
    group: int
    stored: Blobs

    def per_element(self, cols: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scales, offsets)`` expanded to ``(rows, cols)``."""
        idx = np.arange(cols) // self.group
        return self.scales[:, idx], self.offsets[:, idx]

    def values(self, codes: np.ndarray) -> np.ndarray:
        """float32 ``(rows, cols)`` values of ``(rows, cols)`` codes, as dequantization computes them."""
        s, o = self.per_element(codes.shape[1])
        return self.levels[codes] * s + o


@dataclass(frozen=True)
class Encoding(abc.ABC):
    """Base class (abstract). Subclasses set ``name`` and ``supported_bits``, implement
    :meth:`dequantize`, and either :meth:`quantize` or the grid interface (:meth:`grid`,
    :meth:`round_to_grid`), and :meth:`blob_nbytes` or :meth:`nbytes`."""

    bits: int
    group_size: int

    name: ClassVar[str] = ""
    supported_bits: ClassVar[Tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def __post_init__(self):
        if self.bits not in self.supported_bits:
            raise ConfigurationError(
                f"bit_width={self.bits} is not supported by encoding {self.name!r}; "
                f"allowed: {self.supported_bits}"
            )

    def group_for(self, cols: int) -> int:
        """The effective group length along a row of ``cols`` elements."""
        return cols if self.group_size <= 0 else min(self.group_size, cols)

    def quantize(self, x: np.ndarray) -> Tuple[Blobs, np.ndarray]:
        """Encode a C-contiguous float32 ``(rows, cols)`` chunk.

        Returns the blobs and the fused statistics ``[sum x*y, sum x*x, sum y*y,
        sum (x-y)**2]`` (float64) of the dequantized result ``y``.
        """
        grid = self.grid(x)
        codes, stats = self.round_to_grid(x, grid)
        return self.pack(grid, codes), stats

    # -- the grid interface: parameters first, then codes (a calibrated solver picks its own codes)

    def grid(self, x: np.ndarray) -> "Grid":
        """The chunk's grid: every parameter the encoder stores besides the codes."""
        raise NotImplementedError

    @property
    def has_grid(self) -> bool:
        """Whether this encoding exposes its grid (so calibrated rounding can choose its codes)."""
        return type(self).grid is not Encoding.grid

    def round_to_grid(self, x: np.ndarray, grid: "Grid") -> Tuple[np.ndarray, np.ndarray]:
        """Nearest-level codes (rows*cols uint8, row-major) and the fused statistics."""
        raise NotImplementedError

    def pack(self, grid: "Grid", codes: np.ndarray) -> Blobs:
        """The blobs of ``codes`` (rows*cols uint8, row-major) on ``grid``."""
        return dict(grid.stored, codes=packing.pack_codes(codes, self.bits))

    def quantize_codes(self, x: np.ndarray, grid: "Grid", codes: np.ndarray) -> Tuple[Blobs, np.ndarray]:
        """Encode ``x`` with codes chosen elsewhere (e.g. error-compensated) on ``grid``."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        y = grid.values(codes.reshape(x.shape))
        return self.pack(grid, codes.reshape(-1)), rounding.error_stats(x, y)

    @abc.abstractmethod
    def dequantize(self, blobs: Blobs, rows: int, cols: int) -> np.ndarray:
        """Decode blobs back to a float32 ``(rows, cols)`` array."""

    def blob_nbytes(self, rows: int, cols: int) -> Dict[str, int]:
        """Length of each blob for a ``(rows, cols)`` chunk: the layout a store reader checks
        every row against before decoding (``storecheck.check_blobs``). Blobs not listed are
        null or empty. The default (everything in ``codes``) fits block formats such as
        ggml's; a subclass overrides this or :meth:`nbytes`."""
        return {"codes": self.nbytes(rows, cols)}

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes stored for a ``(rows, cols)`` chunk: the bpw formula, equal to the blob sizes."""
        return sum(self.blob_nbytes(rows, cols).values())

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.nbytes(rows, cols) * 8 / (rows * cols)

    @property
    def label(self) -> str:
        g = "row" if self.group_size <= 0 else str(self.group_size)
        return f"int{self.bits} {self.name} g{g}"


F16_MAX = 65504.0


def to_f16(a: np.ndarray) -> np.ndarray:
    """Round to float16 (nearest-even), saturating at +-65504 so no parameter becomes inf."""
    return np.clip(a, -F16_MAX, F16_MAX).astype(np.float16)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest-even) and return the uint16 bit patterns.

    bfloat16 keeps float32's exponent range (1e-38 .. 3e38) with 8 bits of
    mantissa: a super-block scale of a layer with tiny weights (1e-6) stays a
    normal number, where float16 would fall to a subnormal with few or no bits.
    """
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@register
@dataclass(frozen=True)
class AffineMinMax(Encoding):
    """Plain asymmetric rounding between each group's min and max (the baseline).

    Groups: ``g = group_for(cols)`` elements along each row, ``ng = ceil(cols / g)``
    groups per row, the last one possibly shorter.
    Blobs:
      * ``codes``: the codes ``q`` in ``[0, 2**bits - 1]``, one per element in
        row-major order, packed in the kernels' LSB-first bitstream.
      * ``scales``: float16 ``(rows, ng)`` row-major: ``s = fp16((max - min) / (2**bits - 1))``.
      * ``zeros``: float16 ``(rows, ng)`` row-major: the offset ``z = fp16(min)``.
    Dequantization (float32, exactly as written): ``y = float32(q) * s + z``.
    Coding: ``q = clip(rint((x - z) / s), 0, 2**bits - 1)`` (nearest level).
    Bytes: ``ceil(rows*cols*bits / 8) + 4 * rows * ng``; bpw = bits + 32 / g.
    """

    name: ClassVar[str] = "affine"

    def _params(self, x, group):
        """float16 ``(scales, offsets)`` per group."""
        lo, hi = rounding.group_minmax(x, group)
        return to_f16((hi - lo) / ((1 << self.bits) - 1)), to_f16(lo)

    def grid(self, x):
        group = self.group_for(x.shape[1])
        scales, offsets = self._params(x, group)
        # The parameters as stored, so the codes and the statistics are those of
        # exactly what dequantize() will return.
        return Grid(np.arange(1 << self.bits, dtype=np.float32), scales.astype(np.float32),
                    offsets.astype(np.float32), group, {"scales": as_u8(scales), "zeros": as_u8(offsets)})

    def round_to_grid(self, x, grid):
        return rounding.quantize_affine(x, grid.scales, grid.offsets, self.bits, grid.group)

    def dequantize(self, blobs, rows, cols):
        g = self.group_for(cols)
        ng = packing.groups_per_row(cols, g)
        codes = packing.unpack_codes(blobs["codes"], self.bits, rows * cols)
        scales = blobs["scales"].view(np.float16).reshape(rows, ng).astype(np.float32)
        offsets = blobs["zeros"].view(np.float16).reshape(rows, ng).astype(np.float32)
        return decode.dequantize_affine(codes, scales, offsets, rows, cols, g)

    def blob_nbytes(self, rows, cols):
        ng = packing.groups_per_row(cols, self.group_for(cols))
        return {"codes": packing.packed_nbytes(rows * cols, self.bits), "scales": 2 * rows * ng, "zeros": 2 * rows * ng}


@register
@dataclass(frozen=True)
class AffineOpt(AffineMinMax):
    """Same layout, formula and bpw as ``affine``; the scale and offset are searched.

    Byte layout and dequantization: exactly those of :class:`AffineMinMax`
    (``codes``, float16 ``scales``, float16 ``zeros``; ``y = float32(q) * s + z``;
    bpw = bits + 32 / g), so any reader of ``affine`` reads this too.
    Encoder (free to change, it is not part of the format): per group, the
    min-max range shrunk about its centre by a few factors (clipping the tails),
    each rounded and followed by a least-squares re-fit of (scale, offset) to the
    codes, the best kept and refined by a few round/re-fit steps
    (``search.search_affine``); then rounded to float16 and coded by nearest level.
    """

    name: ClassVar[str] = "affine_opt"
    #: shrink factors tried (1.0 = min-max) and refinement steps, per bit width.
    SEARCH: ClassVar[Dict[int, Tuple[Tuple[float, ...], int]]] = {
        2: ((1.0, 1.15, 1.3, 1.5, 1.7), 3),
        3: ((1.0, 1.1, 1.2, 1.35, 1.5), 3),
        4: ((1.0, 1.1, 1.2, 1.3, 1.45), 3),
        5: ((1.0, 1.05, 1.1, 1.2), 2),
        6: ((1.0, 1.05, 1.1, 1.2), 2),
        8: ((1.0, 1.05, 1.1, 1.2), 2),
    }

    def _params(self, x, group):
        ts, iters = self.SEARCH[self.bits]
        scales, offsets = search.search_affine(x, group, self.bits, np.asarray(ts, np.float32), iters)
        return to_f16(scales), to_f16(offsets)


@register
@dataclass(frozen=True)
class Symmetric(Encoding):
    """Plain symmetric rounding, no offset (like ggml Q4_0/Q8_0, any group size).

    Each group's largest-magnitude element ``m`` (with its sign) is put on the
    grid's lowest level, ``s = fp16(m / -2**(bits-1))``, so all ``2**bits`` codes
    are used and 0 is exactly representable.
    Blobs:
      * ``codes``: codes ``q`` in ``[0, 2**bits - 1]``, row-major, LSB-first bitstream.
      * ``scales``: float16 ``(rows, ng)`` row-major (may be negative).
    Dequantization (float32, exactly as written): ``y = float32(q) * s + o`` with
    ``o = -2**(bits-1) * s`` (exact: a power-of-two multiple).
    Coding: ``q = clip(rint(x / s) + 2**(bits-1), 0, 2**bits - 1)``.
    Bytes: ``ceil(rows*cols*bits / 8) + 2 * rows * ng``; bpw = bits + 16 / g.
    """

    name: ClassVar[str] = "symmetric"

    def _offsets(self, scales32):
        return np.float32(-(1 << (self.bits - 1))) * scales32

    def grid(self, x):
        group = self.group_for(x.shape[1])
        lo, hi = rounding.group_minmax(x, group)
        m = np.where(-lo > hi, lo, hi)
        scales = to_f16(m / -float(1 << (self.bits - 1)))
        s32 = scales.astype(np.float32)
        return Grid(np.arange(1 << self.bits, dtype=np.float32), s32, self._offsets(s32), group,
                    {"scales": as_u8(scales)})

    def round_to_grid(self, x, grid):
        return rounding.quantize_affine(x, grid.scales, grid.offsets, self.bits, grid.group)

    def dequantize(self, blobs, rows, cols):
        g = self.group_for(cols)
        ng = packing.groups_per_row(cols, g)
        codes = packing.unpack_codes(blobs["codes"], self.bits, rows * cols)
        s32 = blobs["scales"].view(np.float16).reshape(rows, ng).astype(np.float32)
        return decode.dequantize_affine(codes, s32, self._offsets(s32), rows, cols, g)

    def blob_nbytes(self, rows, cols):
        ng = packing.groups_per_row(cols, self.group_for(cols))
        return {"codes": packing.packed_nbytes(rows * cols, self.bits), "scales": 2 * rows * ng}


@dataclass(frozen=True)
class SuperBlocks(Encoding):
    """The geometry the k-quant-style encodings share: groups of ``g = group_for(cols)`` elements
    along each row (``ng`` per row) under super-blocks of ``K = max(1, SUPER // g)`` consecutive
    groups of the same row (``ns = ceil(ng / K)`` per row, the last ones possibly shorter)."""

    #: elements per super-block (part of the format: K = max(1, SUPER // g)).
    SUPER: ClassVar[int] = 256

    def _geometry(self, cols):
        g = self.group_for(cols)
        ng = packing.groups_per_row(cols, g)
        k = max(1, self.SUPER // g)
        return g, ng, k, packing.groups_per_row(ng, k)


@register
@dataclass(frozen=True)
class KQuantNL(SuperBlocks):
    """Non-uniform grid, one signed sub-scale per group; bfloat16 scale and mean per super-block.

    The quality encoding (in the spirit of llama.cpp's k-quants and IQ4_XS, with
    its own grids and search). Geometry: groups ("sub-blocks") of ``g =
    group_for(cols)`` elements along each row, ``ng = ceil(cols / g)`` per row;
    super-blocks of ``K = max(1, 256 // g)`` consecutive groups of the same row,
    ``ns = ceil(ng / K)`` per row (the last ones possibly shorter).
    Per bit width: grid ``L = decode.GRIDS[bits]`` (sorted float32 levels, listed
    below), sub-scale width ``sb = SCALE_BITS[bits]`` and code range
    ``[cmin, cmax] = [-2**(sb-1), 2**(sb-1) - 1]`` (signed: the grids are not
    symmetric, and a negative scale mirrors the grid).
    Blobs:
      * ``codes``: the level index ``q`` of every element, ``bits`` bits each,
        row-major, packed in the kernels' LSB-first bitstream.
      * ``scales``: the sub-scale code ``c`` of every group, ``(rows, ng)``
        row-major, stored as ``c - cmin`` in ``sb`` bits each, LSB-first bitstream.
      * ``aux``: per super-block the bfloat16 pair ``(D, M)``, scale and mean,
        ``(rows, ns, 2)`` row-major (each the high 16 bits of a float32, little-endian).
    Dequantization (float32, exactly as written), element ``j`` of group ``gi`` of
    row ``r``: ``s = float32(c[r, gi]) * D[r, gi // K]``, ``y = L[q] * s + M[r, gi // K]``.
    Bytes: ``ceil(rows*cols*bits / 8) + ceil(rows*ng*sb / 8) + 4 * rows * ns``;
    bpw = bits + sb / g + 32 / (K * g): 4.5 at 4 bits g16, 2.625 at 2 bits g8, 3.5 at 3 bits g16.
    No 8-bit variant: a uniform grid is near-optimal there and the asymmetric
    ``affine_opt`` / ``kquant`` fit skewed heavy-tailed groups better than a
    symmetric one would.
    Encoder (not part of the format): ``M`` = bf16 of the super-block's mean (real
    layers, e.g. a U-Net's embedding projections, have rows far from zero-mean,
    which a scale-only grid cannot follow: relF 0.054 -> 0.044 on the terrain U-Net
    at int4); per group of ``x - M``, the scale minimising the squared error
    (``search.search_grid_scales``); ``D = bf16(max |d| / cmax)`` per super-block;
    the sub-scale code by rounding ``d / D`` (or, with ``refine``, the better of its
    two neighbours); then nearest-level coding with the stored values
    (``rounding.quantize_grid``). A zero group has ``c = 0`` and decodes to ``M``.
    """

    name: ClassVar[str] = "kquant_nl"
    supported_bits: ClassVar[Tuple[int, ...]] = (2, 3, 4)
    #: bits of the sub-scale code per weight bit width (part of the format).
    SCALE_BITS: ClassVar[Dict[int, int]] = {2: 4, 3: 6, 4: 6}
    #: encoder effort per bit width: (clip factors, Lloyd steps, refine sub-scale codes).
    SEARCH: ClassVar[Dict[int, Tuple[Tuple[float, ...], int, bool]]] = {
        # Chosen on 4096-wide Gaussian/Student-t rows (relF; relative 1-core speed):
        # int2 g8: (1.0, 1.1, 1.2) 0.2509 / 1.0; (1.0, 1.2) 0.2509 / 1.2; (1.1,) 0.2527 / 1.7.
        2: ((1.0, 1.2), 0, True),
        3: ((1.0, 1.2), 0, True),
        # int4 g16: (1.0, 1.1) 0.0649 / 1.0; (1.0,)+1 Lloyd step 0.0654 / 1.1; (1.0,) 0.0657 / 1.3.
        # The last: int4 is the profile most runs use, so it takes the fastest setting (its
        # measured speed: the README's encodings table, benchmarks/results/bench_encodings.json).
        4: ((1.0,), 0, False),
    }

    def _code_range(self):
        sb = self.SCALE_BITS[self.bits]
        return -(1 << (sb - 1)), (1 << (sb - 1)) - 1

    def grid(self, x):
        rows, cols = x.shape
        g, ng, k, ns = self._geometry(cols)
        ts, iters, refine = self.SEARCH[self.bits]
        cmin, cmax = self._code_range()
        xc, mean = rounding.center_spans(x, k * g)
        d = search.search_grid_scales(xc, g, self.bits, np.asarray(ts, np.float32), iters)
        # Super-block scale: the largest |d| of the super-block maps to code cmax.
        pad = np.zeros((rows, ns * k), np.float32)
        pad[:, :ng] = np.abs(d)
        dmax = pad.reshape(rows, ns, k).max(axis=2)
        big = from_bf16_bits(to_bf16_bits(dmax / np.float32(cmax)))
        c = search.choose_scale_codes(xc, g, self.bits, d, big, k, cmin, cmax, refine)
        scales, offsets = self._group_params(c, big, mean, ng, k)
        sb = self.SCALE_BITS[self.bits]
        return Grid(decode.GRIDS[self.bits], scales, offsets, g, {
            "scales": packing.pack_codes((c - cmin).astype(np.uint8).reshape(-1), sb),
            "aux": as_u8(to_bf16_bits(np.stack([big, mean], axis=2))),
        })

    def round_to_grid(self, x, grid):
        return rounding.quantize_grid(x, grid.scales, grid.offsets, grid.group, self.bits)

    @staticmethod
    def _group_params(c, big, mean, ng, k):
        """float32 ``(rows, ng)`` group scales ``float32(c) * D`` and offsets ``M`` (as documented)."""
        scales = c.astype(np.float32) * np.repeat(big, k, axis=1)[:, :ng]
        return scales, np.ascontiguousarray(np.repeat(mean, k, axis=1)[:, :ng])

    def dequantize(self, blobs, rows, cols):
        g, ng, k, ns = self._geometry(cols)
        cmin, _ = self._code_range()
        sb = self.SCALE_BITS[self.bits]
        codes = packing.unpack_codes(blobs["codes"], self.bits, rows * cols)
        c = packing.unpack_codes(blobs["scales"], sb, rows * ng).astype(np.int32).reshape(rows, ng) + cmin
        pair = from_bf16_bits(blobs["aux"].view(np.uint16)).reshape(rows, ns, 2)
        scales, offsets = self._group_params(c, pair[..., 0], pair[..., 1], ng, k)
        return decode.dequantize_grid(codes, scales, offsets, rows, cols, g, self.bits)

    def blob_nbytes(self, rows, cols):
        _, ng, _, ns = self._geometry(cols)
        return {"codes": packing.packed_nbytes(rows * cols, self.bits),
                "scales": packing.packed_nbytes(rows * ng, self.SCALE_BITS[self.bits]), "aux": 4 * rows * ns}


@register
@dataclass(frozen=True)
class KQuant(SuperBlocks):
    """Asymmetric uniform grid with two-level scales *and* offsets (k-quant style).

    Same geometry as ``kquant_nl``: groups of ``g = group_for(cols)`` elements
    (``ng`` per row), super-blocks of ``K = max(1, 256 // g)`` groups of a row (``ns``
    per row). Sub-code width ``sb = SCALE_BITS[bits]``.
    Blobs:
      * ``codes``: ``q`` in ``[0, 2**bits - 1]`` per element, row-major, LSB-first bitstream.
      * ``scales``: unsigned sub-scale codes ``cs`` in ``[0, 2**sb - 1]``, ``(rows, ng)``
        row-major, ``sb`` bits each, LSB-first bitstream.
      * ``zeros``: signed sub-offset codes ``cz`` in ``[-2**(sb-1), 2**(sb-1) - 1]``,
        ``(rows, ng)`` row-major, stored as ``cz + 2**(sb-1)`` in ``sb`` bits, LSB-first.
      * ``aux``: per super-block the bfloat16 pair ``(D, Dz)``, ``(rows, ns, 2)`` row-major.
    Dequantization (float32, exactly as written): ``s = float32(cs) * D``,
    ``z = float32(cz) * Dz``, ``y = float32(q) * s + z``.
    Bytes: ``ceil(rows*cols*bits / 8) + 2 * ceil(rows*ng*sb / 8) + 4 * rows * ns``;
    bpw = bits + 2 sb / g + 32 / (K g): 4.5 at 4 bits g32 (Q4_K's size), 2.625 at
    2 bits g16 (Q2_K's size), 8.375 at 8 bits g64.
    Encoder (not part of the format): least-squares clipping search of each group's
    (scale, offset) (``search.search_affine``), ``Dz = bf16(max |z| / (2**(sb-1) - 1))``
    and ``cz = round(z / Dz)``; ``D = bf16(max s / (2**sb - 1))`` and the scale code
    by rounding (or the better neighbour, ``refine``) given the stored offset; then
    nearest-level coding with the stored parameters (``rounding.quantize_affine``).
    """

    name: ClassVar[str] = "kquant"
    supported_bits: ClassVar[Tuple[int, ...]] = (2, 3, 4, 8)
    #: bits of the sub-scale and sub-offset codes per weight bit width (part of the format).
    SCALE_BITS: ClassVar[Dict[int, int]] = {2: 4, 3: 6, 4: 6, 8: 8}
    #: encoder effort per bit width: (shrink factors, Lloyd steps, refine scale codes).
    SEARCH: ClassVar[Dict[int, Tuple[Tuple[float, ...], int, bool]]] = {
        2: ((1.0, 1.2, 1.4, 1.6), 2, True),
        3: ((1.0, 1.15, 1.3), 2, True),
        4: ((1.0, 1.1, 1.2), 1, True),
        8: ((1.0, 1.05), 1, True),
    }

    def grid(self, x):
        rows, cols = x.shape
        g, ng, k, ns = self._geometry(cols)
        ts, iters, refine = self.SEARCH[self.bits]
        sb = self.SCALE_BITS[self.bits]
        cmax_s, cmax_z = (1 << sb) - 1, (1 << (sb - 1)) - 1
        s, z = search.search_affine(x, g, self.bits, np.asarray(ts, np.float32), iters)
        big_s = self._super(np.maximum(s, 0), k, ns) / np.float32(cmax_s)
        big_z = self._super(np.abs(z), k, ns) / np.float32(cmax_z)
        pair = to_bf16_bits(np.stack([big_s, big_z], axis=2))
        big_s, big_z = from_bf16_bits(pair[..., 0]), from_bf16_bits(pair[..., 1])
        dz = np.repeat(big_z, k, axis=1)[:, :ng]
        with np.errstate(divide="ignore", invalid="ignore"):
            cz = np.where(dz > 0, np.rint(z / dz), 0)
        cz = np.clip(cz, -cmax_z - 1, cmax_z).astype(np.int32)
        zq = cz.astype(np.float32) * dz
        cs = search.choose_affine_scale_codes(x, g, self.bits, s, zq, big_s, k, cmax_s, refine)
        scales = cs.astype(np.float32) * np.repeat(big_s, k, axis=1)[:, :ng]
        return Grid(np.arange(1 << self.bits, dtype=np.float32), scales, zq, g, {
            "scales": packing.pack_codes(cs.astype(np.uint8).reshape(-1), sb),
            "zeros": packing.pack_codes((cz + cmax_z + 1).astype(np.uint8).reshape(-1), sb),
            "aux": as_u8(pair),
        })

    def round_to_grid(self, x, grid):
        return rounding.quantize_affine(x, grid.scales, grid.offsets, self.bits, grid.group)

    @staticmethod
    def _super(v, k, ns):
        """Per super-block maximum of the ``(rows, ng)`` array ``v`` (>= 0)."""
        rows, ng = v.shape
        pad = np.zeros((rows, ns * k), np.float32)
        pad[:, :ng] = v
        return pad.reshape(rows, ns, k).max(axis=2)

    def dequantize(self, blobs, rows, cols):
        g, ng, k, ns = self._geometry(cols)
        sb = self.SCALE_BITS[self.bits]
        codes = packing.unpack_codes(blobs["codes"], self.bits, rows * cols)
        cs = packing.unpack_codes(blobs["scales"], sb, rows * ng).reshape(rows, ng)
        cz = packing.unpack_codes(blobs["zeros"], sb, rows * ng).astype(np.int32).reshape(rows, ng) - (1 << (sb - 1))
        pair = from_bf16_bits(blobs["aux"].view(np.uint16)).reshape(rows, ns, 2)
        scales = cs.astype(np.float32) * np.repeat(pair[..., 0], k, axis=1)[:, :ng]
        zq = cz.astype(np.float32) * np.repeat(pair[..., 1], k, axis=1)[:, :ng]
        return decode.dequantize_affine(codes, scales, zq, rows, cols, g)

    def blob_nbytes(self, rows, cols):
        _, ng, _, ns = self._geometry(cols)
        sub = packing.packed_nbytes(rows * ng, self.SCALE_BITS[self.bits])
        return {"codes": packing.packed_nbytes(rows * cols, self.bits), "scales": sub, "zeros": sub, "aux": 4 * rows * ns}


def _grid_listing() -> str:
    lines = ["", "    Grids (``decode.GRIDS``, float32):"]
    for b, levels in decode.GRIDS.items():
        lines.append(f"      * {b} bits: ``{[float(v) for v in levels]}``.")
    return "\n".join(lines) + "\n"


KQuantNL.__doc__ += _grid_listing()

#: Default encoding per bit width (read by the config/plan), and the group size it
#: was chosen at. Measured by benchmarks/bench_encodings.py on 4096x4096 float32
#: matrices, Gaussian sigma 0.02 / Student-t df 4 with per-row scale spread
#: (relF = ||W - W_hat||_F / ||W||_F; bpw counts every stored byte):
#:   int2: kquant_nl g8   2.625 bpw  0.251 / 0.285  (kquant g16 2.625: 0.270 / 0.303;
#:         affine g64 2.5: 0.450 / 0.591; llama.cpp Q2_K 2.625: 0.296)
#:   int3: kquant_nl g16  3.5 bpw    0.134 / 0.154  (kquant g32 3.5: 0.149 / 0.178;
#:         affine g64 3.5: 0.192 / 0.252; llama.cpp Q3_K 3.44: 0.151)
#:   int4: kquant_nl g16  4.5 bpw    0.0656 / 0.076 (kquant g32 4.5: 0.0733 / 0.088;
#:         affine_opt g64 4.5: 0.0835 / 0.109; affine g64 4.5: 0.0896 / 0.117;
#:         llama.cpp Q4_K 4.5: 0.0713); speeds: benchmarks/results/bench_encodings.json.
#:   int8: affine_opt g64 8.5 bpw    0.0051 / 0.0067 (affine g64 8.5: 0.0053 / 0.0069;
#:         kquant g64 8.375: 0.0053 / 0.0070; Q8_0 8.5: 0.0054 / 0.0073). A symmetric
#:         uniform 8-bit grid with two-level scales (g32, 8.31 bpw: 0.0052 / 0.0072)
#:         loses on skewed heavy-tailed groups, so kquant_nl stops at 4 bits.
#: Real models (int4, whole-model relF): terrain U-Net kquant_nl g16 0.044 vs affine
#: g64 0.052; MiniLM 0.066 vs 0.092; tiny Dream 0.094 vs 0.144.
#: The group size matters: kquant_nl is best at g8/g16 (the sizes above). At the
#: profiles' g32/g64 it stores fewer bits (int4 g64: 4.22 bpw) and is then only about
#: as accurate as affine at 4.5 bpw (worse on tiny Dream: 0.168 vs 0.144).
#:   int5, int6: affine_opt g64 (5.5 / 6.5 bpw), the int8 choice one and two bits down; the
#:         ggml types Q5_K / Q6_K (``target_runtime="gguf"``) are measured in bench_ggml_types.
DEFAULT_ENCODING: Dict[int, str] = {2: "kquant_nl", 3: "kquant_nl", 4: "kquant_nl", 5: "affine_opt", 6: "affine_opt",
                                    8: "affine_opt"}
#: The group each encoding is tuned for at a bit width (its accuracy-per-bit sweet spot,
#: measured above); the config's ``group_size=None`` means "this one". Others: 64.
PREFERRED_GROUP: Dict[Tuple[str, int], int] = {
    ("kquant_nl", 2): 8, ("kquant_nl", 3): 16, ("kquant_nl", 4): 16,
    ("kquant", 2): 16, ("kquant", 3): 32, ("kquant", 4): 32,
}


def preferred_group(name: str, bits: int) -> int:
    """The group size encoding ``name`` is tuned for at ``bits`` bits (a ggml type: its block)."""
    return fixed_group(name) or PREFERRED_GROUP.get((name, bits), 64)


def fixed_group(name: str) -> int:
    """The block length of an encoding whose grouping is part of its format (ggml types), else 0."""
    return getattr(_REGISTRY.get(name), "block", 0)


DEFAULT_GROUP_SIZE: Dict[int, int] = {b: preferred_group(n, b) for b, n in DEFAULT_ENCODING.items()}


def quantize(x: np.ndarray, encoding: Encoding) -> Tuple[Blobs, np.ndarray]:
    """Encode a float32 chunk; see :meth:`Encoding.quantize`."""
    return encoding.quantize(np.ascontiguousarray(x, dtype=np.float32))


def dequantize(blobs: Blobs, encoding: Encoding, rows: int, cols: int) -> np.ndarray:
    """Decode blobs to float32 ``(rows, cols)``; see :meth:`Encoding.dequantize`."""
    return encoding.dequantize(blobs, rows, cols)


def sample_rows(x: np.ndarray, max_elements: int = 1 << 18) -> np.ndarray:
    """Evenly spaced rows of ``x`` (2-D) holding at most about ``max_elements`` values."""
    rows = x.shape[0]
    take = max(1, min(rows, max_elements // max(1, x.shape[1])))
    idx = np.unique(np.linspace(0, rows - 1, take).round().astype(np.int64))
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def choose_group_for_target(
    x: np.ndarray,
    encoding_name: str,
    bits: int,
    target_cosine: float,
    candidates: Tuple[int, ...] = (256, 128, 64, 32),
    max_elements: int = 1 << 18,
) -> Encoding:
    """The cheapest ``encoding_name`` at ``bits`` among ``candidates`` group sizes reaching ``target_cosine``.

    "Cheapest" is fewest stored bytes for ``x``'s shape (the largest group for every
    encoding here; ``0`` = one group per row may be a candidate). Quality is measured
    on an evenly spaced sample of rows (at most ~``max_elements`` values, so this
    costs a few milliseconds whatever the tensor). When no candidate reaches the
    target, the most accurate one is returned. ``x`` is viewed as 2-D ``(rows, -1)``
    with groups along the last axis, as the store does.
    """
    x2 = np.asarray(x).reshape(np.asarray(x).shape[0], -1) if np.ndim(x) > 1 else np.asarray(x).reshape(1, -1)
    sample = sample_rows(x2, max_elements)
    rows, cols = x2.shape
    encs = sorted(
        {get_encoding(encoding_name, bits, int(g)) for g in candidates},
        key=lambda e: (e.nbytes(rows, cols), -e.group_for(cols)),
    )
    best, best_cos = None, -np.inf
    for enc in encs:
        cos = figures(enc.quantize(sample)[1])["cosine"]
        if cos >= target_cosine:
            return enc
        if cos > best_cos:
            best, best_cos = enc, cos
    return best
