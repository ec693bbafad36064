"""The format's decoders: float32 values from codes and stored parameters, exactly as the
rounding kernels computed them. With :mod:`.packing` this is all a reader runs."""
from __future__ import annotations

import numpy as np
from numba import njit

from . import JIT

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


def midpoints(grid: np.ndarray) -> np.ndarray:
    """The rounding thresholds of a grid: code ``q`` is the number of midpoints below the value."""
    return ((grid[1:] + grid[:-1]) / 2).astype(np.float32)


@njit(**JIT)
def dequantize_affine(codes, scales, offsets, rows, cols, group):
    """``y = q * scale + offset`` per group, in float32 exactly as ``quantize_affine``."""
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

