"""GGUF out (export) and in (validate/inspect any GGUF) against gguf-py's reference reader."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import gguf_helpers  # noqa: F401 - registers the reference ggml encodings
from arrow_quant_v2 import (ArrowQuantV2, DiffusionQuantConfig, ExportError, OutputError, ValidationError,
                            load_quantized)
from arrow_quant_v2.cli import ExitCode, main as cli
from arrow_quant_v2.gguf_io import runtime
from arrow_quant_v2.source import open_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def quantize(src, out, **config):
    ArrowQuantV2().quantize_diffusion_model(src, out, DiffusionQuantConfig(**config))
    return load_quantized(out)


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    return gguf_helpers.make_dream(tmp_path_factory.mktemp("m") / "dream")


@pytest.fixture(scope="module")
def q8_store(dream, tmp_path_factory):
    return quantize(dream, tmp_path_factory.mktemp("s") / "q8", bit_width=8, encoding="gguf_ref_q8_0")


@pytest.fixture(scope="module")
def q8_gguf(q8_store, tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "dream-q8.gguf"
    result = q8_store.to_gguf(path)
    return path, result


def source_of(reader: gguf.GGUFReader) -> dict:
    """GGUF name -> source name, from the file's own provenance record."""
    record = json.loads(str(reader.get_field("arrowquant.tensors").contents()))
    return {g: r["source"] for g, r in record.items()}


def assert_round_trip(store, path, target=None):
    """Every GGUF tensor, dequantized by gguf-py, equals the store's dequantize (exactly)."""
    reader = gguf.GGUFReader(path)
    names = source_of(reader)
    assert sorted(names.values()) == sorted(store.tensors)
    for t in reader.tensors:
        name = names[t.name]
        want = store.dequantize(name)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if target is not None and name in target.permute_heads:
            got = runtime.permute_qk(got, target.permute_heads[name], inverse=True)
        assert np.array_equal(got, want), name
        if store.tensors[name].quantized:
            assert t.tensor_type.name == type(gguf_helpers.encodings.get_encoding(
                store.tensors[name].encoding, store.tensors[name].bits, 0)).ggml_type
    return reader


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


# -- export ---------------------------------------------------------------------------------


