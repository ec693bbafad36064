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
import json
import math
import os
import re
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

from . import encodings, storecheck
from .errors import OutputError, StoreFormatError
from .source import DTYPES, INDEX_NAME, to_float32
from .storecheck import FORMAT_NAME, FORMAT_VERSION, MANIFEST, RAW, is_store  # noqa: F401 - the format's identity

JOURNAL = "journal.json"  # only inside a partial folder
LOCK = "writer.pid"  # only inside a partial folder

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


#: Once a shard holds SHARED_GROUPS_AFTER rows, rows of fewer blob bytes than SMALL_ROW_BYTES
#: share a row group, up to ROW_GROUP_BYTES together: one footer entry for many tiny tensors
#: (a model of 100,000 of them would otherwise have 100,000 row groups, and a 3.6 GB writer).
#: Every other row has a row group of its own, so a real chunk is read alone, and a model of
#: ordinary size is stored exactly as before (its store pins and the size budget's overhead
#: model, budget.store_overhead, are unchanged).
SHARED_GROUPS_AFTER, SMALL_ROW_BYTES, ROW_GROUP_BYTES = 1024, 16 << 10, 1 << 20


def _binary_column(blobs: List[Optional[np.ndarray]]) -> pa.Array:
    """A large_binary column of several small blobs (copied once into one buffer)."""
    if len(blobs) == 1:
        return _binary_cell(blobs[0])
    sizes = np.array([0 if b is None else b.nbytes for b in blobs], dtype=np.int64)
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    present = [np.ascontiguousarray(b).view(np.uint8).reshape(-1) for b in blobs if b is not None]
    data = np.concatenate(present) if present else np.zeros(0, np.uint8)
    validity = None
    if any(b is None for b in blobs):
        validity = pa.py_buffer(np.packbits(np.array([b is not None for b in blobs]), bitorder="little"))
    return pa.Array.from_buffers(pa.large_binary(), len(blobs), [validity, pa.py_buffer(offsets), pa.py_buffer(data)])


def row_places(pf: pq.ParquetFile) -> List[Tuple[int, int]]:
    """(row group, row within it) of every row of a shard, in order, from its footer."""
    meta = pf.metadata
    if meta.num_row_groups == meta.num_rows:  # one row per row group (stores written before small rows shared groups)
        return [(i, 0) for i in range(meta.num_rows)]
    return [(g, k) for g in range(meta.num_row_groups) for k in range(meta.row_group(g).num_rows)]


def _binary_cell(blob: Optional[np.ndarray]) -> pa.Array:
    """A one-value large_binary array over the blob's own memory (no copy).

    Not ``[memoryview(blob)]``: pyarrow keeps every buffer converted that way alive, so
    a writer's memory grew with the model (1.3 GB after 300 chunks of 4 MB)."""
    if blob is None:
        return pa.nulls(1, pa.large_binary())
    data = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
    offsets = np.array([0, data.size], dtype=np.int64)
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _temp_siblings(output: Path, kind: str) -> List[Tuple[Path, str]]:
    """This project's temporary siblings of ``output`` of ``kind`` ("partial" or "old"), with
    the run key of each partial: only names of exactly the form a writer creates
    (``.<output>.partial-<12 hex>-<8 hex>``, ``.<output>.old-<8 hex>``)."""
    tail = r"partial-(?P<key>[0-9a-f]{12})(?:-[0-9a-f]{8})?" if kind == "partial" else r"old-[0-9a-f]{8}"
    pattern = re.compile(re.escape(f".{output.name}.") + tail)
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in sorted(entries):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append((p, m.groupdict().get("key") or ""))
    return found


