"""ggml block types: bytes decode exactly as gguf-py's reference, sizes as ggml's, and the
encoder search is never worse than plain round-to-nearest on the same grid."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # a dev dependency: the reference decoder
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from arrow_quant_v2 import encodings as E  # noqa: E402
from arrow_quant_v2.kernels import ggml_decode as G  # noqa: E402
from arrow_quant_v2.errors import ConfigurationError, ValidationError  # noqa: E402
from arrow_quant_v2.ggml_types import GGUF_TYPE_FOR_BITS, ROW_FALLBACK, GGMLEncoding, gguf_type_for  # noqa: E402

#: this library's ggml encodings (other test modules may register stand-ins with a ggml_type too)
GGML = sorted(n for n, c in E._REGISTRY.items() if issubclass(c, GGMLEncoding))


def _enc(name):
    cls = E._REGISTRY[name]
    return E.get_encoding(name, cls.supported_bits[0], 0)


def _matrices(rows=4, cols=512):
    """Random and adversarial NaN-free matrices (name -> float32 (rows, cols))."""
    rng = np.random.default_rng(7)
    g = rng.standard_normal((rows, cols))
    spiky = g * 1e-3
    spiky[1, 5] = 40.0
    spiky[2, 300] = -25.0
    halves = g.copy()
    halves[:, : cols // 2] *= 1e-4  # one super-block tiny, the next ordinary
    out = {
        "gaussian": g * 0.02,
        "student_t_row_spread": rng.standard_t(3, (rows, cols)) * 0.02 * np.exp(rng.normal(0, 1, (rows, 1))),
        "zeros": np.zeros((rows, cols)),
        "constant_rows": np.repeat(rng.uniform(-3, 3, (rows, 1)), cols, axis=1),
        "positive_only": np.abs(g) + 0.5,
        "negative_only": -np.abs(g) - 0.5,
        "huge": g * 3e3,
        "tiny": g * 1e-7,  # scales fall to float16 subnormals or zero
        "spiky": spiky,
        "mixed_magnitudes": halves,
        "two_levels": np.where(g > 0, 0.3, -0.1),
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


MATRICES = _matrices()


@pytest.mark.parametrize("name", GGML)
@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_bytes_decode_exactly_as_gguf_reference(name, kind):
    x = MATRICES[kind]
    rows, cols = x.shape
    enc = _enc(name)
    blobs, stats = E.quantize(x, enc)
    assert set(blobs) == {"codes"}  # the codes blob is the GGUF tensor data; nothing else
    codes = blobs["codes"]
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[enc.ggml_type]]
    assert (enc.block, enc.type_size) == (block, type_size)
    assert codes.size == enc.nbytes(rows, cols) == rows * cols // block * type_size
    ours = E.dequantize({"codes": np.frombuffer(codes.tobytes(), np.uint8)}, enc, rows, cols)
    ref = gguf.quants.dequantize(codes.reshape(rows, -1), GGMLQuantizationType[enc.ggml_type])
    assert ref.shape == (rows, cols)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))  # bit for bit
    assert np.all(np.isfinite(ours))
    xd, yd = x.astype(np.float64), ours.astype(np.float64)
    np.testing.assert_allclose(stats, [(xd * yd).sum(), (xd * xd).sum(), (yd * yd).sum(), ((xd - yd) ** 2).sum()],
                               rtol=1e-6, atol=1e-12 * max(1.0, (xd * xd).sum()))


@pytest.mark.parametrize("name", GGML)
def test_rows_in_order_and_chunks_concatenate(name):
    """A chunk's bytes are its rows' blocks in order: encoding rows apart gives the same bytes."""
    x = MATRICES["student_t_row_spread"]
    enc = _enc(name)
    whole = E.quantize(x, enc)[0]["codes"]
    parts = np.concatenate([E.quantize(x[r:r + 1], enc)[0]["codes"] for r in range(x.shape[0])])
    np.testing.assert_array_equal(whole, parts)


def _f16(v):
    return np.clip(np.asarray(v, np.float64), -65504, 65504).astype(np.float16).astype(np.float32)


def _rtn_affine(x, sub, nmax, smax):
    """Plain two-level rounding (ggml k-quant style, no search): min-max sub-block ranges,
    super-block scales max/smax, nearest sub-codes, nearest codes."""
    b = x.reshape(-1, 256 // sub, sub).astype(np.float32)
    lo = np.minimum(b.min(-1), 0)
    s = (b.max(-1) - lo) / nmax
    d = _f16(s.max(-1, keepdims=True) / smax)
    dm = _f16((-lo).max(-1, keepdims=True) / smax)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.clip(np.rint(s / d), 0, smax), 0).astype(np.float32)
        m = np.where(dm > 0, np.clip(np.rint(-lo / dm), 0, smax), 0).astype(np.float32)
        scale, off = (d * sc)[..., None], (dm * m)[..., None]
        q = np.where(scale > 0, np.clip(np.rint((b + off) / scale), 0, nmax), 0)
    return (scale * q - off).reshape(x.shape)


def _rtn_symmetric(x, sub, qmin, smin, smax):
    b = x.reshape(-1, 256 // sub, sub).astype(np.float32)
    ext = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    s = ext / qmin
    big = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)
    d = _f16(big / smin)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d != 0, np.clip(np.rint(s / d), smin, smax), 0).astype(np.float32)
        scale = (d * sc)[..., None]
        q = np.where(scale != 0, np.clip(np.rint(b / scale), qmin, -qmin - 1), 0)
    return (scale * q).reshape(x.shape)


def _rtn_iq4_nl(x):
    b = x.reshape(-1, 32).astype(np.float32)
    grid = G.IQ4NL_GRID.astype(np.float32)
    ext = np.take_along_axis(b, np.abs(b).argmax(-1)[:, None], -1)
    d = _f16(ext / grid[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d != 0, b / d, 0)
    idx = np.abs(t[..., None] - grid).argmin(-1)
    return (d * grid[idx]).reshape(x.shape)


def _rtn_iq4_xs(x):
    """Plain two-level rounding on IQ4_XS: each sub-block's extreme on the grid's end, the
    super-block scale the largest of those over -32, nearest sub-scales, nearest levels."""
    b = x.reshape(-1, 8, 32).astype(np.float64)
    grid = G.IQ4NL_GRID.astype(np.float64)
    s = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0] / grid[0]
    big = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)
    d = _f16(big / -32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(d != 0, np.clip(np.rint(s / d), -32, 31), 0)
        scale = (d * ls).astype(np.float32).astype(np.float64)[..., None]
        t = np.where(scale != 0, b / scale, 0)
    return (scale * grid[np.abs(t[..., None] - grid).argmin(-1)]).reshape(x.shape)


def _plain_rounding(name, x):
    """Dequantized plain round-to-nearest on ``name``'s grid (gguf-py's reference quantizer
    where it has one: Q8_0, Q4_0, Q5_0, Q5_1)."""
    cls = E._REGISTRY[name]
    qt = GGMLQuantizationType[cls.ggml_type]
    if name in ("q8_0", "q4_0", "q5_0", "q5_1"):
        return gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
    if name == "iq4_nl":
        return _rtn_iq4_nl(x)
    if name == "iq4_xs":
        return _rtn_iq4_xs(x)
    if name in ("q4_k", "q5_k", "q2_k"):
        return _rtn_affine(x, cls.SUB, cls.NMAX, cls.SMAX)
    return _rtn_symmetric(x, cls.SUB, cls.QMIN, cls.SMIN, -cls.SMIN - 1)


@pytest.mark.parametrize("name", GGML)
@pytest.mark.parametrize("kind", ["gaussian", "student_t_row_spread", "spiky", "mixed_magnitudes", "positive_only"])
def test_never_worse_than_plain_rounding(name, kind):
    x = MATRICES[kind]
    enc = _enc(name)
    ours = E.dequantize(E.quantize(x, enc)[0], enc, *x.shape).astype(np.float64)
    plain = _plain_rounding(name, x).astype(np.float64)
    e_ours, e_plain = np.sum((x - ours) ** 2), np.sum((x - plain) ** 2)
    assert e_ours <= e_plain * (1 + 1e-6) + 1e-30, (e_ours, e_plain)
    if kind == "gaussian":
        assert e_ours < e_plain  # and the search finds better on ordinary weights


def test_row_length_must_fit_the_block():
    x = np.ones((2, 100), np.float32)
    for name in GGML:
        enc = _enc(name)
        assert not enc.fits(100) and enc.fits(enc.block * 3)
        with pytest.raises(ConfigurationError, match="multiple of"):
            enc.quantize(x)
        with pytest.raises(ConfigurationError, match="multiple of"):
            enc.nbytes(2, 100)


def test_truncated_codes_are_a_typed_error_not_a_crash():
    enc = _enc("q4_k")
    blobs, _ = E.quantize(MATRICES["gaussian"], enc)
    with pytest.raises(ValidationError, match="bytes"):
        enc.dequantize({"codes": blobs["codes"][:-1]}, 4, 512)
    with pytest.raises(ValidationError, match="no codes"):
        enc.dequantize({}, 4, 512)


def test_gguf_mapping_and_llama_cpp_fallbacks():
    assert GGUF_TYPE_FOR_BITS == {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0"}
    for bits, name in GGUF_TYPE_FOR_BITS.items():
        assert bits in E._REGISTRY[name].supported_bits
        assert gguf_type_for(bits, 4096) == (name, "")
    for bits in (2, 3):
        name, why = gguf_type_for(bits, 96)
        assert name == "iq4_nl" and "not a multiple of 256" in why
    assert gguf_type_for(4, 96)[0] == "q5_0"
    assert gguf_type_for(5, 96)[0] == "q5_1"
    assert gguf_type_for(6, 96)[0] == "q8_0"
    assert gguf_type_for(8, 96) == ("q8_0", "")
    for bits in GGUF_TYPE_FOR_BITS:
        name, why = gguf_type_for(bits, 100)
        assert name is None and "100" in why
    assert set(ROW_FALLBACK.values()) <= set(GGML)


def test_float16_helpers_match_numpy():
    import numba

    @numba.njit
    def bits_of(v):
        out = np.empty(v.size, np.int64)
        for i in range(v.size):
            out[i] = G.f16_bits(v[i])
        return out

    @numba.njit
    def values_of(h):
        out = np.empty(h.size, np.float32)
        for i in range(h.size):
            out[i] = G.f16_value(h[i])
        return out

    h = np.arange(1 << 16, dtype=np.uint16)
    ref = h.view(np.float16).astype(np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(values_of(h)[finite].view(np.uint32), ref[finite].view(np.uint32))
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 5, 20000)).astype(np.float32)
    v = np.concatenate([v[np.abs(v) < 65504], ref[finite], np.float32([0.0, -0.0, 65504.0])])
    np.testing.assert_array_equal(bits_of(v), v.astype(np.float16).view(np.uint16))
    assert bits_of(np.float32([1e6, -1e6])).tolist() == [0x7BFF, 0xFBFF]  # saturates, never inf


# -- target_runtime="gguf": plans, fallbacks, budgets, stores ---------------------------------


def _gguf_model(folder):
    from badfiles import make_model, tensor

    rng = np.random.default_rng(3)
    return make_model(folder, [
        tensor("blocks.0.attn.weight", "F32", (64, 512), rng.standard_normal((64, 512)) * 0.02),
        tensor("blocks.0.conv.weight", "F32", (32, 16, 4, 4), seed=1),  # rows of 256
        tensor("blocks.0.mlp.weight", "BF16", (48, 96), seed=2),  # 96: a 32-block type only
        tensor("blocks.0.odd.weight", "F16", (40, 100), seed=3),  # 100: no ggml block fits
        tensor("blocks.0.norm.weight", "F32", (512,), seed=4),
    ])


def _check_gguf_store(store, qm):
    """Every quantized tensor is a ggml type whose concatenated codes gguf-py decodes to the store's values."""
    for name in qm:
        e = qm.tensors[name]
        if e.encoding == "raw":
            continue
        cls = E._REGISTRY[e.encoding]
        assert cls.ggml_type, name
        data = np.concatenate([np.frombuffer(c["codes"], np.uint8) for c in qm.chunks(name)])
        rows = e.shape[0]
        ref = gguf.quants.dequantize(data.reshape(rows, -1), GGMLQuantizationType[cls.ggml_type])
        np.testing.assert_array_equal(qm.dequantize(name).reshape(rows, -1).view(np.uint32), ref.view(np.uint32))


