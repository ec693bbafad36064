"""Calibration through the model's graph and error-compensated rounding on an encoding's grid."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
from arrow_quant_v2 import calibration, e2e, encodings
from arrow_quant_v2.kernels import solver
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.errors import ConfigurationError

GRIDS = [("kquant_nl", 2, 8), ("kquant_nl", 4, 16), ("affine_opt", 4, 64), ("affine", 2, 32), ("kquant", 2, 16),
         ("symmetric", 4, 32)]


def _layer(seed: int, rows: int = 48, cols: int = 96):
    """A layer with correlated, uneven inputs (as real activations are) and its input second moment."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.diag(rng.uniform(0.2, 3.0, cols))
    x = (rng.standard_normal((2048, cols)) @ mix).astype(np.float32)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    return x, w, x.T.astype(np.float64) @ x


@pytest.mark.parametrize("name,bits,group", GRIDS)
def test_compensated_codes_lower_the_output_error_on_the_same_grid(name, bits, group):
    x, w, h = _layer(1)
    enc = encodings.get_encoding(name, bits, group)
    grid = enc.grid(w)
    plain, _ = enc.round_to_grid(w, grid)
    scales, offsets = grid.per_element(w.shape[1])
    found = solver.solve(w, h, grid.levels, scales, offsets, plain.reshape(w.shape))
    blobs, stats = enc.quantize_codes(w, grid, found.codes)
    plain_blobs = enc.pack(grid, plain)
    # the same grid: every parameter blob is byte-identical, only the codes differ
    assert {k: v.tobytes() for k, v in blobs.items() if k != "codes"} == \
        {k: v.tobytes() for k, v in plain_blobs.items() if k != "codes"}
    out = {k: np.linalg.norm(x @ w.T - x @ enc.dequantize(b, *w.shape).T) for k, b in
           (("plain", plain_blobs), ("solved", blobs))}
    assert found.compensated and out["solved"] < 0.95 * out["plain"], out
    assert encodings.figures(stats)["cosine"] == pytest.approx(
        encodings.figures(np.array(_stats(w, enc.dequantize(blobs, *w.shape))))["cosine"], abs=1e-9)


def _stats(x, y):
    x, y = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    return [x @ y, x @ x, y @ y, ((x - y) ** 2).sum()]


