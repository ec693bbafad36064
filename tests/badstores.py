"""A corpus of damaged and hostile quantized stores (the store-side twin of ``badfiles``).

Each case copies a small valid store and breaks it the way a damaged download or a
hostile author could: the manifest, the file names, the Parquet rows (rewritten with
pyarrow so the file is well-formed and only the values lie), the bytes. Unless a case
is about checksums, the manifest's sizes and SHA-256 are updated after the damage, so
the deeper checks are what gets exercised.

``python -m tests.badstores`` runs every case through the reader and prints
``case | error type: message`` as a table (for reports).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from tests import badfiles

SHARD = "weights-00001.parquet"


def make_store(tmp: Path) -> tuple:
    """A small model (a 2-chunk matrix, F32/F16/BF16 matrices, a norm, an int tensor) and its int4 store."""
    from arrow_quant_v2 import DiffusionQuantConfig
    from arrow_quant_v2.engine import quantize_model

    tensors = badfiles.small_tensors() + [badfiles.tensor("blocks.1.proj.weight", "F32", (1024, 512), seed=9)]
    model = badfiles.make_model(tmp / "model", tensors)
    store = tmp / "store"
    quantize_model(model, store, DiffusionQuantConfig(bit_width=4, min_accuracy=0.0, max_shard_mb=1))
    return model, store


# -- editing a store ------------------------------------------------------------------------------


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def write_manifest(store: Path, m, raw: Optional[bytes] = None) -> None:
    (store / "manifest.json").write_bytes(raw if raw is not None else json.dumps(m).encode())


def rehash(store: Path) -> None:
    """Make the manifest's shard sizes and SHA-256 match the files again."""
    from arrow_quant_v2.storecheck import file_sha256

    m = manifest(store)
    for s in m["shards"]:
        f = store / s["file"]
        if f.is_file():
            s["bytes"], s["sha256"] = f.stat().st_size, file_sha256(f)
    write_manifest(store, m)


def edit_rows(store: Path, fn: Callable[[List[dict]], List[dict]], shard: str = SHARD, schema=None) -> None:
    """Rewrite ``shard`` with ``fn(rows)`` (one row group per row, as written), fix the manifest's row count."""
    from arrow_quant_v2.store import SCHEMA

    rows = fn(pq.read_table(store / shard).to_pylist())
    schema = schema or SCHEMA
    with pq.ParquetWriter(store / shard, schema) as w:
        for r in rows:
            w.write_table(pa.Table.from_pylist([r], schema=schema))
    m = manifest(store)
    for s in m["shards"]:
        if s["file"] == shard:
            s["rows"] = len(rows)
    write_manifest(store, m)


def first_quantized(rows: List[dict]) -> dict:
    return next(r for r in rows if r["encoding"] != "raw")


def set_field(field, value, pick=first_quantized):
    def fn(rows):
        pick(rows)[field] = value
        return rows
    return fn


def manifest_edit(fn):
    def build(store: Path, tmp: Path) -> None:
        m = manifest(store)
        fn(m, tmp)
        write_manifest(store, m)
    return build


def rows_edit(fn):
    def build(store: Path, tmp: Path) -> None:
        edit_rows(store, fn)
        rehash(store)
    return build


def _two_chunk(rows):
    return [r for r in rows if r["name"] == "blocks.1.proj.weight"]


def _drop_chunk(rows):
    victim = _two_chunk(rows)[1]
    return [r for r in rows if r is not victim]


def _duplicate_chunk(rows):
    extra = dict(_two_chunk(rows)[0])
    return rows + [extra]


def _overlap(rows):
    a, b = _two_chunk(rows)
    b["row_start"] -= 1
    return rows


def _cut_codes(rows):
    first_quantized(rows)["codes"] = first_quantized(rows)["codes"][:1]
    return rows


def _halve_group(rows):
    r = first_quantized(rows)
    for row in rows:
        if row["name"] == r["name"]:
            row["group_size"] //= 2
    return rows


