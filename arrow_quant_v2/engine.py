"""The quantization pipeline: source -> plan -> kernels -> store.

One job reads the model chunk by chunk (a chunk is a block of rows of a tensor's 2-D
view), quantizes chunks on a shared pool of kernel threads and writes each finished
tensor to the store. A sliding window of chunk tasks overlaps reading, quantizing
and writing across tensors. Memory is bounded by that window plus at most
``SPOOL_MEMORY_BYTES`` of encoded chunks waiting for their tensor to finish (the rest
wait in an anonymous temporary file), whatever the largest tensor. The cancel token
is checked between chunks.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import encodings, hub, policy, sensitivity
from ._version import __version__
from .budget import BudgetPlan, allocate
from .config import BIT_WIDTHS, DiffusionQuantConfig
from .errors import ConfigurationError, OutputError, QuantizationError
from .layout import chunk_ranges
from .metrics import figures, weighted_cosine
from .plan import Planner, TensorPlan, detect_modality, spatial_plan
from .policy import LOSSLESS, Choice
from .progress import CancelToken, ProgressEvent, ProgressSink
from .source import ModelSource, TensorInfo, open_model
from .store import (FORMAT_NAME, FORMAT_VERSION, RAW, ChunkRecord, StoreWriter, check_output,
                    recover_interrupted_overwrite)

#: Lossless tensors up to this size are copied on the job's thread, not sent to the kernel
#: pool: for a model of many tiny tensors the hand-off cost more than the copy.
INLINE_BYTES = 64 << 10

_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def kernel_pool(threads: Optional[int] = None) -> ThreadPoolExecutor:
    """The process-wide pool the kernels run on: one thread per core, shared by all jobs
    so that many concurrent jobs never oversubscribe the cores. ``threads`` sizes it when
    it is first made (a Dask worker passes its own thread count)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2, thread_name_prefix="aq-kernel")
        return _pool


def resolve_threads(config: DiffusionQuantConfig) -> int:
    return config.num_threads or (os.cpu_count() or 2)


def check_paths(source: ModelSource, output: Path, overwrite: bool) -> None:
    """Refuse outputs that would touch the input or an existing store."""
    src = source.root.resolve()
    try:
        out = output.resolve()
        output.exists()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a symlink loop...
        raise OutputError(f"{str(output)!r}: not a usable output path ({e})") from None
    if out == src or src in out.parents:
        raise OutputError(f"{output}: lies inside the input folder {source.root}; choose an output outside it")
    if out in src.parents:
        raise OutputError(f"{output}: contains the input model {source.root}; choose another output")
    check_output(output, overwrite)


class _NonFinite(Exception):
    pass