def recover_interrupted_overwrite(output: Path) -> None:
    """A kill between the two renames of a non-atomic overwrite leaves the old store as
    ``.<output>.old-*`` and nothing at the output: put it back. Only renames (nothing is
    deleted here: a later successful run sweeps leftovers once its own checks have passed).
    Called before anything looks at the output path."""
    if output.exists() or output.is_symlink():
        return
    for old, _ in _temp_siblings(output, "old"):
        if is_store(old):
            os.rename(old, output)
            return


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


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists unless ``overwrite`` and it is one of our stores
    (recognised by the signature in its manifest, not by a file name)."""
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputError(f"{output}: already exists; pass overwrite=True (CLI: --overwrite) or choose another output")
        if not is_store(output):
            raise OutputError(f"{output}: exists and is not an ArrowQuant store (its manifest.json lacks the "
                              f"{FORMAT_NAME!r} signature); refusing to overwrite it; choose another output")


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

    The sibling is named ``.<output>.partial-<run key>-<token>``: the run key hashes the
    source and the config, so a later run with the same inputs finds it (``resume``); the
    token is new for every run, so a run only ever creates and removes a folder it made.
    Leftovers of killed runs (our name pattern and our lock or journal inside) are swept
    only after a run has published its store. Each shard is
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
        check_output(self.output, overwrite)
        parent = self.output.parent
        self.tmp = parent / f".{self.output.name}.partial-{self.run_key[:12]}-{uuid.uuid4().hex[:8]}"
        self.shards: List[dict] = []
        self.resumed: Dict[str, dict] = {}  # tensor name -> its figures, for tensors kept from a killed run
        self._writer: Optional[pq.ParquetWriter] = None
        self._shard_bytes = 0
        self._pending: List[tuple] = []  # rows waiting to become one row group: (record, figures, reason)
        self._pending_bytes = 0
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._claim(resume)
        except OSError as e:
            raise _disk_error(e, parent) from None

    # -- partial folders, lock and journal ---------------------------------------------

    def _claim(self, resume: bool) -> None:
        key = self.run_key[:12]
        adopt = None
        with _claimed_lock:
            partials = _temp_siblings(self.output, "partial")
            for other, other_key in partials:
                if other_key != key:
                    continue  # another config's run (live or dead): not ours to touch here
                if other in _claimed:
                    raise OutputError(f"{self.output}: another job of this process is writing it right now")
                owner = _lock_owner(other)
                if owner is not None:
                    raise OutputError(f"{self.output}: another run (pid {owner}) is writing it right now")
                if resume and adopt is None and (other / JOURNAL).is_file():
                    adopt = other  # a killed run of the same inputs: keep its verified shards
            if adopt is not None:
                self.tmp = adopt
            _claimed.add(self.tmp)
        self.tmp.mkdir(exist_ok=adopt is not None)
        (self.tmp / LOCK).write_text(str(os.getpid()))
        if resume:
            self._load_journal()
        for f in self.tmp.glob("weights-*.parquet"):  # a shard that was open when the run died
            if f.name not in {s["file"] for s in self.shards}:
                f.unlink()

    def _sweep_leftovers(self) -> None:
        """Remove what killed runs of this project left beside the output: partial folders
        (our name pattern, our lock or journal inside, no live writer) and old stores moved
        aside by an interrupted overwrite (our pattern and our signature). Called only once
        this run's store is in place."""
        with _claimed_lock:
            for other, _ in _temp_siblings(self.output, "partial"):
                ours = (other / LOCK).is_file() or (other / JOURNAL).is_file()
                if ours and other not in _claimed and _lock_owner(other) is None:
                    shutil.rmtree(other, ignore_errors=True)
        for old, _ in _temp_siblings(self.output, "old"):
            if is_store(old):
                shutil.rmtree(old, ignore_errors=True)

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
            if not f.is_file() or f.stat().st_size != shard["bytes"] or storecheck.file_sha256(f) != shard["sha256"]:
                break  # keep the verified prefix only
            self.shards.append(shard)
            for name in shard["tensor_names"]:
                self.resumed[name] = journal["tensors"][name]
        self._journal_tensors = {n: journal["tensors"][n] for n in self.resumed}

    def _record_shard(self, tensors: Dict[str, dict]) -> None:
        """Journal the just-closed shard with its hash and its tensors' figures."""
        shard = self.shards[-1]
        f = self.tmp / shard["file"]
        shard.update(bytes=f.stat().st_size, sha256=storecheck.file_sha256(f))
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
            digest = storecheck.file_sha256(f) if file == name else None
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
            fh.write(json.dumps(journal))  # dumps uses the C encoder; dump does not (100k tensors: seconds)
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
            self._flush_rows()
            self._writer.close()
            self._writer = None
            self._record_shard(self._open_figures)

    def write_tensor(self, records: Iterable[ChunkRecord], figures: Dict[str, float], reason: str,
                     summary: Optional[dict] = None, nbytes: Optional[int] = None) -> None:
        """Append all chunks of one tensor (a tensor never straddles two shards).

        ``summary`` is what the engine knows of the tensor (bits, bytes, figures); it is
        journaled with the shard so a resumed run can report it without re-reading.
        ``records`` may be any iterable (the engine passes a generator that reads its spooled
        chunks back one by one); ``nbytes``, the sum of their blob bytes, is then required so
        that the shard is chosen before the first row.
        """
        if nbytes is None:
            records = list(records)
            nbytes = sum(r.nbytes for r in records)
        size = nbytes
        rows, name = 0, None
        try:
            if self._writer is None or starts_new_shard(self._shard_bytes, size, self.max_shard_bytes):
                self._open_shard()  # closes (and journals) the previous shard: disk errors here too
            for r in records:
                small = r.nbytes < SMALL_ROW_BYTES and self.shards[-1]["rows"] >= SHARED_GROUPS_AFTER
                if not small or self._pending_bytes + r.nbytes > ROW_GROUP_BYTES:
                    self._flush_rows()
                self._pending.append((r, figures, reason))
                self._pending_bytes += r.nbytes
                if not small:
                    self._flush_rows()
                rows, name = rows + 1, r.name
        except OSError as e:
            raise _disk_error(e, self.output) from None
        self._shard_bytes += size
        self.shards[-1]["tensors"] += 1
        self.shards[-1]["rows"] += rows
        self.shards[-1]["tensor_names"].append(name)
        self._open_figures[name] = summary or {}

    def _flush_rows(self) -> None:
        """Write the pending rows as one row group. Where the cuts fall depends only on the rows,
        so the same inputs give the same files (resume relies on it)."""
        if not self._pending:
            return
        rows, self._pending, self._pending_bytes = self._pending, [], 0
        columns = {
            "name": [r.name for r, _, _ in rows], "source_file": [r.source_file for r, _, _ in rows],
            "shape": [list(r.shape) for r, _, _ in rows], "dtype": [r.dtype for r, _, _ in rows],
            "chunk": [r.chunk for r, _, _ in rows], "row_start": [r.row_start for r, _, _ in rows],
            "row_count": [r.row_count for r, _, _ in rows], "encoding": [r.encoding for r, _, _ in rows],
            "bits": [r.bits for r, _, _ in rows], "group_size": [r.group_size for r, _, _ in rows],
            "nbytes": [r.nbytes for r, _, _ in rows],
            "cosine": [f["cosine"] for _, f, _ in rows], "rel_error": [f["rel_error"] for _, f, _ in rows],
            "sqnr_db": [f["sqnr_db"] for _, f, _ in rows], "reason": [why for _, _, why in rows],
        }
        arrays = []
        for field in SCHEMA:
            if field.name in encodings.BLOB_FIELDS:
                arrays.append(_binary_column([r.blobs.get(field.name) for r, _, _ in rows]))
            else:
                arrays.append(pa.array(columns[field.name], type=field.type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA), row_group_size=len(rows))

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
            if self.output.exists() and (not self.overwrite or not is_store(self.output)):
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
        self._sweep_leftovers()
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
    rows: Tuple[Tuple[int, int, int, int, int], ...]  # (shard index, row group, row in group, row_start, row_count)

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
    """A quantized store opened for reading: list tensors, dequantize any one, export.

    Opening validates the store (``storecheck``: manifest, file names, every row's metadata,
    shard sizes and SHA-256) and raises :class:`~arrow_quant_v2.errors.StoreFormatError` on
    the first problem; each row's blobs are checked against its encoding's layout as it is
    read, before it is decoded. ``verify_checksums=False`` skips hashing the shards (for
    stores you trust, e.g. ones you just wrote); everything else is always checked. Each
    shard's Parquet footer is read once, and a tensor is read by its row group and offset.
    """

    def __init__(self, path, *, verify_checksums: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreFormatError(self.path, MANIFEST, "not a folder: not an ArrowQuant store")
        self.manifest = storecheck.check_manifest(self.path, storecheck.read_manifest(self.path))
        shards = self.manifest["shards"]
        self.files = [storecheck.check_shard_file(self.path, s, verify_checksums) for s in shards]
        self.tensors: Dict[str, TensorEntry] = {}
        self._parquet: List[pq.ParquetFile] = []
        self._checker = storecheck.RowChecker(self.path)
        self._meta: Dict[str, dict] = {}
        self._lock = threading.Lock()
        self._cached_group: Tuple[Optional[Tuple[int, int]], Optional[pa.Table]] = (None, None)
        self._load_index(shards)

    def _load_index(self, shards: List[dict]) -> None:
        for si, (file, shard) in enumerate(zip(self.files, shards)):
            where = f"shards[{shard['file']}]"
            try:
                pf = pq.ParquetFile(file)
                storecheck.check_schema(self.path, shard["file"], pf.schema_arrow, SCHEMA)
                meta = pf.metadata
                if meta.num_rows != shard["rows"]:
                    raise StoreFormatError(self.path, f"{where}.rows",
                                           f"the file has {meta.num_rows} rows, the manifest says {shard['rows']}")
                table = pf.read(columns=META_COLUMNS)
                columns = table.to_pydict()
                places = [(si, g, k) for g, k in row_places(pf)]
            except (OSError, pa.ArrowException, ValueError) as e:
                raise StoreFormatError(self.path, where, f"unreadable Parquet ({str(e)[:200]})") from None
            refs = [(place, start, count, nbytes, cos, rel, sqnr, reason) for place, start, count, nbytes, cos, rel,
                    sqnr, reason in zip(places, columns["row_start"], columns["row_count"], columns["nbytes"],
                                        columns["cosine"], columns["rel_error"], columns["sqnr_db"], columns["reason"])]
            self._checker.add(shard["file"], table, columns, refs)
            self._parquet.append(pf)
        for name, (meta, refs) in self._checker.finish().items():
            (si, rg, k), start, count, nbytes, cos, rel, sqnr, reason = refs[0]
            if len(refs) == 1:  # most tensors (all of a model of many tiny ones): no generator needed
                rows = ((si, rg, k, start, count),)
            else:
                rows = tuple((p[0], p[1], p[2], r0, n) for p, r0, n, *_ in refs)
                nbytes = sum(r[3] for r in refs)
            self._meta[name] = meta
            self.tensors[name] = TensorEntry(
                name=name, shape=meta["shape"], dtype=meta["dtype"], encoding=meta["encoding"], bits=meta["bits"],
                group_size=meta["group_size"], reason=reason or "", cosine=cos, rel_error=rel, sqnr_db=sqnr,
                nbytes=nbytes, source_file=meta["source_file"], rows=rows,
            )

    # -- per tensor ---------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def _rows(self, entry: TensorEntry):
        """Each chunk's checked blobs and row count, in row order."""
        for chunk, (si, rg, offset, _, count) in enumerate(entry.rows):
            with self._lock:  # one reader of a ParquetFile at a time; the last row group is kept for neighbours
                key, table = self._cached_group
                if key != (si, rg):
                    try:
                        table = self._parquet[si].read_row_group(rg, columns=list(encodings.BLOB_FIELDS))
                    except (OSError, pa.ArrowException, ValueError) as e:
                        raise StoreFormatError(self.path, f"shards[{self.files[si].name}]",
                                               f"unreadable row group {rg} ({str(e)[:200]})", entry.name) from None
                    self._cached_group = ((si, rg), table)
            if offset >= table.num_rows:
                raise StoreFormatError(self.path, "rows", f"row group {rg} has no row {offset}", entry.name)
            row = {f: table.column(f)[offset].as_py() for f in encodings.BLOB_FIELDS}
            row.update(row_count=count, chunk=chunk)
            yield storecheck.check_blobs(self.path, entry.name, self._meta[entry.name], row, self._checker), count

    def chunks(self, name: str):
        """The stored chunks of tensor ``name`` in row order: dicts of the blob columns (each checked
        against the encoding's layout, a blob the encoding does not use is absent) and ``row_count``."""
        for blobs, count in self._rows(self._entry(name)):
            yield dict(blobs, row_count=count)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor ``name`` as float32 in its original shape (reads only its own rows).

        Lossless tensors come back exactly (BF16/F16 widened to float32, integers cast).

        Raises:
            KeyError: the store has no tensor ``name``.
            StoreFormatError: a row's blobs do not match its encoding's layout.
        """
        entry = self._entry(name)
        rows, cols = storecheck.matrix_shape(entry.shape)
        out = np.empty((rows, cols), dtype=np.float32)  # the validator checked the chunks cover every row once
        at = 0
        for blobs, count in self._rows(entry):
            out[at:at + count] = self._decode(entry, blobs, count, cols)
            at += count
        return out.reshape(entry.shape)

    def raw(self, name: str) -> np.ndarray:
        """A lossless tensor's stored values in its source dtype (BF16 as uint16 words).

        Raises:
            ValueError: the tensor is quantized (use :meth:`dequantize`).
        """
        entry = self._entry(name)
        if entry.quantized:
            raise ValueError(f"{name!r} is quantized; use dequantize()")
        parts = [np.frombuffer(blobs["codes"], dtype=DTYPES[entry.dtype]) for blobs, _ in self._rows(entry)]
        return (np.concatenate(parts) if parts else np.empty(0, DTYPES[entry.dtype])).reshape(entry.shape)

    def _decode(self, entry: TensorEntry, blobs: Dict[str, bytes], rows: int, cols: int) -> np.ndarray:
        if entry.encoding == RAW:
            raw = np.frombuffer(blobs["codes"], dtype=DTYPES[entry.dtype])
            return to_float32(raw, entry.dtype).reshape(rows, cols)  # widens BF16 bits, casts the rest
        enc = self._checker.encoding(entry.encoding, entry.bits, entry.group_size, entry.name)
        return encodings.dequantize({f: np.frombuffer(b, dtype=np.uint8) for f, b in blobs.items()}, enc, rows, cols)

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

    def to_safetensors(self, path, dtype: str = "float16", *, progress=None, cancel=None) -> Path:
        """Export a dequantized safetensors model (same file layout as the source) into folder ``path``.

        Quantized tensors are written in ``dtype`` (float16, bfloat16 or float32);
        lossless ones keep their exact source bytes. Non-weight files are copied.
        Every file written is named by a validated relative name from the store and is
        checked to stay inside ``path`` after resolving symlinks; an extra file that is a
        symlink is copied as the file it points to only if that lies inside the store.

        The folder is written as a hidden temporary beside ``path`` and renamed into place when
        complete: an export that fails, or that ``cancel`` (a
        :class:`~arrow_quant_v2.progress.CancelToken`, checked before each tensor) stops, leaves
        nothing; a killed one leaves the temporary, which the next export to ``path`` removes.
        ``progress`` receives an ``export`` event per tensor.

        Returns:
            The new folder's path.

        Raises:
            ValueError: an unknown ``dtype``.
            OutputError: ``path`` already exists, or cannot be written.
            StoreFormatError: the store names a file that would land outside ``path``,
                twice, or outside the store.
            Cancelled: ``cancel`` was set.
        """
        from .paths import export_temporary, remove_stale_export_temporaries
        from .safetensors_writer import float32_to_bf16_bits

        target = {"float16": ("F16", lambda a: a.astype(np.float16)),
                  "bfloat16": ("BF16", float32_to_bf16_bits),
                  "float32": ("F32", lambda a: a.astype(np.float32))}
        if dtype not in target:
            raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(target)}")
        out = Path(path)
        if out.exists() or out.is_symlink():
            raise OutputError(f"{out}: already exists; choose another folder")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_export_temporaries(out)
            tmp = export_temporary(out)
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"{out}: cannot create the export folder ({e.strerror or e})") from None
        try:
            self._write_safetensors_export(tmp, target[dtype], progress, cancel)
            if out.exists() or out.is_symlink():
                raise OutputError(f"{out}: appeared while exporting; nothing was overwritten")
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _write_safetensors_export(self, out: Path, dtype_and_convert, progress, cancel) -> None:
        """Write :meth:`to_safetensors`' files into the (temporary) folder ``out``."""
        from .progress import ProgressEvent
        from .safetensors_writer import TensorSpec, write_safetensors

        st_dtype, convert = dtype_and_convert
        entries = list(self.tensors.values())
        total = max(sum(e.numel for e in entries), 1)
        count = {"tensors": 0, "elements": 0}

        def produce(e: TensorEntry) -> np.ndarray:
            if cancel is not None:
                cancel.check()
            data = convert(self.dequantize(e.name)) if e.quantized else self.raw(e.name)
            count["tensors"] += 1
            count["elements"] += e.numel
            if progress is not None:
                progress(ProgressEvent(stage="export", fraction=min(count["elements"] / total, 0.99), tensor=e.name,
                                       message=f"exporting {e.name} [{count['tensors']}/{len(entries)}]",
                                       tensors_done=count["tensors"], tensors_total=len(entries)))
            return data

        by_file: Dict[str, List[TensorEntry]] = {}
        for e in entries:
            by_file.setdefault(e.source_file, []).append(e)
        for rel, group in by_file.items():
            specs = [TensorSpec(e.name.split("/", 1)[-1] if "/" in rel else e.name,
                                st_dtype if e.quantized else e.dtype, e.shape, lambda e=e: produce(e))
                     for e in group]
            write_safetensors(self._export_path(out, rel, "source_file"), specs,
                              metadata={"format": "pt", "dequantized_from": "arrowquant"})
        if len(by_file) > 1 and all("/" not in rel for rel in by_file):
            index = {"metadata": {}, "weight_map": {e.name: e.source_file for e in entries}}
            self._export_path(out, INDEX_NAME, "extra_files").write_text(json.dumps(index, indent=1))
        for rel in self.manifest.get("extra_files", []):
            if cancel is not None:
                cancel.check()
            src = self.path / rel
            if not src.is_file():
                continue  # listed but not shipped: nothing to copy
            src = storecheck.inside(self.path, rel, self.path, "extra_files[]")
            shutil.copyfile(src, self._export_path(out, rel, "extra_files[]"))

    def _export_path(self, out: Path, rel: str, field: str) -> Path:
        """Where an export writes ``rel``: a new file inside ``out``, its folders created and the
        result checked (after resolving symlinks) to lie inside ``out``."""
        storecheck.relative_name(rel, self.path, field)
        dest = out / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreFormatError(self.path, field, f"{rel!r} cannot be created in the export ({e.strerror})") from None
        real_out = out.resolve()
        if real_out != dest.parent.resolve() and real_out not in dest.parent.resolve().parents:
            raise StoreFormatError(self.path, field, f"{rel!r} would be written outside the export folder")
        if dest.exists() or dest.is_symlink():
            raise StoreFormatError(self.path, field, f"{rel!r} is written twice by this export")
        return dest

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


def load_quantized(path, *, verify_checksums: bool = True) -> QuantizedModel:
    """Open an ArrowQuant store for reading (see :class:`QuantizedModel`).

    The manifest, the Parquet footers and the metadata columns are read and validated
    here, and each shard's SHA-256 is checked against the manifest (once per shard per
    process; ``verify_checksums=False`` skips it for a store you trust); tensors are read
    when dequantized.

    Raises:
        StoreFormatError: ``path`` is not a store, or it breaks the format (the error names
            the store, the tensor and the field); a subclass of ``ValidationError``.
    """
    return QuantizedModel(path, verify_checksums=verify_checksums)