def _grow_scales(rows):
    r = first_quantized(rows)
    r["codes"], r["scales"] = r["codes"][:-2], r["scales"] + b"\0\0"  # same total bytes, wrong split
    return rows


def _raw_short(rows):
    r = next(row for row in rows if row["encoding"] == "raw")
    r["codes"] = r["codes"][:-1]
    return rows


def _huge_shape(rows):
    r = first_quantized(rows)
    for row in rows:
        if row["name"] == r["name"]:
            row["shape"] = [1 << 20, 1 << 20]
    return rows


def _null_in(field):
    def fn(rows):
        first_quantized(rows)[field] = None
        return rows
    return fn


def _shard_twice(m, tmp):
    m["shards"].append(dict(m["shards"][0]))


def _shard_elsewhere(m, tmp):
    other = tmp / "other-store"
    other.mkdir(exist_ok=True)
    shutil.copy(tmp / "store-pristine" / SHARD, other / SHARD)
    m["shards"][0]["file"] = str(other / SHARD)


def _extra_over_weights(m, tmp):
    (tmp / "store" / "model.safetensors").write_bytes(b"attacker's bytes")
    m["extra_files"] = ["model.safetensors"]


def _symlinked_extra(store: Path, tmp: Path) -> None:
    secret = tmp / "secret.txt"
    secret.write_text("private key material")
    (store / "config.json").unlink()
    os.symlink(secret, store / "config.json")


def _symlinked_shard(store: Path, tmp: Path) -> None:
    outside = tmp / "outside.parquet"
    shutil.move(store / SHARD, outside)
    os.symlink(outside, store / SHARD)


def _flip_bytes(rehashed: bool):
    def build(store: Path, tmp: Path) -> None:
        f = store / SHARD
        data = bytearray(f.read_bytes())
        for i in range(200, min(len(data) - 2000, 20_000), 97):  # data pages, not the footer
            data[i] ^= 0x5A
        f.write_bytes(bytes(data))
        if rehashed:
            rehash(store)
    return build


def _schema_changed(store: Path, tmp: Path) -> None:
    from arrow_quant_v2.store import SCHEMA

    schema = SCHEMA.set(SCHEMA.get_field_index("row_count"), pa.field("row_count", pa.string()))

    def fn(rows):
        for r in rows:
            r["row_count"] = str(r["row_count"])
        return rows
    edit_rows(store, fn, schema=schema)
    rehash(store)


def _raw_manifest(raw: bytes):
    def build(store: Path, tmp: Path) -> None:
        write_manifest(store, None, raw)
    return build


def _truncated_shard(store: Path, tmp: Path) -> None:
    f = store / SHARD
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rehash(store)


@dataclass
class StoreCase:
    """A damaged store: ``build(store, tmp)`` breaks the copy at ``store``."""

    id: str
    build: Callable[[Path, Path], None]
    why: str  # the finding of the issue (or the rule) the case stands for
    field: str = ""  # a text the error message must contain (usually the field)


