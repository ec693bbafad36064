"""End-to-end validation: original versus dequantized network at noise levels over the model's range."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig, load_quantized
from arrow_quant_v2.e2e import end_to_end, find_graph, noise_levels
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.validation import validate_store

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

LEVEL_KEYS = {"sigma", "cosine", "rel_error", "psnr_db"}
SUMMARY_KEYS = {"available", "reason", "levels", "mean_cosine", "worst_cosine", "mean_psnr_db", "worst_psnr_db",
                "mean_rel_error", "worst_rel_error", "worst_sigma"}


def make_graph_model(root: Path, channels: int = 16) -> Path:
    """A tiny denoiser with a graph: out = (x + conv(x, W)) / (1 + sigma), W a real weight."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
    save_file({"conv.weight": w}, str(root / "model.safetensors"))
    nodes = [
        helper.make_node("Conv", ["noisy", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["noisy", "c"], ["s"]),
        helper.make_node("Reshape", ["sigma", "shape4"], ["sig4"]),
        helper.make_node("Add", ["sig4", "one"], ["den"]),
        helper.make_node("Div", ["s", "den"], ["denoised"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-denoiser",
        [helper.make_tensor_value_info("noisy", TensorProto.FLOAT, ["batch", channels, 8, 8]),
         helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        initializer=[numpy_helper.from_array(w, "conv.weight"),
                     numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
                     numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(root / "model.onnx"))
    (root / "config.json").write_text(json.dumps({"_class_name": "UNetModel", "sigma_min": 0.002, "sigma_max": 80.0}))
    return root


@pytest.fixture(scope="module")
def graph_model(tmp_path_factory) -> Path:
    return make_graph_model(tmp_path_factory.mktemp("graph-model"))


def test_noise_levels_are_log_spaced_over_the_config_range():
    levels, desc = noise_levels({"sigma_min": 0.002, "sigma_max": 80.0}, 5)
    assert levels[0] == pytest.approx(80.0) and levels[-1] == pytest.approx(0.002)
    assert np.allclose(np.diff(np.log(levels)), np.log(0.002 / 80) / 4) and "log-spaced" in desc
    steps, _ = noise_levels({"num_train_timesteps": 1000}, 3)
    assert list(steps) == [999.0, 500.0, 0.0]
    assert noise_levels({}, 3) is None


def test_graph_model_reports_every_level_and_uses_num_time_groups(graph_model, tmp_path):
    quantize_model(graph_model, tmp_path / "q", DiffusionQuantConfig(bit_width=4, num_time_groups=4, lossless_below=0))
    report = ArrowQuantV2().validate_quality(graph_model, tmp_path / "q")
    e2e = report["end_to_end"]
    assert e2e["available"], e2e["reason"]
    assert SUMMARY_KEYS <= set(e2e) and e2e["num_levels"] == 4 and e2e["replaced_tensors"] == 1
    assert [round(lv["sigma"], 6) for lv in e2e["levels"]] == pytest.approx(list(np.geomspace(80, 0.002, 4)), rel=1e-5)
    for lv in e2e["levels"]:
        assert LEVEL_KEYS <= set(lv) and 0.9 < lv["cosine"] <= 1.0 and lv["rel_error"] > 0
    assert e2e["worst_cosine"] == min(lv["cosine"] for lv in e2e["levels"])
    json.dumps(report["end_to_end"])  # the app stores reports as JSON
    # an explicit count wins over the store's config; reruns are reproducible
    again = validate_store(graph_model, tmp_path / "q", num_time_groups=2)["end_to_end"]
    assert again["num_levels"] == 2 and again["levels"][0]["cosine"] == pytest.approx(e2e["levels"][0]["cosine"])


def test_more_bits_give_a_closer_network(graph_model, tmp_path):
    worst = {}
    for bits in (2, 8):
        quantize_model(graph_model, tmp_path / f"q{bits}", DiffusionQuantConfig(bit_width=bits, lossless_below=0,
                                                                                min_accuracy=0.0))
        worst[bits] = end_to_end(graph_model, tmp_path / f"q{bits}", num_time_groups=3)
    assert worst[8]["worst_cosine"] > worst[2]["worst_cosine"]
    assert worst[8]["mean_psnr_db"] > worst[2]["mean_psnr_db"] + 20


def test_unavailable_cases_say_why(graph_model, make_model, tmp_path):
    plain = make_model("tiny")
    quantize_model(plain, tmp_path / "p", DiffusionQuantConfig(bit_width=8))
    e2e = validate_store(plain, tmp_path / "p")["end_to_end"]
    assert e2e["available"] is False and "no executable graph" in e2e["reason"] and e2e["levels"] == []
    quantize_model(graph_model, tmp_path / "g", DiffusionQuantConfig(bit_width=8, lossless_below=0))
    off = validate_store(graph_model, tmp_path / "g", end_to_end=False)["end_to_end"]
    assert off["available"] is False and "not requested" in off["reason"]
    assert find_graph(graph_model) == graph_model / "model.onnx" and find_graph(plain) is None


def test_terrain_unet_int8_is_faithful_at_every_noise_level(tmp_path):
    from arrow_quant_v2.samples import sample_path

    model = sample_path("terrain-unet")
    quantize_model(model, tmp_path / "q", DiffusionQuantConfig(bit_width=8))
    e2e = end_to_end(model, tmp_path / "q", num_time_groups=3)
    assert e2e["available"], e2e["reason"]
    assert [lv["sigma"] for lv in e2e["levels"]] == pytest.approx([80.0, 0.4, 0.002])
    # three samples per level, one per difficulty (low, middle, high), each figure also alone
    assert e2e["input_shape"] == [3, 1, 128, 128] and e2e["conditioning"]["difficulty"] == pytest.approx([0.1, 0.5, 0.9])
    for lv in e2e["levels"]:
        assert len(lv["sample_cosines"]) == 3 and lv["worst_sample_cosine"] == min(lv["sample_cosines"])
    assert e2e["worst_sample_cosine"] == min(lv["worst_sample_cosine"] for lv in e2e["levels"])
    assert e2e["worst_cosine"] > 0.999 and e2e["worst_psnr_db"] > 35


def test_terrain_unet_local_profile_keeps_every_noise_level_above_099(tmp_path):
    """int4 with the denoiser's boundary layers protected: the output stays faithful even at
    sigma 80, where int4 on the first block's convolution alone drops it to 0.83."""
    from arrow_quant_v2.samples import sample_path

    model = sample_path("terrain-unet")
    quantize_model(model, tmp_path / "q", DiffusionQuantConfig.from_profile("local"))
    store = load_quantized(tmp_path / "q")
    first_conv = store.tensors["network.input_blocks.1.0.in_layers.2.weight"]
    assert first_conv.bits == 8 and "boundary layer (input_blocks.1)" in first_conv.reason
    assert store.tensors["network.input_blocks.2.0.in_layers.2.weight"].bits == 4
    e2e = end_to_end(model, tmp_path / "q", num_time_groups=10)
    assert e2e["worst_cosine"] >= 0.99, [(lv["sigma"], lv["cosine"]) for lv in e2e["levels"]]


def test_validation_reports_its_stages_to_the_api_and_the_cli(graph_model, tmp_path, capsys):
    """The per-layer check, then the end-to-end check with its own count of noise levels: each
    stage's events carry its own progress (what an ETA can be computed from), and the same stages
    reach a plain listener, the async API and the CLI's bar."""
    import asyncio

    from arrow_quant_v2 import AsyncArrowQuantV2
    from arrow_quant_v2.cli import main

    quantize_model(graph_model, tmp_path / "q", DiffusionQuantConfig(bit_width=4, num_time_groups=3, lossless_below=0))
    events = []
    validate_store(graph_model, tmp_path / "q", progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "validate" and events[0].stage_fraction == 0.0  # at once, before the first tensor
    assert stages == sorted(stages, key=["validate", "end-to-end", "done"].index)  # one stage after the other
    e2e = [e for e in events if e.stage == "end-to-end"]
    assert e2e[0].stage_fraction == 0.0 and e2e[-1].stage_fraction == 1.0
    assert all("3 noise levels" in e.message for e in e2e) and "forward pass" in e2e[-1].message
    assert [e.stage_fraction for e in e2e] == sorted(e.stage_fraction for e in e2e)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # the whole stays monotonic

    seen = []
    asyncio.run(AsyncArrowQuantV2().validate_quality_async(graph_model, tmp_path / "q", on_event=seen.append,
                                                           progress_interval=0))
    direct = [(e.stage, e.stage_fraction, e.message) for e in events]
    delivered = [(e.stage, e.stage_fraction, e.message) for e in seen]
    assert set(delivered) <= set(direct) and delivered[0] == direct[0] and delivered[-1] == direct[-1]
    assert list(dict.fromkeys(e.stage for e in seen)) == ["validate", "end-to-end", "done"]

    assert main(["validate", str(graph_model), str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    assert "validating: per-layer check" in err and "validating: end-to-end check" in err


def test_a_gguf_file_gets_the_end_to_end_check_of_its_store(tmp_path, capsys):
    """A GGUF file's tensors, dequantized and mapped back to the source names, go into the graph:
    an exported store gives exactly the output figures of the store itself, and a GGUF written by
    gguf-py's own quantizer gives those of its dequantized weights put in by hand."""
    gguf = pytest.importorskip("gguf")
    from arrow_quant_v2.cli import main

    (tmp_path / "m").mkdir()
    model = make_graph_model(tmp_path / "m", channels=32)  # rows of 288: ggml blocks of 32
    quantize_model(model, tmp_path / "q", DiffusionQuantConfig(bit_width=4, num_time_groups=3, lossless_below=0,
                                                               target_runtime="gguf"))
    store = load_quantized(tmp_path / "q")
    assert store.tensors["conv.weight"].quantized
    store.to_gguf(tmp_path / "q.gguf")
    events = []
    from_gguf = validate_store(model, tmp_path / "q.gguf", progress=events.append)["end_to_end"]
    from_store = validate_store(model, tmp_path / "q")["end_to_end"]
    assert from_gguf["available"], from_gguf["reason"]
    assert from_gguf["replaced_tensors"] == 1 and from_gguf["num_levels"] == 3  # the recorded config's levels
    assert from_gguf["levels"] == from_store["levels"] and from_gguf["worst_cosine"] < 1.0
    assert list(dict.fromkeys(e.stage for e in events)) == ["validate", "end-to-end", "done"]
    assert [e.fraction for e in events] == sorted(e.fraction for e in events)

    # a file this project did not write: gguf-py's Q4_0, the source's names, no recorded config
    from safetensors.numpy import load_file

    from arrow_quant_v2.gguf_io.writer import ORIG_SHAPE_KEY

    w = load_file(str(model / "model.safetensors"))["conv.weight"]
    q4 = gguf.quants.quantize(w.reshape(32, -1), gguf.GGMLQuantizationType.Q4_0)
    writer = gguf.GGUFWriter(tmp_path / "foreign.gguf", "unet")
    writer.add_array(ORIG_SHAPE_KEY.format("conv.weight"), list(w.shape))  # as ComfyUI-GGUF files record it
    writer.add_tensor("conv.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    by_hand = gguf.quants.dequantize(q4, gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
    foreign = validate_store(model, tmp_path / "foreign.gguf")["end_to_end"]
    assert foreign["num_levels"] == 10 and foreign["levels"] == end_to_end(model, weights={"conv.weight": by_hand})["levels"]
    assert main(["validate", str(model), str(tmp_path / "foreign.gguf")]) == 0
    assert "end-to-end worst output cosine" in capsys.readouterr().out