def test_q8_0_export_is_lossless_with_llama_cpp_names_and_dream_metadata(dream, q8_store, q8_gguf):
    path, result = q8_gguf
    reader = assert_round_trip(q8_store, path)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_q.bias",
            "blk.1.ffn_down.weight", "blk.1.attn_norm.weight"} <= names
    config = json.loads((dream / "config.json").read_text())
    assert field(reader, "general.architecture") == "dream"
    assert field(reader, "dream.embedding_length") == config["hidden_size"]
    assert field(reader, "dream.block_count") == config["num_hidden_layers"]
    assert field(reader, "dream.feed_forward_length") == config["intermediate_size"]
    assert field(reader, "dream.attention.head_count") == config["num_attention_heads"]
    assert field(reader, "dream.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, "dream.context_length") == config["max_position_embeddings"]
    assert field(reader, "dream.rope.freq_base") == pytest.approx(config["rope_theta"])
    assert field(reader, "dream.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "dream.attention.causal") is False
    assert field(reader, "tokenizer.ggml.mask_token_id") == config["mask_token_id"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert len(field(reader, "tokenizer.ggml.tokens")) == config["vocab_size"]
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert result["architecture"] == "dream" and result["has_tokenizer"] and result["ggml_types"]["Q8_0"] > 0
    record = json.loads(field(reader, "arrowquant.tensors"))
    assert record["blk.0.attn_q.weight"]["cosine"] == q8_store.tensors["model.layers.0.self_attn.q_proj.weight"].cosine
    assert json.loads(field(reader, "arrowquant.config"))["encoding"] == "gguf_ref_q8_0"


def test_llama_layout_reorders_q_and_k_rows_like_llama_cpp_and_reads_back(tmp_path):
    src = gguf_helpers.make_dream(tmp_path / "llama", model_type="llama")
    store = quantize(src, tmp_path / "s", bit_width=8, encoding="gguf_ref_q8_0")
    path = tmp_path / "llama.gguf"
    store.to_gguf(path)
    target = runtime.describe(src, list(store.tensors), {}, with_metadata=False)
    assert target.permute_heads["model.layers.0.self_attn.q_proj.weight"] == 4
    assert target.permute_heads["model.layers.0.self_attn.k_proj.bias"] == 2
    reader = assert_round_trip(store, path, target)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    as_stored = store.dequantize("model.layers.0.self_attn.q_proj.weight")
    assert not np.array_equal(gguf.quants.dequantize(q.data, q.tensor_type), as_stored)  # really reordered
    report = ArrowQuantV2().validate_quality(src, path)
    for name, layer in report["per_layer"].items():
        assert layer["cosine"] == pytest.approx(store.tensors[name].cosine, abs=1e-9)


def test_lossless_store_exports_its_source_bytes(tmp_path):
    src = gguf_helpers.make_dream(tmp_path / "f32", dtype="F32", tokenizer=False)
    store = quantize(src, tmp_path / "s", bit_rules={"*": 0})
    assert not any(e.quantized for e in store.tensors.values())
    result = store.to_gguf(tmp_path / "f32.gguf")
    reader = assert_round_trip(store, tmp_path / "f32.gguf")
    source = open_model(src)
    names = source_of(reader)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert bytes(np.asarray(t.data).tobytes()) == bytes(source.read_raw(names[t.name]).tobytes())
    assert not result["has_tokenizer"] and "llama.cpp needs one" in " ".join(result["notes"])


def test_arrowquant_encodings_get_export_error_naming_tensors_and_the_fix(dream, tmp_path):
    store = quantize(dream, tmp_path / "s", bit_width=4)
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError) as e:
        store.to_gguf(out)
    first = next(n for n, t in store.tensors.items() if t.quantized)
    assert "target_runtime" in str(e.value) and first in str(e.value)
    assert list(tmp_path.glob("*x.gguf*")) == []


def test_existing_file_needs_overwrite_and_nothing_is_left_behind(q8_store, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError):
        q8_store.to_gguf(out)
    assert out.read_bytes() == b"keep me"
    q8_store.to_gguf(out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import gguf_helpers
from arrow_quant_v2 import load_quantized
seen = []
def progress(event):
    seen.append(event)
    if len(seen) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
getattr(load_quantized({store!r}), {method!r})({out!r}, progress=progress)
"""


@pytest.mark.parametrize("method, name", [("to_gguf", "killed.gguf"), ("to_safetensors", "killed")])
def test_killed_export_leaves_nothing_that_looks_finished(q8_store, tmp_path, method, name):
    out = tmp_path / name
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), store=str(q8_store.path), out=str(out),
                                method=method)
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == -9
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1  # the dead export's hidden temporary
    getattr(q8_store, method)(out)  # the next export removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_safetensors_export_cancelled_between_tensors_leaves_nothing(q8_store, tmp_path):
    """Cancelled after two tensors (its first weight file may be complete by then): it stops
    before the next tensor, and neither the folder nor a temporary remains; the next export works."""
    from arrow_quant_v2.export import export_store
    from arrow_quant_v2.progress import Cancelled, CancelToken

    token, seen = CancelToken(), []

    def cancel_after_two(event):
        seen.append(event)
        if event.tensors_done == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        export_store(q8_store.path, tmp_path / "f16", progress=cancel_after_two, cancel=token)
    assert max(e.tensors_done for e in seen) == 2 < len(q8_store.tensors)
    assert list(tmp_path.iterdir()) == []
    result = export_store(q8_store.path, tmp_path / "f16")
    assert result["tensors"] == len(q8_store.tensors) and sorted(p.name for p in tmp_path.iterdir()) == ["f16"]


def test_image_family_keeps_source_names_and_records_conv_shapes(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    for cls, arch, block in (("FluxTransformer2DModel", "flux", "double_blocks.0.img_attn.proj.weight"),
                             ("SomethingNew2DModel", runtime.GENERIC_ARCH, "blocks.0.proj.weight")):
        tensors = {block: rng.standard_normal((64, 64)).astype(np.float32),
                   "img_in.weight": rng.standard_normal((64, 16, 2, 4)).astype(np.float32),
                   "img_in.bias": rng.standard_normal(64).astype(np.float32)}
        src = tmp_path / cls
        src.mkdir()
        save_file(tensors, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps({"_class_name": cls}))
        store = quantize(src, tmp_path / f"{cls}-store", bit_width=8, encoding="gguf_ref_q8_0",
                         enable_time_aware=False)
        result = store.to_gguf(tmp_path / f"{cls}.gguf")
        reader = assert_round_trip(store, tmp_path / f"{cls}.gguf")
        assert field(reader, "general.architecture") == arch == result["architecture"]
        assert {t.name for t in reader.tensors} == set(tensors)
        assert store.tensors["img_in.weight"].quantized
        orig = reader.get_field("comfy.gguf.orig_shape.img_in.weight")  # as ComfyUI-GGUF's loader reads it
        assert orig.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32] and orig.contents() == [64, 16, 2, 4]
        assert bool(result["warnings"]) == (arch == runtime.GENERIC_ARCH)


def test_missing_hyper_parameter_is_an_export_error_naming_it(tmp_path):
    src = gguf_helpers.make_dream(tmp_path / "d", tokenizer=False)
    config = json.loads((src / "config.json").read_text())
    del config["rms_norm_eps"]
    (src / "config.json").write_text(json.dumps(config))
    store = quantize(src, tmp_path / "s", bit_rules={"*": 0})
    with pytest.raises(ExportError, match="rms_norm_eps"):
        store.to_gguf(tmp_path / "d.gguf")


# -- GGUF in ---------------------------------------------------------------------------------


def write_reference_gguf(src: Path, out: Path, qtype=gguf.GGMLQuantizationType.Q8_0) -> Path:
    """What a llama.cpp-style converter writes: llama.cpp names, gguf-py's own quantizer, F32 1-D tensors."""
    source = open_model(src)
    names, _ = runtime.llama_names("dream", list(source.tensors), 2)
    writer = gguf.GGUFWriter(out, "dream")
    for name in source.tensors:
        x = source.read_float32(name)
        t = qtype if x.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(names[name], gguf.quants.quantize(x, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0])
async def test_reference_quantizer_gguf_validates_with_independent_cosines(dream, tmp_path, qtype):
    path = write_reference_gguf(dream, tmp_path / "ref.gguf", qtype)
    report = ArrowQuantV2().validate_quality(dream, path)
    from arrow_quant_v2 import AsyncArrowQuantV2

    assert (await AsyncArrowQuantV2().validate_quality_async(dream, path))["per_layer_accuracy"] == \
        report["per_layer_accuracy"]
    source = open_model(dream)
    matrices = [n for n, t in source.tensors.items() if len(t.shape) == 2]
    assert sorted(report["per_layer"]) == sorted(matrices)
    assert report["num_lossless"] == len(source.tensors) - len(matrices)  # BF16 vectors -> F32: exact
    for name in matrices:
        x = source.read_float32(name).astype(np.float64)
        q = gguf.quants.dequantize(gguf.quants.quantize(source.read_float32(name), qtype), qtype).astype(np.float64)
        cosine = float((x * q).sum() / math.sqrt((x * x).sum() * (q * q).sum()))
        assert report["per_layer"][name]["cosine"] == pytest.approx(cosine, abs=1e-6)
        assert report["per_layer"][name]["bits"] == (8 if qtype.name == "Q8_0" else 4)
    assert report["worst_layers"][0][1] == report["min_cosine"]
    assert report["passed"] == all(p["cosine"] >= p["threshold"] for p in report["per_layer"].values())


def test_cli_validates_and_inspects_a_gguf(dream, q8_gguf, capsys):
    path, _ = q8_gguf
    assert cli(["validate", str(dream), str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "gguf" and report["passed"]
    assert cli(["inspect", str(path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["architecture"] == "dream"
    assert {t["source"] for t in listing["tensors"]} == set(open_model(dream).tensors)


def test_cli_export_picks_the_format_from_the_suffix(q8_store, tmp_path, capsys):
    assert cli(["export", str(q8_store.path), str(tmp_path / "a.gguf"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "gguf"
    assert cli(["export", str(q8_store.path), str(tmp_path / "b"), "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "safetensors"
    assert (tmp_path / "b" / "config.json").is_file()
    assert cli(["export", str(q8_store.path), str(tmp_path / "a.gguf"), "--quiet"]) == ExitCode.OUTPUT  # exists
    assert "already exists" in capsys.readouterr().err


# -- bad GGUF files --------------------------------------------------------------------------


@pytest.fixture()
def ref_gguf(dream, tmp_path):
    return write_reference_gguf(dream, tmp_path / "ref.gguf")


def test_truncated_gguf_names_file_and_tensor(dream, ref_gguf):
    data = ref_gguf.read_bytes()
    ref_gguf.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValidationError, match=r"ref\.gguf: tensor '.*' .*runs past the end"):
        ArrowQuantV2().validate_quality(dream, ref_gguf)


def test_corrupt_header_is_a_validation_error(dream, ref_gguf):
    data = bytearray(ref_gguf.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    ref_gguf.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match=r"ref\.gguf: not a readable GGUF file"):
        ArrowQuantV2().validate_quality(dream, ref_gguf)


def test_unknown_ggml_type_names_the_tensor(dream, ref_gguf):
    reader = gguf.GGUFReader(ref_gguf)
    victim = reader.tensors[3]
    type_offset = victim.field.offset + sum(p.nbytes for p in victim.field.parts[:4])
    del reader
    data = bytearray(ref_gguf.read_bytes())
    data[type_offset:type_offset + 4] = (250).to_bytes(4, "little")
    ref_gguf.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match=rf"tensor '{victim.name}' has ggml type 250"):
        ArrowQuantV2().validate_quality(dream, ref_gguf)


def test_gguf_of_another_model_names_missing_and_misshapen_tensors(dream, tmp_path):
    other = gguf_helpers.make_dream(tmp_path / "other", layers=1, tokenizer=False)
    path = write_reference_gguf(other, tmp_path / "other.gguf")
    with pytest.raises(ValidationError, match=r"other\.gguf: .*not in the GGUF.*model\.layers\.1\."):
        ArrowQuantV2().validate_quality(dream, path)
    wide = gguf_helpers.make_dream(tmp_path / "wide", intermediate=192, tokenizer=False)
    path = write_reference_gguf(wide, tmp_path / "wide.gguf")
    with pytest.raises(ValidationError, match=r"wide\.gguf: tensor 'blk\.0\.ffn_(gate|up|down)\.weight'"):
        ArrowQuantV2().validate_quality(dream, path)


# -- export as an async job ------------------------------------------------------------------


async def test_export_async_reports_progress_and_returns_the_file(q8_store, tmp_path):
    from arrow_quant_v2 import AsyncArrowQuantV2

    events = []
    result = await AsyncArrowQuantV2().export_async(q8_store.path, tmp_path / "a.gguf", on_event=events.append,
                                                    progress_interval=0)
    assert result["format"] == "gguf" and Path(result["path"]) == (tmp_path / "a.gguf").resolve()
    assert result["bytes"] == (tmp_path / "a.gguf").stat().st_size
    assert events[-1].fraction == 1.0 and any(e.stage == "export" for e in events)
    folder = await AsyncArrowQuantV2().export_async(q8_store.path, tmp_path / "f32", dtype="float32")
    assert folder["format"] == "safetensors" and (tmp_path / "f32" / "config.json").is_file()


@pytest.mark.parametrize("name", ["c.gguf", "c-float16"])
async def test_cancelled_export_stops_and_leaves_nothing(q8_store, tmp_path, monkeypatch, name):
    import asyncio
    import time

    from arrow_quant_v2 import AsyncArrowQuantV2, QuantizedModel
    from arrow_quant_v2.gguf_io import writer

    tensor_bytes, dequantize = writer._tensor_bytes, QuantizedModel.dequantize
    monkeypatch.setattr(writer, "_tensor_bytes", lambda *a: (time.sleep(0.05), tensor_bytes(*a))[1])  # a slow disk
    monkeypatch.setattr(QuantizedModel, "dequantize", lambda *a: (time.sleep(0.05), dequantize(*a))[1])
    task = None

    def cancel_on_first_tensor(event):
        if event.stage == "export" and event.tensors_done and task is not None:
            task.cancel()

    task = asyncio.ensure_future(AsyncArrowQuantV2().export_async(
        q8_store.path, tmp_path / name, on_event=cancel_on_first_tensor, progress_interval=0))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(tmp_path.iterdir()) == []


async def test_export_async_rejects_bad_arguments_before_running(q8_store, tmp_path):
    from arrow_quant_v2 import AsyncArrowQuantV2, ConfigurationError

    with pytest.raises(ConfigurationError, match="format='onnx'"):
        await AsyncArrowQuantV2().export_async(q8_store.path, tmp_path / "x", format="onnx")
    with pytest.raises(ConfigurationError, match="dtype"):
        await AsyncArrowQuantV2().export_async(q8_store.path, tmp_path / "x.gguf", dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_llada_gets_its_names_hparams_and_llama_cpp_row_order(tmp_path):
    src = gguf_helpers.make_llada(tmp_path / "llada")
    store = quantize(src, tmp_path / "s", bit_width=8, encoding="gguf_ref_q8_0")
    path = tmp_path / "llada.gguf"
    result = store.to_gguf(path)
    target = runtime.describe(src, list(store.tensors), {}, with_metadata=False)
    reader = assert_round_trip(store, path, target)
    assert source_of(reader)["output.weight"] == "model.transformer.ff_out.weight"
    assert source_of(reader)["blk.1.ffn_down.weight"] == "model.transformer.blocks.1.ff_out.weight"
    assert source_of(reader)["blk.0.ffn_gate.weight"] == "model.transformer.blocks.0.ff_proj.weight"
    config = json.loads((src / "config.json").read_text())
    assert field(reader, "general.architecture") == "llada" == result["architecture"]
    for key, value in (("embedding_length", "d_model"), ("block_count", "n_layers"), ("attention.head_count", "n_heads"),
                       ("feed_forward_length", "mlp_hidden_size"), ("context_length", "max_sequence_length")):
        assert field(reader, f"llada.{key}") == config[value]
    assert field(reader, "llada.rope.freq_base") == config["rope_theta"]
    assert field(reader, "llada.attention.causal") is False and field(reader, "diffusion.shift_logits") is False
    assert field(reader, "tokenizer.ggml.mask_token_id") == config["mask_token_id"]
    report = ArrowQuantV2().validate_quality(src, path)
    assert report["per_layer_accuracy"] == pytest.approx({n: store.tensors[n].cosine for n in report["per_layer"]},
                                                         abs=1e-9)


def test_denoiser_only_gguf_of_a_full_checkpoint_compares_the_denoiser(tmp_path):
    """ComfyUI-GGUF's convert.py strips ``model.diffusion_model.`` and keeps only the denoiser."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    full = {"model.diffusion_model.input_blocks.0.0.weight": rng.standard_normal((64, 4, 2, 4)).astype(np.float32),
            "model.diffusion_model.out.2.weight": rng.standard_normal((64, 64)).astype(np.float32),
            "first_stage_model.decoder.conv_in.weight": rng.standard_normal((8, 4)).astype(np.float32)}
    (tmp_path / "ckpt").mkdir()
    save_file(full, str(tmp_path / "ckpt" / "model.safetensors"))
    writer = gguf.GGUFWriter(tmp_path / "unet.gguf", "sd1")
    for name, x in full.items():
        if name.startswith("model.diffusion_model."):
            writer.add_tensor(name[len("model.diffusion_model."):], x.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = ArrowQuantV2().validate_quality(tmp_path / "ckpt", tmp_path / "unet.gguf")
    assert sorted(report["per_layer"]) == sorted(n for n in full if n.startswith("model.diffusion_model."))
    assert report["passed"] and report["architecture"] == "sd1"
    assert "not compared" in report["warnings"][0]


# -- the library's ggml block types (target_runtime="gguf") ----------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_target_runtime_gguf_stores_export_losslessly(tmp_path, bits):
    """k-quants need rows of 256: the 320-wide vocabulary rows and 64-wide rows fall back to the
    types llama.cpp uses; every tensor still decodes in gguf-py exactly as in the store."""
    src = gguf_helpers.make_dream(tmp_path / "d", hidden=256, intermediate=512, vocab=320)
    store = quantize(src, tmp_path / "s", bit_width=bits, target_runtime="gguf")
    result = store.to_gguf(tmp_path / "d.gguf")
    assert_round_trip(store, tmp_path / "d.gguf")
    main = {8: "Q8_0", 4: "Q4_K", 2: "Q2_K"}[bits]
    assert result["ggml_types"][main] > 0
    report = ArrowQuantV2().validate_quality(src, tmp_path / "d.gguf")
    assert report["per_layer_accuracy"] == pytest.approx({n: store.tensors[n].cosine for n in report["per_layer"]},
                                                         abs=1e-9)
