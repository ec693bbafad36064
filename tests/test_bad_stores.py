"""Hostile and damaged stores: every reader entry point gives a typed error or a correct result.

Each case of ``tests/badstores.py`` is run in a child process under an address-space
limit (RLIMIT_AS) through ``load_quantized``, ``dequantize`` (every tensor),
``to_safetensors``, ``validate_quality`` and ``arrow-quant inspect``: a crash (signal),
an untyped exception or a write outside the export folder fails the test. Hypothesis
then fuzzes manifest fields and row values in-process. The overwrite tests check that
a folder is replaced only when its manifest carries our signature.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arrow_quant_v2 import ArrowQuantError, OutputError, StoreFormatError, load_quantized
from arrow_quant_v2.engine import quantize_model
from tests import badfiles, badstores


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return badstores.make_store(tmp_path_factory.mktemp("pristine"))


def _files_under(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_the_pristine_store_passes_every_entry_point(pristine, tmp_path):
    """The control: the corpus breaks a store that every step reads correctly."""
    model, store = pristine
    code, steps, err = badstores.run_case(store, model, tmp_path)
    assert code == 0 and steps is not None, err
    assert [s[1] for s in steps] == ["ok"] * 5, steps


@pytest.mark.parametrize("case", badstores.CASES, ids=[c.id for c in badstores.CASES])
def test_hostile_store(case, pristine, tmp_path):
    model, store = pristine
    victims = [Path("/tmp/aq-victim.safetensors"), Path("/tmp/aq-victim-bashrc")]
    for v in victims:
        v.unlink(missing_ok=True)
    bad = badstores.build_case(case, store, tmp_path)
    code, steps, err = badstores.run_case(bad, model, tmp_path)
    assert code == 0 and steps is not None, f"the child crashed (exit {code}):\n{err[-3000:]}"
    untyped = [s for s in steps if s[1].startswith("UNTYPED")]
    assert not untyped, untyped
    failed = [s for s in steps if s[1] != "ok"]
    assert failed, f"{case.id}: every entry point accepted the damaged store"
    assert any(s[1] == "StoreFormatError" and case.field in s[2] for s in failed), failed
    # nothing written outside the export folder, whatever the store said
    export = tmp_path / "export"
    assert all(p.startswith("deep") for p in _files_under(export)), _files_under(export)
    assert not any(v.exists() for v in victims)


def test_store_format_error_names_store_tensor_and_field(pristine, tmp_path):
    _, store = pristine
    bad = badstores.build_case(next(c for c in badstores.CASES if c.id == "codes-cut-to-1-byte"), store, tmp_path)
    s = load_quantized(bad)
    name = next(n for n, e in s.tensors.items() if e.quantized)
    with pytest.raises(StoreFormatError) as info:
        s.dequantize(name)
    e = info.value
    assert (e.store, e.tensor, e.field) == (str(bad), name, "codes")
    assert str(bad) in str(e) and name in str(e) and "codes" in str(e)


def test_sha256_is_checked_once_and_can_be_skipped_for_trusted_stores(pristine, tmp_path, monkeypatch):
    from arrow_quant_v2 import storecheck

    _, store = pristine
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    hashed = []
    real = storecheck.file_sha256
    monkeypatch.setattr(storecheck, "file_sha256", lambda p: hashed.append(p) or real(p))
    load_quantized(copy)
    load_quantized(copy)
    shards = len(json.loads((copy / "manifest.json").read_text())["shards"])
    assert len(hashed) == shards, "each shard is hashed once, then the (size, mtime) cache answers"
    f = copy / badstores.SHARD
    data = bytearray(f.read_bytes())
    data[300] ^= 1
    f.write_bytes(bytes(data))  # same size, new mtime: hashed again, and caught
    with pytest.raises(StoreFormatError, match="sha256"):
        load_quantized(copy)
    hashed.clear()
    try:
        load_quantized(copy, verify_checksums=False)  # trusted: the hash is skipped (the flip may still be caught)
    except StoreFormatError as e:
        assert not e.field.endswith(".sha256")
    assert hashed == []


# -- hypothesis: manifest fields and row values -------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
MANIFEST_KEYS = ["format", "format_version", "shards", "extra_files", "source", "totals", "config", "modality",
                 "created"]
SHARD_KEYS = ["file", "tensors", "rows", "bytes", "sha256"]
INTS = st.one_of(st.integers(-3, 3), st.integers(-2**63, 2**63 - 1), st.sampled_from([2**31, 2**40, 1 << 62]))
ROW_FIELDS = {"row_start": INTS, "row_count": INTS, "chunk": st.integers(-2**31, 2**31 - 1),
              "bits": st.integers(-128, 127), "group_size": st.integers(-2**31, 2**31 - 1), "nbytes": INTS,
              "shape": st.lists(INTS, max_size=5), "dtype": st.sampled_from(["F32", "BF16", "I8", "U64", "Q", ""]),
              "encoding": st.sampled_from(["raw", "affine", "symmetric", "kquant", "kquant_nl", "affine_opt", "x"])}
SETTINGS = settings(max_examples=int(os.environ.get("AQ_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _read_everything(store: Path, out: Path) -> None:
    """Every reader path; a typed error is a correct answer to a damaged store."""
    try:
        s = load_quantized(store)
        for n in s:
            assert s.dequantize(n).shape == s.tensors[n].shape
        s.to_safetensors(out)
    except ArrowQuantError:
        pass


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory, pristine):
    return tmp_path_factory.mktemp("fuzz")


def _fresh_copy(store: Path, work: Path):
    """An empty ``work`` folder holding a copy of ``store`` (hypothesis reuses one folder per test)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copytree(store, work / "store")
    return work, work / "store"