CASES: List[StoreCase] = [
    # exports that escape
    StoreCase("source-file-parent", rows_edit(set_field("source_file", "../../victim.safetensors")),
              "to_safetensors wrote outside the export folder", "source_file"),
    StoreCase("source-file-absolute", rows_edit(set_field("source_file", "/tmp/aq-victim.safetensors")),
              "absolute source_file", "source_file"),
    StoreCase("extra-file-parent", manifest_edit(lambda m, t: m.update(extra_files=["../../.bashrc"])),
              "extra_files escape the export folder", "extra_files"),
    StoreCase("extra-file-absolute", manifest_edit(lambda m, t: m.update(extra_files=["/tmp/aq-victim-bashrc"])),
              "absolute extra file", "extra_files"),
    StoreCase("extra-file-symlink-out", _symlinked_extra, "a symlinked extra file exposes a file outside the store",
              "extra_files"),
    StoreCase("extra-file-names-weights", manifest_edit(_extra_over_weights),
              "an extra file overwriting an exported weight file", "extra_files"),
    # out-of-bounds reads in the kernels
    StoreCase("row-count-huge", rows_edit(set_field("row_count", 1 << 40)), "large row_count segfaulted", "row_"),
    StoreCase("codes-cut-to-1-byte", rows_edit(_cut_codes), "decoded from memory past the buffer", "codes"),
    StoreCase("group-size-halved", rows_edit(_halve_group), "decoded from memory past the buffer", "nbytes"),
    StoreCase("blob-split-wrong", rows_edit(_grow_scales), "right total, wrong blob lengths", "codes"),
    StoreCase("raw-codes-short", rows_edit(_raw_short), "a lossless row one byte short", "codes"),
    StoreCase("bits-unsupported", rows_edit(set_field("bits", 7)), "bits no encoding has", "encoding"),
    StoreCase("encoding-unknown", rows_edit(set_field("encoding", "q9_evil")), "unknown encoding", "encoding"),
    StoreCase("dtype-unknown", rows_edit(set_field("dtype", "F128")), "unknown dtype", "dtype"),
    StoreCase("group-size-negative", rows_edit(set_field("group_size", -16)), "negative group", "group_size"),
    StoreCase("row-start-negative", rows_edit(set_field("row_start", -5)), "row range outside the shape", "row_start"),
    StoreCase("nbytes-lies", rows_edit(set_field("nbytes", 3)), "nbytes not the layout's", "nbytes"),
    # uninitialised memory
    StoreCase("chunk-missing", rows_edit(_drop_chunk), "missing rows came back as garbage", "row"),
    StoreCase("chunk-duplicated", rows_edit(_duplicate_chunk), "a chunk twice", "chunk"),
    StoreCase("chunks-overlap", rows_edit(_overlap), "overlapping row ranges", "row_start"),
    # the manifest trusted blindly
    StoreCase("shard-absolute-path", manifest_edit(_shard_elsewhere), "shard file may point at another store",
              "shards[]"),
    StoreCase("shard-listed-twice", manifest_edit(_shard_twice), "reshape ValueError", "shards"),
    StoreCase("shard-symlink-out", _symlinked_shard, "a shard outside the store", "resolves outside"),
    StoreCase("shard-missing", lambda s, t: (s / SHARD).unlink(), "a listed shard is gone", "shards["),
    StoreCase("sha256-mismatch", _flip_bytes(rehashed=False), "sha256 never checked", "sha256"),
    StoreCase("data-pages-flipped", _flip_bytes(rehashed=True), "flipped bytes gave a plain OSError", ""),
    StoreCase("shard-truncated", _truncated_shard, "a cut shard", "shards["),
    StoreCase("manifest-list", _raw_manifest(b"[]"), "TypeError / app down", "manifest.json"),
    StoreCase("manifest-not-json", _raw_manifest(b"{not json"), "corrupt manifest", "manifest.json"),
    StoreCase("manifest-not-utf8", _raw_manifest(b'{"format": "\xff\xfe"}'), "bytes that are not UTF-8",
              "manifest.json"),
    StoreCase("manifest-deep", _raw_manifest(b"[" * 100_000 + b"]" * 100_000), "RecursionError", "manifest.json"),
    StoreCase("manifest-no-shards", manifest_edit(lambda m, t: m.pop("shards")), "KeyError", "shards"),
    StoreCase("manifest-shards-string", manifest_edit(lambda m, t: m.update(shards="weights")), "TypeError",
              "shards"),
    StoreCase("manifest-shard-not-object", manifest_edit(lambda m, t: m.update(shards=[1])), "AttributeError",
              "shards[]"),
    StoreCase("manifest-shard-file-int", manifest_edit(lambda m, t: m["shards"][0].update(file=5)), "TypeError",
              "shards[]"),
    StoreCase("manifest-version-string", manifest_edit(lambda m, t: m.update(format_version="1")), "a string version",
              "format"),
    StoreCase("manifest-source-list", manifest_edit(lambda m, t: m.update(source=[1, 2])), "AttributeError", "source"),
    StoreCase("manifest-totals-string", manifest_edit(lambda m, t: m.update(totals="x")), "inspect TypeError",
              "totals"),
    StoreCase("manifest-extra-not-list", manifest_edit(lambda m, t: m.update(extra_files="config.json")),
              "TypeError", "extra_files"),
    StoreCase("manifest-rows-lie", manifest_edit(lambda m, t: m["shards"][0].update(rows=1)), "row count", "rows"),
    # sizes
    StoreCase("shape-4-tib", rows_edit(_huge_shape), "tried to allocate 4 TiB", "shape"),
    StoreCase("null-name", rows_edit(_null_in("name")), "a null where a value is required", "name"),
    StoreCase("null-shape", rows_edit(_null_in("shape")), "a null shape", "shape"),
    StoreCase("schema-changed", _schema_changed, "a column of another type", "schema"),
]


