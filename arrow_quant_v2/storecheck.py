"""What a valid store is, checked in one place before anything trusts a store.

Stores are a distribution format: a folder someone downloaded may be damaged or
hostile. The reader (:class:`arrow_quant_v2.store.QuantizedModel`) therefore runs
every check here before a kernel sees a byte, and each failure is a
:class:`~arrow_quant_v2.errors.StoreFormatError` naming the store, the tensor and the
field. The rules (docs/format.md, "Validation"):

* **Manifest**: a UTF-8 JSON object of at most :data:`MAX_MANIFEST_BYTES` whose
  signature (``format`` = :data:`FORMAT_NAME`, ``format_version`` = :data:`FORMAT_VERSION`)
  is this project's; every key the library reads has its documented type.
* **File names**: shard files are plain names (no separator, not hidden, ``.parquet``);
  extra files and ``source_file`` are relative paths of plain parts (no ``..``, no
  absolute path, no backslash, no NUL); each resolves inside the store.
* **Rows** (the metadata columns of every shard, read once when the store opens): the
  Parquet schema is the store schema; no required value is null; shapes have rank
  <= 32 and at most :data:`MAX_TENSOR_ELEMENTS` elements; dtype, encoding, bits and
  group size name something the library knows and repeat on every chunk of a tensor;
  chunks are numbered 0, 1, ... and their row ranges cover the tensor's 2-D view
  exactly once; ``nbytes`` is what the encoding's layout needs for the row range.
* **Blobs** (checked as each row is read, before decoding): each blob's length is
  exactly what the encoding's layout says for the row (:meth:`Encoding.blob_nbytes`);
  a blob the encoding does not use is null or empty.
* **Shards**: the file's size and SHA-256 equal the manifest's (checked once per shard
  per process, cached by size and mtime; ``verify_checksums=False`` skips the hash for
  stores you trust).

:func:`is_store` is the signature test the writer uses before replacing a folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow.compute as pc

from . import encodings
from .errors import ConfigurationError, StoreFormatError
from .layout import RAW  # noqa: F401 - the encoding name of lossless rows, defined with the row layout
from .source import DTYPES, MAX_RANK

#: The signature that makes a folder a store: written by this project into manifest.json.
FORMAT_NAME = "arrowquant"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: A manifest larger than this is refused before it is parsed.
MAX_MANIFEST_BYTES = 64 << 20
#: Largest tensor a store may declare (elements); dequantizing allocates 4 bytes each.
MAX_TENSOR_ELEMENTS = 1 << 34
#: Longest relative path (characters) and path part accepted for a file name.
MAX_PATH_CHARS, MAX_PART_CHARS = 1024, 255
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.parquet")


# -- names -----------------------------------------------------------------------------


def relative_name(value, store, field: str, tensor: Optional[str] = None) -> str:
    """``value`` if it is a safe relative path (plain parts joined by ``/``), else StoreFormatError."""
    if not isinstance(value, str) or not value:
        raise StoreFormatError(store, field, f"must be a non-empty relative path, not {_short(value)}", tensor)
    if len(value) > MAX_PATH_CHARS or "\x00" in value or "\\" in value or value.startswith("/"):
        raise StoreFormatError(store, field, f"{_short(value)} is not a plain relative path "
                               "(no absolute path, backslash or NUL)", tensor)
    parts = value.split("/")
    if any(p in ("", ".", "..") or len(p) > MAX_PART_CHARS for p in parts):
        raise StoreFormatError(store, field, f"{_short(value)} has an empty, '.' or '..' part", tensor)
    return value


def shard_name(value, store) -> str:
    """``value`` if it is a plain Parquet file name, else StoreFormatError."""
    if not isinstance(value, str) or not _SHARD_NAME.fullmatch(value) or len(value) > MAX_PART_CHARS:
        raise StoreFormatError(store, "shards[].file", f"{_short(value)} is not a plain .parquet file name")
    return value


def inside(root: Path, rel: str, store, field: str) -> Path:
    """``root / rel``, checked to stay inside ``root`` once symlinks are resolved."""
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise StoreFormatError(store, field, f"{rel!r} resolves outside {root} (a symlink?)")
    return path


# -- manifest ----------------------------------------------------------------------------


def read_manifest(store: Path) -> dict:
    """The parsed manifest of ``store``; StoreFormatError if it is missing, too large or not JSON."""
    path = store / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise StoreFormatError(store, MANIFEST, f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        text = path.read_bytes().decode("utf-8")
        manifest = json.loads(text)
    except FileNotFoundError:
        raise StoreFormatError(store, MANIFEST, "missing: not an ArrowQuant store") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StoreFormatError(store, MANIFEST, f"unreadable or not JSON ({_short(str(e), 200)})") from None
    if not isinstance(manifest, dict):
        raise StoreFormatError(store, MANIFEST, f"must be a JSON object, not {type(manifest).__name__}")
    return manifest


def is_store(path: Path) -> bool:
    """Whether ``path`` is a folder this project wrote: its manifest carries our signature.

    The test for "may be replaced by ``overwrite=True``": a folder that merely holds a
    file called manifest.json is not a store."""
    try:
        if not path.is_dir() or path.is_symlink():
            return False
        manifest = read_manifest(path)
    except (OSError, StoreFormatError):
        return False
    version = manifest.get("format_version")
    return manifest.get("format") == FORMAT_NAME and _is_int(version) and version >= 1


def check_manifest(store: Path, manifest: dict) -> dict:
    """Check the manifest's signature and the type of every key the library reads.

    Returns ``manifest`` unchanged; raises StoreFormatError naming the key."""
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION \
            or not _is_int(manifest.get("format_version")):
        raise StoreFormatError(store, "format", f"{_short(manifest.get('format'))} "
                               f"v{_short(manifest.get('format_version'))} is not {FORMAT_NAME} v{FORMAT_VERSION}")
    for key, kind in (("source", dict), ("config", dict), ("modality", dict), ("totals", dict),
                      ("sensitivity", dict), ("created", str), ("library_version", str)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise StoreFormatError(store, key, f"must be a JSON {_KIND[kind]}, not {_short(manifest[key])}")
    source = manifest.get("source", {})
    for key in ("path", "header_checksum"):
        if key in source and not isinstance(source[key], str):
            raise StoreFormatError(store, f"source.{key}", f"must be a string, not {_short(source[key])}")
    extra = manifest.get("extra_files", [])
    if not isinstance(extra, list):
        raise StoreFormatError(store, "extra_files", f"must be a list of relative paths, not {_short(extra)}")
    for rel in extra:
        relative_name(rel, store, "extra_files[]")
    if len(set(extra)) != len(extra):
        raise StoreFormatError(store, "extra_files", "lists a file twice")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise StoreFormatError(store, "shards", f"must be a list, not {_short(shards)}")
    for shard in shards:
        if not isinstance(shard, dict):
            raise StoreFormatError(store, "shards[]", f"must be an object, not {_short(shard)}")
        shard_name(shard.get("file"), store)
        for key in ("tensors", "rows", "bytes"):
            if not _is_int(shard.get(key)) or shard[key] < 0:
                raise StoreFormatError(store, f"shards[{shard['file']}].{key}",
                                       f"must be a non-negative integer, not {_short(shard.get(key))}")
        if not isinstance(shard.get("sha256"), str) or not _SHA256.fullmatch(shard["sha256"]):
            raise StoreFormatError(store, f"shards[{shard['file']}].sha256", "must be 64 lower-case hex digits")
    files = [s["file"] for s in shards]
    if len(set(files)) != len(files):
        raise StoreFormatError(store, "shards", "lists a file twice")
    if set(files) & set(extra) or MANIFEST in extra:
        raise StoreFormatError(store, "extra_files", "names a shard or the manifest")
    return manifest


# -- shard files ----------------------------------------------------------------------------

_hash_cache: Dict[str, Tuple[int, int, str]] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()  # hashlib.file_digest is 3.11+, and we support 3.10
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard_file(store: Path, shard: dict, verify_checksum: bool = True) -> Path:
    """The shard's path, checked: a regular file inside the store, of the manifest's size and
    (unless ``verify_checksum`` is False) SHA-256. Hashes are cached per process by
    (path, size, mtime), so a shard is hashed once however often the store is opened."""
    path = inside(store, shard["file"], store, f"shards[{shard['file']}].file")
    try:
        st = path.stat()
    except OSError as e:
        raise StoreFormatError(store, f"shards[{shard['file']}].file", f"missing or unreadable ({e.strerror})") from None
    if not path.is_file():
        raise StoreFormatError(store, f"shards[{shard['file']}].file", "is not a regular file")
    if st.st_size != shard["bytes"]:
        raise StoreFormatError(store, f"shards[{shard['file']}].bytes",
                               f"the file has {st.st_size} bytes, the manifest says {shard['bytes']}")
    if verify_checksum:
        key = str(path.resolve())
        with _hash_lock:
            cached = _hash_cache.get(key)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            digest = cached[2]
        else:
            try:
                digest = file_sha256(path)
            except OSError as e:
                raise StoreFormatError(store, f"shards[{shard['file']}].file", f"unreadable ({e.strerror})") from None
            with _hash_lock:
                _hash_cache[key] = (st.st_size, st.st_mtime_ns, digest)
        if digest != shard["sha256"]:
            raise StoreFormatError(store, f"shards[{shard['file']}].sha256",
                                   "the file's SHA-256 differs from the manifest's: the shard is damaged or was "
                                   "changed; re-download or re-quantize the store")
    return path


def check_schema(store: Path, file: str, schema, expected) -> None:
    """The shard's Arrow schema must be the store schema (names and types, in order)."""
    got = [(f.name, f.type) for f in schema]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        diff = next((f"{g} != {w}" for g, w in zip(got, want) if g != w), f"{len(got)} columns, not {len(want)}")
        raise StoreFormatError(store, f"{file}: schema", f"is not the store schema ({diff})")