def test_target_runtime_gguf_stores_only_ggml_types_with_llama_cpp_fallbacks(tmp_path):
    from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
    from arrow_quant_v2.engine import quantize_model

    model = _gguf_model(tmp_path / "m")
    config = DiffusionQuantConfig(bit_width=4, target_runtime="gguf", lossless_below=0, min_accuracy=0.0,
                                  protect_embeddings=False, bit_rules={"blocks.0.conv.*": 6})
    quantize_model(model, tmp_path / "q", config)
    qm = load_quantized(tmp_path / "q")
    got = {n: (e.encoding, e.bits, e.reason) for n, e in qm.tensors.items()}
    assert got["blocks.0.attn.weight"][:2] == ("q4_k", 4)
    assert got["blocks.0.conv.weight"][:2] == ("q6_k", 6) and "rule" in got["blocks.0.conv.weight"][2]
    assert got["blocks.0.mlp.weight"][:2] == ("q5_0", 5)
    assert "row length 96 is not a multiple of 256" in got["blocks.0.mlp.weight"][2]
    assert got["blocks.0.odd.weight"][0] == "raw" and "row length 100" in got["blocks.0.odd.weight"][2]
    assert got["blocks.0.norm.weight"][0] == "raw"
    _check_gguf_store(tmp_path / "q", qm)