def test_the_solver_never_returns_a_higher_output_error_than_rounding():
    """Inputs that are exactly uncorrelated give compensation nothing to gain: the plain codes come back."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    h = np.eye(64)
    enc = encodings.get_encoding("kquant_nl", 2, 8)
    for seed in range(4):
        grid = enc.grid(w)
        plain, _ = enc.round_to_grid(w, grid)
        s, o = grid.per_element(64)
        hh = h if seed == 0 else _layer(seed, 16, 64)[2]
        found = solver.solve(w, hh, grid.levels, s, o, plain.reshape(w.shape))
        assert found.error <= found.plain_error
        if seed == 0:
            assert np.array_equal(found.codes, plain.reshape(w.shape))


def test_the_solver_chooses_gptqs_codes_without_inverting_h():
    """The nearest-plane sweep on H's reversed Cholesky factor picks the codes of GPTQ's own update
    (error pushed through the upper Cholesky factor of the damped H^-1), here written out plainly."""
    x, w, h = _layer(5, rows=12, cols=150)
    enc = encodings.get_encoding("kquant_nl", 2, 8)
    grid = enc.grid(w)
    plain, _ = enc.round_to_grid(w, grid)
    s, o = grid.per_element(150)
    found = solver.solve(w, solver.prepare(h, act_order=False), grid.levels, s, o, plain.reshape(w.shape))
    damped = h + solver.DAMP * np.mean(np.diagonal(h)) * np.eye(150)
    u = np.linalg.cholesky(np.linalg.inv(damped)).T
    work, ref = w.astype(np.float64), np.empty(w.shape, np.uint8)
    values = grid.levels[None, :] * s[:, :, None] + o[:, :, None]  # (rows, cols, levels), float32 as stored
    for i in range(150):
        ref[:, i] = np.abs(values[:, i, :] - work[:, i:i + 1]).argmin(axis=1)
        e = (work[:, i] - values[np.arange(12), i, ref[:, i]]) / u[i, i]
        work[:, i + 1:] -= np.outer(e, u[i, i + 1:])
    assert found.compensated and np.array_equal(found.codes, ref)


def test_im2col_patches_reproduce_the_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    layer = calibration.Layer("w", "x", "conv", False, (3, 2), (1, 0, 1, 1), (2, 1), (1, 2))
    p = calibration.patches(x, layer, 10 ** 6, rng)
    y = p @ w.reshape(5, -1).T
    xp = np.pad(x, ((0, 0), (1, 1), (0, 1)))
    ref = [float(np.sum(xp[:, i * 2:i * 2 + 3, j:j + 3:2] * w[4])) for i in range(5) for j in range(10)]
    assert p.shape == (50, 18) and np.allclose(y[:, 4], ref, atol=1e-4)


@pytest.fixture(scope="module")
def graph_model(tmp_path_factory):
    """A tiny denoiser with a graph: out = conv2(relu(conv1(x))) * 1/(1+sigma) + gemm on difficulty."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("cal-model")
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((32, 4, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((4, 32, 3, 3)) * 0.1).astype(np.float32)
    save_file({"conv1.weight": w1, "conv2.weight": w2}, str(root / "model.safetensors"))
    nodes = [
        helper.make_node("Conv", ["noisy", "conv1.weight"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "conv2.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["sigma", "shape4"], ["sig4"]),
        helper.make_node("Add", ["sig4", "one"], ["den"]),
        helper.make_node("Div", ["c", "den"], ["d"]),
        helper.make_node("Reshape", ["difficulty", "shape4"], ["dif4"]),
        helper.make_node("Add", ["d", "dif4"], ["denoised"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-denoiser",
        [helper.make_tensor_value_info("noisy", TensorProto.FLOAT, ["batch", 4, 8, 8]),
         helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=[numpy_helper.from_array(w1, "conv1.weight"), numpy_helper.from_array(w2, "conv2.weight"),
                     numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
                     numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "model.onnx"))
    (root / "config.json").write_text(json.dumps({"_class_name": "UNetModel", "sigma_min": 0.002, "sigma_max": 80.0}))
    return root


def test_graph_calibration_collects_each_layers_input_moment(graph_model):
    cal = calibration.collect(graph_model, ["conv1.weight", "conv2.weight"], samples=2, num_levels=3)
    assert set(cal.hessians) == {"conv1.weight", "conv2.weight"} and not cal.skipped
    assert cal.hessians["conv1.weight"].shape == (36, 36) and cal.hessians["conv2.weight"].shape == (288, 288)
    h = cal.hessians["conv2.weight"]
    assert np.allclose(h, h.T) and np.all(np.linalg.eigvalsh(h.astype(np.float64)) > -1e-3 * np.trace(h))
    assert len(cal.levels) == 3 and "stream 1" in cal.summary()["inputs"]


def test_calibration_inputs_never_coincide_with_validation_inputs():
    assert e2e.CALIBRATION_STREAM != e2e.VALIDATION_STREAM
    a = e2e.input_rng(0, e2e.VALIDATION_STREAM).standard_normal(1000)
    b = e2e.input_rng(0, e2e.CALIBRATION_STREAM).standard_normal(1000)
    assert not np.isin(a, b).any()


def test_calibrated_store_reads_back_and_is_closer_to_the_network(graph_model, tmp_path):
    base = dict(bit_width=2, lossless_below=0, min_accuracy=0.0, num_time_groups=4)
    plain = quantize_model(graph_model, tmp_path / "plain", DiffusionQuantConfig(**base))
    events = []
    cal = quantize_model(graph_model, tmp_path / "cal", DiffusionQuantConfig(calibration="graph", **base),
                         progress=events.append)
    assert cal["calibration"]["layers"] == 2 and cal["model_size_mb"] == plain["model_size_mb"]
    # calibration is a stage of its own with its own fraction (the app's job row and the CLI show it)
    own = [e.stage_fraction for e in events if e.stage == "calibrate"]
    assert own[0] == 0.0 and own[-1] == 1.0 and own == sorted(own), own
    store = load_quantized(tmp_path / "cal")
    assert store.manifest["config"]["calibration"] == "graph"
    figs = {k: e2e.end_to_end(graph_model, tmp_path / k, num_time_groups=4) for k in ("plain", "cal")}
    assert 1 - figs["cal"]["mean_cosine"] < 1 - figs["plain"]["mean_cosine"]


def test_an_encoding_without_a_grid_is_rounded_plainly_and_says_so(graph_model, tmp_path):
    gguf_helpers = pytest.importorskip("gguf_helpers")  # registers gguf-py's reference quantizers: no grid

    cfg = DiffusionQuantConfig(bit_width=4, encoding="gguf_ref_q4_0", lossless_below=0, min_accuracy=0.0,
                               calibration="graph", bit_rules={"conv1.weight": 0},  # 36 inputs: not whole blocks
                               num_time_groups=2)
    r = quantize_model(graph_model, tmp_path / "q", cfg)
    assert any("does not expose its grid" in w for w in r["warnings"])
    assert not encodings.get_encoding("gguf_ref_q4_0", 4, 32).has_grid and gguf_helpers


GGML = [("q8_0", 8), ("q6_k", 6), ("q5_k", 5), ("q4_k", 4), ("q3_k", 3), ("q2_k", 2), ("q4_0", 4), ("q5_0", 5),
        ("q5_1", 5), ("iq4_nl", 4), ("iq4_xs", 4)]


@pytest.mark.parametrize("name,bits", GGML)
def test_ggml_types_get_compensated_codes_that_gguf_decodes(name, bits):
    """Calibration on ggml's block types: each block's d/dmin/sub-scales fitted by the encoder as the
    sweep reaches it, codes compensated; the bytes are ggml's, read back by gguf-py exactly."""
    gguf = pytest.importorskip("gguf")
    from arrow_quant_v2 import ggml_types  # noqa: F401 - registers the ggml block types

    x, w, h = _layer(2, rows=16, cols=512)
    enc = encodings.get_encoding(name, bits, 0)
    grid = enc.grid(w)
    plain, stats = enc.round_to_grid(w, grid)
    plain_blobs = enc.pack(grid, plain)
    assert plain_blobs["codes"].tobytes() == enc.quantize(w)[0]["codes"].tobytes()  # plain = the uncalibrated bytes
    blobs, solved_stats = enc.quantize_compensated(w, solver.prepare(h, act_order=False), grid, plain, stats)
    y = enc.dequantize(blobs, *w.shape)
    qtype = gguf.GGMLQuantizationType[enc.ggml_type]
    assert np.array_equal(gguf.quants.dequantize(blobs["codes"].reshape(16, -1), qtype).reshape(w.shape), y)
    out = {k: np.linalg.norm(x @ w.T - x @ v.T) for k, v in (("plain", enc.dequantize(plain_blobs, *w.shape)),
                                                               ("solved", y))}
    assert out["solved"] < 0.95 * out["plain"], out
    assert np.allclose(solved_stats, _stats(w, y), rtol=1e-9)


@pytest.mark.parametrize("name,bits", [("q2_k", 2), ("q4_0", 4)])
def test_calibrated_ggml_codes_are_never_worse_than_the_encoders(name, bits):
    from arrow_quant_v2 import ggml_types  # noqa: F401

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 256)) * 0.05).astype(np.float32)
    enc = encodings.get_encoding(name, bits, 0)
    grid = enc.grid(w)
    plain, stats = enc.round_to_grid(w, grid)
    for seed in range(3):
        h = np.eye(256) if seed == 0 else _layer(seed, 8, 256)[2]
        prep = solver.prepare(h, act_order=False)
        blobs, _ = enc.quantize_compensated(w, prep, grid, plain, stats)
        errors = [solver.output_error(enc.dequantize(b, 8, 256) - w, h) for b in (blobs, enc.pack(grid, plain))]
        assert errors[0] <= errors[1]


def test_calibrated_gguf_store_exports_losslessly(graph_model, tmp_path):
    """Under target_runtime='gguf' calibration writes ggml blocks, so the GGUF file holds the store's values."""
    gguf = pytest.importorskip("gguf")

    base = dict(bit_width=2, lossless_below=0, min_accuracy=0.0, num_time_groups=4, target_runtime="gguf")
    plain = quantize_model(graph_model, tmp_path / "plain", DiffusionQuantConfig(**base))
    cal = quantize_model(graph_model, tmp_path / "cal", DiffusionQuantConfig(calibration="graph", **base))
    store = load_quantized(tmp_path / "cal")
    assert store.tensors["conv2.weight"].encoding == "iq4_nl" and not cal["warnings"]  # 288 inputs: Q2_K's fallback
    assert cal["model_size_mb"] == plain["model_size_mb"]
    store.to_gguf(tmp_path / "cal.gguf")
    reader = gguf.GGUFReader(tmp_path / "cal.gguf")
    t = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.IQ4_NL)
    want = store.dequantize("conv2.weight")
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape), want)
    assert not np.array_equal(want, load_quantized(tmp_path / "plain").dequantize("conv2.weight"))
    figs = {k: e2e.end_to_end(graph_model, tmp_path / k, num_time_groups=4) for k in ("plain", "cal")}
    assert 1 - figs["cal"]["mean_cosine"] < 1 - figs["plain"]["mean_cosine"]