@SETTINGS
@given(key=st.sampled_from(MANIFEST_KEYS + [f"shards.{k}" for k in SHARD_KEYS]), value=JSON)
def test_fuzzed_manifest_field(pristine, fuzz_root, key, value):
    work, copy = _fresh_copy(pristine[1], Path(fuzz_root) / "m")
    m = badstores.manifest(copy)
    if key.startswith("shards."):
        m["shards"][0][key.split(".", 1)[1]] = value
    else:
        m[key] = value
    badstores.write_manifest(copy, m)
    _read_everything(copy, work / "export" / "out")
    assert all(p.startswith("out") for p in _files_under(work / "export"))


@SETTINGS
@given(data=st.data(), which=st.integers(0, 200))
def test_fuzzed_row_values(pristine, fuzz_root, data, which):
    work, copy = _fresh_copy(pristine[1], Path(fuzz_root) / "r")
    fields = data.draw(st.lists(st.sampled_from(sorted(ROW_FIELDS) + ["codes", "scales", "aux"]), min_size=1,
                                max_size=3, unique=True))

    def mutate(rows):
        row = rows[which % len(rows)]
        for f in fields:
            if f in ROW_FIELDS:
                row[f] = data.draw(ROW_FIELDS[f], label=f)
            elif row[f] is not None:
                cut = data.draw(st.integers(0, len(row[f]) + 8), label=f)
                row[f] = (row[f] + b"\x7f" * 8)[:cut]
        return rows

    try:
        badstores.edit_rows(copy, mutate)
    except (pa.ArrowException, OverflowError, ValueError, TypeError):  # pyarrow cannot even write the value
        return
    badstores.rehash(copy)
    _read_everything(copy, work / "export" / "out")


# -- overwrite only what is ours ----------------------------------------------------------------


def test_overwrite_refuses_a_folder_with_a_foreign_manifest(tmp_path):
    model = badfiles.make_model(tmp_path / "m")
    project = tmp_path / "project"
    project.mkdir()
    (project / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    (project / "main.py").write_text("print('precious')")
    before = badfiles.hash_tree(project)
    with pytest.raises(OutputError, match="not an ArrowQuant store"):
        quantize_model(model, project, overwrite=True)
    assert badfiles.hash_tree(project) == before
    assert badfiles.leftovers(project) == []


def test_a_refused_run_deletes_no_sibling(tmp_path):
    """Hidden siblings named like ours are not touched by a run that is then refused, nor by
    any run when they are not ours (no lock, journal or signature inside)."""
    model = badfiles.make_model(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("[]")
    decoys = [tmp_path / ".out.old-deadbeef", tmp_path / ".out.partial-0123456789ab-deadbeef",
              tmp_path / ".out.partial-whatever"]
    for d in decoys:
        d.mkdir()
        (d / "keep.txt").write_text("not yours")
    with pytest.raises(OutputError):
        quantize_model(model, out, overwrite=True)
    assert all((d / "keep.txt").is_file() for d in decoys)
    shutil.rmtree(out)
    quantize_model(model, tmp_path / "out")  # succeeds and sweeps only leftovers that are ours
    assert all((d / "keep.txt").is_file() for d in decoys)


def test_overwrite_replaces_our_store(tmp_path):
    model = badfiles.make_model(tmp_path / "m")
    out = tmp_path / "out"
    quantize_model(model, out)
    quantize_model(model, out, overwrite=True)
    assert load_quantized(out).tensors and badfiles.leftovers(out) == []


def test_export_writes_the_source_layout(pristine, tmp_path):
    """The checks do not get in the way of a good store: weights and extra files are exported."""
    _, store = pristine
    s = load_quantized(store)
    out = s.to_safetensors(tmp_path / "exp")
    names = _files_under(out)
    assert "model.safetensors" in names and "config.json" in names
    reloaded = np.asarray(load_quantized(store).dequantize("blocks.0.norm1.weight"))
    assert np.array_equal(reloaded, np.ones(128, np.float32))
