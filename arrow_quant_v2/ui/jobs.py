"""Quantization jobs: :class:`Job` (one run, observable) and :class:`JobManager` (starts, tracks, cancels).

Plain ``param`` state, no Panel. A process keeps one manager (:func:`shared_manager`), so
every browser tab of a served app sees the same jobs. Jobs run as asyncio tasks on the
loop that submitted them (the Panel server's, or a notebook kernel's) through
:class:`~arrow_quant_v2.aio.AsyncArrowQuantV2`; the heavy work happens in its worker
threads. Every progress event lands on the loop and is copied into the job's parameters,
which the views poll or watch.
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import param

from ..config import DiffusionQuantConfig
from ..progress import ProgressEvent
from .. import storecheck
from ..errors import StoreFormatError
from ..store import MANIFEST
from .compute import ComputePlace
from .library import ModelEntry, ModelLibrary
from .roots import default_output_root, is_within, unique_path
from .settings import user_words

log = logging.getLogger(__name__)

#: Job states. ``queued``: waiting for a slot; ``preparing``: building a sample model.
STATUSES = ("queued", "preparing", "running", "validating", "done", "failed", "cancelled")
ACTIVE = ("queued", "preparing", "running", "validating")
#: The ETA is the current stage's rate over the last ETA_WINDOW_S seconds, shown only once that
#: window spans ETA_MIN_SPAN_S with progress in it.
ETA_WINDOW_S = 5.0
ETA_MIN_SPAN_S = 1.0

_ids = itertools.count(1)



def cancel_task(task: Optional[asyncio.Task]) -> bool:
    """Cancel ``task`` from any thread; False if there is none or it has ended."""
    if task is None or task.done():
        return False
    loop = task.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        task.cancel()
    else:
        loop.call_soon_threadsafe(task.cancel)
    return True


async def outcome_of(task: Optional[asyncio.Task]) -> None:
    """Wait for ``task`` to end whatever its outcome (recorded by the task itself on its job).

    Shielded, so cancelling the waiter does not cancel the work; a cancellation of the waiter
    itself still propagates.
    """
    if task is None:
        return
    try:
        await asyncio.shield(task)
    except BaseException:  # noqa: BLE001 - the outcome is on the job
        if not task.done():
            raise

class Job(param.Parameterized):
    """One quantization (and its validation) of one model with one config."""

    job_id = param.Integer(default=0, constant=True)
    model_name = param.String(default="")
    model_path = param.String(default="")
    output_path = param.String(default="")
    label = param.String(default="", doc="Profile or short config label, e.g. 'edge' or 'int4-g32'.")
    config = param.Dict(default={}, doc="The DiffusionQuantConfig as a dict.")
    status = param.Selector(default="queued", objects=list(STATUSES))
    stage = param.String(default="")
    fraction = param.Number(default=0.0, bounds=(0.0, 1.0))
    stage_fraction = param.Number(default=0.0, bounds=(0.0, 1.0), doc="How far the current stage is.")
    message = param.String(default="")
    tensor = param.String(default="")
    tensors_done = param.Integer(default=0)
    tensors_total = param.Integer(default=0)
    bytes_done = param.Integer(default=0)
    bytes_total = param.Integer(default=0)
    events = param.Integer(default=0, doc="Progress events received (tests and benchmarks count them).")
    created = param.Number(default=0.0, doc="time.time() when submitted.")
    started = param.Number(default=None, allow_None=True, doc="time.monotonic() of the first progress event.")
    finished = param.Number(default=None, allow_None=True)
    result = param.Dict(default=None, allow_None=True, doc="quantize_diffusion_model_async's result.")
    report = param.Dict(default=None, allow_None=True, doc="validate_quality_async's report.")
    error = param.String(default="")
    from_disk = param.Boolean(default=False, doc="Found in the output folder, not run by this process.")

    def __init__(self, **params):
        params.setdefault("job_id", next(_ids))
        params.setdefault("created", time.time())
        super().__init__(**params)
        self._t0 = time.monotonic()
        self._task: Optional[asyncio.Task] = None
        self._rate: List[tuple] = []

    # -- what the views show ------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def elapsed(self) -> Optional[float]:
        if self.from_disk:
            return (self.result or {}).get("quantization_time_s")
        end = self.finished if self.finished is not None else time.monotonic()
        return end - self._t0

    @property
    def eta(self) -> Optional[float]:
        """Seconds left in the current stage, from its progress over the last few seconds; None
        until the stage has moved for :data:`ETA_MIN_SPAN_S` (no ETA beats a wrong one)."""
        if self.status not in ("running", "validating"):
            return None
        now = time.monotonic()
        window = [(t, f) for t, f in self._rate if now - t <= ETA_WINDOW_S]
        if len(window) < 2 or window[-1][0] - window[0][0] < ETA_MIN_SPAN_S or window[-1][1] <= window[0][1]:
            return None
        (t0, f0), (t1, f1) = window[0], window[-1]
        rate = (f1 - f0) / (t1 - t0)
        return max(0.0, (1.0 - self.stage_fraction) / rate)

    @property
    def title(self) -> str:
        return f"#{self.job_id} {self.model_name} · {self.label}"

    def summary(self) -> Dict[str, Any]:
        """Size, compression and cosines of a finished job (validation figures win when present); the network's
        output cosine mean / worst over the noise levels when validation ran the graph; whether it was calibrated."""
        r, v = self.result or {}, self.report or {}
        e2e = v.get("end_to_end") or {}
        return {
            "calibrated": (self.config or {}).get("calibration") == "graph",
            "output_cosine": e2e.get("mean_cosine") if e2e.get("available") else None,
            "output_worst": e2e.get("worst_cosine") if e2e.get("available") else None,
            "size_mb": r.get("model_size_mb", v.get("model_size_mb")),
            "compression_ratio": v.get("compression_ratio", r.get("compression_ratio")),
            "cosine": v.get("cosine_similarity", r.get("cosine_similarity")),
            "min_cosine": v.get("min_cosine", r.get("min_cosine")),
            "bits_per_weight": v.get("bits_per_weight", r.get("bits_per_weight")),
            "passed": v.get("passed"),
            "fallbacks": len(r.get("fallbacks") or []),
        }

    def quality_report(self) -> Dict[str, Any]:
        """The validation report; for a store found on disk, the figures it recorded (read once)."""
        if not self.report:
            from .quality import report_from_store

            self.report = report_from_store(self.output_path)
        return self.report

    def output_sensitivity(self) -> Optional[Dict[str, Any]]:
        """A calibrated store's per-layer output sensitivity (its manifest's ``sensitivity``, read once), or None."""
        if self.status != "done" or (self.config or {}).get("calibration") != "graph":
            return None
        if not hasattr(self, "_sensitivity"):
            from .quality import store_sensitivity

            self._sensitivity = store_sensitivity(self.output_path) if Path(self.output_path).is_dir() else None
        return self._sensitivity

    # -- fed by the manager -------------------------------------------------------------

    def on_event(self, event: ProgressEvent) -> None:
        """Copy a progress event into the parameters (called on the event loop)."""
        now = time.monotonic()
        frac = max(self.fraction, min(float(event.fraction), 1.0))
        stage_frac = min(max(float(event.stage_progress), 0.0), 1.0)
        if event.stage != self.stage:  # a new stage runs at its own pace: its rate starts afresh
            self._rate.clear()
        self._rate.append((now, stage_frac))
        if len(self._rate) > 64:
            del self._rate[:32]
        updates = dict(stage=event.stage, fraction=frac, stage_fraction=stage_frac, message=event.message, tensor=event.tensor or self.tensor,
                       tensors_done=event.tensors_done, tensors_total=event.tensors_total,
                       bytes_done=event.bytes_done, bytes_total=event.bytes_total, events=self.events + 1)
        if self.status in ("queued", "preparing"):
            updates["status"] = "running"
            updates["started"] = now
        self.param.update(**updates)

    def to_json(self) -> dict:
        """The job's identity, status and :meth:`summary` as JSON-ready data."""
        keys = ("job_id", "model_name", "model_path", "output_path", "label", "status", "stage", "fraction",
                "error", "config")
        return {k: getattr(self, k) for k in keys} | {"summary": self.summary()}