def test_calibration_without_a_graph_is_a_clear_error(make_model, tmp_path):
    with pytest.raises(ConfigurationError, match="needs the model's executable graph"):
        quantize_model(make_model("tiny"), tmp_path / "q", DiffusionQuantConfig(calibration="graph"))
    assert not (tmp_path / "q").exists()


def test_calibration_config_bounds():
    with pytest.raises(ConfigurationError, match="calibration="):
        DiffusionQuantConfig(calibration="data")
    with pytest.raises(ConfigurationError, match="calibration_samples="):
        DiffusionQuantConfig(calibration_samples=0)
    assert DiffusionQuantConfig.from_dict(DiffusionQuantConfig(calibration="graph").to_dict()).calibration == "graph"


def test_user_inputs_replace_the_synthetic_ones(graph_model, tmp_path):
    rng = np.random.default_rng(5)
    npz = tmp_path / "inputs.npz"
    np.savez(npz, noisy=rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
             sigma=np.array([1.0, 0.1, 10.0], np.float32), difficulty=np.array([0.2, 0.4, 0.6], np.float32))
    cal = calibration.collect(graph_model, ["conv1.weight"], samples=2, inputs=npz)
    assert "inputs.npz" in cal.summary()["inputs"] and cal.hessians["conv1.weight"].shape == (36, 36)
    np.savez(tmp_path / "bad.npz", noisy=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ConfigurationError, match="bad.npz.*sigma"):
        calibration.collect(graph_model, ["conv1.weight"], samples=2, inputs=tmp_path / "bad.npz")