class _Ready:
    """A result computed on the spot, with the two methods of a Future the pipeline calls."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value

    def cancel(self) -> bool:
        return False


#: Encoded chunks of the tensor being finished kept in memory; beyond this they are spooled to disk.
SPOOL_MEMORY_BYTES = 64 << 20


class ChunkSpool:
    """The encoded chunks of one tensor, until its figures are known and its rows can be written.

    Every Parquet row of a tensor carries the tensor's figures and reason, which are known only
    after its last chunk (and decide whether it is re-encoded wider), so its rows cannot be
    written as the chunks finish. The first ``memory_bytes`` of chunks stay in memory; later
    ones go to an anonymous temporary file in ``folder`` (unlinked from the start: nothing is
    left behind even if the process dies) and are read back one at a time while the rows are
    written. Only the job's thread uses a spool.
    """

    def __init__(self, folder: Path, memory_bytes: int) -> None:
        self.folder, self.memory_bytes = folder, memory_bytes
        self.chunks: List[tuple] = []  # (r0, r1, blobs or their {field: (offset, size)} in the file, spooled)
        self.nbytes = 0
        self._in_memory = 0
        self._file = None

    def add(self, r0: int, r1: int, blobs) -> None:
        """Keep chunk ``[r0, r1)``'s blobs (``None``: a chunk that could not be encoded)."""
        size = 0 if blobs is None else sum(int(b.size) for b in blobs.values() if b is not None)
        self.nbytes += size
        if blobs is None or self._in_memory + size <= self.memory_bytes:
            self._in_memory += size
            self.chunks.append((r0, r1, blobs, False))
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.folder, prefix=".spool-")
        where = {}
        for field, blob in blobs.items():
            if blob is None:
                where[field] = None
                continue
            data = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
            where[field] = (self._file.seek(0, os.SEEK_END), data.size)
            self._file.write(data.data)
        self.chunks.append((r0, r1, where, True))

    def __iter__(self):
        for r0, r1, blobs, spooled in self.chunks:
            yield r0, r1, self._read(blobs) if spooled else blobs

    def _read(self, where):
        out = {}
        for field, loc in where.items():
            if loc is not None:
                self._file.seek(loc[0])
                out[field] = np.frombuffer(self._file.read(loc[1]), np.uint8)
            else:
                out[field] = None
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class QuantizeJob:
    """Quantizes one model into one store. Use :func:`quantize_model`."""

    def __init__(self, source: ModelSource, writer: StoreWriter, config: DiffusionQuantConfig,
                 plans: Dict[str, TensorPlan], report: Callable[..., None], cancel: CancelToken,
                 names: Optional[Sequence[str]] = None, calibration=None) -> None:
        self.source, self.writer, self.config, self.plans = source, writer, config, plans
        self.calibration = calibration  # calibration.Calibration: per-tensor input second moments, or None
        self._prepared: Dict[tuple, object] = {}  # (id of an H, fitted blocks) -> solver.Prepared, shared by chunks
        self._prepare_lock = threading.Lock()
        self._plain_stats: Dict[str, np.ndarray] = {}  # calibrated tensor -> plain rounding's statistics so far
        self._output_stats: Dict[str, np.ndarray] = {}  # calibrated tensor -> output statistics (written, plain) so far
        self.report, self.cancel = report, cancel
        self.names = list(source.tensors) if names is None else list(names)  # a part of the model (cluster)
        self.threads = resolve_threads(config)
        self.pool = kernel_pool()
        self.final: Dict[str, dict] = {}  # tensor -> its figures, bits, bytes, reason
        self.warnings: List[str] = []
        self.fallbacks: List[dict] = []
        self._source_files: Dict[Path, str] = {}  # weight file -> its name relative to the model root

    # -- work items ---------------------------------------------------------------------

    def _tasks(self):
        for name in self.names:
            info = self.source.tensors[name]
            if name in self.final:  # kept from a killed run (resume)
                continue
            plan = self.plans[name]
            if self.config.enable_spatial and self.config.target_model_size_mb is None:
                plan = self.plans[name] = spatial_plan(plan, self.source, self.config)
            ranges = chunk_ranges(*info.matrix_shape)
            for i, (r0, r1) in enumerate(ranges):
                yield info, plan, i, r0, r1, i == len(ranges) - 1

    def _encode(self, info: TensorInfo, plan: TensorPlan, r0: int, r1: int):
        """Worker: one chunk -> (blobs, stats). Runs on a kernel thread."""
        self.cancel.check()
        if plan.lossless:
            _, cols = info.matrix_shape
            raw = self.source.read_raw(info.name, r0 * cols, (r1 - r0) * cols)
            return {"codes": raw.view(np.uint8)}, None
        x = self.source.read_rows(info.name, r0, r1)
        if not np.isfinite(x).all():
            raise _NonFinite()
        encoding = encodings.get_encoding(plan.encoding, plan.bits, plan.group_size)
        if self.calibration is not None and info.name in self.calibration.hessians:
            blobs, stats = self._encode_calibrated(x, info, encoding, r0, r1)
            self._measure_output(x, info, encoding, blobs, r0)
            return blobs, stats
        return encodings.quantize(x, encoding)

    def _measure_output(self, x: np.ndarray, info: TensorInfo, encoding, blobs, r0: int) -> None:
        """Add this chunk's output statistics (:mod:`arrow_quant_v2.sensitivity`) on the calibration's H:
        of the codes written, and of plain rounding (what the fallback judges, as the budget does)."""
        written = encodings.dequantize(blobs, encoding, *x.shape)
        plain = encodings.dequantize(encodings.quantize(x, encoding)[0], encoding, *x.shape)
        found = sensitivity.view_stats(x, [written, plain], self.calibration.hessians[info.name],
                                       self.calibration.layers[info.name].transposed, np.arange(r0, r0 + x.shape[0]))
        with self._prepare_lock:
            self._output_stats[info.name] = self._output_stats.get(info.name, 0) + np.stack(found)

    def _judged(self, name: str, fig: Dict[str, float]) -> Tuple[float, str, Optional[np.ndarray]]:
        """``(cosine, what it measures, output statistics)`` the fallback decision reads. For a calibrated
        tensor: plain rounding on the same grid, as the budget measured it, by the layer output's cosine on
        the calibration inputs (``policy.measure_for``), its error scaled by the layer's downstream gain when
        measured (``sensitivity.felt_cosine``); compensation then only improves on it."""
        with self._prepare_lock:
            plain = self._plain_stats.pop(name, None)
            output = self._output_stats.pop(name, None)
        if output is not None:
            cos, gain = sensitivity.figures(output[1])["cosine"], self.calibration.gain(name)
            if gain is None:
                return cos, policy.OUTPUT_COSINE, output
            return sensitivity.felt_cosine(cos, gain), policy.felt_measure(gain), output
        return (figures(plain) if plain is not None else fig)["cosine"], policy.WEIGHT_COSINE, None

    def _encode_calibrated(self, x: np.ndarray, info: TensorInfo, encoding, r0: int, r1: int):
        """The encoder's grid, then error-compensated codes on it (see :mod:`arrow_quant_v2.kernels.solver`)."""
        from .kernels import solver

        layer = self.calibration.layers[info.name]
        if not encoding.has_grid:
            if r0 == 0:
                self.warnings.append(f"{info.name}: encoding {encoding.name} does not expose its grid yet; "
                                     "rounded without calibration")
            return encodings.quantize(x, encoding)
        if layer.transposed and (r0, r1) != (0, info.matrix_shape[0]):
            return encodings.quantize(x, encoding)  # inputs along rows split over chunks: no whole column to solve
        grid = encoding.grid(x)
        plain, stats = encoding.round_to_grid(x, grid)
        with self._prepare_lock:
            self._plain_stats[info.name] = self._plain_stats.get(info.name, 0) + stats
        turn = (lambda a: a.T) if layer.transposed else (lambda a: a)
        # ggml blocks along the inputs: their parameters are fitted as the sweep reaches them
        fitting = hasattr(encoding, "compensated") and not layer.transposed
        h = self.calibration.hessians[info.name]
        key = (id(h), fitting)  # one factorisation per H (layers reading the same input share it), not per chunk
        with self._prepare_lock:
            prepared = self._prepared.get(key)
        if prepared is None:  # factorised outside the lock: chunks of other tensors go on meanwhile
            prepared = solver.prepare(h, act_order=not fitting)
            with self._prepare_lock:
                if len(self._prepared) > self.threads:  # only the tensors in flight (the window) need theirs
                    del self._prepared[next(iter(self._prepared))]
                self._prepared.setdefault(key, prepared)
        if fitting:
            return encoding.quantize_compensated(x, prepared, grid, plain, stats)
        scales, offsets = grid.per_element(x.shape[1])
        found = solver.solve(turn(x), prepared, grid.levels, turn(scales), turn(offsets), turn(plain.reshape(x.shape)))
        if not found.compensated:
            return encoding.pack(grid, plain), stats
        return encoding.quantize_codes(x, grid, turn(found.codes))

    # -- the pipeline -------------------------------------------------------------------

    def run(self) -> None:
        pending: collections.deque = collections.deque()
        tasks = self._tasks()
        window = self.threads  # this job's chunks in flight: num_threads (0 = all cores), never more
        parts = self._spool()
        stats = np.zeros(4)
        whole = len(self.names) == len(self.source.tensors)
        self.bytes_total = max(self.source.total_bytes if whole else sum(self.source.tensors[n].nbytes for n in self.names), 1)
        self.tensors_total = len(self.names)
        self.final.update(self.writer.resumed)
        self.tensors_done = len(self.final)
        self.bytes_done = sum(t["source_bytes"] for t in self.final.values())
        self._emit("prepare", "", "loading kernels (compiled once per machine on first use)")
        self._warm_up()
        self._emit("quantize", "", "starting")

        def refill() -> None:
            while len(pending) < window:
                item = next(tasks, None)
                if item is None:
                    return
                info, plan, i, r0, r1, last = item
                if plan.lossless and info.nbytes <= INLINE_BYTES:  # a copy: cheaper here than a pool round trip
                    pending.append((item, _Ready(self._encode(info, plan, r0, r1))))
                else:
                    pending.append((item, self.pool.submit(self._encode, info, plan, r0, r1)))

        try:
            while True:
                refill()
                if not pending:
                    break
                self.cancel.check()
                (info, plan, i, r0, r1, last), fut = pending.popleft()
                try:
                    blobs, st = fut.result()
                    parts.add(r0, r1, blobs)
                    if st is not None:
                        stats += st
                except _NonFinite:
                    parts.add(r0, r1, None)
                    stats[:] = np.nan
                refill()  # keep `window` chunks computing while this thread writes
                self.bytes_done += info.nbytes * (r1 - r0) // max(info.matrix_shape[0], 1)
                self._emit("quantize", info.name, f"{'storing' if plan.lossless else 'quantizing'} {info.name} "
                           f"{'lossless' if plan.lossless else f'int{plan.bits}'} "
                           f"[{self.tensors_done + 1}/{self.tensors_total}]")
                if last:
                    self._finish_tensor(info, plan, parts, stats)
                    parts, stats = self._spool(), np.zeros(4)
        except BaseException:
            parts.close()
            for _, fut in pending:
                fut.cancel()
            for _, fut in pending:  # let running chunks end so no thread outlives the job
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001 - already failing; the first error wins
                    pass
            raise

    def _warm_up(self) -> None:
        """Load (or, the first time on a machine, compile) the kernels of every planned encoding
        and of the same-width alternate, so a job's first chunk isn't a long silent pause."""
        tiny = np.linspace(-1, 1, 2 * 256, dtype=np.float32).reshape(2, 256)
        kinds = {(p.encoding, p.bits, p.group_size) for p in self.plans.values() if not p.lossless}
        alternate = policy.alternate_encoding(self.config)
        if alternate is not None:
            kinds |= {(alternate, b, policy.group_for(self.config, alternate, b))
                      for _, b, _ in kinds if encodings.supports(alternate, b)}
        for name, bits, group in sorted(kinds, key=str):
            self.cancel.check()
            enc = encodings.get_encoding(name, bits, group)
            encodings.dequantize(encodings.quantize(tiny, enc)[0], enc, *tiny.shape)

    def _spool(self) -> ChunkSpool:
        return ChunkSpool(self.writer.tmp, SPOOL_MEMORY_BYTES)

    def _finish_tensor(self, info: TensorInfo, plan: TensorPlan, parts: ChunkSpool, stats) -> None:
        try:
            self._settle(info, plan, parts, stats)
        finally:
            parts.close()

    def _settle(self, info: TensorInfo, plan: TensorPlan, parts: ChunkSpool, stats) -> None:
        """Write the tensor, or re-encode it along the policy's chain until it is accepted."""
        if plan.lossless:
            self._write(info, plan, parts, {"cosine": 1.0, "rel_error": 0.0, "sqnr_db": math.inf}, plan.reason)
            return
        reason = plan.reason
        while True:
            if np.isnan(stats).any():
                msg = f"{info.name}: contains NaN/Inf values; kept lossless so nothing changes"
                self.warnings.append(msg)
                plan = TensorPlan(info.name, LOSSLESS, 0, "lossless: contains NaN/Inf")
                parts.close()
                parts, _ = self._encode_all(info, plan)
                self._write(info, plan, parts, {"cosine": math.nan, "rel_error": 0.0, "sqnr_db": math.inf}, plan.reason)
                return
            fig = figures(stats)
            judged, measure, output = self._judged(info.name, fig)
            if policy.accepts(self.config, plan.bits, judged):
                self._write(info, plan, parts, fig, reason, output)
                return
            tried = Choice(plan.encoding, plan.bits, plan.group_size)
            nxt, reason, wider = policy.fallback(self.config, tried, judged, info.matrix_shape[1], measure)
            if wider:
                if self.config.fail_fast:
                    raise QuantizationError(
                        f"{info.name}: cosine {fig['cosine']:.5f} at int{plan.bits} is below min_accuracy "
                        f"{policy.required(self.config, plan.bits)} (fail_fast is on; turn it off to fall back to more bits)"
                    )
                self.fallbacks.append({"tensor": info.name, "from_bits": plan.bits, "to_bits": nxt.bits,
                                       "cosine": fig["cosine"]})
            if nxt.encoding is None:
                plan = TensorPlan(info.name, LOSSLESS, 0, reason)
                parts.close()
                parts, _ = self._encode_all(info, plan)
                self._write(info, plan, parts, {"cosine": 1.0, "rel_error": 0.0, "sqnr_db": math.inf}, plan.reason)
                return
            plan = TensorPlan(info.name, nxt.bits, nxt.group, "", nxt.encoding, plan.role)
            parts.close()
            parts, stats = self._encode_all(info, plan)

    def _encode_all(self, info: TensorInfo, plan: TensorPlan) -> Tuple[ChunkSpool, np.ndarray]:
        """Encode every chunk of ``info`` again under ``plan``, ``num_threads`` chunks in flight at a
        time (as the first pass), into a new spool; returns it and the summed statistics."""
        spool, stats = self._spool(), np.zeros(4)
        ranges = iter(chunk_ranges(*info.matrix_shape))
        pending: collections.deque = collections.deque()
        try:
            while True:
                while len(pending) < self.threads and (r := next(ranges, None)) is not None:
                    pending.append((r, self.pool.submit(self._encode, info, plan, *r)))
                if not pending:
                    return spool, stats
                (r0, r1), fut = pending.popleft()
                blobs, st = fut.result()
                spool.add(r0, r1, blobs)
                if st is not None:
                    stats += st
        except BaseException:
            spool.close()
            for _, fut in pending:
                fut.cancel()
            concurrent.futures.wait([fut for _, fut in pending])  # no thread outlives the job
            raise

    def _write(self, info: TensorInfo, plan: TensorPlan, parts: ChunkSpool, fig: Dict[str, float], reason: str,
               output: Optional[np.ndarray] = None) -> None:
        rel = self._source_files.get(info.file)
        if rel is None:
            rel = str(info.file.relative_to(self.source.root)) if self.source.path.is_dir() else info.file.name
            self._source_files[info.file] = rel
        encoding = RAW if plan.lossless else plan.encoding
        records = (  # read back one at a time: only one spooled chunk is in memory while writing
            ChunkRecord(info.name, rel, info.shape, info.dtype, i, r0, r1 - r0, encoding, plan.bits, plan.group_size, blobs)
            for i, (r0, r1, blobs) in enumerate(parts)
        )
        summary = dict(fig, bits=plan.bits, encoding=encoding, nbytes=parts.nbytes,
                       numel=info.numel, reason=reason, source_bytes=info.nbytes)
        if output is not None:  # the manifest's "sensitivity" (sensitivity_entry)
            summary["output"] = {"rel_error2": sensitivity.rel_error2(output[0]),
                                 "cosine": sensitivity.figures(output[0])["cosine"],
                                 "plain_cosine": sensitivity.figures(output[1])["cosine"]}
        elif plan.lossless and self.calibration is not None and info.name in self.calibration.hessians:
            summary["output"] = {"rel_error2": 0.0, "cosine": 1.0, "plain_cosine": 1.0}
        try:
            self.writer.write_tensor(records, fig, reason, summary, nbytes=parts.nbytes)
        finally:
            parts.close()
        self.final[info.name] = summary
        self.tensors_done += 1

    def _emit(self, stage: str, tensor: str, message: str) -> None:
        self.report(stage=stage, tensor=tensor, message=message, tensors_done=self.tensors_done,
                    tensors_total=self.tensors_total, bytes_done=self.bytes_done, bytes_total=self.bytes_total)


