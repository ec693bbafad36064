"""The engine end to end on small generated models: store contents, figures, plan, fallback."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from arrow_quant_v2 import (ArrowQuantV2, ConfigurationError, DiffusionQuantConfig, OutputError, QuantizationError,
                            load_quantized)
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.source import open_model

RESULT_KEYS = {"quantized_path", "compression_ratio", "cosine_similarity", "model_size_mb", "modality", "bit_width",
               "quantization_time_s"}
VALIDATION_KEYS = {"cosine_similarity", "compression_ratio", "per_layer_accuracy", "passed"}


def heavy_tailed(rng, shape, scale=0.02):
    w = rng.standard_t(4, size=shape) * scale
    return (w * rng.lognormal(0, 0.5, size=(shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small diffusion-transformer-like model: time embedding, blocks, norms, biases, a conv, an int tensor."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("model")
    tensors = {
        "time_embed.0.weight": heavy_tailed(rng, (256, 128)),
        "time_embed.0.bias": rng.normal(size=256).astype(np.float32),
        "conv_in.weight": heavy_tailed(rng, (64, 4, 3, 3)),
        "position_ids": np.arange(77, dtype=np.int64)[None],
    }
    for b in range(2):
        for m, shape in (("attn.q_proj", (256, 256)), ("attn.k_proj", (256, 256)), ("mlp.up_proj", (512, 256)),
                         ("mlp.down_proj", (256, 512))):
            tensors[f"blocks.{b}.{m}.weight"] = heavy_tailed(rng, shape)
        tensors[f"blocks.{b}.norm1.weight"] = np.ones(256, np.float32)
        tensors[f"blocks.{b}.mlp.up_proj.bias"] = rng.normal(size=512).astype(np.float32)
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    (root / "README.md").write_text("weights of a test model\n")
    return root


def quantize(model, out, **cfg):
    return quantize_model(model, out, DiffusionQuantConfig(**cfg))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_result_figures_match_files_on_disk(model, tmp_path, bits):
    result = quantize(model, tmp_path / "q", bit_width=bits, group_size=64)
    assert RESULT_KEYS <= set(result)
    weights = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.parquet"))
    source_bytes = open_model(model).total_bytes
    assert result["model_size_mb"] == pytest.approx(weights / 2**20)
    assert result["compression_ratio"] == pytest.approx(source_bytes / weights)
    assert result["bit_width"] == bits and result["modality"] == "image"
    # every stored byte counted: codes + scales + offsets stay within bits + 0.6 for ordinary layers
    store = load_quantized(tmp_path / "q")
    quantized = [e for e in store.tensors.values() if e.quantized]
    assert quantized and all(e.bits_per_weight <= e.bits + 0.6 for e in quantized)
    assert all(e.bits >= bits for e in quantized)
    assert result["cosine_similarity"] >= {2: 0.90, 4: 0.99, 8: 0.999}[bits]


def test_store_is_self_describing(model, tmp_path):
    quantize(model, tmp_path / "q", bit_width=4)
    out = tmp_path / "q"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "arrowquant" and manifest["format_version"] == 1
    assert manifest["config"]["bit_width"] == 4
    assert manifest["source"]["header_checksum"] == open_model(model).header_checksum
    assert (out / "config.json").read_text() == (model / "config.json").read_text()
    assert (out / "README.md").exists()
    assert not list(tmp_path.glob(".q.partial-*"))


def test_reload_gives_what_validation_measured(model, tmp_path):
    q = ArrowQuantV2()
    q.quantize_diffusion_model(str(model), str(tmp_path / "q"), config=DiffusionQuantConfig(bit_width=2))
    report = q.validate_quality(str(model), str(tmp_path / "q"))
    assert VALIDATION_KEYS <= set(report) and report["passed"]
    store = load_quantized(tmp_path / "q")
    source = open_model(model)
    for name, cos in report["per_layer_accuracy"].items():
        x = source.read_float32(name).astype(np.float64).ravel()
        y = store.dequantize(name).astype(np.float64).ravel()
        assert np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) == pytest.approx(cos, abs=1e-9)
        assert store.tensors[name].cosine == pytest.approx(cos, abs=1e-6)
    # lossless tensors come back bit for bit
    assert np.array_equal(store.raw("position_ids"), source.read_raw("position_ids").reshape(1, 77))
    assert np.array_equal(store.dequantize("blocks.0.norm1.weight"), np.ones(256, np.float32))


def test_plan_reasons(model, tmp_path):
    quantize(model, tmp_path / "q", bit_width=2)
    store = load_quantized(tmp_path / "q")
    t = store.tensors
    assert t["time_embed.0.weight"].bits == 8 and "time conditioning" in t["time_embed.0.weight"].reason
    assert t["blocks.0.norm1.weight"].reason == "lossless: 1-D norm"
    assert t["blocks.0.mlp.up_proj.bias"].encoding == "raw"
    assert t["position_ids"].reason == "lossless: I64 tensor"
    assert t["blocks.1.attn.q_proj.weight"].bits in (2, 4)


def test_time_aware_can_be_turned_off(model, tmp_path):
    quantize(model, tmp_path / "q", bit_width=2, enable_time_aware=False, min_accuracy=0.5)
    assert load_quantized(tmp_path / "q").tensors["time_embed.0.weight"].bits == 2


def test_bit_rules_win(model, tmp_path):
    quantize(model, tmp_path / "q", bit_width=4, bit_rules={"blocks.*.mlp.*": 8, "conv_in.*": 0})
    t = load_quantized(tmp_path / "q").tensors
    assert t["blocks.0.mlp.up_proj.weight"].bits == 8 and "rule" in t["blocks.0.mlp.up_proj.weight"].reason
    assert t["conv_in.weight"].encoding == "raw"
    assert t["blocks.0.attn.q_proj.weight"].bits == 4


def test_fallback_to_wider_bits(model, tmp_path):
    result = quantize(model, tmp_path / "q", bit_width=2, min_accuracy=0.97)
    t = load_quantized(tmp_path / "q").tensors
    fell = [f["tensor"] for f in result["fallbacks"]]
    assert fell, "int2 cannot reach 0.97 on heavy-tailed weights; the plan must fall back"
    for name in fell:
        assert t[name].bits > 2 and "fallback from int2" in t[name].reason and t[name].cosine >= 0.97


def test_fail_fast_names_tensor_and_cosine(model, tmp_path):
    with pytest.raises(QuantizationError, match=r"cosine 0\.\d+ at int2 is below min_accuracy 0\.99"):
        quantize(model, tmp_path / "q", bit_width=2, min_accuracy=0.99, fail_fast=True)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial-*"))


def test_existing_output_is_never_clobbered_silently(model, tmp_path):
    quantize(model, tmp_path / "q", bit_width=8)
    before = (tmp_path / "q" / "manifest.json").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        quantize(model, tmp_path / "q", bit_width=2)
    assert (tmp_path / "q" / "manifest.json").read_bytes() == before
    quantize_model(model, tmp_path / "q", DiffusionQuantConfig(bit_width=2), overwrite=True)
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["config"]["bit_width"] == 2


def test_unreachable_size_budget_names_the_reachable_range(model, tmp_path):
    with pytest.raises(ConfigurationError, match=r"target_model_size_mb=0.01 cannot be reached.*allowed: [\d.]+ to [\d.]+ MiB"):
        quantize(model, tmp_path / "q", target_model_size_mb=0.01)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_export_dequantized_safetensors(model, tmp_path, dtype):
    quantize(model, tmp_path / "q", bit_width=4)
    store = load_quantized(tmp_path / "q")
    out = store.to_safetensors(tmp_path / "export", dtype=dtype)
    assert (out / "config.json").exists()
    header = json.loads((out / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (out / "model.safetensors").read_bytes()[:8], "little")])
    want = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    assert header["blocks.0.attn.q_proj.weight"]["dtype"] == want
    assert header["position_ids"]["dtype"] == "I64"
    if dtype != "bfloat16":  # numpy cannot load BF16
        loaded = load_file(str(out / "model.safetensors"))
        y = store.dequantize("blocks.0.attn.q_proj.weight")
        np.testing.assert_allclose(loaded["blocks.0.attn.q_proj.weight"].astype(np.float32), y, rtol=1e-3, atol=1e-6)
        assert np.array_equal(loaded["position_ids"], np.arange(77)[None])
    reopened = open_model(out)
    assert set(reopened.tensors) == set(store.tensors)


def test_single_file_input_and_sharded_output(model, tmp_path):
    result = quantize_model(model / "model.safetensors", tmp_path / "q",
                            DiffusionQuantConfig(bit_rules={"*": 0}, max_shard_mb=1))
    store = load_quantized(tmp_path / "q")
    assert len(store.files) > 1, "a 1 MiB shard limit must split the 3.3 MB lossless store"
    assert all(f.stat().st_size < 1.2 * 2**20 for f in store.files)
    assert len(store) == len(open_model(model).tensors)
    assert result["model_size_mb"] == pytest.approx(sum(f.stat().st_size for f in store.files) / 2**20)


def test_progress_is_monotonic_and_ends_at_one(model, tmp_path):
    events = []
    quantize_model(model, tmp_path / "q", DiffusionQuantConfig(), progress=events.append)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] == 0.0
    assert any("blocks.1.mlp.down_proj.weight" in e.message for e in events)
    assert events[-1].tensors_done == events[-1].tensors_total == len(open_model(model).tensors)


def test_spatial_picks_per_layer_groups_within_the_accuracy_target(model, tmp_path):
    plain = quantize(model, tmp_path / "plain", bit_width=4)
    spatial = quantize(model, tmp_path / "spatial", bit_width=4, enable_spatial=True)
    t = load_quantized(tmp_path / "spatial").tensors
    ordinary = [e for e in t.values() if e.quantized and e.bits == 4]
    assert any(e.group_size > 16 for e in ordinary), "some layer can afford a larger group than the default 16"
    assert all("spatial" in e.reason and e.cosine >= 0.99 for e in ordinary)
    assert spatial["bits_per_weight"] < plain["bits_per_weight"]
