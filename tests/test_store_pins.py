"""The stores of the sample model, pinned: a refactor must not change a single stored value.

Each config below quantizes ``tiny-dream`` and every Parquet row is reduced to a digest of
its metadata columns and of each blob; the digests must equal ``tests/data/store_pins.json``.
A change to an encoder, the planner, the chunking or the shard cuts shows up here as the
list of rows that changed. A deliberate change updates the pins in the same commit:

    ARROW_QUANT_UPDATE_PINS=1 python -m pytest -q tests/test_store_pins.py

Why rows decoded through pyarrow and not the files' own sha256: the Parquet bytes also hold
the writer's ``created_by`` version string and pyarrow's page and encoding choices, which
change with a pyarrow upgrade while every value a reader sees stays the same. What is pinned
is exactly what ``load_quantized`` reads back (and which shard each row is in).

The search kernels are compiled with reassociating fastmath, so a CPU with another vector
width may sum in another order and pick another scale at a tie: the pins were recorded on
the CPU named in the pin file. On another CPU the test still checks everything except the
digests of quantized blobs and float figures (names, chunks, shards, encodings, widths,
groups, reasons and every lossless row).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from llvmlite import binding as llvm

from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
from arrow_quant_v2.samples import sample_path

PINS = Path(__file__).parent / "data" / "store_pins.json"
BLOBS = ("codes", "scales", "zeros", "aux")
FIGURES = ("cosine", "rel_error", "sqnr_db")
#: Few and quick, but covering the width ladder, the same-width alternate and fallbacks (edge),
#: the size-budget allocator and the per-layer group search.
CONFIGS = {
    "edge": lambda: DiffusionQuantConfig.from_profile("edge"),
    "local": lambda: DiffusionQuantConfig.from_profile("local"),
    "cloud": lambda: DiffusionQuantConfig.from_profile("cloud"),
    "local-budget-17mb": lambda: DiffusionQuantConfig.from_profile("local", target_model_size_mb=17.0),
    "local-spatial": lambda: DiffusionQuantConfig.from_profile("local", enable_spatial=True),
}


def _value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v.hex() if isinstance(v, float) else v


def _sha(data) -> str:
    """A short sha256 (16 hex digits are plenty to notice a change)."""
    raw = data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def store_digest(store: Path) -> dict:
    """``{"tensor#chunk": {"shard", "meta", "structure", "lossless", "blobs"}}`` for every row: digests
    of its metadata columns, of those without the float figures, and of its blobs."""
    rows = {}
    for shard in sorted(store.glob("weights-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            meta = {k: _value(v) for k, v in row.items() if k not in BLOBS}
            rows[f"{row['name']}#{row['chunk']}"] = {
                "shard": shard.name,
                "meta": _sha(meta),
                "structure": _sha({k: v for k, v in meta.items() if k not in FIGURES}),
                "lossless": row["bits"] == 0,
                "blobs": _sha(b"".join(_sha(row[k] if row[k] is not None else b"null").encode() for k in BLOBS)),
            }
    return rows


def _cpu() -> str:
    return llvm.get_host_cpu_name()


@pytest.fixture(scope="module")
def tiny_dream(tmp_path_factory):
    return sample_path("tiny-dream", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("label", list(CONFIGS))
def test_store_rows_match_pins(label, tiny_dream, tmp_path):
    out = tmp_path / label
    ArrowQuantV2().quantize_diffusion_model(str(tiny_dream), str(out), config=CONFIGS[label]())
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {"cpu": _cpu(), "configs": {}}
    if os.environ.get("ARROW_QUANT_UPDATE_PINS"):
        pins["cpu"] = _cpu()
        pins["configs"][label] = store_digest(out)
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        return
    want = pins["configs"][label]
    same_cpu = pins["cpu"] == _cpu()
    got = store_digest(out)
    assert sorted(got) == sorted(want), f"{label}: the stored rows differ: {sorted(set(got) ^ set(want))[:10]}"
    changed = []
    for key, row in got.items():
        pin = want[key]
        if row["shard"] != pin["shard"] or (row["lossless"] or same_cpu) and row["blobs"] != pin["blobs"]:
            changed.append(key)
        elif row["meta" if same_cpu else "structure"] != pin["meta" if same_cpu else "structure"]:
            changed.append(key)
    assert not changed, (f"{label}: {len(changed)} of {len(got)} rows differ from the pins "
                         f"(first: {changed[:5]}); if deliberate, update the pins (see this file's docstring)")