def _file_state(source: ModelSource):
    def state(f):
        try:
            st = f.stat()
        except OSError:  # vanished: compares unequal, so the run fails as "changed"
            return None
        return st.st_size, st.st_mtime_ns
    return [(f, state(f)) for f, _ in source.files]


#: The source fingerprint of the resume key reads this many evenly spaced samples of
#: RESUME_SAMPLE_BYTES from each weight file (and always its first and last bytes).
RESUME_SAMPLES, RESUME_SAMPLE_BYTES = 16, 64 << 10


def source_fingerprint(source: ModelSource) -> str:
    """A cheap fingerprint of the source's data, for the resume key.

    Trade-off (chosen so a resume costs milliseconds, not a re-read of the model): per
    weight file its size, its mtime (ns) and a SHA-256 of RESUME_SAMPLES samples of
    RESUME_SAMPLE_BYTES spread over the file. Any ordinary rewrite (same header, new
    values) changes the mtime, so the run starts over; a change that keeps size and
    mtime (deliberately reset) is still caught when it touches a sample. What it misses:
    an edit that restores the mtime *and* falls between samples; the resumed shards
    themselves are verified by their SHA-256 in the journal either way.
    """
    import hashlib

    digest = hashlib.sha256()
    for f, _ in source.files:
        try:
            st = f.stat()
            digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
            with open(f, "rb") as fh:
                span = max(st.st_size - RESUME_SAMPLE_BYTES, 0)
                for i in range(RESUME_SAMPLES + 1):
                    fh.seek(span * i // RESUME_SAMPLES)
                    digest.update(fh.read(RESUME_SAMPLE_BYTES))
        except OSError as e:
            raise QuantizationError(f"{f}: cannot be read ({e.strerror}); the model changed or vanished") from None
    return digest.hexdigest()


def run_key(source: ModelSource, config: DiffusionQuantConfig) -> str:
    """What makes two runs produce the same store: source headers and data fingerprint
    (:func:`source_fingerprint`), config (threads aside), versions."""
    settings = config.to_dict()
    settings.pop("num_threads")
    text = (f"{FORMAT_VERSION}|{__version__}|{source.header_checksum}|{source_fingerprint(source)}|"
            f"{json.dumps(settings, sort_keys=True)}")
    return hashlib.sha256(text.encode()).hexdigest()


def summarize(final: Dict[str, dict]) -> dict:
    """Model-level figures from per-tensor ones (the definitions are in the README's result keys and in :mod:`arrow_quant_v2.metrics`)."""
    q = {n: t for n, t in final.items() if t["bits"] != LOSSLESS}
    params = sum(t["numel"] for t in q.values())
    per_bits: Dict[str, dict] = {}
    for t in final.values():
        key = "lossless" if t["bits"] == LOSSLESS else f"int{t['bits']}"
        d = per_bits.setdefault(key, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += t["numel"]
        d["bytes"] += t["nbytes"]
    worst = min(q.items(), key=lambda kv: kv[1]["cosine"], default=(None, {"cosine": 1.0}))
    return {
        "cosine_similarity": weighted_cosine(q.values()),
        "min_cosine": float(worst[1]["cosine"]),
        "worst_layer": worst[0],
        "bits_per_weight": (sum(t["nbytes"] for t in q.values()) * 8 / params) if params else 0.0,
        "bits_per_weight_all": sum(t["nbytes"] for t in final.values()) * 8 / max(sum(t["numel"] for t in final.values()), 1),
        "quantized_params": params,
        "total_params": sum(t["numel"] for t in final.values()),
        "per_bits": per_bits,
    }


def plan_tensors(source: ModelSource, config: DiffusionQuantConfig, calibration=None
                 ) -> Tuple[Dict[str, TensorPlan], Optional[BudgetPlan]]:
    """Every tensor's plan, and the budget allocation when ``target_model_size_mb`` is set.

    The per-tensor rules (:meth:`~arrow_quant_v2.plan.Planner.plan`) decide alone, unless there is a
    size budget: then :func:`~arrow_quant_v2.budget.allocate` chooses the widths, keeping the rules'
    lossless and ``bit_rules`` decisions and treating their protected widths as floors; with a
    ``calibration`` it allocates by the layers' output sensitivity.
    """
    planner = Planner(config)
    if config.target_model_size_mb is None:
        return planner.plan_model(source), None
    budget = allocate(source, config, planner, calibration=calibration)
    return dict(budget.plans), budget


@dataclasses.dataclass
class Preparation:
    """What a run decides before any tensor is quantized: the source, its plan and the writer."""

    source: ModelSource
    output: Path
    config: DiffusionQuantConfig
    modality: str
    modality_reason: str
    plans: Dict[str, TensorPlan]
    budget: Optional[BudgetPlan]  # the allocation under target_model_size_mb, else None
    state_before: list
    writer: StoreWriter
    calibration: object = None    # calibration.Calibration under calibration="graph" (made before planning), else None


def prepare(model_path, output_path, config: Optional[DiffusionQuantConfig], *, overwrite: bool,
            resume: bool, revision: Optional[str] = None, download: bool = False,
            components: Optional[List[str]] = None, variant: Optional[str] = None,
            calibrate: Optional[Callable[..., object]] = None) -> Preparation:
    """Open and check the source (a path or a hub id, see :func:`arrow_quant_v2.hub.resolve`) and
    the output, plan every tensor, and claim the partial folder.

    ``calibrate(source, config, rule_plans)``: under ``calibration="graph"``, makes the calibration
    before planning, since a size budget allocates by the layers' output sensitivity."""
    config = config if config is not None else DiffusionQuantConfig()
    if not isinstance(config, DiffusionQuantConfig):
        raise ConfigurationError(f"config={config!r} is not allowed; allowed: a DiffusionQuantConfig or None")
    output = Path(output_path)
    source = open_model(hub.resolve(model_path, revision=revision, download=download),
                        components=components, variant=variant)
    if config.calibration == "graph":
        from . import calibration

        calibration.check_model(source.path)  # before anything is written: calibration needs a graph
    try:
        recover_interrupted_overwrite(output)
    except OSError:
        pass  # an unusable output path is reported by check_paths
    check_paths(source, output, overwrite)
    modality, modality_reason = detect_modality(source, config.modality)
    calibrated = None
    if config.calibration == "graph" and calibrate is not None:
        calibrated = calibrate(source, config, Planner(config).plan_model(source))
    plans, budget = plan_tensors(source, config, calibrated)
    state_before = _file_state(source)
    writer = StoreWriter(output, overwrite=overwrite, max_shard_bytes=config.max_shard_mb << 20,
                         run_key=run_key(source, config), resume=resume)
    return Preparation(source, output, config, modality, modality_reason, plans, budget, state_before, writer,
                       calibrated)


def publish(prep: Preparation, final: Dict[str, dict], fallbacks: List[dict], warnings: List[str]) -> dict:
    """Check the source did not change, copy its other files, write the manifest last and move
    the store into place. Returns the result dict (without the time taken)."""
    source, config, writer = prep.source, prep.config, prep.writer
    if _file_state(source) != prep.state_before:
        raise QuantizationError(f"{source.path}: the model files changed while being quantized; run again")
    extra = source.extra_files()
    writer.copy_extra(source.root, extra)
    weight_bytes = writer.close()
    figures = summarize(final)
    result = {
        "quantized_path": str(prep.output),
        "compression_ratio": source.total_bytes / weight_bytes if weight_bytes else 0.0,
        "cosine_similarity": figures["cosine_similarity"],
        "model_size_mb": weight_bytes / 2**20,
        "modality": prep.modality,
        "bit_width": config.bit_width,
        "quantization_time_s": 0.0,
        **{k: v for k, v in figures.items() if k != "cosine_similarity"},
        "modality_reason": prep.modality_reason,
        "source_size_mb": source.total_bytes / 2**20,
        "num_tensors": len(final),
        "fallbacks": fallbacks,
        "warnings": warnings,
        "deployment_profile": config.deployment_profile,
    }
    if prep.budget is not None:  # target_model_size_mb: what the allocator aimed at versus the disk
        result["budget"] = prep.budget.outcome(weight_bytes, final)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(source.path), "header_checksum": source.header_checksum,
                   "bytes": source.total_bytes, "files": [str(f.relative_to(source.root)) for f, _ in source.files],
                   "components": source.selected, "variant": source.variant},
        "config": config.to_dict(),
        "modality": {"name": prep.modality, "reason": prep.modality_reason},
        "extra_files": [str(p) for p in extra],
        "totals": {k: v for k, v in result.items() if k not in ("quantized_path", "quantization_time_s")},
    }
    if prep.calibration is not None:
        manifest["sensitivity"] = sensitivity_entry(final, prep.calibration, prep.budget)
    writer.finish(manifest)
    return result