def test_gguf_accuracy_fallback_walks_the_ggml_types(tmp_path):
    from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
    from arrow_quant_v2.engine import quantize_model

    model = _gguf_model(tmp_path / "m")
    config = DiffusionQuantConfig(bit_width=2, target_runtime="gguf", lossless_below=0, min_accuracy=0.999,
                                  protect_embeddings=False)
    result = quantize_model(model, tmp_path / "q", config)
    qm = load_quantized(tmp_path / "q")
    attn = qm.tensors["blocks.0.attn.weight"]
    # cos ~ 1 - relF**2 / 2: Q2_K, Q3_K, Q4_K (relF >= 0.07) miss 0.999; Q5_K (relF ~0.035) reaches it.
    assert (attn.encoding, attn.bits) == ("q5_k", 5) and "fallback from int4" in attn.reason
    steps = [(f["from_bits"], f["to_bits"]) for f in result["fallbacks"] if f["tensor"] == "blocks.0.attn.weight"]
    assert steps == [(2, 3), (3, 4), (4, 5)]
    _check_gguf_store(tmp_path / "q", qm)


def test_gguf_size_budget_allocates_over_ggml_types(tmp_path):
    from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
    from arrow_quant_v2.engine import quantize_model

    model = _gguf_model(tmp_path / "m")
    config = DiffusionQuantConfig(target_runtime="gguf", lossless_below=0, min_accuracy=0.0, protect_embeddings=False,
                                  target_model_size_mb=0.05)
    quantize_model(model, tmp_path / "q", config)
    qm = load_quantized(tmp_path / "q")
    assert {e.encoding for e in qm.tensors.values()} <= set(GGML) | {"raw"}
    assert any(e.encoding != "raw" for e in qm.tensors.values())
    _check_gguf_store(tmp_path / "q", qm)


