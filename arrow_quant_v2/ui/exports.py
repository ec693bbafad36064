"""Exports of finished stores and checks of GGUF files, as observable jobs (plain ``param`` state).

* :class:`ExportJob` / :class:`Exports`: the Export actions of a finished job — GGUF (lossless, for
  llama.cpp / ComfyUI-GGUF / diffusers) or dequantized safetensors — run as asyncio tasks through
  :meth:`AsyncArrowQuantV2.export_async`, with progress, cancellation, and the exported file's
  path and size. The file goes beside the store in the output folder, under a fresh name: the app
  never writes anywhere a browser typed, and never replaces a file.
* :func:`check_gguf`: a GGUF file (any: this project's, llama-quantize's, ComfyUI-GGUF's) compared
  tensor by tensor with its source model, as a :class:`~arrow_quant_v2.ui.jobs.Job` whose report
  the Quality view shows like a store's. Both paths must lie inside the configured model roots.
"""
from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
import weakref
from pathlib import Path
from typing import List, Optional, Union

import param

from ..export import SAFETENSORS_DTYPES, export_format
from ..progress import ProgressEvent
from ..store import MANIFEST
from .jobs import Job, JobManager, cancel_task, outcome_of
from .roots import is_within, safe_name, unique_path

log = logging.getLogger(__name__)

EXPORT_STATUSES = ("running", "done", "failed", "cancelled")
_ids = itertools.count(1)


def can_export(job: Job) -> bool:
    """A job whose store exists: finished, or cancelled during validation with its store kept."""
    return job.status in ("done", "cancelled") and bool(job.output_path) and Path(job.output_path, MANIFEST).is_file()


class ExportJob(param.Parameterized):
    """One export of one store to one file (GGUF) or folder (safetensors)."""

    export_id = param.Integer(default=0, constant=True)
    store_path = param.String(default="")
    output_path = param.String(default="", doc="Absolute path of the file or folder being written.")
    format = param.Selector(default="gguf", objects=["gguf", "safetensors"])
    status = param.Selector(default="running", objects=list(EXPORT_STATUSES))
    fraction = param.Number(default=0.0, bounds=(0.0, 1.0))
    message = param.String(default="")
    size_bytes = param.Integer(default=None, allow_None=True, doc="Size of the finished export.")
    notes = param.List(default=[], doc="What a runtime will still need, and warnings (e.g. no tokenizer).")
    error = param.String(default="")

    def __init__(self, **params):
        params.setdefault("export_id", next(_ids))
        super().__init__(**params)
        self._task: Optional[asyncio.Task] = None

    @property
    def active(self) -> bool:
        return self.status == "running"

    def on_event(self, event: ProgressEvent) -> None:
        self.param.update(fraction=max(self.fraction, min(float(event.fraction), 1.0)), message=event.message)