def sensitivity_entry(final: Dict[str, dict], calibrated, budget: Optional[BudgetPlan]) -> dict:
    """The manifest's ``sensitivity`` (docs/format.md): per calibrated tensor, its output sensitivity
    as written, and the per-width curve the budget allocated by."""
    tensors = {}
    for name, t in final.items():
        if "output" not in t:
            continue
        row = {"bits": t["bits"], "output_rel_error2": t["output"]["rel_error2"],
               "output_cosine": t["output"]["cosine"], "plain_output_cosine": t["output"]["plain_cosine"]}
        if calibrated.gain(name) is not None:
            row["downstream_gain"] = calibrated.gain(name)
            row["gain_probed_with"] = calibrated.gains.probed_with[name]
        tb = budget.tensors.get(name) if budget is not None else None
        if tb is not None and tb.by_output:
            row["curve"] = {o.label: o.sensitivity for o in tb.options if o.sensitivity is not None}
        tensors[name] = row
    return {"measure": "tr(dW H dW^T) / tr(W H W^T): the relative error power each layer adds to its output "
                       "on the calibration inputs (H = X^T X of its inputs across the noise levels)",
            "levels": list(calibrated.levels), "samples_per_level": calibrated.samples, "inputs": calibrated.source,
            **({"downstream_gain": dict(calibrated.gains.summary(), measure=(
                "network output's relative error power with the layer quantized at its planned width (alone, or "
                "with gain_probed_with neighbours) over the layers' output sensitivities, relative to the median "
                "layer's; the plan judges each layer by its sensitivity times this"))} if calibrated.gains else {}),
            "tensors": tensors}


