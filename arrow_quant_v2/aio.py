"""The asyncio API: :class:`AsyncArrowQuantV2`.

It is a thin facade over the same engine the blocking :class:`~arrow_quant_v2.ArrowQuantV2`
uses. What it adds is how a job lives inside an event loop:

Work
    Each job (one model, or one validation) runs as one call of the engine through
    ``loop.run_in_executor(executor, ...)``. The default executor is a
    ``ThreadPoolExecutor`` with ``max_concurrent_jobs`` threads; any
    ``concurrent.futures.Executor`` that runs callables in this process can be passed in.
    The engine's kernels are numba ``nogil`` functions running on the process-wide
    ``engine.kernel_pool()`` (one thread per core, shared by every job), so several jobs
    really run in parallel and many jobs never oversubscribe the cores. The event loop
    only ever receives progress events.

Bounds
    A job first waits for a job slot (at most ``max_concurrent_jobs`` at once, default the
    number of cores), then for its share of the byte budget ``max_bytes_in_flight``
    (default a quarter of RAM): the size of its source weights, capped at the budget so a
    model bigger than the budget still runs, alone. Both queues are first come, first
    served. A job that has to wait reports a ``"queued"`` event first. Bounds are kept
    per event loop.

Progress
    Callbacks may be plain functions or ``async def``; both are called on the caller's
    event loop thread, never on a worker thread: the worker hands each event to the loop
    with ``loop.call_soon_threadsafe`` and one consumer task per job delivers them in order.
    Delivery is throttled per job to ``progress_interval`` seconds (default 5, per
    instance or per call); the first and the final (``1.0``) event are always delivered
    and progress never goes backwards. If a callback is slower than the events, the
    intermediate events it has not yet seen are replaced by the newest one (the worker
    never waits for a callback); the first, ``queued`` and final events are never dropped.
    A callback that raises is logged with ``logging.warning`` and the job carries on.
    A job's coroutine returns once its final event has been delivered.
    A single-model callback gets ``(message, progress)``, a multi-model one
    ``(model_idx, message, progress)``; ``on_event`` gets the raw
    :class:`~arrow_quant_v2.progress.ProgressEvent` (stage, tensor, counts, bytes, time).

Cancellation
    Cancelling the task that awaits a job sets the job's cancel token; the engine stops at
    its next chunk, removes its temporary output and leaves any earlier store at the
    output path untouched. The coroutine waits (shielded) until the worker has really
    stopped and then raises ``asyncio.CancelledError``, so no thread of the job is left
    using the CPU. If the job had already finished when the cancel arrived, its store
    stays and ``CancelledError`` is still raised.

    Cancelling the task that awaits :meth:`AsyncArrowQuantV2.quantize_multiple_models_async`
    cancels every model of that call. To be able to cancel one model while the others go
    on, start one task per model with :meth:`AsyncArrowQuantV2.quantize_diffusion_model_async`
    and gather them (see ``examples/async_quantization_example.py``).

Cluster
    ``AsyncArrowQuantV2(cluster=client_or_address)`` runs every job on a Dask cluster instead
    (``distributed``, the ``cluster`` extra; see :mod:`arrow_quant_v2.cluster` and the docs'
    Cluster page). The semantics above hold, with the bounds kept per worker:
    ``max_concurrent_jobs`` job slots (default: the worker's threads) and
    ``max_bytes_in_flight`` bytes (default: a quarter of the worker's memory limit) on each.
    Model and output paths must name the same files on every worker.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable, Deque, List, Optional, Sequence, Tuple, Union

from .concurrency import WeightedSemaphore, default_max_bytes_in_flight, wait_stopped
from .config import DiffusionQuantConfig
from .engine import quantize_model
from .errors import (
    ArrowQuantError,
    ConfigurationError,
    ExportError,
    MultiModelError,
    QuantizationError,
    ValidationError,
)
from .progress import Cancelled, CancelToken, ProgressEvent, Throttle
from .validation import validate_store

log = logging.getLogger(__name__)

__all__ = ["AsyncArrowQuantV2", "default_max_bytes_in_flight", "QUEUED"]

#: Stage of the event a job reports while it waits for a job slot or for memory.
QUEUED = "queued"

ProgressCallback = Callable[..., Union[None, Awaitable[None]]]
EventHook = Callable[[ProgressEvent], Union[None, Awaitable[None]]]
ModelSpec = Tuple[Any, Any, Optional[DiffusionQuantConfig]]


def source_bytes(model_path) -> int:
    """Bytes of a model's safetensors files (what a job is charged against the byte budget).

    A cheap estimate from file sizes; the engine validates the model itself. An unreadable
    or missing path counts as 0 so that the engine reports the real error.
    """
    from .hub import local_path

    p = local_path(model_path)  # a repo id: its cached snapshot (None if not cached)
    try:
        if p is None:
            return 0
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            files = list(p.glob("*.safetensors")) or list(p.glob("*/*.safetensors"))
            return sum(f.stat().st_size for f in files)
    except OSError:
        pass
    return 0


# -- bounds ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Limits:
    jobs: WeightedSemaphore
    memory: WeightedSemaphore


# -- progress ----------------------------------------------------------------------------------


class _ProgressChannel:
    """Carries one job's events from its worker thread to its listeners on the event loop.

    The worker calls :meth:`sink` (throttled there, so an unlistened or throttled event costs
    nothing on the loop); admitted events cross to the loop with ``call_soon_threadsafe``
    and a consumer task delivers them in order. While the consumer is busy, a newer
    ordinary event replaces the one still waiting; first, queued and final events stay.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: List[Callable[[ProgressEvent], Any]],
                 interval: float, model_index: Optional[int] = None) -> None:
        self.loop = loop
        self.listeners = listeners
        self.throttle = Throttle(interval)
        self.model_index = model_index
        self._pending: Deque[Tuple[ProgressEvent, bool]] = collections.deque()  # (event, keep)
        self._seen_engine_event = False
        self._last_fraction = 0.0
        self._closing = False
        self._closed = False
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        if listeners:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._consume(), name="arrow-quant-progress")

    # worker side
    def sink(self, event: ProgressEvent) -> None:
        if self._task is None or not self.throttle.admit(event):
            return
        try:
            self.loop.call_soon_threadsafe(self._push, event, False)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    @property
    def listening(self) -> bool:
        return self._task is not None

    @property
    def interval(self) -> float:
        return self.throttle.interval

    def deliver(self, event: ProgressEvent) -> None:
        """An event already throttled elsewhere (a cluster worker), on the loop thread."""
        if self._task is not None:
            self._push(event, False)

    # loop side
    def post(self, event: ProgressEvent) -> None:
        """Queue an event from the loop thread itself (e.g. ``queued``); never dropped."""
        if self._task is not None:
            self._push(event, True)

    def _push(self, event: ProgressEvent, keep: bool) -> None:
        if self._closed:
            return
        if self.model_index is not None:
            event = event.for_model(self.model_index)
        if not keep and event.stage != QUEUED:
            keep = not self._seen_engine_event or event.fraction >= 1.0 or event.stage == "done"
            self._seen_engine_event = True
        if not keep and self._pending and not self._pending[-1][1]:
            self._pending[-1] = (event, keep)  # the consumer lags: skip the stale one
        else:
            self._pending.append((event, keep))
        self._wakeup.set()

    async def _consume(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            event, _ = self._pending.popleft()
            if event.fraction < self._last_fraction:  # monotonic, whatever the source does
                event = dataclasses.replace(event, fraction=self._last_fraction)
            self._last_fraction = event.fraction
            for listener in self.listeners:
                try:
                    result = listener(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # noqa: BLE001 - a listener's bug must not kill the job
                    log.warning("progress callback %r raised; the job carries on", listener, exc_info=True)

    async def finish(self) -> None:
        """Deliver what is still pending (the final event included), then stop."""
        if self._task is None or self._closed:
            return
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.shield(self._task)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop delivering now (the job failed or was cancelled)."""
        self._closed = True
        self._pending.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()


def _listeners(progress_callback: Optional[ProgressCallback], on_event: Optional[EventHook],
               multi: bool) -> List[Callable[[ProgressEvent], Any]]:
    out: List[Callable[[ProgressEvent], Any]] = []
    if progress_callback is not None:
        if not callable(progress_callback):
            raise ConfigurationError(f"progress_callback={progress_callback!r} is not allowed; allowed: a callable or None")
        if multi:
            out.append(lambda e: progress_callback(e.model_index, e.message, e.fraction))
        else:
            out.append(lambda e: progress_callback(e.message, e.fraction))
    if on_event is not None:
        if not callable(on_event):
            raise ConfigurationError(f"on_event={on_event!r} is not allowed; allowed: a callable or None")
        out.append(on_event)
    return out


# -- the worker call ---------------------------------------------------------------------------


def _work(fn: Callable[..., Any], token: CancelToken, sink: Callable[[ProgressEvent], None]) -> Any:
    """Runs on an executor thread."""
    token.check()  # cancelled while it sat in the executor's queue
    return fn(progress=sink, cancel=token)


def _check_config(config, where: str = "config") -> None:
    if config is not None and not isinstance(config, DiffusionQuantConfig):
        raise ConfigurationError(f"{where}={config!r} is not allowed; allowed: a DiffusionQuantConfig or None")


def _check_interval(value, name: str = "progress_interval") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigurationError(f"{name}={value!r} is not allowed; allowed: a number of seconds >= 0")
    return float(value)


def _check_models(models) -> List[ModelSpec]:
    """Validate the shape of ``models`` before any job starts."""
    if isinstance(models, (str, bytes, os.PathLike)) or not isinstance(models, (list, tuple)):
        raise ConfigurationError(
            f"models={models!r} is not allowed; allowed: a list of (model_path, output_path, config) tuples"
        )
    out: List[ModelSpec] = []
    outputs = {}
    for i, entry in enumerate(models):
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ConfigurationError(
                f"models[{i}]={entry!r} is not allowed; allowed: a (model_path, output_path, config) tuple "
                "(config may be None)"
            )
        model_path, output_path = entry[0], entry[1]
        config = entry[2] if len(entry) == 3 else None
        for what, value in (("model_path", model_path), ("output_path", output_path)):
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigurationError(f"models[{i}] {what}={value!r} is not allowed; allowed: a str or os.PathLike path")
        _check_config(config, f"models[{i}] config")
        key = os.path.abspath(os.fspath(output_path))
        if key in outputs:
            raise ConfigurationError(
                f"models[{i}] output_path={os.fspath(output_path)!r} is also the output of models[{outputs[key]}]; "
                "allowed: a distinct output per model"
            )
        outputs[key] = i
        out.append((model_path, output_path, config))
    return out


# -- the API -----------------------------------------------------------------------------------


class AsyncArrowQuantV2:
    """Non-blocking quantizer for asyncio (see the module docstring for the full semantics).

    Parameters
    ----------
    executor:
        Where jobs run. ``None`` (default) creates a ``ThreadPoolExecutor`` with
        ``max_concurrent_jobs`` threads on first use (closed by :meth:`close`). A passed
        executor must run callables in this process (threads); it is never shut down here.
    max_concurrent_jobs:
        Jobs (quantizations and validations) running at once; default ``os.cpu_count()``.
    max_bytes_in_flight:
        Budget of source-weight bytes of the jobs running at once; default a quarter of RAM.
    progress_interval:
        Minimum seconds between two progress deliveries of one job (default 5.0, as the
        seed document says; ``0`` delivers every event). Each call may override it.
    cluster:
        Run jobs on a Dask cluster: a ``distributed.Client`` or a scheduler address such as
        ``"tcp://127.0.0.1:8786"`` (connected on first use, closed by :meth:`close`). The two
        bounds then apply per worker. Not together with ``executor``.
    """

    def __init__(self, executor: Optional[concurrent.futures.Executor] = None,
                 max_concurrent_jobs: Optional[int] = None, max_bytes_in_flight: Optional[int] = None,
                 progress_interval: float = 5.0, *, cluster=None) -> None:
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise ConfigurationError(f"executor={executor!r} is not allowed; allowed: a concurrent.futures.Executor or None")
        if executor is not None and cluster is not None:
            raise ConfigurationError("executor= and cluster= were both given; allowed: one place for jobs to run")
        per_worker = (max_concurrent_jobs, max_bytes_in_flight)
        if max_concurrent_jobs is None:
            max_concurrent_jobs = os.cpu_count() or 2
        if isinstance(max_concurrent_jobs, bool) or not isinstance(max_concurrent_jobs, int) or max_concurrent_jobs < 1:
            raise ConfigurationError(f"max_concurrent_jobs={max_concurrent_jobs!r} is not allowed; allowed: an integer >= 1")
        if max_bytes_in_flight is None:
            max_bytes_in_flight = default_max_bytes_in_flight()
        if isinstance(max_bytes_in_flight, bool) or not isinstance(max_bytes_in_flight, int) or max_bytes_in_flight < 1:
            raise ConfigurationError(f"max_bytes_in_flight={max_bytes_in_flight!r} is not allowed; allowed: an integer >= 1 (bytes)")
        self.max_concurrent_jobs = max_concurrent_jobs
        self.max_bytes_in_flight = max_bytes_in_flight
        self.progress_interval = _check_interval(progress_interval)
        self._executor = executor
        self._owns_executor = executor is None
        self._executor_lock = threading.Lock()
        self._limits: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Limits]" = weakref.WeakKeyDictionary()
        self._cluster = None
        if cluster is not None:
            from .cluster import ClusterRunner  # distributed is imported only there, only now

            self._cluster = ClusterRunner(cluster, *per_worker)

    def __repr__(self) -> str:
        return (f"AsyncArrowQuantV2(max_concurrent_jobs={self.max_concurrent_jobs}, "
                f"max_bytes_in_flight={self.max_bytes_in_flight}, progress_interval={self.progress_interval})")

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def executor(self) -> concurrent.futures.Executor:
        """The executor jobs run on: the one passed in, or a ``ThreadPoolExecutor`` created on first use."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.max_concurrent_jobs, thread_name_prefix="aq-job")
            return self._executor

    @property
    def cluster(self):
        """The :class:`~arrow_quant_v2.cluster.ClusterRunner` jobs run on, or None (this machine)."""
        return self._cluster

    def close(self, wait: bool = True) -> None:
        """Shut down the executor (or the cluster client) this instance created; passed-in ones are left alone."""
        if self._cluster is not None:
            self._cluster.close()
        with self._executor_lock:
            if self._owns_executor and self._executor is not None:
                self._executor.shutdown(wait=wait)
                self._executor = None

    async def __aenter__(self) -> "AsyncArrowQuantV2":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def _limits_for(self, loop: asyncio.AbstractEventLoop) -> _Limits:
        limits = self._limits.get(loop)
        if limits is None:
            limits = self._limits[loop] = _Limits(WeightedSemaphore(self.max_concurrent_jobs), WeightedSemaphore(self.max_bytes_in_flight))
        return limits

    def stats(self) -> dict:
        """Jobs and bytes in flight and waiting, on the running loop (for dashboards and tests)."""
        limits = self._limits_for(asyncio.get_running_loop())
        return {"jobs_running": limits.jobs.used, "jobs_waiting": len(limits.jobs._waiters),
                "bytes_in_flight": limits.memory.used, "bytes_waiting": len(limits.memory._waiters)}

    # -- one job -----------------------------------------------------------------------------

    async def _run_job(self, fn: Callable[..., Any], *, source, channel: _ProgressChannel,
                       split: Optional[bool] = False) -> Any:
        """Wait for a slot (first come, first served), then for memory (the size of the
        weights at ``source``), run ``fn(progress=, cancel=)`` on the executor, and on
        cancellation stop the worker before re-raising."""
        if self._cluster is not None:
            return await self._cluster.run_job(fn, nbytes=source_bytes(source), channel=channel, split=split,
                                               queued=lambda message: channel.post(
                                                   ProgressEvent(stage=QUEUED, fraction=0.0, message=message)))
        loop = asyncio.get_running_loop()
        limits = self._limits_for(loop)
        if limits.jobs.would_wait(1):
            channel.post(ProgressEvent(stage=QUEUED, fraction=0.0, message=(
                f"queued: waiting for a job slot ({limits.jobs.used} of {self.max_concurrent_jobs} in use)")))
        await limits.jobs.acquire(1)
        try:
            nbytes = source_bytes(source)  # a few stat() calls: inline, so jobs keep their order
            if limits.memory.would_wait(nbytes):
                free = max(limits.memory.capacity - limits.memory.used, 0)
                channel.post(ProgressEvent(stage=QUEUED, fraction=0.0, message=(
                    f"queued: waiting for memory ({min(nbytes, limits.memory.capacity) / 2**20:.0f} MiB needed, "
                    f"{free / 2**20:.0f} MiB of {limits.memory.capacity / 2**20:.0f} MiB free)")))
            units = await limits.memory.acquire(nbytes)
            try:
                token = CancelToken()
                ctx = contextvars.copy_context()
                fut = loop.run_in_executor(self.executor, ctx.run, _work, fn, token, channel.sink)
                try:
                    return await asyncio.shield(fut)
                except asyncio.CancelledError:
                    token.cancel()
                    await wait_stopped(fut)
                    raise
                except Cancelled:  # only our token cancels a job, and then we are cancelled too
                    raise asyncio.CancelledError() from None
            finally:
                limits.memory.release(units)
        finally:
            limits.jobs.release(1)

    async def _job(self, fn, *, source, listeners, interval: float, model_index: Optional[int],
                   wrap: Callable[[Exception], Exception], split: Optional[bool] = False) -> Any:
        loop = asyncio.get_running_loop()
        channel = _ProgressChannel(loop, listeners, interval, model_index)
        try:
            try:
                result = await self._run_job(fn, source=source, channel=channel, split=split)
            except ArrowQuantError:
                raise
            except Exception as e:  # an unexpected failure still surfaces as the documented error type
                raise wrap(e) from e
            await channel.finish()
            return result
        finally:
            channel.abort()

    def _paths(self, *paths) -> tuple:
        """On a cluster, paths made absolute (a worker has another working folder)."""
        if self._cluster is None:
            return paths
        from .cluster.runner import absolute

        return tuple(absolute(p) if i == 0 else os.path.abspath(p) if isinstance(p, (str, os.PathLike)) else p
                     for i, p in enumerate(paths))

    # -- public coroutines -------------------------------------------------------------------

    async def quantize_diffusion_model_async(self, model_path, output_path,
                                             config: Optional[DiffusionQuantConfig] = None,
                                             progress_callback: Optional[ProgressCallback] = None, *,
                                             overwrite: bool = False, resume: bool = False,
                                             progress_interval: Optional[float] = None,
                                             on_event: Optional[EventHook] = None,
                                             revision: Optional[str] = None, download: bool = False,
                                             split_across_workers: Optional[bool] = None,
                                             components: Optional[List[str]] = None,
                                             variant: Optional[str] = None) -> dict:
        """Quantize ``model_path`` into a new store at ``output_path`` without blocking the loop.

        ``model_path`` may be a Hugging Face repo id (``org/name``, ``@revision`` or ``revision=``)
        found in the local cache; ``download=True`` fetches it in the worker when it is not.
        ``components`` / ``variant`` choose a diffusers pipeline's components and the weight variant
        (as in the blocking API).

        ``overwrite`` replaces an existing store (atomically, only once the new one is
        complete); ``resume`` reuses what a killed run with the same source and config had
        finished (as in the blocking API).
        ``progress_callback(message, progress)`` may be a function or ``async def``;
        ``on_event(event)`` receives the raw :class:`ProgressEvent` objects. Both are called on
        this loop, throttled to ``progress_interval`` (default: the instance's).

        On a cluster, ``split_across_workers`` quantizes the model's tensors on every worker at
        once and has the workers write the store's shards (the same store, byte for byte);
        ``None`` (default) splits models larger than
        :data:`arrow_quant_v2.cluster.split.SPLIT_ABOVE_BYTES`.

        Returns the same dict as the blocking API: ``quantized_path, compression_ratio,
        cosine_similarity, model_size_mb, modality, bit_width, quantization_time_s`` and more.
        Raises :class:`ConfigurationError`, :class:`QuantizationError` (and its subclasses),
        or ``asyncio.CancelledError`` when cancelled (the worker has stopped by then).
        """
        if split_across_workers and self._cluster is None:
            raise ConfigurationError("split_across_workers=True needs a cluster; allowed without one: None or False")
        return await self._quantize(model_path, output_path, config, progress_callback, overwrite=overwrite,
                                    resume=resume, progress_interval=progress_interval, on_event=on_event,
                                    model_index=None, revision=revision, download=download,
                                    split=split_across_workers, components=components, variant=variant)

    async def _quantize(self, model_path, output_path, config, progress_callback, *, overwrite, resume,
                        progress_interval, on_event, model_index, revision=None, download=False,
                        split: Optional[bool] = None, components=None, variant=None) -> dict:
        _check_config(config)
        interval = self.progress_interval if progress_interval is None else _check_interval(progress_interval)
        listeners = _listeners(progress_callback, on_event, multi=model_index is not None)
        model_path, output_path = self._paths(model_path, output_path)
        fn = functools.partial(quantize_model, model_path, output_path, config, overwrite=overwrite, resume=resume,
                               revision=revision, download=download, components=components, variant=variant)

        def wrap(e: Exception) -> Exception:
            return QuantizationError(f"{model_path}: quantizing failed: {type(e).__name__}: {e}")

        return await self._job(fn, source=model_path, listeners=listeners, interval=interval,
                               model_index=model_index, wrap=wrap, split=split)

    async def quantize_multiple_models_async(self, models: Sequence[ModelSpec],
                                             progress_callback: Optional[ProgressCallback] = None, *,
                                             return_exceptions: bool = False,
                                             progress_interval: Optional[float] = None,
                                             overwrite: bool = False, resume: bool = False,
                                             on_event: Optional[EventHook] = None) -> List[Any]:
        """Quantize several models concurrently (within the instance's bounds).

        ``models`` is a list of ``(model_path, output_path, config)`` tuples (config may be
        ``None``); its shape is checked before anything starts (:class:`ConfigurationError`).
        ``progress_callback(model_idx, message, progress)``; ``on_event`` gets events whose
        ``model_index`` is set. Returns one result dict per model, in order. The models
        are started largest first (equal sizes in the order given), so that with more models
        than slots the last to finish is a small one, not a large one started last.

        If some models fail, the others still finish and :class:`MultiModelError` (a
        :class:`QuantizationError`) is raised naming each failed model; its ``results``
        holds every model's result dict or exception and ``failures`` the
        ``(index, model_path, exception)`` of each failure. With ``return_exceptions=True``
        that list is returned instead. Cancelling the awaiting task cancels every model of
        this call (each worker stops first); to cancel a single model, run one
        :meth:`quantize_diffusion_model_async` task per model instead.
        """
        specs = _check_models(models)
        if progress_interval is not None:
            _check_interval(progress_interval)
        _listeners(progress_callback, on_event, multi=True)  # fail early on a non-callable
        sizes = [source_bytes(m) for m, _, _ in specs]  # a few stat() calls
        started = {i: asyncio.ensure_future(self._quantize(m, o, c, progress_callback, overwrite=overwrite,
                                                           resume=resume, progress_interval=progress_interval,
                                                           on_event=on_event, model_index=i))
                   for i, (m, o, c) in sorted(enumerate(specs), key=lambda item: -sizes[item[0]])}
        tasks = [started[i] for i in range(len(specs))]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [(i, specs[i][0], r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failures and not return_exceptions:
            lines = "; ".join(f"[{i}] {os.fspath(path)}: {type(e).__name__}: {e}" for i, path, e in failures)
            raise MultiModelError(f"{len(failures)} of {len(specs)} models failed: {lines}", failures, results)
        return results

    async def validate_quality_async(self, original_path, quantized_path, min_accuracy: Optional[float] = None, *,
                                     progress_callback: Optional[ProgressCallback] = None,
                                     progress_interval: Optional[float] = None,
                                     on_event: Optional[EventHook] = None,
                                     end_to_end: Optional[bool] = None, num_time_groups: Optional[int] = None) -> dict:
        """Re-read source and store and compare every tensor, without blocking the loop.

        Returns ``cosine_similarity, compression_ratio, per_layer_accuracy, passed`` and
        more (as :meth:`ArrowQuantV2.validate_quality`, whose ``end_to_end`` and
        ``num_time_groups`` are passed through). Raises :class:`ValidationError`
        (or :class:`ConfigurationError` for a bad argument); cancellable like a quantization.
        """
        if min_accuracy is not None and (isinstance(min_accuracy, bool) or not isinstance(min_accuracy, (int, float))
                                         or not 0.0 <= min_accuracy <= 1.0):
            raise ConfigurationError(f"min_accuracy={min_accuracy!r} is not allowed; allowed: None or a number in [0.0, 1.0]")
        interval = self.progress_interval if progress_interval is None else _check_interval(progress_interval)
        listeners = _listeners(progress_callback, on_event, multi=False)
        original_path, quantized_path = self._paths(original_path, quantized_path)
        fn = functools.partial(validate_store, original_path, quantized_path, min_accuracy=min_accuracy,
                               end_to_end=end_to_end, num_time_groups=num_time_groups)

        def wrap(e: Exception) -> Exception:
            return ValidationError(f"validating {quantized_path} against {original_path} failed: {type(e).__name__}: {e}")

        try:
            return await self._job(fn, source=original_path, listeners=listeners, interval=interval, model_index=None,
                                   wrap=wrap)
        except (ValidationError, ConfigurationError):
            raise
        except ArrowQuantError as e:  # e.g. the source changed or is damaged: still a validation failure
            raise ValidationError(f"validating {quantized_path} against {original_path} failed: {e}") from e


    async def export_async(self, store_path, output_path, format: Optional[str] = None, *,
                           dtype: Optional[str] = None, overwrite: bool = False,
                           progress_callback: Optional[ProgressCallback] = None,
                           progress_interval: Optional[float] = None,
                           on_event: Optional[EventHook] = None) -> dict:
        """Export a store to GGUF or dequantized safetensors without blocking the loop.

        ``format`` is ``"gguf"`` or ``"safetensors"`` (None: from the suffix, ``.gguf`` -> GGUF);
        ``dtype`` is the float type of a safetensors export. Progress and cancellation work as
        for a quantization (an export stops at the next tensor and leaves nothing behind).
        Returns the dict of :func:`arrow_quant_v2.export.export_store`. Raises
        :class:`ExportError`, :class:`OutputError`, :class:`ConfigurationError` or
        :class:`ValidationError` (not a store), or ``asyncio.CancelledError``.
        """
        from .export import export_format, export_store

        export_format(output_path, format)  # a bad format fails before anything is queued
        interval = self.progress_interval if progress_interval is None else _check_interval(progress_interval)
        listeners = _listeners(progress_callback, on_event, multi=False)
        store_path, output_path = self._paths(store_path, output_path)
        fn = functools.partial(export_store, store_path, output_path, format=format, dtype=dtype, overwrite=overwrite)

        def wrap(e: Exception) -> Exception:
            return ExportError(f"exporting {store_path} to {output_path} failed: {type(e).__name__}: {e}")

        return await self._job(fn, source=store_path, listeners=listeners, interval=interval, model_index=None,
                               wrap=wrap)

