"""One model split across the workers of a cluster.

The client opens the source, plans every tensor once and claims the store's partial folder
(``engine.prepare``). Then, on the workers, in parallel:

1. **parts**: consecutive runs of tensors (in source order) are quantized by the ordinary
   :class:`~arrow_quant_v2.engine.QuantizeJob`, each part writing its rows to a Parquet file of
   its own under ``<partial>/parts/`` and a ``done.json`` with its tensors' figures;
2. **shards**: once every part is done, the encoded sizes decide which tensors each store shard
   holds (:func:`~arrow_quant_v2.store.shard_layout`, the rule the local writer follows), and
   each shard is written by a worker straight into the partial folder from the parts' rows.

The client checks each shard's sha256 against what its worker hashed, journals it, writes the
manifest last and moves the store into place (``engine.publish``): the store is byte for byte
the one a local run makes, complete or absent.

Faults: a worker that dies has its tasks rerun elsewhere by the scheduler; a part or shard
whose ``done.json`` exists is not redone (its result is read back), so work already written
survives. A cancelled or failed run removes the partial folder, as locally.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pyarrow.parquet as pq

from ..config import DiffusionQuantConfig
from ..engine import Preparation, QuantizeJob, fraction_reporter, prepare, publish
from ..errors import ConfigurationError
from ..progress import CancelToken, ProgressEvent, ProgressSink
from ..source import open_model
from ..store import ChunkRecord, StoreWriter, row_places, shard_layout

#: Models larger than this are split across the workers unless the caller says otherwise.
SPLIT_ABOVE_BYTES = 1 << 30
#: Parts per worker (more parts: better balance and less lost to a dead worker; fewer: less overhead).
PARTS_PER_WORKER = 4
#: No part smaller than this (bytes of source weights), except a model's last tensors.
MIN_PART_BYTES = 16 << 20
PARTS = "parts"
DONE = "done.json"
ROWS = "rows.parquet"
#: A writer's shard bound that nothing reaches: a part or a shard is one Parquet file.
ONE_FILE = 1 << 62


# -- on a worker ---------------------------------------------------------------------------------


def quantize_part(model_path, config: DiffusionQuantConfig, plans: Dict[str, Any], names: List[str], folder: str,
                  *, progress: ProgressSink, cancel: CancelToken) -> dict:
    """Quantize tensors ``names`` of the model into ``folder/rows.parquet``; returns (and
    records in ``folder/done.json``) their figures, fallbacks and warnings."""
    folder = Path(folder)
    done = _read_done(folder / DONE)
    if done is not None:
        return dict(done, reused=True)
    _drop_leftovers(folder)
    writer = StoreWriter(folder / "rows", max_shard_bytes=ONE_FILE, run_key="part")
    try:
        job = QuantizeJob(open_model(model_path), writer, config, plans, fraction_reporter(progress), cancel,
                          names=names)
        job.run()
        writer.close()
        os.replace(writer.tmp / writer.shards[0]["file"], folder / ROWS)
    finally:
        writer.abort()
    record = {"final": {n: job.final[n] for n in names}, "fallbacks": job.fallbacks, "warnings": job.warnings}
    _write_done(folder / DONE, record)
    return dict(record, reused=False)


def write_shard(members: List[Tuple[str, List[str]]], target: str, marker: str, *, progress: ProgressSink,
                cancel: CancelToken) -> dict:
    """Write the store shard ``target`` from the rows of the parts in ``members`` (part folder,
    tensor names, in order); returns (and records in ``marker``) its file, rows and sha256."""
    target, marker = Path(target), Path(marker)
    done = _read_done(marker)
    if done is not None and target.is_file() and target.stat().st_size == done["bytes"]:
        return done
    _drop_leftovers(marker.parent, marker.stem)
    writer = StoreWriter(marker.with_suffix(""), max_shard_bytes=ONE_FILE, run_key="shard")
    total = sum(len(names) for _, names in members)
    written = 0
    try:
        for folder, names in members:
            figures = json.loads((Path(folder) / DONE).read_text(encoding="utf-8"))["final"]
            rows_file = pq.ParquetFile(Path(folder) / ROWS)
            where: Dict[str, List[Tuple[int, int]]] = {}
            places = row_places(rows_file)  # small rows share a row group
            for i, name in enumerate(rows_file.read(columns=["name"]).column("name").to_pylist()):
                where.setdefault(name, []).append(places[i])
            group: Tuple[int, Any] = (-1, None)
            for name in names:
                cancel.check()
                rows = []
                for g, k in where[name]:
                    if group[0] != g:
                        group = (g, rows_file.read_row_group(g))
                    rows.append(group[1].slice(k, 1).to_pylist()[0])
                writer.write_tensor([ChunkRecord.from_row(r) for r in rows],
                                    {k: rows[0][k] for k in ("cosine", "rel_error", "sqnr_db")}, rows[0]["reason"],
                                    figures[name])
                written += 1
                progress(ProgressEvent(stage="write", fraction=written / total, message=f"writing {target.name}",
                                       tensor=name, tensors_done=written, tensors_total=total))
        writer.close()
        shard = writer.shards[0]
        os.replace(writer.tmp / shard["file"], target)
    finally:
        writer.abort()
    record = {"file": target.name, "bytes": shard["bytes"], "sha256": shard["sha256"], "rows": shard["rows"],
              "tensors": shard["tensor_names"]}
    _write_done(marker, record)
    return record


def _drop_leftovers(folder: Path, stem: str = "rows") -> None:
    """Remove what a dead run of this task left (the scheduler runs a task once at a time; the
    writer's pid lock cannot tell a dead process on another machine from a live one)."""
    for leftover in folder.glob(f".{stem}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _read_done(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_done(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- on the client -------------------------------------------------------------------------------


def part_groups(sizes: Sequence[Tuple[str, int]], workers: int) -> List[List[str]]:
    """Consecutive runs of ``(name, source bytes)`` of about equal bytes, ``PARTS_PER_WORKER``
    per worker, none below ``MIN_PART_BYTES`` (but the last)."""
    total = sum(n for _, n in sizes)
    target = max(total // max(workers * PARTS_PER_WORKER, 1), MIN_PART_BYTES, 1)
    groups: List[List[str]] = []
    filled = target
    for name, nbytes in sizes:
        if filled >= target:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    return groups


def part_folder(root: Path, names: List[str]) -> Path:
    """A part's folder, named by its tensors so that a later run (resume) finds it again."""
    return root / ("part-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16])


class _Progress:
    """Model-level events from the parts' and shards' events, through the job's throttle."""

    def __init__(self, channel, prep: Preparation, kept: Dict[str, dict]) -> None:
        self.channel = channel
        self.bytes_total = max(prep.source.total_bytes, 1)
        self.tensors_total = len(prep.source.tensors)
        self.kept_bytes = sum(t["source_bytes"] for t in kept.values())
        self.kept_tensors = len(kept)
        self.parts: Dict[int, Tuple[int, int]] = {}  # part -> (bytes done, tensors done)
        self.runs = 0  # part runs started: parts + reruns of parts whose worker died
        self.shards_done = 0
        self.shards_total = 1

    def _emit(self, stage: str, fraction: float, message: str, tensor: str = "") -> None:
        bytes_done = self.kept_bytes + sum(b for b, _ in self.parts.values())
        tensors_done = self.kept_tensors + sum(t for _, t in self.parts.values())
        event = ProgressEvent(stage=stage, fraction=min(fraction, 0.99), message=message, tensor=tensor,
                              tensors_done=tensors_done, tensors_total=self.tensors_total,
                              bytes_done=min(bytes_done, self.bytes_total), bytes_total=self.bytes_total)
        if self.channel.listening and self.channel.throttle.admit(event):
            self.channel.deliver(event)

    def part(self, index: int) -> Callable[[ProgressEvent], None]:
        def on_event(event: ProgressEvent) -> None:
            if event.stage == "prepare":  # a part's first event: it started (again, after a worker died)
                self.runs += 1
            before = self.parts.get(index, (0, 0))
            self.parts[index] = (max(before[0], event.bytes_done), max(before[1], event.tensors_done))
            done = self.kept_bytes + sum(b for b, _ in self.parts.values())
            self._emit(event.stage, 0.9 * done / self.bytes_total, event.message, event.tensor)
        return on_event

    def shard(self, event: ProgressEvent) -> None:
        self._emit("write", 0.9 + 0.09 * self.shards_done / self.shards_total, event.message, event.tensor)

    def shard_done(self) -> None:
        self.shards_done += 1

    def finalize(self, message: str) -> None:
        self._emit("finalize", 0.99, message)

    def done(self, message: str) -> None:
        self.channel.deliver(ProgressEvent(stage="done", fraction=1.0, message=message, tensors_done=self.tensors_total,
                                           tensors_total=self.tensors_total, bytes_done=self.bytes_total,
                                           bytes_total=self.bytes_total))


async def _all(coroutines) -> List[Any]:
    """Run ``coroutines`` at once; if one fails or the caller is cancelled, cancel the others
    and wait until every one has stopped (its worker too) before raising."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        while not all(t.done() for t in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:
                continue
        raise


async def quantize_split(runner, call: functools.partial, *, channel, queued: Callable[[str], None]) -> dict:
    """Quantize ``call`` (a ``quantize_model(model, output, config, overwrite=, resume=)``
    partial) across the cluster's workers; returns quantize_model's result dict plus
    ``cluster`` (parts, parts reused, shards, workers)."""
    started = time.perf_counter()
    model_path, output_path, config = call.args
    if config is not None and config.calibration:  # the parts would each need the whole graph's statistics
        raise ConfigurationError("calibration='graph' cannot be split across a cluster's workers yet: "
                                 "quantize this model on one machine (without cluster=) to calibrate it")
    prep = await asyncio.to_thread(prepare, model_path, output_path, config, **call.keywords)
    try:
        result = await _run(runner, prep, channel, queued)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(prep.writer.abort))
        raise
    result["quantization_time_s"] = time.perf_counter() - started
    return result


async def _run(runner, prep: Preparation, channel, queued) -> dict:
    source, writer = prep.source, prep.writer
    kept = dict(writer.resumed)
    progress = _Progress(channel, prep, kept)
    workers = max(len(await runner.workers_now()), 1)
    groups = part_groups([(n, t.nbytes) for n, t in source.tensors.items() if n not in kept], workers)
    parts_root = writer.tmp / PARTS
    folders = [part_folder(parts_root, names) for names in groups]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    interval = channel.interval
    model = str(source.path)
    told = []

    def queued_once(message: str) -> None:  # the split job waits for the cluster; its parts are ours
        if not told:
            told.append(message)
            queued(message)

    def part_task(i: int, names: List[str]):
        fn = functools.partial(quantize_part, model, prep.config, {n: prep.plans[n] for n in names}, names,
                               str(folders[i]))
        return runner.run(fn, nbytes=sum(source.tensors[n].nbytes for n in names), queued=queued_once,
                          on_event=progress.part(i), interval=interval, name="quantize-part")

    parts = await _all(part_task(i, names) for i, names in enumerate(groups))
    final = dict(kept)
    fallbacks: List[dict] = []
    warnings: List[str] = []
    owner: Dict[str, Path] = {}
    for folder, part in zip(folders, parts):
        final.update(part["final"])
        fallbacks += part["fallbacks"]
        warnings += part["warnings"]
        owner.update({n: folder for n in part["final"]})
    names = list(source.tensors)
    final = {n: final[n] for n in names}  # source order, as a local run reports them

    layout = [[names[i] for i in shard] for shard in shard_layout([final[n]["nbytes"] for n in names],
                                                                  writer.max_shard_bytes)]
    done_shards = len(writer.shards)
    if [s["tensor_names"] for s in writer.shards] != layout[:done_shards]:
        raise RuntimeError(f"{prep.output}: the kept shards do not match this run's layout")  # cannot happen
    todo = layout[done_shards:]
    progress.shards_total = max(len(todo), 1)

    async def shard_task(k: int, shard_names: List[str]):
        members: List[Tuple[str, List[str]]] = []
        for n in shard_names:
            if not members or members[-1][0] != str(owner[n]):
                members.append((str(owner[n]), []))
            members[-1][1].append(n)
        file = f"weights-{k:05d}.parquet"
        fn = functools.partial(write_shard, members, str(writer.tmp / file), str(parts_root / f"shard-{k:05d}.json"))
        record = await runner.run(fn, nbytes=sum(final[n]["nbytes"] for n in shard_names), queued=queued_once,
                                  on_event=progress.shard, interval=interval, name="write-shard")
        progress.shard_done()
        return record

    records = await _all(shard_task(done_shards + 1 + i, shard_names) for i, shard_names in enumerate(todo))

    def finish() -> dict:
        for record in records:
            writer.adopt_shard(record["file"], {n: final[n] for n in record["tensors"]}, record["rows"],
                               record["sha256"])
        shutil.rmtree(parts_root)
        return publish(prep, final, fallbacks, warnings)

    progress.finalize(f"writing manifest of {prep.output.name}")
    result = await asyncio.to_thread(finish)
    result["cluster"] = {"workers": workers, "parts": len(groups), "parts_reused": sum(p["reused"] for p in parts),
                         "part_runs": progress.runs,
                         "shards_written": len(records), "shards_kept": done_shards}
    progress.done(f"done: {prep.output.name}")
    return result
