"""Output sensitivity from the calibration's H: it finds the layer the network feels, the budget gives
that layer bits, the fallback judges by it, and the store keeps it for the app."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2 import DiffusionQuantConfig, budget, calibration, encodings, load_quantized, policy, sensitivity
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.plan import Planner
from arrow_quant_v2.source import open_model

pytest.importorskip("onnxruntime")
SENSITIVE = "mid.weight"


def _write_denoiser(root, name: str, w: dict, body: list, constants: dict):
    """A model folder the calibration reads: ``w`` as safetensors, and a graph ``noisy / (sigma + 1)`` ->
    ``body`` (nodes from ``scaled`` to ``denoised``, with ``w`` and ``constants`` as initializers) with
    the sigma range e2e builds its noise levels from."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    save_file(w, str(root / "model.safetensors"))
    nodes = [
        helper.make_node("Reshape", ["sigma", "shape4"], ["sig4"]),
        helper.make_node("Add", ["sig4", "one"], ["den"]),
        helper.make_node("Div", ["noisy", "den"], ["scaled"]),  # inputs of one scale at every noise level
    ] + body
    constants = dict(constants, shape4=np.array([-1, 1, 1, 1], np.int64), one=np.array(1.0, np.float32))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("noisy", TensorProto.FLOAT, ["batch", 4, 8, 8]),
         helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        initializer=[numpy_helper.from_array(v, k) for k, v in {**w, **constants}.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "model.onnx"))
    (root / "config.json").write_text(json.dumps({"_class_name": "UNetModel", "sigma_min": 0.002, "sigma_max": 80.0}))
    return root, w