def calibrate(model_path, source: ModelSource, config: DiffusionQuantConfig, plans: Dict[str, TensorPlan],
              report: Callable[..., None], cancel: CancelToken):
    """The ``calibrate`` stage: the graph's layer inputs at the noise levels, then (``downstream_gain``) each
    layer's downstream gain at its planned width (:mod:`arrow_quant_v2.calibration`)."""
    from . import calibration

    total = max(source.total_bytes, 1)

    collected = [0]
    gain_passes = sensitivity.GAIN_PASSES if config.downstream_gain else 0

    def on_pass(done: int, passes: int) -> None:  # the stage's own fraction: an ETA for it, a moving bar in the app
        collected[0] = passes  # the gain passes follow (at most GAIN_PASSES): the fraction counts both
        report("calibrate", f"calibration: forward pass {done}/{passes} through the graph", tensors_done=0,
               tensors_total=len(source.tensors), bytes_done=0, bytes_total=total,
               stage_fraction=done / (passes + gain_passes))

    report("calibrate", "calibration: running the original graph across the noise levels", tensors_done=0,
           tensors_total=len(source.tensors), bytes_done=0, bytes_total=total, stage_fraction=0.0)
    names = [n for n, p in plans.items() if not p.lossless]
    calibrated = calibration.collect(model_path, names, num_levels=config.num_time_groups,
                                     samples=config.calibration_samples,
                                     inputs=Path(config.calibration_inputs) if config.calibration_inputs else None,
                                     threads=resolve_threads(config), check=cancel.check, on_pass=on_pass)
    if not config.downstream_gain:
        return calibrated

    def on_gain_pass(done: int, passes: int) -> None:
        whole = collected[0] + gain_passes
        report("calibrate", f"calibration: downstream gain, forward pass {done}/{passes} through the graph",
               tensors_done=0, tensors_total=len(source.tensors), bytes_done=0, bytes_total=total,
               stage_fraction=1.0 if done >= passes else min(collected[0] + done, whole - 1) / whole)

    # at the width the layer gets: under a size budget an ordinary layer's climb starts at the narrowest
    bits = {n: (BIT_WIDTHS[0] if config.target_model_size_mb is not None and plans[n].role == "ordinary"
                else plans[n].bits) for n in names}
    calibration.measure_gains(model_path, source, calibrated, config, bits,
                              threads=resolve_threads(config), check=cancel.check, on_pass=on_gain_pass)
    return calibrated


