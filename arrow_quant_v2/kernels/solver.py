"""Error-compensated rounding (GPTQ-class) on an encoding's fixed grid.

Plain rounding picks each weight's nearest grid value independently; what the network
feels is the layer's output error ``||X W^T - X What^T||^2 = tr(dW H dW^T)`` with
``H = X^T X`` the second moment of the layer's inputs (:mod:`arrow_quant_v2.calibration`
collects it from the model's own graph). Following GPTQ (Frantar et al., 2022), the
input columns are rounded one at a time, each to the level nearest its best value given the
columns rounded before it (the others free to follow). With the damped ``H = M^T M``, ``M``
lower triangular, that value is ``w_i + sum_{j<i} M_ij d_j / M_ii`` with ``d_j = w_j - q_j``
the earlier columns' rounding errors (Babai's nearest plane; the same codes as GPTQ's update
through the Cholesky factor of ``H^-1``, without inverting ``H``: one Cholesky factorisation
of the reversed ``H`` gives ``M``). Columns go in blocks of :data:`BLOCK`: inside a block
each error is pushed onto the block's later columns at once (numba), the rest of the matrix
gets one matrix product per block (lazy batch update). ``act_order`` rounds the columns with the
largest input energy first.

The grid is fixed before any code is chosen (the encoder's scales, offsets and
sub-scales, chosen as without calibration, see :class:`arrow_quant_v2.encodings.Grid`),
so every encoding that exposes its grid gets compensated codes in exactly its own byte
layout. The solver keeps the plain codes whenever they give the lower output error on
``H``, so it is never worse on the calibration inputs than rounding. Block formats whose
blocks run along the inputs (ggml's) can instead have each block's grid fitted when the sweep
reaches it (:func:`solve_fitting_blocks`), on the weights as compensated so far.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

#: Columns rounded with immediate updates before one lazy update of the rest.
BLOCK = 128
#: Damping added to H's diagonal, as a fraction of its mean diagonal (GPTQ's 1%).
DAMP = 0.01


@njit(cache=True, nogil=True, fastmath=False)  # serial, like every kernel (see kernels' docstring)
def _round_block(w, work, n, s, z, levels, i1, i2, codes, err):
    """Round columns ``i1..i2`` with compensation inside the block.

    ``w`` the weights (rows, cols); ``work`` their compensated values so far (updated in
    place for the block's later columns); ``n`` the strictly lower ``M_ji / M_jj``;
    ``s``/``z`` the per-element scale and offset; ``codes`` receives the level index,
    ``err`` (rows, i2 - i1) the rounding errors ``w - q`` for the lazy update after ``i2``.
    """
    rows = w.shape[0]
    nl = levels.shape[0]
    for r in range(rows):
        for i in range(i1, i2):
            x = work[r, i]
            sc = s[r, i]
            of = z[r, i]
            best = 0
            best_d = np.inf
            for k in range(nl):
                v = np.float64(np.float32(levels[k] * sc + of))
                d = abs(v - x)
                if d < best_d:
                    best_d = d
                    best = k
            codes[r, i] = best
            e = w[r, i] - np.float64(np.float32(levels[best] * sc + of))
            err[r, i - i1] = e
            for j in range(i + 1, i2):
                work[r, j] += n[j, i] * e


def lower_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """``N = M / diag(M)`` (row ``j`` divided by ``M_jj``), strictly lower, with
    ``M^T M = H + damp * mean(diag H) * I`` and ``M`` lower triangular; unused inputs get a unit diagonal.

    ``M = J chol(J H J)^T J`` (``J`` the reversal): one Cholesky factorisation, no inverse."""
    h = np.array(h, dtype=np.float64)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(diag[~dead])) if (~dead).any() else damp
    m = np.linalg.cholesky(h[::-1, ::-1]).T[::-1, ::-1]
    n = m / np.diagonal(m)[:, None]
    np.fill_diagonal(n, 0.0)
    return np.ascontiguousarray(n)


@dataclass(frozen=True)
class Prepared:
    """What the solver needs of one layer's H, computed once per tensor (every chunk of its rows shares it)."""

    h: np.ndarray       # H, float64
    order: np.ndarray   # the column order (largest input energy first with act_order)
    n: np.ndarray       # lower_factor of H in that order


def prepare(h: np.ndarray, *, act_order: bool = True, damp: float = DAMP) -> Prepared:
    h = np.asarray(h, np.float64)
    order = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(len(h))
    return Prepared(h, order, lower_factor(h[np.ix_(order, order)], damp))


def output_error(dw: np.ndarray, h: np.ndarray) -> float:
    """``tr(dW H dW^T)``: the layer's summed squared output error on the calibration inputs."""
    dw = np.asarray(dw, np.float64)
    return float(np.sum((dw @ h) * dw))


@dataclass(frozen=True)
class Solution:
    codes: np.ndarray        # (rows, cols) uint8 level indices
    error: float             # output error of the kept codes
    plain_error: float       # output error of nearest-level rounding
    compensated: bool        # False when plain rounding was kept (it was not worse)


def solve(w: np.ndarray, h, levels: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
          plain_codes: np.ndarray, *, act_order: bool = True, damp: float = DAMP, block: int = BLOCK) -> Solution:
    """Error-compensated codes for ``w`` (rows = outputs, cols = inputs) on a fixed grid.

    ``h`` (cols, cols) the inputs' second moment, or its :func:`prepare`-d form (then
    ``act_order``/``damp`` are those it was prepared with); ``levels`` the grid's sorted levels;
    ``scales``/``offsets`` per element ``(rows, cols)`` (value = ``levels[q] * s + o``);
    ``plain_codes`` (rows, cols) the nearest-level codes, kept if they do better.
    """
    w = np.asarray(w, np.float64)
    rows, cols = w.shape
    prep = h if isinstance(h, Prepared) else prepare(h, act_order=act_order, damp=damp)
    h, order, n = prep.h, prep.order, prep.n
    w_ord = np.ascontiguousarray(w[:, order])
    work = w_ord.copy()
    s = np.ascontiguousarray(scales[:, order], dtype=np.float32)
    z = np.ascontiguousarray(offsets[:, order], dtype=np.float32)
    lv = np.ascontiguousarray(levels, dtype=np.float32)
    codes = np.empty((rows, cols), np.uint8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = np.empty((rows, i2 - i1), np.float64)
        _round_block(w_ord, work, n, s, z, lv, i1, i2, codes, err)
        if i2 < cols:
            work[:, i2:] += err @ n[i2:, i1:i2].T
    out = np.empty_like(codes)
    out[:, order] = codes
    return best_of(w, h, levels, scales, offsets, out, plain_codes)


def best_of(w, h, levels, scales, offsets, codes, plain_codes) -> Solution:
    """The better of two code sets on ``h`` (ties keep the plain ones)."""
    lv = np.asarray(levels, np.float32)
    err = output_error(lv[codes] * scales + offsets - w, h)
    plain = output_error(lv[plain_codes] * scales + offsets - w, h)
    if err < plain:
        return Solution(codes, err, plain, True)
    return Solution(np.asarray(plain_codes, np.uint8), plain, plain, False)


def solve_fitting_blocks(w: np.ndarray, prep: Prepared, width: int, levels: np.ndarray, fit) -> np.ndarray:
    """Error-compensated codes where each block of ``width`` columns gets its grid only when the
    sweep reaches it: ``fit(block)`` (the block's weights as compensated so far, float64
    ``(rows, width)``) returns its per-element ``(scales, offsets)``, so the grid follows the
    weights the codes will stand for (GPTQ's own group handling). ``prep`` in natural column
    order (``act_order=False``): a block's columns must be contiguous. Returns the codes."""
    if not np.array_equal(prep.order, np.arange(len(prep.order))):
        raise ValueError("fitted blocks need the columns in their own order (prepare(act_order=False))")
    w = np.array(w, dtype=np.float64, order="C")
    work = w.copy()
    rows, cols = work.shape
    s = np.empty((rows, cols), np.float32)
    z = np.empty((rows, cols), np.float32)
    lv = np.ascontiguousarray(levels, dtype=np.float32)
    codes = np.empty((rows, cols), np.uint8)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        s[:, i1:i2], z[:, i1:i2] = fit(work[:, i1:i2])
        err = np.empty((rows, i2 - i1), np.float64)
        _round_block(w, work, prep.n, s, z, lv, i1, i2, codes, err)
        if i2 < cols:
            work[:, i2:] += err @ prep.n[i2:, i1:i2].T
    return codes