@pytest.fixture(scope="module")
def cancelling_model(tmp_path_factory):
    """in -> conv -> relu -> (+ offset) -> mid conv -> relu -> out conv. ``mid`` reads inputs with a large
    offset pattern its weights are orthogonal to, so its output is a small difference of large terms: its
    weight error is ordinary, but rounding breaks the cancellation and the network output moves a lot.
    Quantizing it is what the network feels most."""
    pytest.importorskip("onnx")
    from onnx import helper

    root = tmp_path_factory.mktemp("cancelling")
    rng = np.random.default_rng(0)
    w = {"first.weight": (rng.standard_normal((16, 4, 3, 3)) * 0.05).astype(np.float32),
         SENSITIVE: (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32),
         "last.weight": (rng.standard_normal((4, 16, 3, 3)) * 0.2).astype(np.float32)}
    # the offset is a checkerboard (a pattern every tap of a 3x3 kernel sees with sign (-1)^(kh+kw)); mid's
    # weights are orthogonal to it, so they cancel it exactly (a flat offset would be kept by the groups' offsets)
    pattern = np.broadcast_to(np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], np.float32), (16, 3, 3)).ravel()
    m = w[SENSITIVE].reshape(16, -1)
    basis = np.stack([pattern, np.ones_like(pattern)], axis=1)  # and to a flat input (the relu's mean)
    m -= (m @ basis) @ np.linalg.pinv(basis)
    checker = (20.0 * (-1.0) ** np.add.outer(np.arange(8), np.arange(8))).astype(np.float32)
    return _write_denoiser(root, "cancelling", w, [
        helper.make_node("Conv", ["scaled", "first.weight"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Add", ["r1", "offset"], ["a1"]),
        helper.make_node("Conv", ["a1", SENSITIVE], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "last.weight"], ["denoised"], pads=[1, 1, 1, 1]),
    ], {"offset": checker[None, None]})


@pytest.fixture(scope="module")
def calibrated(cancelling_model):
    root, w = cancelling_model
    return calibration.collect(root, list(w), samples=2, num_levels=3)


def _int2(x: np.ndarray) -> np.ndarray:
    x2 = x.reshape(x.shape[0], -1)
    enc = encodings.get_encoding("kquant_nl", 2, 8)
    return encodings.dequantize(encodings.quantize(x2, enc)[0], enc, *x2.shape).reshape(x.shape)


def test_output_sensitivity_finds_the_layer_the_network_feels(cancelling_model, calibrated):
    root, w = cancelling_model
    q = {n: _int2(v) for n, v in w.items()}
    estimate = {n: sensitivity.rel_error2(sensitivity.output_stats(v.reshape(len(v), -1), q[n].reshape(len(v), -1),
                                                                   calibrated.hessians[n])) for n, v in w.items()}
    weight = {n: float(np.sum((q[n] - v) ** 2) / np.sum(v ** 2)) for n, v in w.items()}
    direct = sensitivity.measure_directly(root, {n: {n: q[n]} for n in w}, num_levels=3)
    assert max(estimate, key=estimate.get) == SENSITIVE == max(direct, key=lambda n: direct[n]["mean_error"])
    others = [n for n in w if n != SENSITIVE]
    # the weights alone cannot tell: every layer's relF**2 is alike, its output's is not
    assert weight[SENSITIVE] < 1.5 * min(weight[n] for n in others)
    assert estimate[SENSITIVE] > 2 * max(estimate[n] for n in others), estimate
    # the estimate is the layer output's relF**2: exact against the layer run on its calibration inputs
    x = np.random.default_rng(1).standard_normal((500, 36))
    h = x.T @ x
    a, b = w["first.weight"].reshape(16, -1), q["first.weight"].reshape(16, -1)
    ratio = np.sum((x @ (b - a).T) ** 2) / np.sum((x @ a.T) ** 2)
    assert sensitivity.rel_error2(sensitivity.output_stats(a, b, h)) == pytest.approx(ratio, rel=1e-6)  # float32 weights


def test_a_budget_by_output_sensitivity_gives_the_sensitive_layer_more_bits(cancelling_model, calibrated):
    root, _ = cancelling_model
    base = DiffusionQuantConfig(lossless_below=0, min_accuracy=0.0)
    uniform = budget.size_range(root, base)["uniform_mb"]
    cfg = base.replace(target_model_size_mb=(uniform["int2"] + uniform["int4"]) / 2)
    by_weight = budget.allocate(open_model(root), cfg)
    by_output = budget.allocate(open_model(root), cfg, calibration=calibrated)
    assert by_output.by_output and not by_weight.by_output
    def widest_other(plan):
        return max(p.bits for n, p in plan.plans.items() if n != SENSITIVE)

    # by weight error the sensitive layer does not stand out; by output sensitivity it gets the most bits
    assert by_weight.plans[SENSITIVE].bits <= widest_other(by_weight)
    assert by_output.plans[SENSITIVE].bits > widest_other(by_output)
    assert by_output.estimated_bytes <= cfg.target_model_size_mb * budget.MIB * (1 + budget.MET_TOLERANCE)
    assert "output sensitivity" in by_output.plans[SENSITIVE].reason


def test_the_fallback_judges_the_output_and_the_store_keeps_the_sensitivity(cancelling_model, tmp_path):
    root, w = cancelling_model
    cfg = DiffusionQuantConfig(bit_width=2, lossless_below=0, min_accuracy=0.9, num_time_groups=3)
    plain = quantize_model(root, tmp_path / "plain", cfg)
    cal = quantize_model(root, tmp_path / "cal", cfg.replace(calibration="graph"))
    widened = {f["tensor"] for f in cal["fallbacks"]}
    assert SENSITIVE in widened and SENSITIVE not in {f["tensor"] for f in plain["fallbacks"]}
    store = load_quantized(tmp_path / "cal")
    assert "output cos" in store.tensors[SENSITIVE].reason and "output sensitivity" in store.tensors[SENSITIVE].reason
    entry = store.manifest["sensitivity"]
    assert set(entry["tensors"]) == set(w) and len(entry["levels"]) == 3
    for name, row in entry["tensors"].items():
        assert set(row) >= {"bits", "output_rel_error2", "output_cosine", "plain_output_cosine"}
        assert row["bits"] == store.tensors[name].bits
        assert row["plain_output_cosine"] >= policy.required(cfg, row["bits"]) or row["bits"] == 0
    assert "sensitivity" not in load_quantized(tmp_path / "plain").manifest


AMPLIFIED = "input_blocks.1.0.in_layers.2.weight"  # a boundary layer's name: the planner's list knows it


@pytest.fixture(scope="module")
def amplifying_model(tmp_path_factory):
    """in -> conv -> relu -> (+ 20) -> AMPLIFIED conv -> instance norm -> relu -> out conv. AMPLIFIED reads
    inputs with a large flat offset, so its output is mostly a per-channel constant that the norm then takes
    away: its error relative to its own output (the H estimate) is small, but relative to what is left after
    the norm it is large. Only the network downstream of the layer shows that: a gain the estimate misses."""
    pytest.importorskip("onnx")
    from onnx import helper

    root = tmp_path_factory.mktemp("amplifying")
    rng = np.random.default_rng(0)
    c = 48  # enough weights that a bit more for one layer shows in the size
    w = {"first.weight": (rng.standard_normal((c, 4, 3, 3)) * 0.2).astype(np.float32),
         AMPLIFIED: (rng.standard_normal((c, c, 3, 3)) * 0.1 + 0.02).astype(np.float32),
         "last.weight": (rng.standard_normal((4, c, 3, 3)) * 0.2).astype(np.float32)}
    return _write_denoiser(root, "amplifying", w, [
        helper.make_node("Conv", ["scaled", "first.weight"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Add", ["r1", "offset"], ["a1"]),
        # unpadded, so the offset reaches every output position alike (the norm takes all of it away)
        helper.make_node("Conv", ["a1", AMPLIFIED], ["h2"]),
        helper.make_node("InstanceNormalization", ["h2", "gamma", "beta"], ["n2"]),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("Conv", ["r2", "last.weight"], ["denoised"], pads=[2, 2, 2, 2]),
    ], {"offset": np.array(20.0, np.float32), "gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32)})


def test_the_downstream_gain_finds_what_the_estimate_misses_and_the_budget_pays_for_it(amplifying_model):
    root, w = amplifying_model
    # protect_embeddings=False: the boundary-layer name list (a floor under a graph too) leaves AMPLIFIED to the measurement
    base = DiffusionQuantConfig(lossless_below=0, min_accuracy=0.0, calibration="graph", num_time_groups=3,
                                protect_embeddings=False)
    source = open_model(root)
    cal = calibration.collect(root, list(w), samples=2, num_levels=3)
    q = {n: _int2(v) for n, v in w.items()}
    estimate = {n: sensitivity.rel_error2(sensitivity.output_stats(v.reshape(len(v), -1), q[n].reshape(len(v), -1),
                                                                   cal.hessians[n])) for n, v in w.items()}
    direct = sensitivity.measure_directly(root, {n: {n: q[n]} for n in w}, num_levels=3)
    # its own output error says AMPLIFIED is the least of the three; per unit of that error the network feels it
    # far more than the others
    assert min(estimate, key=estimate.get) == AMPLIFIED, estimate
    felt = {n: direct[n]["mean_error"] / estimate[n] for n in w}
    assert felt[AMPLIFIED] > 5 * max(v for n, v in felt.items() if n != AMPLIFIED), felt

    uniform = budget.size_range(root, base.replace(calibration=None, protect_embeddings=True))["uniform_mb"]
    cfg = base.replace(target_model_size_mb=(uniform["int2"] + uniform["int4"]) / 2)
    by_estimate = budget.allocate(source, cfg, calibration=cal)
    gains = calibration.measure_gains(root, source, cal, cfg, {n: 2 for n in w})
    assert max(gains.relative, key=gains.relative.get) == AMPLIFIED and gains.relative[AMPLIFIED] > 3
    by_gain = budget.allocate(source, cfg, calibration=cal)
    assert by_gain.plans[AMPLIFIED].bits > by_estimate.plans[AMPLIFIED].bits
    # the reason cites the measurement, not the boundary-layer name the planner would use without a graph
    reason = by_gain.plans[AMPLIFIED].reason
    assert "downstream gain measured through the graph" in reason and "boundary" not in reason, reason
    for graph in (None, "graph"):  # by default the name list still sets its floor, with a graph or without
        plan = Planner(cfg.replace(calibration=graph, protect_embeddings=True)).plan(source.tensors[AMPLIFIED])
        assert "boundary layer" in plan.reason and plan.bits == cfg.sensitive_bits


def test_without_a_budget_the_fallback_judges_the_amplified_layer_by_its_measured_gain(amplifying_model, tmp_path):
    root, w = amplifying_model
    # at int2 AMPLIFIED's own output cosine (0.9998) clears 0.99; times its gain (about 16) it does not
    cfg = DiffusionQuantConfig(bit_width=2, lossless_below=0, min_accuracy=0.99, num_time_groups=3, sensitive_bits=4)
    quantize_model(root, tmp_path / "named", cfg)
    measured = quantize_model(root, tmp_path / "measured", cfg.replace(calibration="graph", protect_embeddings=False,
                                                                       downstream_gain=True))
    store = load_quantized(tmp_path / "measured")
    assert "boundary layer" in load_quantized(tmp_path / "named").tensors[AMPLIFIED].reason
    # the measurement moved it off the width's first choice (here to the same-width alternate encoding,
    # which keeps the offsets the norm takes away), and the reason says why
    entry = store.manifest["sensitivity"]
    t = store.tensors[AMPLIFIED]
    assert (t.bits, t.encoding) != (2, policy.choose(cfg, 2, 144).encoding)
    assert "downstream gain" in t.reason and "boundary" not in t.reason, t.reason
    assert entry["downstream_gain"]["passes"] >= 1
    assert entry["tensors"][AMPLIFIED]["downstream_gain"] == max(row["downstream_gain"] for row in entry["tensors"].values())
    assert "downstream_gain" in measured["calibration"]
    # the gain costs forward passes and is not yet a better default: without asking, none is measured or used
    plain = quantize_model(root, tmp_path / "plain", cfg.replace(calibration="graph", protect_embeddings=False))
    assert "downstream_gain" not in plain["calibration"]
    assert "downstream gain" not in load_quantized(tmp_path / "plain").tensors[AMPLIFIED].reason
