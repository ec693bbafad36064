"""Kernel-level tests: bit packing, grid rounding, fused statistics, parameter searches."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arrow_quant_v2 import encodings as E
from arrow_quant_v2.kernels import decode, packing, rounding, search


def _pack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """The LSB-first bitstream, bit by bit, exactly as the layout is written down."""
    out = np.zeros((codes.size * bits + 7) // 8, dtype=np.uint8)
    for i, c in enumerate(codes.tolist()):
        for b in range(bits):
            if (c >> b) & 1:
                k = i * bits + b
                out[k // 8] |= 1 << (k % 8)
    return out


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    n = data.draw(st.integers(0, 80))
    codes = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n)), dtype=np.uint8)
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packing.packed_nbytes(n, bits)
    assert np.array_equal(packed, _pack_reference(codes, bits))
    assert np.array_equal(packing.unpack_codes(packed, bits, n), codes)


def test_pack_large_all_widths():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        codes = rng.integers(0, 1 << bits, 10_007).astype(np.uint8)
        packed = packing.pack_codes(codes, bits)
        assert np.array_equal(packed, _pack_reference(codes, bits))
        assert np.array_equal(packing.unpack_codes(packed, bits, codes.size), codes)


def test_grids_are_the_format():
    # The grids are part of the on-disk format: changing them breaks stored models.
    assert decode.GRID2.tolist() == np.array([-0.6779, -0.1266, 0.3511, 1.0], np.float32).tolist()
    assert decode.GRID3.tolist() == np.array(
        [-0.8593, -0.5181, -0.268, -0.0566, 0.1423, 0.3495, 0.5986, 1.0], np.float32).tolist()
    assert decode.GRID4.tolist() == np.array(
        [-0.9156, -0.7382, -0.5902, -0.4682, -0.3624, -0.2654, -0.1694, -0.0723,
         0.0259, 0.1259, 0.2293, 0.3389, 0.4563, 0.5877, 0.7484, 1.0], np.float32).tolist()
    assert set(decode.GRIDS) == {2, 3, 4}
    for b, g in decode.GRIDS.items():
        assert g.dtype == np.float32 and g.size == 1 << b and np.all(np.diff(g) > 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_grid_picks_nearest_level_and_fuses_stats(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((5, 67)).astype(np.float32)
    group = 16
    ng = packing.groups_per_row(67, group)
    scales = rng.uniform(-0.5, 0.5, (5, ng)).astype(np.float32)
    scales[0, 0] = 0.0  # a zero scale decodes to the offset, without NaN
    offsets = rng.uniform(-0.2, 0.2, (5, ng)).astype(np.float32)
    codes, stats = rounding.quantize_grid(x, scales, offsets, group, bits)
    y = decode.dequantize_grid(codes, scales, offsets, 5, 67, group, bits)
    levels = decode.GRIDS[bits]
    s_el = np.repeat(scales, group, axis=1)[:, :67]
    o_el = np.repeat(offsets, group, axis=1)[:, :67]
    cand = levels[None, None, :] * s_el[..., None] + o_el[..., None]  # every grid point of the group
    best = np.abs(x[..., None] - cand).min(axis=2)
    assert np.all(np.abs(x - y) <= best + 1e-6 * np.abs(x) + 1e-6)
    assert np.all(y[0, :group] == offsets[0, 0])
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    ref = [(xd * yd).sum(), (xd * xd).sum(), (yd * yd).sum(), ((xd - yd) ** 2).sum()]
    np.testing.assert_allclose(stats, ref, rtol=1e-9)


def test_span_means_and_subtract():
    x = np.arange(30, dtype=np.float32).reshape(2, 15)
    mu = rounding.span_means(x, 4)
    np.testing.assert_allclose(mu, [[1.5, 5.5, 9.5, 13.0], [16.5, 20.5, 24.5, 28.0]])
    xc = rounding.subtract_spans(x, mu, 4)
    np.testing.assert_array_equal(xc, x - np.repeat(mu, 4, axis=1)[:, :15])
    rng = np.random.default_rng(0)
    for shape, span in (((3, 1000), 256), ((2, 7), 4), ((1, 300), 512)):
        x = (rng.standard_normal(shape) * 0.02 + 0.01).astype(np.float32)
        xc, m = rounding.center_spans(x, span)
        m_ref = E.from_bf16_bits(E.to_bf16_bits(rounding.span_means(x, span)))
        np.testing.assert_array_equal(m, m_ref)
        np.testing.assert_array_equal(xc, rounding.subtract_spans(x, m_ref, span))


def test_quantize_affine_stats_match_dequantized():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50)).astype(np.float32)
    lo, hi = rounding.group_minmax(x, 16)
    s = (hi - lo) / 15
    codes, stats = rounding.quantize_affine(x, s, lo, 4, 16)
    y = decode.dequantize_affine(codes, s, lo, 3, 50, 16)
    np.testing.assert_allclose(stats, rounding.error_stats(x, y), rtol=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_search_grid_scales_beats_covering_scale(bits):
    """The searched scale is at least as good as the min-max covering one, group by group."""
    rng = np.random.default_rng(7)
    x = (rng.standard_t(4, (8, 256)) * 0.02).astype(np.float32)
    x[0, :32] = 0.0  # a zero group
    group = 32
    d = search.search_grid_scales(x, group, bits, np.array([1.0, 1.1], np.float32), 1)
    assert d.shape == (8, 8) and np.all(np.isfinite(d))
    assert d[0, 0] == 0
    levels = decode.GRIDS[bits]
    lo, hi = rounding.group_minmax(x, group)
    cover = np.maximum(hi / levels[-1], -lo / -levels[0]).astype(np.float32)

    def sse(scales):
        zero = np.zeros(scales.shape, np.float32)
        codes, stats = rounding.quantize_grid(x, scales.astype(np.float32), zero, group, bits)
        y = decode.dequantize_grid(codes, scales.astype(np.float32), zero, 8, 256, group, bits)
        return ((x - y).astype(np.float64).reshape(8, 8, group) ** 2).sum(axis=2)

    assert np.all(sse(d) <= sse(cover) * (1 + 1e-5) + 1e-12)


def test_choose_scale_codes_in_range_and_refine_not_worse():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 128)) * 0.02).astype(np.float32)
    group, k = 8, 16
    d = search.search_grid_scales(x, group, 2, np.array([1.0], np.float32), 0)
    big = (np.abs(d).reshape(4, 1, 16).max(axis=2) / 7).astype(np.float32)
    plain = search.choose_scale_codes(x, group, 2, d, big, k, -8, 7, False)
    refined = search.choose_scale_codes(x, group, 2, d, big, k, -8, 7, True)
    for c in (plain, refined):
        assert c.min() >= -8 and c.max() <= 7

    def err(c):
        s = (c.astype(np.float32) * np.repeat(big, k, axis=1)).astype(np.float32)
        return rounding.quantize_grid(x, s, np.zeros_like(s), group, 2)[1][3]

    assert err(refined) <= err(plain) * (1 + 1e-9)


def test_search_affine_not_worse_than_minmax():
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, (16, 512)) * 0.02).astype(np.float32)
    x[1, :64] = 0.25  # a constant group: scale 0, offset the value
    for bits in (2, 4, 8):
        s, z = search.search_affine(x, 64, bits, np.array([1.0, 1.2, 1.4], np.float32), 2)
        assert s[1, 0] == 0 and z[1, 0] == np.float32(0.25)
        lo, hi = rounding.group_minmax(x, 64)
        e_opt = rounding.quantize_affine(x, s, z, bits, 64)[1][3]
        e_mm = rounding.quantize_affine(x, (hi - lo) / ((1 << bits) - 1), lo, bits, 64)[1][3]
        assert e_opt < e_mm
