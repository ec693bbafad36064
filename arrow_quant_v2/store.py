"""The ArrowQuant store, format version 1: Parquet weights + ``manifest.json``.

A store is a folder:

* ``weights-00001.parquet`` ... : one row per tensor chunk (a range of rows of the
  tensor's 2-D view), one row group per row so any tensor is read alone. Columns are
  :data:`SCHEMA`; the blob columns hold what the row's encoding wrote (see
  ``encodings``: each encoding's class docstring is its byte layout). Lossless rows
  use encoding ``raw``: ``codes`` is the source bytes, little-endian, in ``dtype``.
* ``manifest.json``: :data:`FORMAT_NAME`, :data:`FORMAT_VERSION`, library version,
  source (path, header checksum, bytes), config, modality, shards, totals.
* the source's non-weight files (config.json, tokenizer files, ...), copied.

:class:`StoreWriter` builds a store in a temporary sibling folder and renames it
into place only when complete; :class:`QuantizedModel` (``load_quantized``) reads it.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import encodings
from .errors import OutputError, ValidationError
from .source import DTYPES, to_float32

FORMAT_NAME = "arrowquant"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal.json"  # only inside a partial folder
LOCK = "writer.pid"  # only inside a partial folder
RAW = "raw"

SCHEMA = pa.schema([
    ("name", pa.string()),            # tensor name as in the source
    ("source_file", pa.string()),     # source shard, relative to the model root (export keeps the layout)
    ("shape", pa.list_(pa.int64())),  # the tensor's full shape
    ("dtype", pa.string()),           # source dtype (safetensors name: F32, BF16, ...)
    ("chunk", pa.int32()),            # chunk index within the tensor
    ("row_start", pa.int64()),        # first row of the 2-D view held by this row
    ("row_count", pa.int64()),        # rows of the 2-D view held by this row
    ("encoding", pa.string()),        # encoding name, or "raw" for lossless
    ("bits", pa.int8()),              # code width (0 = lossless)
    ("group_size", pa.int32()),       # 0 = one group per row
    ("codes", pa.large_binary()),
    ("scales", pa.large_binary()),
    ("zeros", pa.large_binary()),
    ("aux", pa.large_binary()),
    ("nbytes", pa.int64()),           # sum of this row's blob lengths (what bpw counts)
    ("cosine", pa.float64()),         # tensor-level figures measured while writing
    ("rel_error", pa.float64()),
    ("sqnr_db", pa.float64()),
    ("reason", pa.string()),          # why the tensor got this encoding
])
META_COLUMNS = [f.name for f in SCHEMA if f.name not in encodings.BLOB_FIELDS]


@dataclass
class ChunkRecord:
    """One Parquet row: a chunk of a tensor with its blobs."""

    name: str
    source_file: str
    shape: Tuple[int, ...]
    dtype: str
    chunk: int
    row_start: int
    row_count: int
    encoding: str
    bits: int
    group_size: int
    blobs: Dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(int(b.size) for b in self.blobs.values())

    @classmethod
    def from_row(cls, row: dict) -> "ChunkRecord":
        """The record a row of a shard was written from (``row`` as ``to_pylist`` gives it)."""
        blobs = {f: np.frombuffer(row[f], dtype=np.uint8) for f in encodings.BLOB_FIELDS if row[f] is not None}
        return cls(row["name"], row["source_file"], tuple(row["shape"]), row["dtype"], row["chunk"], row["row_start"],
                   row["row_count"], row["encoding"], row["bits"], row["group_size"], blobs)


def starts_new_shard(shard_bytes: int, size: int, max_shard_bytes: int) -> bool:
    """Whether a tensor of ``size`` encoded bytes opens a new shard after ``shard_bytes``
    (a tensor never straddles two shards; an oversized one gets a shard of its own)."""
    return bool(shard_bytes) and shard_bytes + size > max_shard_bytes


def shard_layout(sizes: Iterable[int], max_shard_bytes: int) -> List[List[int]]:
    """The indices of the tensors each shard holds when tensors of encoded ``sizes`` are written
    in order: what :class:`StoreWriter` does, known in advance (a cluster writes shards in parallel)."""
    shards: List[List[int]] = []
    shard_bytes = 0
    for i, size in enumerate(sizes):
        if not shards or starts_new_shard(shard_bytes, size, max_shard_bytes):
            shards.append([])
            shard_bytes = 0
        shards[-1].append(i)
        shard_bytes += size
    return shards


def _disk_error(e: OSError, where: Path) -> OutputError:
    """A typed error naming the output (not our hidden temporary folder) and the fix."""
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and not where.is_dir():
        return OutputError(f"{where}: cannot create the output: a part of its path is a file, not a folder")
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"{where}: no space left while writing the store ({e.strerror}); free space or choose another output")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{where}: not writable ({e.strerror}); choose another output folder")
    return OutputError(f"{where}: write failed ({e})")


def _binary_cell(blob: Optional[np.ndarray]) -> pa.Array:
    """A one-value large_binary array over the blob's own memory (no copy).

    Not ``[memoryview(blob)]``: pyarrow keeps every buffer converted that way alive, so
    a writer's memory grew with the model (1.3 GB after 300 chunks of 4 MB)."""
    if blob is None:
        return pa.nulls(1, pa.large_binary())
    data = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
    offsets = np.array([0, data.size], dtype=np.int64)
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest is 3.11+, and we support 3.10
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recover_interrupted_overwrite(output: Path) -> None:
    """A kill between the two renames of a non-atomic overwrite leaves the old store as
    ``.<output>.old-*`` and nothing at the output: put it back (or drop it if a newer
    store made it into place). Called before anything looks at the output path."""
    for old in sorted(output.parent.glob(f".{output.name}.old-*")):
        if not output.exists() and (old / MANIFEST).is_file():
            os.rename(old, output)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported
    (other systems: the caller falls back to two renames, recovered by :func:`recover_interrupted_overwrite`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


#: Partial folders being written by this process: the pid lock cannot tell two jobs
#: of one process (the async API, the app) apart.
_claimed: set = set()
_claimed_lock = threading.Lock()


def _lock_owner(partial: Path) -> Optional[int]:
    """The pid of a live process writing ``partial``, or None."""
    try:
        pid = int((partial / LOCK).read_text())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


class StoreWriter:
    """Writes a store into a hidden sibling of ``output`` and publishes it atomically.

    The sibling is named ``.<output>.partial-<run key>``: the run key hashes the source
    headers and the config, so a later run with the same inputs finds it. Each shard is
    closed at a size that depends only on the tensors, and recorded with its sha256 in
    ``journal.json`` when it closes; with ``resume=True`` a new run keeps the verified
    shards (and the tensors in them) and writes the rest, giving the same files as an
    uninterrupted run. A partial folder is never at the output path, so nothing
    half-written can be taken for a finished store.
    """

    def __init__(self, output: Path, *, overwrite: bool = False, max_shard_bytes: int = 2 << 30,
                 run_key: str = "", resume: bool = False) -> None:
        self.output = Path(output)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.run_key = run_key or uuid.uuid4().hex
        if self.output.exists() and not overwrite:
            raise OutputError(f"{self.output}: already exists; pass overwrite=True (CLI: --overwrite) or choose another output")
        parent = self.output.parent
        self.tmp = parent / f".{self.output.name}.partial-{self.run_key[:12]}"
        self.shards: List[dict] = []
        self.resumed: Dict[str, dict] = {}  # tensor name -> its figures, for tensors kept from a killed run
        self._writer: Optional[pq.ParquetWriter] = None
        self._shard_bytes = 0
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._claim(resume)
        except OSError as e:
            raise _disk_error(e, parent) from None

    # -- partial folders, lock and journal ---------------------------------------------

    def _claim(self, resume: bool) -> None:
        with _claimed_lock:
            busy = {p for p in _claimed if p.parent == self.output.parent}
            if self.tmp in busy:
                raise OutputError(f"{self.output}: another job of this process is writing it right now")
            _claimed.add(self.tmp)
        for other in self.output.parent.glob(f".{self.output.name}.partial-*"):
            owner = os.getpid() if other in busy else _lock_owner(other)
            if owner is not None:
                if other == self.tmp:
                    raise OutputError(f"{self.output}: another run (pid {owner}) is writing it right now")
                continue  # a live run with another config: not ours to touch
            if other != self.tmp or not resume:
                shutil.rmtree(other, ignore_errors=True)
        self.tmp.mkdir(exist_ok=True)
        (self.tmp / LOCK).write_text(str(os.getpid()))
        if resume:
            self._load_journal()
        for f in self.tmp.glob("weights-*.parquet"):  # a shard that was open when the run died
            if f.name not in {s["file"] for s in self.shards}:
                f.unlink()

    def _release(self) -> None:
        with _claimed_lock:
            _claimed.discard(self.tmp)

    def _load_journal(self) -> None:
        try:
            journal = json.loads((self.tmp / JOURNAL).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if journal.get("key") != self.run_key:
            return
        for shard in journal.get("shards", []):
            f = self.tmp / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["bytes"] or _sha256(f) != shard["sha256"]:
                break  # keep the verified prefix only
            self.shards.append(shard)
            for name in shard["tensor_names"]:
                self.resumed[name] = journal["tensors"][name]
        self._journal_tensors = {n: journal["tensors"][n] for n in self.resumed}

    def _record_shard(self, tensors: Dict[str, dict]) -> None:
        """Journal the just-closed shard with its hash and its tensors' figures."""
        shard = self.shards[-1]
        f = self.tmp / shard["file"]
        shard.update(bytes=f.stat().st_size, sha256=_sha256(f))
        self._journal(tensors)

    def adopt_shard(self, file: str, tensors: Dict[str, dict], rows: int, sha256: str) -> None:
        """Take ``file``, a shard another process wrote into this partial folder (a cluster
        worker), as the next shard: check it holds what its writer hashed, then journal it.

        ``tensors`` maps its tensor names, in order, to their figures.
        Raises :class:`OutputError` if the bytes differ (the folder is not shared as it should be).
        """
        self._close_shard()
        name = f"weights-{len(self.shards) + 1:05d}.parquet"
        f = self.tmp / name
        try:
            digest = _sha256(f) if file == name else None
            size = f.stat().st_size
        except OSError as e:
            raise OutputError(f"{self.output}: shard {name} written by a worker is not readable here ({e}); "
                              "the output must be on a file system every worker shares") from None
        if digest != sha256:
            raise OutputError(f"{self.output}: shard {name} does not hold what its worker wrote (sha256 differs); "
                              "the output must be on a file system every worker shares")
        self.shards.append({"file": name, "tensors": len(tensors), "rows": rows, "tensor_names": list(tensors),
                            "bytes": size, "sha256": digest})
        self._journal(tensors)

    def _journal(self, tensors: Dict[str, dict]) -> None:
        self._journal_tensors = dict(getattr(self, "_journal_tensors", {}), **tensors)
        journal = {"key": self.run_key, "shards": self.shards,
                   "tensors": {n: self._journal_tensors[n] for s in self.shards for n in s["tensor_names"]}}
        tmp = self.tmp / (JOURNAL + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(journal, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.tmp / JOURNAL)

    # -- rows -------------------------------------------------------------------------

    def _open_shard(self) -> None:
        self._close_shard()
        name = f"weights-{len(self.shards) + 1:05d}.parquet"
        self.shards.append({"file": name, "tensors": 0, "rows": 0, "tensor_names": []})
        self._open_figures: Dict[str, dict] = {}
        self._writer = pq.ParquetWriter(
            self.tmp / name, SCHEMA, compression="zstd",
            use_dictionary=["name", "source_file", "dtype", "encoding", "reason"],
            write_statistics=["name", "chunk"],
            metadata_collector=None,
        )
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._record_shard(self._open_figures)

    def write_tensor(self, records: List[ChunkRecord], figures: Dict[str, float], reason: str,
                     summary: Optional[dict] = None) -> None:
        """Append all chunks of one tensor (a tensor never straddles two shards).

        ``summary`` is what the engine knows of the tensor (bits, bytes, figures); it is
        journaled with the shard so a resumed run can report it without re-reading.
        """
        size = sum(r.nbytes for r in records)
        try:
            if self._writer is None or starts_new_shard(self._shard_bytes, size, self.max_shard_bytes):
                self._open_shard()  # closes (and journals) the previous shard: disk errors here too
            for r in records:
                row = {
                    "name": [r.name], "source_file": [r.source_file], "shape": [list(r.shape)], "dtype": [r.dtype],
                    "chunk": [r.chunk], "row_start": [r.row_start], "row_count": [r.row_count],
                    "encoding": [r.encoding], "bits": [r.bits], "group_size": [r.group_size], "nbytes": [r.nbytes],
                    "cosine": [figures["cosine"]], "rel_error": [figures["rel_error"]],
                    "sqnr_db": [figures["sqnr_db"]], "reason": [reason],
                }
                for f in encodings.BLOB_FIELDS:
                    row[f] = _binary_cell(r.blobs.get(f))
                self._writer.write_table(pa.table(row, schema=SCHEMA))
        except OSError as e:
            raise _disk_error(e, self.output) from None
        self._shard_bytes += size
        self.shards[-1]["tensors"] += 1
        self.shards[-1]["rows"] += len(records)
        self.shards[-1]["tensor_names"].append(records[0].name)
        self._open_figures[records[0].name] = summary or {}

    # -- publish / abort ---------------------------------------------------------------

    def copy_extra(self, root: Path, files: Iterable[Path]) -> None:
        """Copy the source's non-weight ``files`` (paths relative to ``root``) into the store; raises :class:`OutputError`."""
        try:
            for rel in files:
                dest = self.tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, dest)
        except OSError as e:
            raise _disk_error(e, self.output) from None

    def close(self) -> int:
        """Close the open shard and return the bytes of all weight files (what model_size_mb counts)."""
        try:
            self._close_shard()
        except OSError as e:
            raise _disk_error(e, self.output) from None
        return sum((self.tmp / s["file"]).stat().st_size for s in self.shards)

    def finish(self, manifest: dict) -> Path:
        """Write the manifest and move the finished store into place."""
        trash = None
        try:
            self._close_shard()
            shards = [{k: s[k] for k in ("file", "tensors", "rows", "bytes", "sha256")} for s in self.shards]
            manifest = dict(manifest, shards=shards)
            for leftover in (JOURNAL, LOCK):
                (self.tmp / leftover).unlink(missing_ok=True)
            with open(self.tmp / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=True)
                f.flush()
                os.fsync(f.fileno())
            trash = None
            if self.output.exists() and (not self.overwrite or not (self.output / MANIFEST).is_file()):
                self.abort()  # something appeared at the output while we wrote: never clobber it
                raise OutputError(f"{self.output}: appeared while this run was writing and is not a store we may "
                                  "replace; nothing was overwritten")
            if self.output.exists() and _exchange(self.tmp, self.output):
                trash = self.tmp  # now holds the old store; the output was never missing
            else:
                if self.output.exists():  # no atomic exchange here: two renames, recovered by the next run
                    trash = self.output.parent / f".{self.output.name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(self.output, trash)
                os.rename(self.tmp, self.output)
        except OSError as e:
            if trash is not None and not self.output.exists():
                os.rename(trash, self.output)  # put the old store back: overwrite is all or nothing
            self.abort()
            raise _disk_error(e, self.output) from None
        self._release()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.output

    def abort(self) -> None:
        """Remove everything written; the output path is left as it was."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - we are cleaning up after another error
                pass
            self._writer = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of a store: its plan, figures and where its chunks are."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    encoding: str
    bits: int
    group_size: int
    reason: str
    cosine: float
    rel_error: float
    sqnr_db: float
    nbytes: int
    source_file: str
    rows: Tuple[Tuple[int, int, int, int], ...]  # (shard index, row group, row_start, row_count)

    @property
    def numel(self) -> int:
        """Elements of the tensor (the product of its shape)."""
        return math.prod(self.shape)

    @property
    def quantized(self) -> bool:
        """True unless the tensor is stored losslessly (encoding ``raw``)."""
        return self.encoding != RAW

    @property
    def bits_per_weight(self) -> float:
        """Every byte the tensor's rows store (all blobs) x 8 / its element count."""
        return self.nbytes * 8 / self.numel if self.numel else 0.0


class QuantizedModel:
    """A quantized store opened for reading: list tensors, dequantize any one, export."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ValidationError(f"{self.path}: not an ArrowQuant store (no {MANIFEST})")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValidationError(f"{manifest_path}: corrupt manifest ({e})") from None
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValidationError(
                f"{manifest_path}: format {self.manifest.get('format')!r} v{self.manifest.get('format_version')} "
                f"is not {FORMAT_NAME} v{FORMAT_VERSION}"
            )
        self.files = [self.path / s["file"] for s in self.manifest.get("shards", [])]
        self.tensors: Dict[str, TensorEntry] = {}
        self._load_index()

    def _load_index(self) -> None:
        acc: Dict[str, dict] = {}
        for si, file in enumerate(self.files):
            try:
                pf = pq.ParquetFile(file)
                table = pf.read(columns=META_COLUMNS)
            except (OSError, pa.ArrowException) as e:
                raise ValidationError(f"{file}: unreadable Parquet shard ({e})") from None
            for i, row in enumerate(table.to_pylist()):
                entry = acc.setdefault(row["name"], dict(row, total=0, rows=[]))
                entry["total"] += row["nbytes"]
                entry["rows"].append((si, i, row["row_start"], row["row_count"]))
        for name, e in acc.items():
            self.tensors[name] = TensorEntry(
                name=name, shape=tuple(e["shape"]), dtype=e["dtype"], encoding=e["encoding"], bits=e["bits"],
                group_size=e["group_size"], reason=e["reason"], cosine=e["cosine"], rel_error=e["rel_error"],
                sqnr_db=e["sqnr_db"], nbytes=e["total"], source_file=e["source_file"], rows=tuple(e["rows"]),
            )

    # -- per tensor ---------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def _rows(self, name: str):
        try:
            entry = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None
        for si, rg, _, _ in entry.rows:
            table = pq.ParquetFile(self.files[si]).read_row_group(rg)
            yield table.to_pylist()[0]

    def chunks(self, name: str):
        """The stored rows of tensor ``name`` in row order, as dicts of the :data:`SCHEMA` columns."""
        return self._rows(name)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float32 in its original shape (reads only its own row groups).

        Lossless tensors come back exactly (BF16/F16 widened to float32, integers cast).

        Raises:
            KeyError: the store has no tensor ``name``.
        """
        entry = self.tensors[name]
        rows, cols = (entry.shape[0], math.prod(entry.shape[1:])) if len(entry.shape) > 1 else (
            (entry.shape[0], 1) if entry.shape else (1, 1))
        out = np.empty((rows, cols), dtype=np.float32)
        for row in self._rows(name):
            r0, n = row["row_start"], row["row_count"]
            out[r0:r0 + n] = self._decode(row, n, cols)
        return out.reshape(entry.shape)

    def raw(self, name: str) -> np.ndarray:
        """A lossless tensor's stored values in its source dtype (BF16 as uint16 words).

        Raises:
            ValueError: the tensor is quantized (use :meth:`dequantize`).
        """
        entry = self.tensors[name]
        if entry.quantized:
            raise ValueError(f"{name!r} is quantized; use dequantize()")
        parts = [np.frombuffer(row["codes"] or b"", dtype=DTYPES[entry.dtype]) for row in self._rows(name)]
        return (np.concatenate(parts) if parts else np.empty(0, DTYPES[entry.dtype])).reshape(entry.shape)

    @staticmethod
    def _decode(row: dict, rows: int, cols: int) -> np.ndarray:
        if row["encoding"] == RAW:
            raw = np.frombuffer(row["codes"] or b"", dtype=DTYPES[row["dtype"]])
            return to_float32(raw, row["dtype"]).reshape(rows, cols)  # widens BF16 bits, casts the rest
        enc = encodings.get_encoding(row["encoding"], row["bits"], row["group_size"])
        blobs = {f: np.frombuffer(row[f], dtype=np.uint8) for f in encodings.BLOB_FIELDS if row[f] is not None}
        return encodings.dequantize(blobs, enc, rows, cols)

    # -- whole model ----------------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        """Bytes of the store's Parquet weight files on disk (what ``model_size_mb`` counts)."""
        return sum(f.stat().st_size for f in self.files)

    def summary(self) -> List[dict]:
        """One dict per tensor: name, shape, dtype, encoding, bits, bpw, cosine, rel_error, reason."""
        return [
            dict(name=e.name, shape=e.shape, dtype=e.dtype, encoding=e.encoding, bits=e.bits, group_size=e.group_size,
                 bits_per_weight=e.bits_per_weight, cosine=e.cosine, rel_error=e.rel_error, sqnr_db=e.sqnr_db,
                 reason=e.reason, numel=e.numel)
            for e in self.tensors.values()
        ]

    def to_safetensors(self, path, dtype: str = "float16") -> Path:
        """Export a dequantized safetensors model (same file layout as the source) into folder ``path``.

        Quantized tensors are written in ``dtype`` (float16, bfloat16 or float32);
        lossless ones keep their exact source bytes. Non-weight files are copied.

        Returns:
            The new folder's path.

        Raises:
            ValueError: an unknown ``dtype``.
            OutputError: ``path`` already exists.
        """
        from .safetensors_writer import TensorSpec, float32_to_bf16_bits, write_safetensors

        target = {"float16": ("F16", lambda a: a.astype(np.float16)),
                  "bfloat16": ("BF16", float32_to_bf16_bits),
                  "float32": ("F32", lambda a: a.astype(np.float32))}
        if dtype not in target:
            raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(target)}")
        st_dtype, convert = target[dtype]
        out = Path(path)
        if out.exists():
            raise OutputError(f"{out}: already exists; choose another folder")
        out.mkdir(parents=True)
        by_file: Dict[str, List[TensorEntry]] = {}
        for e in self.tensors.values():
            by_file.setdefault(e.source_file, []).append(e)
        for rel, entries in by_file.items():
            specs = []
            for e in entries:
                if e.quantized:
                    specs.append(TensorSpec(e.name.split("/", 1)[-1] if "/" in rel else e.name, st_dtype, e.shape,
                                            lambda e=e: convert(self.dequantize(e.name))))
                else:
                    specs.append(TensorSpec(e.name.split("/", 1)[-1] if "/" in rel else e.name, e.dtype, e.shape,
                                            lambda e=e: self.raw(e.name)))
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(dest, specs, metadata={"format": "pt", "dequantized_from": "arrowquant"})
        if len(by_file) > 1 and all("/" not in rel for rel in by_file):
            index = {"metadata": {}, "weight_map": {e.name: e.source_file for e in self.tensors.values()}}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        for rel in self.manifest.get("extra_files", []):
            src = self.path / rel
            if src.is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / rel)
        return out


    def to_gguf(self, path, *, overwrite: bool = False, progress=None, cancel=None) -> dict:
        """Export to the GGUF file ``path`` for llama.cpp, ComfyUI-GGUF or diffusers, losslessly.

        Every tensor keeps its stored bytes (ggml block types as they are, lossless tensors in
        their source dtype), so ``gguf.quants.dequantize`` of each GGUF tensor equals
        :meth:`dequantize`. Tensor names, ``general.architecture``, hyper-parameters and the
        tokenizer are what the runtime of the model's family expects (see :mod:`arrow_quant_v2.gguf_io`).
        Needs the ``gguf`` extra (``pip install arrow-quant-v2[gguf]``).

        Returns:
            ``{"path", "architecture", "bytes", "tensors", "ggml_types", "has_tokenizer", "warnings", "notes"}``.

        Raises:
            ExportError: a tensor's encoding has no ggml form (quantize with ``target_runtime="gguf"``),
                or config.json lacks a hyper-parameter the runtime needs.
            OutputError: ``path`` exists and ``overwrite`` is False, or it cannot be written.
        """
        from .gguf_io import export_gguf

        return export_gguf(self, path, overwrite=overwrite, progress=progress, cancel=cancel)


def load_quantized(path) -> QuantizedModel:
    """Open an ArrowQuant store for reading (see :class:`QuantizedModel`).

    Only the manifest and the Parquet footers and metadata columns are read here; tensors
    are read when dequantized.

    Raises:
        ValidationError: ``path`` is not a store, its manifest is corrupt or of another
            format version, or a shard is unreadable.
    """
    return QuantizedModel(path)