@pytest.mark.timeout(1800)  # every layer's H is factorised: a few minutes when the two cores are shared
def test_calibration_keeps_the_widths_and_halves_the_int2_output_error_of_the_terrain_unet(tmp_path):
    """The real U-Net at edge (int2): calibrated on its own stream, validated on e2e's held-out inputs."""
    pytest.importorskip("onnxruntime")
    from arrow_quant_v2.samples import sample_path

    model = sample_path("terrain-unet")
    runs = {}
    for cal in (None, "graph"):
        cfg = DiffusionQuantConfig.from_profile("edge", calibration=cal, calibration_samples=1, num_time_groups=4)
        r = quantize_model(model, tmp_path / str(cal), cfg)
        runs[cal] = (r, e2e.end_to_end(model, tmp_path / str(cal), num_time_groups=4))
    (plain, plain_e2e), (cal, cal_e2e) = runs[None], runs["graph"]
    # the same widths, except where a fallback (by weight cosine without, by output cosine with the graph) widened one
    widened = {f["tensor"] for r in (plain, cal) for f in r["fallbacks"]}
    stores = [load_quantized(tmp_path / str(c)) for c in (None, "graph")]
    assert all(stores[0].tensors[n].bits == stores[1].tensors[n].bits for n in stores[0].tensors if n not in widened)
    assert cal["calibration"]["layers"] > 200
    assert 1 - cal_e2e["worst_cosine"] < 0.5 * (1 - plain_e2e["worst_cosine"]), (plain_e2e["worst_cosine"],
                                                                             cal_e2e["worst_cosine"])


def test_cli_calibrate_on_a_model_without_a_graph_says_why(make_model, tmp_path, capsys):
    from arrow_quant_v2.cli import main

    code = main(["quantize", str(make_model("tiny")), str(tmp_path / "q"), "--calibrate", "--quiet"])
    assert code != 0 and "calibration='graph' needs the model's executable graph" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
