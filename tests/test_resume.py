"""Kill a quantization with SIGKILL, resume it, and get the same store as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
from arrow_quant_v2.engine import quantize_model

CONFIG = dict(bit_width=4, max_shard_mb=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("resume-model")
    save_file({f"blocks.{i}.mlp.up_proj.weight": rng.standard_t(5, (1024, 1024)).astype(np.float32) * 0.02
               for i in range(24)}, str(root / "model.safetensors"))
    return root


def shard_bytes(store: Path):
    return {f.name: f.read_bytes() for f in sorted(store.glob("weights-*.parquet"))}


def test_resume_after_sigkill_is_byte_identical(model, tmp_path):
    reference = tmp_path / "reference"
    quantize_model(model, reference, DiffusionQuantConfig(**CONFIG))

    out = tmp_path / "out"
    code = (f"from arrow_quant_v2.engine import quantize_model; from arrow_quant_v2 import DiffusionQuantConfig;"
            f"quantize_model({str(model)!r}, {str(out)!r}, DiffusionQuantConfig(**{CONFIG!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    journal = None
    while time.time() < deadline and journal is None:  # kill once at least one shard is journaled
        journal = next(iter(tmp_path.glob(".out.partial-*/journal.json")), None)
        time.sleep(0.01)
    assert journal is not None, "the run never closed a shard"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave anything at the output path"
    kept = json.loads(journal.read_text())["shards"]
    assert kept

    events = []
    result = quantize_model(model, out, DiffusionQuantConfig(**CONFIG), resume=True, progress=events.append)
    assert events[0].tensors_done >= sum(s["tensors"] for s in kept), "journaled tensors are reused, not redone"
    assert shard_bytes(out) == shard_bytes(reference)
    ref = json.loads((reference / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got["shards"] == ref["shards"] and got["totals"] == ref["totals"]
    assert result["cosine_similarity"] == pytest.approx(ref["totals"]["cosine_similarity"], abs=0)
    assert not list(tmp_path.glob(".out.partial-*"))


def kill_after_first_shard(model: Path, out: Path) -> None:
    """Quantize ``model`` to ``out`` (CONFIG) in a child and SIGKILL it once a shard is journaled."""
    code = (f"from arrow_quant_v2.engine import quantize_model; from arrow_quant_v2 import DiffusionQuantConfig;"
            f"quantize_model({str(model)!r}, {str(out)!r}, DiffusionQuantConfig(**{CONFIG!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.parent.glob(f".{out.name}.partial-*/journal.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_changed_config_starts_over(model, tmp_path):
    out = tmp_path / "out"
    kill_after_first_shard(model, out)
    events = []
    quantize_model(model, out, DiffusionQuantConfig(**dict(CONFIG, bit_width=8)), resume=True, progress=events.append)
    assert events[0].tensors_done == 0, "a different config must not reuse the killed run's shards"
    assert all(e.bits == 8 for e in load_quantized(out).tensors.values())
    assert not list(tmp_path.glob(".out.partial-*")), "the stale partial of the other config is cleaned up"


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["rewritten", "rewritten-mtime-restored"])
def test_changed_source_data_starts_over(tmp_path, keep_mtime):
    """Same header, new tensor bytes: the resume key covers the data, so nothing stale is reused."""
    rng = np.random.default_rng(5)
    model = tmp_path / "m"
    model.mkdir()
    weights = {f"blocks.{i}.mlp.up_proj.weight": rng.standard_normal((1024, 1024)).astype(np.float32) * 0.02
               for i in range(12)}
    save_file(weights, str(model / "model.safetensors"))
    out = tmp_path / "out"
    kill_after_first_shard(model, out)
    st = (model / "model.safetensors").stat()
    save_file({k: -v for k, v in weights.items()}, str(model / "model.safetensors"))  # same header, every value negated
    if keep_mtime:
        os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    events = []
    quantize_model(model, out, DiffusionQuantConfig(**CONFIG), resume=True, progress=events.append)
    assert events[0].tensors_done == 0, "changed weights must not reuse the killed run's shards"
    store = load_quantized(out)
    name = next(iter(weights))
    assert np.corrcoef(store.dequantize(name).ravel(), -weights[name].ravel())[0, 1] > 0.99