def test_cli_target_runtime_gguf(tmp_path):
    from arrow_quant_v2 import load_quantized
    from arrow_quant_v2.cli import ExitCode, main

    model = _gguf_model(tmp_path / "m")
    out = tmp_path / "q"
    assert main(["quantize", str(model), str(out), "--profile", "local", "--target-runtime", "gguf", "-q"]) == ExitCode.OK
    qm = load_quantized(out)
    assert qm.tensors["blocks.0.attn.weight"].encoding == "q4_k"
    with pytest.raises(SystemExit) as info:  # argparse: not one of the choices
        main(["quantize", str(model), str(tmp_path / "r"), "--target-runtime", "onnx", "-q"])
    assert info.value.code == ExitCode.USAGE


def test_iq4_xs_is_a_choice_under_gguf_and_a_finer_budget_step(tmp_path):
    """IQ4_XS (4.25 bpw) is never int4's default, but ``encoding="iq4_xs"`` stores it (rows that
    256 does not divide get llama.cpp's fallback), and a size budget weighs it between Q3_K and Q4_K."""
    from arrow_quant_v2 import DiffusionQuantConfig, load_quantized, policy
    from arrow_quant_v2.budget import measure_model
    from arrow_quant_v2.engine import quantize_model
    from arrow_quant_v2.source import open_model

    model = _gguf_model(tmp_path / "m")
    config = DiffusionQuantConfig(bit_width=4, target_runtime="gguf", encoding="iq4_xs", lossless_below=0,
                                  min_accuracy=0.0, protect_embeddings=False)
    quantize_model(model, tmp_path / "q", config)
    qm = load_quantized(tmp_path / "q")
    attn = qm.tensors["blocks.0.attn.weight"]
    assert (attn.encoding, attn.bits, attn.bits_per_weight) == ("iq4_xs", 4, 4.25)
    assert qm.tensors["blocks.0.mlp.weight"].encoding == "q5_0"  # rows of 96
    _check_gguf_store(tmp_path / "q", qm)
    import json

    reader = gguf.GGUFReader(qm.to_gguf(tmp_path / "m.gguf")["path"])  # and it ships as such
    record = json.loads(reader.get_field("arrowquant.tensors").contents())
    t = next(t for t in reader.tensors if record[t.name]["source"] == "blocks.0.attn.weight")
    assert t.tensor_type == GGMLQuantizationType.IQ4_XS
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), qm.dequantize("blocks.0.attn.weight"))

    gguf_config = DiffusionQuantConfig(target_runtime="gguf", min_accuracy=0.0, protect_embeddings=False,
                                       lossless_below=0)
    names = [[c.encoding for c in step] for step in policy.steps(gguf_config, (3, 4, 5), 512)]
    assert names == [["q3_k"], ["q4_k"], ["iq4_xs"], ["q5_k"]]
    assert ["iq4_xs"] not in [[c.encoding for c in s] for s in policy.steps(gguf_config, (4,), 96)]
    assert ["iq4_xs"] not in [[c.encoding for c in s] for s in policy.steps(DiffusionQuantConfig(), (4,), 512)]
    options = {o.encoding: o for o in measure_model(open_model(model), gguf_config)["blocks.0.attn.weight"].options}
    q3, xs, q4 = options["q3_k"], options["iq4_xs"], options["q4_k"]
    assert q3.blob_bytes < xs.blob_bytes < q4.blob_bytes and q3.rel_error2 > xs.rel_error2 > q4.rel_error2