# -- rows --------------------------------------------------------------------------------------


def matrix_shape(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """The 2-D view of a tensor: (first axis, product of the rest); 1-D is (n, 1), 0-d is (1, 1)."""
    if not shape:
        return (1, 1)
    return (shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1)


#: Columns that must hold a value on every row (the blobs and ``reason`` may be null).
REQUIRED = ("name", "source_file", "shape", "dtype", "chunk", "row_start", "row_count", "encoding", "bits",
            "group_size", "nbytes", "cosine", "rel_error", "sqnr_db")
#: Per-tensor columns: the same value on every chunk of a tensor.
PER_TENSOR = ("source_file", "shape", "dtype", "encoding", "bits", "group_size")


class RowChecker:
    """Checks the metadata rows of a store's shards and groups them by tensor.

    Feed each shard's metadata columns to :meth:`add` (a dict of column -> Python list, as
    ``Table.to_pydict()`` gives), then :meth:`finish` checks every tensor and returns
    ``{name: (first row, [row refs sorted by chunk])}`` where a row ref is whatever the
    caller passed in ``refs`` for that row (the reader passes where the row lives)."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.tensors: Dict[str, List[tuple]] = {}
        self._layouts: Dict[tuple, object] = {}
        self._checked: Dict[tuple, object] = {}

    def add(self, file: str, table, columns: Dict[str, list], refs: List[tuple]) -> None:
        """Take a shard's metadata rows: ``table`` (pyarrow) for the null checks, ``columns`` the same
        as Python lists, ``refs`` one caller value per row."""
        for c in REQUIRED:
            if table.column(c).null_count:
                i = int(np.argmax(table.column(c).is_null().to_numpy(zero_copy_only=False)))
                raise StoreFormatError(self.store, c, f"is null (row {i} of {file})", _name_at(columns, i))
        if pc.list_flatten(table.column("shape")).null_count:
            i = next(i for i, dims in enumerate(columns["shape"]) if None in dims)
            raise StoreFormatError(self.store, "shape", "has a null dimension", columns["name"][i])
        rows = zip(columns["name"], columns["chunk"], columns["row_start"], columns["row_count"],
                   columns["nbytes"], zip(*(columns[c] for c in PER_TENSOR)), refs)
        tensors = self.tensors
        for name, chunk, r0, count, nbytes, fields, ref in rows:
            entry = (chunk, r0, count, nbytes, fields, ref)
            if name in tensors:
                tensors[name].append(entry)
            else:
                tensors[name] = [entry]

    def finish(self) -> Dict[str, Tuple[dict, List[tuple]]]:
        out = {}
        for name, rows in self.tensors.items():
            if len(rows) > 1:
                rows.sort(key=lambda r: r[0])
            first = rows[0][4]
            for r in rows:
                if r[4] != first:
                    field = next(c for c, a, b in zip(PER_TENSOR, r[4], first) if a != b)
                    raise StoreFormatError(self.store, field, "differs between chunks of the tensor", name)
            key = first[:1] + (tuple(first[1]),) + first[2:]  # many tensors share all of these: check once
            known = self._checked.get(key)
            if known is None:
                meta = dict(zip(PER_TENSOR, key))
                known = self._checked[key] = (meta, self._check_tensor(name, meta), matrix_shape(meta["shape"])[0])
            meta, layout, total = known
            chunk, r0, count, nbytes, _, _ = rows[0]
            if len(rows) != 1 or chunk != 0 or r0 != 0 or count != total or nbytes != layout(count) \
                    or (count == 0 and total != 0):
                self._check_rows(name, meta, layout, rows)  # the general check (and its precise error)
            out[name] = (meta, [r[5] for r in rows])
        return out

    def _check_tensor(self, name: str, meta: dict):
        """The tensor's per-tensor fields; returns a function row_count -> expected nbytes."""
        store, shape = self.store, meta["shape"]
        relative_name(meta["source_file"], store, "source_file", name)
        if len(shape) > MAX_RANK or any(d < 0 for d in shape):
            raise StoreFormatError(store, "shape", f"{_short(list(shape))}: rank <= {MAX_RANK}, dimensions >= 0", name)
        numel = math.prod(shape)
        if numel > MAX_TENSOR_ELEMENTS:
            raise StoreFormatError(store, "shape", f"{_short(list(shape))} has {numel} elements, more than the "
                                   f"limit {MAX_TENSOR_ELEMENTS}", name)
        if meta["dtype"] not in DTYPES:
            raise StoreFormatError(store, "dtype", f"{_short(meta['dtype'])} is not one of {', '.join(DTYPES)}", name)
        _, cols = matrix_shape(shape)
        if meta["encoding"] == RAW:
            if meta["bits"] != 0 or meta["group_size"] != 0:
                raise StoreFormatError(store, "bits", "a raw (lossless) row has bits 0 and group_size 0", name)
            item = DTYPES[meta["dtype"]].itemsize
            return lambda count: count * cols * item
        if numel == 0:
            raise StoreFormatError(store, "encoding", "an empty tensor is stored raw, not quantized", name)
        if meta["group_size"] < 0:
            raise StoreFormatError(store, "group_size", f"{meta['group_size']} is negative", name)
        enc = self.encoding(meta["encoding"], meta["bits"], meta["group_size"], name)
        return lambda count: enc.nbytes(count, cols)

    def encoding(self, encoding: str, bits: int, group_size: int, tensor: Optional[str] = None):
        key = (encoding, bits, group_size)
        if key not in self._layouts:
            try:
                self._layouts[key] = encodings.get_encoding(encoding, bits, group_size)
            except ConfigurationError as e:
                raise StoreFormatError(self.store, "encoding", f"{encoding!r} at bits={bits}: {e}", tensor) from None
        return self._layouts[key]

    def _check_rows(self, name: str, meta: dict, expected_nbytes, rows: List[tuple]) -> None:
        store = self.store
        total, _ = matrix_shape(meta["shape"])
        at = 0
        for i, (chunk, r0, count, nbytes, _, _) in enumerate(rows):
            if chunk != i:
                raise StoreFormatError(store, "chunk", f"chunks must be numbered 0..{len(rows) - 1} once each; "
                                       f"found {chunk} where {i} was expected", name)
            if r0 != at or count < 0 or (count == 0 and total != 0):
                raise StoreFormatError(store, "row_start", f"chunk {chunk} holds rows {r0}..{r0 + count - 1}; "
                                       f"the chunks must cover rows 0..{total - 1} in order, each once", name)
            at = r0 + count
            if at > total:
                raise StoreFormatError(store, "row_count", f"chunk {chunk} ends at row {at}, past the "
                                       f"{total} rows of the tensor", name)
            want = expected_nbytes(count)
            if nbytes != want:
                raise StoreFormatError(store, "nbytes", f"chunk {chunk} says {nbytes} bytes; its encoding needs "
                                       f"{want} for {count} rows", name)
        if at != total:
            raise StoreFormatError(store, "row_count", f"the chunks cover rows 0..{at - 1} of {total}: "
                                   "rows are missing", name)


def check_blobs(store: Path, name: str, meta: dict, row: dict, layouts: "RowChecker") -> Dict[str, bytes]:
    """The row's blobs, each checked to be exactly as long as its encoding's layout says."""
    count = row["row_count"]
    _, cols = matrix_shape(meta["shape"])
    if meta["encoding"] == RAW:
        want = {"codes": count * cols * DTYPES[meta["dtype"]].itemsize}
    else:
        want = layouts.encoding(meta["encoding"], meta["bits"], meta["group_size"], name).blob_nbytes(count, cols)
    out = {}
    for field in encodings.BLOB_FIELDS:
        blob = row.get(field)
        size = 0 if blob is None else len(blob)
        if size != want.get(field, 0):
            raise StoreFormatError(store, field, f"chunk {row['chunk']} has {size} bytes; the "
                                   f"{meta['encoding']} layout needs {want.get(field, 0)} for {count} rows", name)
        if field in want:
            out[field] = blob or b""
    return out


# -- helpers ---------------------------------------------------------------------------------

_KIND = {dict: "object", str: "string", list: "list"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name_at(columns: Dict[str, list], i: int) -> Optional[str]:
    name = columns["name"][i]
    return name if isinstance(name, str) else None


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile value cannot make a huge message."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "RAW", "MAX_TENSOR_ELEMENTS", "MAX_MANIFEST_BYTES",
           "relative_name", "shard_name", "inside", "read_manifest", "is_store", "check_manifest",
           "check_shard_file", "check_schema", "RowChecker", "check_blobs", "matrix_shape", "file_sha256"]