class Exports(param.Parameterized):
    """Starts, tracks and cancels exports of the stores a :class:`JobManager` made."""

    exports = param.List(default=[], item_type=ExportJob, doc="All exports, newest first.")

    def __init__(self, manager: JobManager, **params):
        super().__init__(**params)
        self.manager = manager

    def for_store(self, store_path) -> List[ExportJob]:
        """The exports of one store, newest first."""
        return [e for e in self.exports if e.store_path == str(store_path)]

    def target(self, store_path, fmt: str, dtype: Optional[str] = None) -> Path:
        """A fresh path beside the store in the output folder: ``<store>.gguf`` or ``<store>-<dtype>``."""
        store = Path(store_path)
        taken = {e.output_path for e in self.exports if e.active}
        if fmt == "gguf":
            stem = safe_name(store.name)
            for i in itertools.count(1):
                candidate = store.parent / (f"{stem}.gguf" if i == 1 else f"{stem}-{i}.gguf")
                if not candidate.exists() and str(candidate) not in taken:
                    return candidate
        return unique_path(store.parent, f"{store.name}-{dtype or 'float16'}", taken)

    def start(self, job: Job, fmt: str = "gguf", dtype: Optional[str] = None) -> ExportJob:
        """Export ``job``'s store (a task on the running loop); returns the observable export.

        Raises:
            ValueError: the job has no store to export, or its store is outside the output folder.
            ConfigurationError: an unknown format or dtype.
        """
        if not can_export(job):
            raise ValueError(f"job #{job.job_id} has no finished store to export")
        if not is_within(job.output_path, self.manager.output_root):
            raise ValueError(f"{job.output_path}: outside the output folder {self.manager.output_root}")
        fmt = export_format("x", fmt)
        if fmt == "safetensors" and (dtype or "float16") not in SAFETENSORS_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        out = self.target(job.output_path, fmt, dtype)
        export = ExportJob(store_path=job.output_path, output_path=str(out.resolve()), format=fmt,
                           message=f"exporting to {out.name}")
        self.exports = [export] + list(self.exports)
        loop = self.manager._running_loop()
        export._task = contextvars.Context().run(loop.create_task, self._run(export, dtype))
        return export

    async def _run(self, export: ExportJob, dtype: Optional[str]) -> None:
        q = self.manager.quantizer
        try:
            result = await q.export_async(export.store_path, export.output_path, export.format,
                                          dtype=dtype if export.format == "safetensors" else None,
                                          on_event=export.on_event, progress_interval=self.manager.progress_interval)
            export.param.update(status="done", fraction=1.0, size_bytes=int(result["bytes"]),
                                notes=list(result.get("warnings", [])) + list(result.get("notes", [])),
                                message=f"exported {Path(export.output_path).name}")
        except asyncio.CancelledError:
            export.param.update(status="cancelled", message="cancelled; nothing was written")
            raise
        except Exception as e:  # noqa: BLE001 - shown on the export's row
            log.info("export #%s failed: %s", export.export_id, e)
            export.param.update(status="failed", error=f"{type(e).__name__}: {e}", message="failed")

    def cancel(self, export: ExportJob) -> bool:
        """Ask a running export to stop; True if it was running."""
        if not cancel_task(export._task):
            return False
        export.message = "cancelling"
        return True

    async def wait(self, export: ExportJob) -> ExportJob:
        """Wait for an export to end (whatever its outcome) and return it."""
        await outcome_of(export._task)
        return export


_shared: "weakref.WeakKeyDictionary[JobManager, Exports]" = weakref.WeakKeyDictionary()


def exports_for(manager: JobManager) -> Exports:
    """The :class:`Exports` of a manager (one per manager, so every browser tab sees the same exports)."""
    exports = _shared.get(manager)
    if exports is None:
        exports = _shared[manager] = Exports(manager)
    return exports


def check_gguf(manager: JobManager, model: str, gguf_path: Union[str, Path]) -> Job:
    """Compare a GGUF file with its source model as a job the board and the Quality view show.

    ``model`` is a library entry's name or a path inside the model roots; ``gguf_path`` must lie
    inside the model roots or the output folder.

    Raises:
        PathNotAllowed: ``gguf_path`` lies outside those folders.
        KeyError: ``model`` is not in the library.
    """
    from .roots import confine

    entry = manager.library.get(str(model))
    roots = list(manager.library.allowed_roots) + [Path(manager.output_root)]
    gguf = confine(gguf_path, roots, what="GGUF file")
    job = Job(model_name=entry.name, model_path=entry.path, output_path=str(gguf), label="gguf",
              status="validating", stage="validate", message=f"checking {gguf.name} against {entry.name}")
    manager.jobs = [job] + list(manager.jobs)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(None, manager.library.materialize, entry)
            report = await manager.quantizer.validate_quality_async(str(path), str(gguf), on_event=job.on_event,
                                                                    progress_interval=manager.progress_interval)
            job.param.update(report=dict(report), result={"quantized_path": str(gguf),
                                                          "model_size_mb": report["model_size_mb"]},
                             status="done", stage="done", fraction=1.0, finished=time.monotonic(),
                             message=f"checked {gguf.name}")
        except asyncio.CancelledError:
            job.param.update(status="cancelled", finished=time.monotonic(), message="cancelled")
            raise
        except Exception as e:  # noqa: BLE001 - shown on the job's row
            job.param.update(status="failed", finished=time.monotonic(), error=f"{type(e).__name__}: {e}",
                             message="failed")

    job._task = contextvars.Context().run(manager._running_loop().create_task, run())
    return job