Quantizer = Any  # AsyncArrowQuantV2 or anything with the same two coroutine methods


class JobManager(param.Parameterized):
    """Starts, tracks and cancels quantization jobs; one per process (see :func:`shared_manager`)."""

    jobs = param.List(default=[], item_type=Job, doc="All jobs, newest first.")
    output_root = param.Parameter(default=None, doc="Folder the stores are written under.")
    progress_interval = param.Number(default=0.1, bounds=(0.01, 60), doc="Seconds between progress events (the board shows each).")
    validate = param.Boolean(default=True, doc="Validate each store against its source after quantizing.")
    message = param.String(default="")

    def __init__(self, library: Optional[ModelLibrary] = None, *, output_root=None,
                 quantizer: Optional[Union[Quantizer, Callable[[], Quantizer]]] = None,
                 max_concurrent_jobs: Optional[int] = None, scan_outputs: bool = True, **params):
        root = Path(output_root).expanduser() if output_root is not None else default_output_root()
        super().__init__(output_root=root, **params)
        self.library = library if library is not None else ModelLibrary()
        self._quantizer = quantizer
        self._max_jobs = max_concurrent_jobs
        self.compute = ComputePlace(self.use_quantizer, self.progress_interval)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reserved: set = set()
        self._lock = threading.Lock()
        if scan_outputs:
            self.load_existing()

    # -- the async engine ------------------------------------------------------------------

    @property
    def quantizer(self) -> Quantizer:
        q = self._quantizer
        if q is None:
            from ..aio import AsyncArrowQuantV2

            q = AsyncArrowQuantV2(max_concurrent_jobs=self._max_jobs, progress_interval=self.progress_interval)
        elif callable(q) and not hasattr(q, "quantize_diffusion_model_async"):
            q = q()
        self._quantizer = q
        return q

    def use_quantizer(self, quantizer: Optional[Quantizer]) -> None:
        """Run new jobs on ``quantizer`` (None: a local one, made on first use); running jobs go on where they are."""
        self._quantizer = quantizer

    # -- jobs --------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        """The job with this id; raises ``KeyError`` if there is none."""
        for j in self.jobs:
            if j.job_id == int(job_id):
                return j
        raise KeyError(f"no job #{job_id}")

    @property
    def active_jobs(self) -> List[Job]:
        return [j for j in self.jobs if j.active]

    def results(self, model_name: Optional[str] = None) -> List[Job]:
        """Finished jobs (newest first), optionally only those of one model."""
        return [j for j in self.jobs if j.status == "done" and (model_name is None or j.model_name == model_name)]

    def result_options(self, model_name: Optional[str] = None) -> Dict[str, int]:
        """Finished jobs as choices for a selector: ``{"#3 tiny-dream · edge": 3}``."""
        return {f"#{j.job_id} {j.model_name} · {j.label}": j.job_id for j in self.results(model_name)}

    def plan_output(self, entry: ModelEntry, label: str) -> Path:
        """A fresh folder under the output root: ``<model>-<label>``, with ``-2``, ``-3``... if taken."""
        Path(self.output_root).mkdir(parents=True, exist_ok=True)
        out = unique_path(self.output_root, f"{Path(entry.name).name}-{label}", self._reserved)
        if not is_within(out, self.output_root):  # cannot happen with safe_name, but never write elsewhere
            raise PermissionError(f"{out}: outside the output folder {self.output_root}")
        return out

    def submit(self, model: Union[str, ModelEntry], config: Optional[DiffusionQuantConfig] = None, *,
               label: Optional[str] = None) -> Job:
        """Start quantizing ``model`` (a library entry, name or path inside the roots); returns the job.

        Call it from the event loop's thread (a Panel callback, a notebook cell); the job runs
        as a task on that loop and this returns at once.
        """
        entry = model if isinstance(model, ModelEntry) else self.library.get(str(model))
        if entry.error:
            raise ValueError(f"{entry.name}: cannot be quantized: {entry.error}")
        if entry.kind != "sample":
            self.library.resolve(entry.path)  # refuse paths outside the roots, whatever the caller passed
        config = config if config is not None else DiffusionQuantConfig()
        label = label or config.deployment_profile or f"int{config.bit_width}"
        with self._lock:
            out = self.plan_output(entry, label)
            self._reserved.add(str(out))
        job = Job(model_name=entry.name, model_path=entry.path, output_path=str(out), label=label,
                  config=config.to_dict(), status="queued" if entry.available else "preparing",
                  message="waiting to start" if entry.available else "building the sample model")
        self.jobs = [job] + list(self.jobs)
        loop = self._running_loop()
        # An empty context: the task must not inherit a browser session's context (Panel's
        # curdoc), so that every tab's updates are scheduled on its own document.
        ctx = contextvars.Context()
        job._task = ctx.run(loop.create_task, self._run(job, entry, config))
        return job

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop
            if loop is None:
                try:
                    loop = asyncio.get_event_loop_policy().get_event_loop()
                except RuntimeError:
                    raise RuntimeError("JobManager.submit needs an event loop: call it from the loop's thread") from None
        self._loop = loop
        return loop

    async def _run(self, job: Job, entry: ModelEntry, config: DiffusionQuantConfig) -> None:
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(None, self.library.materialize, entry)
            if not entry.available:
                job.param.update(status="queued", message="waiting to start")
                loop.call_soon(self.library.refresh)
            q = self.quantizer
            result = await q.quantize_diffusion_model_async(
                str(path), job.output_path, config, on_event=job.on_event, progress_interval=self.progress_interval)
            job.param.update(result=dict(result))
            if self.validate:
                job.param.update(status="validating", stage="validate", fraction=0.0, stage_fraction=0.0,
                                 message="validating", tensor="", tensors_done=0)
                job._rate.clear()
                report = await q.validate_quality_async(str(path), job.output_path, on_event=job.on_event,
                                                        progress_interval=self.progress_interval)
                job.param.update(report=dict(report))
            job.param.update(status="done", stage="done", fraction=1.0, finished=time.monotonic(),
                             message=f"done: {Path(job.output_path).name}", tensor="")
        except asyncio.CancelledError:
            kept = Path(job.output_path, MANIFEST).is_file()
            job.param.update(status="cancelled", finished=time.monotonic(), tensor="",
                             message="cancelled" + (" during validation (store kept)" if kept else "; nothing was written"))
            raise
        except Exception as e:  # noqa: BLE001 - shown on the job's row
            log.info("job #%s failed: %s", job.job_id, e)
            job.param.update(status="failed", finished=time.monotonic(), error=f"{type(e).__name__}: {user_words(str(e))}",
                             message="failed", tensor="")
        finally:
            with self._lock:
                self._reserved.discard(job.output_path)

    def cancel(self, job: Union[Job, int]) -> bool:
        """Ask a running job to stop; True if it was running. Thread-safe."""
        job = job if isinstance(job, Job) else self.get(job)
        if not cancel_task(job._task):
            return False
        job.message = "cancelling"
        return True

    async def wait(self, job: Job) -> Job:
        """Wait for a job to end (whatever its outcome) and return it."""
        await outcome_of(job._task)
        return job

    async def run(self, model, config=None, **kw) -> Job:
        """Submit and wait: the notebook's one-liner."""
        return await self.wait(self.submit(model, config, **kw))

    def remove(self, job: Job) -> None:
        """Forget a finished job (its store stays on disk)."""
        if job.active:
            raise ValueError(f"job #{job.job_id} is still {job.status}; cancel it first")
        self.jobs = [j for j in self.jobs if j is not job]

    # -- stores already on disk ----------------------------------------------------------

    def load_existing(self) -> List[Job]:
        """Add a finished job for each store found in the output root (reads manifests only)."""
        root = Path(self.output_root)
        found: List[Job] = []
        if not root.is_dir():
            return found
        known = {j.output_path for j in self.jobs}
        stores = sorted((p for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()),
                        key=_mtime, reverse=True)
        for store in stores:
            if str(store) in known:
                continue
            try:
                manifest = storecheck.check_manifest(store, storecheck.read_manifest(store))
            except StoreFormatError as e:  # a bad neighbour: listed as broken, everything else goes on
                found.append(Job(model_name=store.name, output_path=str(store), label="broken", status="failed",
                                 stage="done", fraction=1.0, from_disk=True, created=_mtime(store),
                                 error=f"broken store: {e}", message=f"found in {root.name}/, unreadable"))
                continue
            src = manifest.get("source", {}).get("path", "")
            cfg = manifest.get("config", {}) or {}
            totals = dict(_figures(manifest.get("totals", {})), quantized_path=str(store))
            label = str(cfg.get("deployment_profile") or f"int{cfg.get('bit_width', '?')}")
            model_name = self._model_name_for(src)
            created = manifest.get("created")
            try:
                ts = datetime.datetime.fromisoformat(created).timestamp() if created else _mtime(store)
            except ValueError:
                ts = _mtime(store)
            found.append(Job(model_name=model_name, model_path=src, output_path=str(store), label=label, config=cfg,
                             status="done", stage="done", fraction=1.0, result=totals, from_disk=True, created=ts,
                             message=f"found in {root.name}/"))
        if found:
            self.jobs = list(self.jobs) + found
        return found

    def _model_name_for(self, source_path: str) -> str:
        for e in self.library.models:
            if e.path == source_path:
                return e.name
        return Path(source_path).name or "model"


def _figures(totals: dict) -> dict:
    """The numeric figures (and the fallback list) of a manifest's totals: what the board shows.
    A store from disk is untrusted; other values would only break the page."""
    keep = {k: v for k, v in totals.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(totals.get("fallbacks"), list):
        keep["fallbacks"] = totals["fallbacks"]
    return keep


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


_shared: Optional[JobManager] = None
_shared_lock = threading.Lock()


def shared_manager(**kwargs) -> JobManager:
    """The process-wide manager (created on first call; later calls ignore ``kwargs``)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = JobManager(**kwargs)
        return _shared


def reset_shared_manager() -> None:
    """Forget the process-wide manager (tests)."""
    global _shared
    with _shared_lock:
        _shared = None
