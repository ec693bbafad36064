"""A model of many tiny tensors (5,000 here; benchmarks/bench_many_tensors.py measures 100,000):
small rows share row groups, the store opens with one footer read per shard, and every tensor
reads back exactly. Behaviour only: the timings live in the benchmark."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from arrow_quant_v2 import DiffusionQuantConfig, load_quantized
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.store import SHARED_GROUPS_AFTER
from benchmarks.bench_many_tensors import SHAPES, make_model

COUNT = 5_000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    make_model(root / "model", COUNT)
    quantize_model(root / "model", root / "store", DiffusionQuantConfig(bit_width=4, min_accuracy=0.0))
    return root / "model", root / "store"


def test_small_rows_share_row_groups(store):
    _, out = store
    files = sorted(out.glob("weights-*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
    # the first rows of a shard keep a row group each (ordinary models are stored as before); then tiny rows share
    assert rows == COUNT and groups <= SHARED_GROUPS_AFTER + 10, (rows, groups)


def test_every_tiny_tensor_reads_back(store):
    from safetensors.numpy import load_file

    model, out = store
    source = load_file(str(model / "model.safetensors"))
    s = load_quantized(out)
    assert len(s) == COUNT and {e.shape for e in s.tensors.values()} == set(SHAPES)
    for name in list(source)[::97]:
        got = s.dequantize(name)
        assert got.shape == source[name].shape
        if not s.tensors[name].quantized:
            assert np.array_equal(got, source[name])
        else:
            assert np.corrcoef(got.ravel(), source[name].ravel())[0, 1] > 0.9
