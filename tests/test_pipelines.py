"""diffusers pipelines and weight variants: the denoiser is quantized by default, the other components
are copied byte for byte; fp16 variants beside the default weights are a choice, not a conflict."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2 import ArrowQuantV2, ConfigurationError, ModelFormatError, ModelNotFoundError
from arrow_quant_v2.cli import ExitCode, main
from arrow_quant_v2.pipelines import file_variant, index_variant
from arrow_quant_v2.source import open_model
from arrow_quant_v2.store import load_quantized


def weights(prefix: str, seed: int, n: int = 2):
    rng = np.random.default_rng(seed)
    return {f"{prefix}.{i}.weight": (rng.standard_normal((96, 64)) * 0.02).astype(np.float32) for i in range(n)} | {
        f"{prefix}.norm.bias": np.zeros(64, np.float32)}


def save_with_fp16(folder: Path, stem: str, tensors) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(folder / f"{stem}.fp16.safetensors"))


@pytest.fixture
def pipeline(tmp_path) -> Path:
    """A Stable-Diffusion-shaped pipeline folder, every weight component with an fp16 variant."""
    root = tmp_path / "sd"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None]}))
    save_with_fp16(root / "unet", "diffusion_pytorch_model", weights("down_blocks", 1, 3) | {
        "time_embedding.linear_1.weight": np.full((96, 64), 0.01, np.float32)})
    save_with_fp16(root / "vae", "diffusion_pytorch_model", weights("encoder", 2))
    save_with_fp16(root / "text_encoder", "model", weights("text_model.encoder", 3))
    (root / "text_encoder" / "pytorch_model.bin").write_bytes(b"a pickle we never copy")
    for comp in ("unet", "vae", "text_encoder"):
        (root / comp / "config.json").write_text(json.dumps({"_class_name": comp}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    return root


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


COPIED_ALWAYS = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"]


@pytest.mark.parametrize("variant, suffix, dtype", [(None, "", "F32"), ("fp16", ".fp16", "F16")])
def test_denoiser_quantized_other_components_copied_byte_for_byte(pipeline, tmp_path, variant, suffix, dtype):
    q = ArrowQuantV2()
    out = tmp_path / f"store-{variant}"
    q.quantize_diffusion_model(str(pipeline), out, variant=variant)
    store = load_quantized(out)
    assert store.tensors and all(name.startswith("unet/") for name in store.tensors)
    assert {e.dtype for e in store.tensors.values()} == {dtype}
    assert store.manifest["source"]["components"] == ["unet"] and store.manifest["source"]["variant"] == variant
    copied = COPIED_ALWAYS + [f"vae/diffusion_pytorch_model{suffix}.safetensors", f"text_encoder/model{suffix}.safetensors"]
    source, written = files(pipeline), files(out)
    for rel in copied:
        assert written[rel] == source[rel], rel
    # no weights of the denoiser, no other variant, no pickle: only the store's own files besides
    store_files = {r for r in written if r not in copied}
    assert all(r in ("manifest.json",) or r.endswith(".parquet") for r in store_files), store_files
    assert q.validate_quality(str(pipeline), out)["passed"]
    # the dequantized export rebuilds the whole pipeline layout
    export = store.to_safetensors(tmp_path / f"export-{variant}")
    for rel in copied:
        assert (export / rel).read_bytes() == source[rel], rel
    assert open_model(export, variant=variant).tensors.keys() == open_model(pipeline, variant=variant).tensors.keys()


def test_components_choose_what_is_quantized(pipeline, tmp_path):
    out = tmp_path / "s"
    ArrowQuantV2().quantize_diffusion_model(str(pipeline), out, components=["unet", "text_encoder"])
    store = load_quantized(out)
    assert {n.split("/")[0] for n in store.tensors} == {"unet", "text_encoder"}
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (pipeline / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert not (out / "text_encoder" / "model.safetensors").exists()
    assert ArrowQuantV2().validate_quality(str(pipeline), out)["passed"]
    with pytest.raises(ConfigurationError, match="'nope'.*unet, vae, text_encoder|'nope'.*text_encoder"):
        open_model(pipeline, components=["nope"])
    with pytest.raises(ModelNotFoundError, match="variant 'bf16'.*default, 'fp16'"):
        open_model(pipeline, variant="bf16")


def test_cli_components_and_variant(pipeline, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", str(pipeline), str(out), "--components", "unet,vae", "--variant", "fp16", "-q"]) == ExitCode.OK
    assert {n.split("/")[0] for n in load_quantized(out).tensors} == {"unet", "vae"}
    assert main(["validate", str(pipeline), str(out)]) == ExitCode.OK
    assert main(["inspect", str(pipeline), "--components", "text_encoder", "--json"]) == ExitCode.OK
    capsys.readouterr()
    assert main(["quantize", str(pipeline), str(tmp_path / "x"), "--components", "nope", "-q"]) == ExitCode.USAGE


def test_variants_side_by_side_are_not_a_conflict_but_duplicates_are(tmp_path):
    model = tmp_path / "m"
    tensors = weights("layers", 4)
    save_with_fp16(model, "model", tensors)
    assert {t.dtype for t in open_model(model).tensors.values()} == {"F32"}
    assert {t.dtype for t in open_model(model, variant="fp16").tensors.values()} == {"F16"}
    (model / "model.safetensors").unlink()  # only a variant left: it is the weights
    assert {t.dtype for t in open_model(model).tensors.values()} == {"F16"}
    save_file(tensors, str(model / "model.safetensors"))
    save_file({"layers.0.weight": tensors["layers.0.weight"]}, str(model / "extra.safetensors"))  # same variant
    with pytest.raises(ModelFormatError, match="layers.0.weight.*also appears"):
        open_model(model)
    with pytest.raises(ConfigurationError, match="variant"):
        open_model(model, variant="../x")


def test_sharded_variants_each_with_their_index(tmp_path):
    model = tmp_path / "sharded"
    model.mkdir()
    tensors = weights("layers", 5, 4)
    names = sorted(tensors)
    for variant, cast in ((None, np.float32), ("fp16", np.float16)):
        tag = f".{variant}" if variant else ""
        shards = {f"model{tag}-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
        for shard, members in shards.items():
            save_file({k: tensors[k].astype(cast) for k in members}, str(model / shard))
        index = f"model.safetensors.index{tag}.json"
        (model / index).write_text(json.dumps({"weight_map": {k: s for s, ms in shards.items() for k in ms}}))
    for variant, dtype in ((None, "F32"), ("fp16", "F16")):
        src = open_model(model, variant=variant)
        assert sorted(src.tensors) == names and {t.dtype for t in src.tensors.values()} == {dtype}
        assert len(src.files) == 2
        assert not [p for p in src.extra_files() if p.suffix == ".safetensors" or "index" in p.name]


@pytest.mark.parametrize("name, variant", [
    ("model.safetensors", None), ("model.fp16.safetensors", "fp16"), ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
    ("model-00001-of-00002.safetensors", None), ("model.fp16-00001-of-00002.safetensors", "fp16"),
    ("model-00001-of-00002.bf16.safetensors", "bf16"), ("v1.5-pruned.safetensors", None), ("sd_xl.fp16x.safetensors", None),
])
def test_file_variant(name, variant):
    assert file_variant(name) == variant


def test_index_variant():
    assert index_variant("model.safetensors.index.json") is None
    assert index_variant("diffusion_pytorch_model.safetensors.index.fp16.json") == "fp16"
