"""Weight encodings: each one is a small class registered by name.

An encoding turns a float32 matrix chunk ``(rows, cols)`` (groups along ``cols``)
into named byte blobs and back. The store keeps those blobs in the Parquet columns
named in :data:`BLOB_FIELDS`; the encoding class is the single place that says what
each blob holds (its docstring is the byte layout). The public surface is
:func:`get_encoding`, :func:`quantize` and :func:`dequantize`.

The ``raw`` encoding carries a tensor losslessly in its source dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple, Type

import numpy as np

from . import kernels
from .errors import ConfigurationError

#: Parquet binary columns an encoding may fill, in order.
BLOB_FIELDS = ("codes", "scales", "zeros", "aux")

Blobs = Dict[str, np.ndarray]  # field name -> 1-D uint8 array

_REGISTRY: Dict[str, Type["Encoding"]] = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def encoding_names() -> Tuple[str, ...]:
    return tuple(n for n in _REGISTRY if n != "raw")


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
class Encoding:
    """Base class. Subclasses set ``name``, ``supported_bits`` and implement the three methods."""

    bits: int
    group_size: int

    name: ClassVar[str] = ""
    supported_bits: ClassVar[Tuple[int, ...]] = (2, 4, 8)

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
        raise NotImplementedError

    def dequantize(self, blobs: Blobs, rows: int, cols: int) -> np.ndarray:
        """Decode blobs back to a float32 ``(rows, cols)`` array."""
        raise NotImplementedError

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes stored for a ``(rows, cols)`` chunk: the bpw formula, equal to the blob sizes."""
        raise NotImplementedError

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.nbytes(rows, cols) * 8 / (rows * cols)

    @property
    def label(self) -> str:
        g = "row" if self.group_size <= 0 else str(self.group_size)
        return f"int{self.bits} {self.name} g{g}"


@register
@dataclass(frozen=True)
class AffineMinMax(Encoding):
    """Asymmetric per-group rounding between the group's min and max: ``x ~ q * scale + offset``.

    Blobs: ``codes`` the packed codes (kernels' bitstream); ``scales`` float16
    ``(rows, groups)`` row-major; ``zeros`` float16 offsets (the group minimum),
    same shape. bpw = bits + 32 / group.
    """

    name: ClassVar[str] = "affine"

    def quantize(self, x):
        group = self.group_for(x.shape[1])
        lo, hi = kernels.group_minmax(x, group)
        # Round the parameters to float16 first so the codes fit what is stored.
        scales = ((hi - lo) / ((1 << self.bits) - 1)).astype(np.float16)
        offsets = lo.astype(np.float16)
        codes, stats = kernels.quantize_affine(
            x, scales.astype(np.float32), offsets.astype(np.float32), self.bits, group
        )
        return {
            "codes": kernels.pack_codes(codes, self.bits),
            "scales": as_u8(scales),
            "zeros": as_u8(offsets),
        }, stats

    def dequantize(self, blobs, rows, cols):
        g = self.group_for(cols)
        ng = kernels.groups_per_row(cols, g)
        codes = kernels.unpack_codes(blobs["codes"], self.bits, rows * cols)
        scales = blobs["scales"].view(np.float16).reshape(rows, ng).astype(np.float32)
        offsets = blobs["zeros"].view(np.float16).reshape(rows, ng).astype(np.float32)
        return kernels.dequantize_affine(codes, scales, offsets, rows, cols, g)

    def nbytes(self, rows, cols):
        ng = kernels.groups_per_row(cols, self.group_for(cols))
        return kernels.packed_nbytes(rows * cols, self.bits) + 2 * 2 * rows * ng


def quantize(x: np.ndarray, encoding: Encoding) -> Tuple[Blobs, np.ndarray]:
    """Encode a float32 chunk; see :meth:`Encoding.quantize`."""
    return encoding.quantize(np.ascontiguousarray(x, dtype=np.float32))


def dequantize(blobs: Blobs, encoding: Encoding, rows: int, cols: int) -> np.ndarray:
    """Decode blobs to float32 ``(rows, cols)``; see :meth:`Encoding.dequantize`."""
    return encoding.dequantize(blobs, rows, cols)


def figures(stats: np.ndarray) -> Dict[str, float]:
    """Cosine, relative Frobenius error and SQNR (dB) from fused statistics."""
    xy, xx, yy, ee = (float(v) for v in stats)
    if xx == 0.0:
        cos = 1.0 if yy == 0.0 else 0.0
        return {"cosine": cos, "rel_error": 0.0 if ee == 0.0 else math.inf, "sqnr_db": math.inf if ee == 0 else -math.inf}
    cos = xy / math.sqrt(xx * yy) if yy > 0 else 0.0
    rel = math.sqrt(ee / xx)
    sqnr = math.inf if ee == 0.0 else 10.0 * math.log10(xx / ee)
    return {"cosine": min(cos, 1.0), "rel_error": rel, "sqnr_db": sqnr}
