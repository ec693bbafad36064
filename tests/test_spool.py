"""Memory bounded by the chunk window: encoded chunks beyond SPOOL_MEMORY_BYTES wait on disk, in an
anonymous file, and the store is the same byte for byte (also when a tensor falls back or holds
NaN), with nothing left beside it."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from arrow_quant_v2 import DiffusionQuantConfig, engine, layout, load_quantized
from arrow_quant_v2.engine import ChunkSpool, quantize_model

from test_store_pins import store_digest


@pytest.fixture
def many_chunks(monkeypatch):
    """Chunks of 1024 elements, so every tensor below is cut into many store rows."""
    monkeypatch.setattr(layout, "MIN_SPLIT_ELEMENTS", 1024)
    monkeypatch.setattr(layout, "CHUNK_ELEMENTS", 1024)


def model(folder):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 64)) * 0.02).astype(np.float32)
    w[:, 5] *= 40  # outlier column: the int2 default misses, the chain takes the alternate or widens
    bad = (rng.standard_normal((128, 64)) * 0.02).astype(np.float32)
    bad[100, 3] = np.nan  # in a late chunk: the tensor is re-read losslessly
    t = {"blocks.0.mlp.up.weight": w, "blocks.0.attn.q.weight": (rng.standard_normal((192, 64)) * 0.02).astype(np.float32),
         "blocks.0.attn.nan.weight": bad, "blocks.0.norm.weight": np.ones(64, np.float32)}
    folder.mkdir()
    save_file(t, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("bits", [2, 4])
def test_spooled_chunks_give_the_same_store_and_leave_nothing(tmp_path, monkeypatch, many_chunks, bits):
    src = model(tmp_path / "model")
    config = DiffusionQuantConfig(bit_width=bits, lossless_below=0, min_accuracy=0.97)
    in_memory = quantize_model(src, tmp_path / "memory", config)
    monkeypatch.setattr(engine, "SPOOL_MEMORY_BYTES", 0)  # every chunk goes through the file
    opened = []
    real = engine.tempfile.TemporaryFile
    monkeypatch.setattr(engine.tempfile, "TemporaryFile", lambda **kw: opened.append(kw) or real(**kw))
    spooled = quantize_model(src, tmp_path / "spooled", config)
    assert opened, "nothing was spooled"
    assert store_digest(tmp_path / "spooled") == store_digest(tmp_path / "memory")
    assert spooled["fallbacks"] == in_memory["fallbacks"] and spooled["warnings"] == in_memory["warnings"]
    assert any("NaN" in w for w in spooled["warnings"])
    reason = load_quantized(tmp_path / "spooled").tensors["blocks.0.mlp.up.weight"].reason
    assert bits == 4 or " cos " in reason, reason  # at int2 the outlier tensor was re-encoded from spooled chunks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "model", "spooled"]


def test_a_spool_keeps_the_first_bytes_in_memory_and_reads_the_rest_back(tmp_path):
    spool = ChunkSpool(tmp_path, memory_bytes=10)
    chunks = [(0, 1, {"codes": np.arange(8, dtype=np.uint8), "scales": None}),
              (1, 2, {"codes": np.arange(8, 24, dtype=np.uint8), "scales": np.full(3, 7, np.uint8)}),
              (2, 3, None)]
    for c in chunks:
        spool.add(*c)
    assert spool.nbytes == 8 + 16 + 3 and [s for *_, s in spool.chunks] == [False, True, False]
    for (r0, r1, got), (e0, e1, want) in zip(spool, chunks):
        assert (r0, r1) == (e0, e1)
        if want is None:
            assert got is None
        else:
            assert {k: None if v is None else v.tolist() for k, v in got.items()} == \
                   {k: None if v is None else v.tolist() for k, v in want.items()}
    spool.close()
    assert list(tmp_path.iterdir()) == []  # the file never had a name