def build_case(case: StoreCase, pristine: Path, tmp: Path) -> Path:
    """A copy of ``pristine`` broken by ``case``; returns the store path."""
    store = tmp / "store"
    shutil.copytree(pristine, store, symlinks=True)
    if not (tmp / "store-pristine").exists():
        os.symlink(pristine, tmp / "store-pristine")
    case.build(store, tmp)
    return store


# -- what every case goes through (run in a child process with an address-space limit) ----------

CHILD = r"""
import json, resource, sys, traceback
from pathlib import Path
limit = int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
store, model, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
from arrow_quant_v2 import ArrowQuantError, load_quantized
from arrow_quant_v2 import ArrowQuantV2
validate_quality = ArrowQuantV2().validate_quality
from arrow_quant_v2.cli import main as cli
steps = []
def step(name, fn):
    try:
        fn()
        steps.append([name, "ok", ""])
    except ArrowQuantError as e:
        steps.append([name, type(e).__name__, str(e)])
    except BaseException as e:
        steps.append([name, "UNTYPED " + type(e).__name__, traceback.format_exc()[-1500:]])
def dequantize_all():
    s = load_quantized(store)
    for n in s:
        v = s.dequantize(n)
        assert v.shape == s.tensors[n].shape
step("load_quantized", lambda: load_quantized(store))
step("dequantize", dequantize_all)
step("to_safetensors", lambda: load_quantized(store).to_safetensors(work / "export" / "deep" / "out"))
step("validate_quality", lambda: validate_quality(model, store, end_to_end=False))
def inspect():
    code = cli(["inspect", str(store)])  # typed errors become exit codes; anything else propagates
    if code != 0:
        raise ArrowQuantError(f"inspect exit {code}")
step("inspect", inspect)
print("RESULT " + json.dumps(steps))
"""


def run_case(store: Path, model: Path, work: Path, memory_limit: int = 3 << 30, env: Optional[dict] = None):
    """Run every reader entry point on ``store`` in a child process; returns (returncode, steps, stderr)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    child_env = dict(os.environ, PYTHONPATH=str(repo), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(model), str(work), str(memory_limit)],
                          capture_output=True, text=True, cwd=work, env=child_env, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    steps = json.loads(line[len("RESULT "):]) if line else None
    return proc.returncode, steps, proc.stderr


if __name__ == "__main__":  # python -m tests.badstores: the table for reports
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        model, pristine = make_store(base)
        print("| case | load_quantized | dequantize / export / validate / inspect |\n|---|---|---|")
        for case in CASES:
            tmp = base / case.id
            tmp.mkdir()
            store = build_case(case, pristine, tmp)
            code, steps, err = run_case(store, model, tmp)
            if steps is None:
                print(f"| {case.id} | CRASH {code} | {err[-200:]} |")
                continue
            first = steps[0]
            others = sorted({s[1] for s in steps[1:]})
            print(f"| {case.id} | {first[1]}: {first[2][:160]} | {', '.join(others)} |")
