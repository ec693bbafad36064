"""What runs on a Dask worker: one engine call, its progress on the scheduler's event log,
and a cancel token driven by a named ``distributed.Event``."""
from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any, Callable

from ..progress import CancelToken, ProgressEvent, Throttle

#: How often the watcher asks the scheduler whether the job's cancel event is set (seconds): the
#: cancel latency it adds, and how soon a vanished scheduler is noticed. It asks (``is_set``) rather
#: than waits on the scheduler (``wait``): a wait still pending when the cluster closes makes the
#: scheduler log a CancelledError traceback, and a look costs one small message.
CANCEL_POLL_S = 0.25


#: Dask configuration for workers that quantize (``dask.config.set(WORKER_CONFIG)`` before the
#: workers start, or the same keys in the workers' Dask YAML). Each key was measured on one-thread
#: workers of a 2-core machine (``benchmarks/bench_cluster.py``):
#:
#: * ``MALLOC_TRIM_THRESHOLD_``: Dask's nanny sets 65536 in every worker process so that glibc hands
#:   freed memory back at once; setting it also turns off glibc's adaptive mmap threshold, so each
#:   chunk's arrays (several MiB) are mapped and faulted in afresh: the kernels took ~1.5x the CPU.
#:   ``None`` leaves glibc's defaults (Dask's documented way to unset a variable);
#: * the worker's statistical profiler samples every thread's stack every 10 ms on the event loop;
#: * the system monitor (psutil: CPU, memory, disk and network counters, for the dashboard) runs
#:   every 500 ms in each scheduler, nanny and worker; every 2 s is enough for the dashboard.
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
}


def cancel_event_name(job_id: str) -> str:
    """The name of the ``distributed.Event`` that cancels job ``job_id``."""
    return f"arrow-quant-cancel-{job_id}"


def run_job(fn: Callable[..., Any], job_id: str, topic: str, interval: float) -> Any:
    """Run ``fn(progress=, cancel=)`` on this worker (the task the client submits).

    Events pass the same :class:`Throttle` as a local job's, here, so only admitted events
    cross the network; each is logged on ``topic`` tagged with the job and a sequence number.
    """
    from distributed import get_client, get_worker

    from ..engine import kernel_pool

    worker = get_worker()
    kernel_pool(worker.state.nthreads)  # a worker's kernels use its own threads, not every core
    token = CancelToken()
    finished = threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(get_client(), job_id, token, finished),
                               name=f"aq-cancel-{job_id[:8]}", daemon=True)
    watcher.start()
    worker.log_event(topic, {"job": job_id, "started_on": worker.address})  # a rerun elsewhere moves the bounds
    throttle = Throttle(interval)
    numbers = itertools.count()

    def sink(event: ProgressEvent) -> None:
        if throttle.admit(event):
            worker.log_event(topic, {"job": job_id, "seq": next(numbers), "event": dataclasses.asdict(event)})

    try:
        token.check()
        return fn(progress=sink, cancel=token)
    finally:
        finished.set()  # the watcher stops at once (between looks) or after its current look


def _watch_cancel(client, job_id: str, token: CancelToken, finished: threading.Event) -> None:
    """Set ``token`` once the client sets the job's cancel event, or once the scheduler is
    unreachable (nobody could receive the result: stop and clean up rather than burn CPU)."""
    from distributed import Event

    event = Event(cancel_event_name(job_id), client=client)
    while not finished.wait(CANCEL_POLL_S):
        try:
            if event.is_set():
                token.cancel()
                return
        except Exception:  # noqa: BLE001 - any failure to reach the scheduler
            if not finished.is_set():
                token.cancel()
            return