def quantize_model(model_path, output_path, config: Optional[DiffusionQuantConfig] = None, *,
                   progress: Optional[ProgressSink] = None, cancel: Optional[CancelToken] = None,
                   overwrite: bool = False, resume: bool = False, revision: Optional[str] = None,
                   download: bool = False, components: Optional[List[str]] = None,
                   variant: Optional[str] = None) -> dict:
    """Quantize the model at ``model_path`` into a new store at ``output_path``.

    ``model_path`` may be a Hugging Face repo id (``org/name``, ``@revision`` or ``revision=``),
    resolved from the local cache; ``download=True`` fetches it when it is not cached
    (:func:`arrow_quant_v2.hub.resolve`). ``variant`` reads weight files of that variant (``"fp16"``);
    ``components`` chooses what of a diffusers pipeline is quantized (default: its denoiser), the other
    components being copied into the store as they are (:mod:`arrow_quant_v2.pipelines`).

    ``progress`` receives every :class:`ProgressEvent` (unthrottled, from this thread);
    ``cancel`` is checked between chunks. ``resume=True`` reuses the verified shards of
    an earlier run with the same source and config that was killed before finishing.
    Returns the result dict (see README).
    Raises ConfigurationError, QuantizationError (and subclasses), or progress.Cancelled.
    """
    started = time.perf_counter()
    cancel = cancel or CancelToken()
    report = fraction_reporter(progress)
    prep = prepare(model_path, output_path, config, overwrite=overwrite, resume=resume, revision=revision,
                   download=download, components=components, variant=variant,
                   calibrate=lambda source, cfg, plans: calibrate(source.path, source, cfg, plans, report, cancel))
    try:
        calibrated = prep.calibration
        job = QuantizeJob(prep.source, prep.writer, prep.config, prep.plans, report, cancel, calibration=calibrated)
        job.run()
        cancel.check()
        report("finalize", f"writing manifest of {prep.output.name}", tensors_done=job.tensors_done,
               tensors_total=job.tensors_total, bytes_done=job.bytes_total, bytes_total=job.bytes_total)
        result = publish(prep, job.final, job.fallbacks, job.warnings)
    except BaseException:
        prep.writer.abort()
        raise
    if calibrated is not None:
        result["calibration"] = calibrated.summary()
    result["quantization_time_s"] = time.perf_counter() - started
    report("done", f"done: {prep.output.name}", tensors_done=job.tensors_done, tensors_total=job.tensors_total,
           bytes_done=job.bytes_total, bytes_total=job.bytes_total)
    return result


def fraction_reporter(progress: Optional[ProgressSink]) -> Callable[..., None]:
    """The ``report(stage, message, **counts)`` a job calls, as monotonic, byte-weighted events
    (at most 0.99 until ``done``) for ``progress``."""
    last_fraction = [0.0]

    def report(stage, message, **kw):
        if progress is None:
            return
        frac = kw["bytes_done"] / kw["bytes_total"] if kw.get("bytes_total") else 0.0
        frac = min(max(frac * 0.98, last_fraction[0]), 1.0 if stage == "done" else 0.99)
        if stage == "done":
            frac = 1.0
        last_fraction[0] = frac
        progress(ProgressEvent(stage=stage, fraction=frac, message=message, **kw))

    return report
