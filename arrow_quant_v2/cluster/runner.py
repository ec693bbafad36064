"""The client side of cluster jobs: connection, per-worker bounds, progress routing, cancel."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import threading
import time
import uuid
import weakref
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple

from ..concurrency import default_max_bytes_in_flight, wait_stopped
from ..errors import ClusterError, ConfigurationError
from ..progress import Cancelled, ProgressEvent
from . import remote

#: Seconds to wait for a scheduler at an address before giving up (ClusterError).
CONNECT_TIMEOUT_S = 10
#: Seconds a finished job waits for its final progress event, which travels by another
#: path than the result; after that the client delivers the final event itself.
FINAL_EVENT_WAIT_S = 2.0
#: Seconds between two looks at the scheduler's worker list while a job waits for a worker.
WORKER_POLL_S = 1.0


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise ConfigurationError(
            "cluster=... needs the 'distributed' package; install it with: pip install 'arrow-quant-v2[cluster]'"
        ) from None
    return distributed


def connect_client(cluster):
    """``(client, owned)`` for ``cluster``: a ``distributed.Client`` (used as is) or a
    scheduler address (a new client, owned by the caller). Blocking; raises
    :class:`ConfigurationError` for another kind of value, :class:`ClusterError` when no
    scheduler answers."""
    distributed = import_distributed()
    if isinstance(cluster, distributed.Client):
        check_cluster(cluster)
        if cluster.status in ("closing", "closed"):
            raise ClusterError(f"cluster= got a closed distributed.Client ({cluster.scheduler.address}); open a new one")
        return cluster, False
    try:
        client = distributed.Client(cluster, set_as_default=False, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncio.TimeoutError) as e:
        raise ClusterError(f"{cluster}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s ({e}); "
                           "start one (`dask scheduler`) or check the address") from None
    return client, True


def check_cluster(cluster) -> None:
    """Refuse anything but a Client or an address, before any connection is made."""
    distributed = import_distributed()
    if isinstance(cluster, distributed.Client):
        if cluster.asynchronous or getattr(cluster, "_asynchronous", False):  # the property is False off its loop
            raise ConfigurationError("cluster= got an asynchronous distributed.Client (asynchronous=True); allowed: "
                                     "a synchronous Client (the default) or a scheduler address")
        return
    if not isinstance(cluster, str) or ":" not in cluster:
        raise ConfigurationError(f"cluster={cluster!r} is not allowed; allowed: a distributed.Client, a scheduler "
                                 "address such as 'tcp://127.0.0.1:8786', or None")


# -- per-worker bounds -------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # compared by identity: a worker back at the same address is another one
class _Worker:
    jobs: int  # job slots
    nbytes: int  # byte budget
    jobs_used: int = 0
    bytes_used: int = 0
    gone: bool = False

    def fits(self, nbytes: int) -> bool:
        return not self.gone and self.jobs_used < self.jobs and self.bytes_used + min(nbytes, self.nbytes) <= self.nbytes


@dataclasses.dataclass(eq=False)
class Lease:
    """One job's hold on one worker's bounds: a job slot and ``units`` bytes of its budget."""
    address: str
    worker: _Worker
    units: int
    held: bool = True  # False once given back (a late report of where the job started changes nothing)


class WorkerSlots:
    """The job and byte bounds, kept per worker, for one event loop.

    Each worker has ``jobs_per_worker`` job slots (default: its thread count) and a budget
    of ``bytes_per_worker`` source bytes (default: a quarter of its memory limit). Jobs are
    placed first come, first served, each on the least busy worker that can hold it; a job
    larger than a worker's budget is capped to it (it runs there alone), as locally.
    """

    def __init__(self, jobs_per_worker: Optional[int], bytes_per_worker: Optional[int]) -> None:
        self.jobs_per_worker = jobs_per_worker
        self.bytes_per_worker = bytes_per_worker
        self.workers: Dict[str, _Worker] = {}
        self._waiters: Deque[list] = collections.deque()  # [nbytes, future]
        self.line = asyncio.Lock()  # jobs join in the order they ask (see ClusterRunner.place)

    def update(self, infos: Dict[str, dict]) -> None:
        """Take the scheduler's current worker list (``scheduler_info()["workers"]``)."""
        for address, info in infos.items():
            if address not in self.workers or self.workers[address].gone:
                limit = info.get("memory_limit") or 0
                self.workers[address] = _Worker(
                    jobs=self.jobs_per_worker or max(int(info.get("nthreads") or 1), 1),
                    nbytes=self.bytes_per_worker or (max(limit // 4, 256 << 20) if limit else default_max_bytes_in_flight()))
        for address, worker in list(self.workers.items()):
            if address not in infos:
                worker.gone = True
                if not worker.jobs_used:
                    del self.workers[address]
        self._wake()

    def would_wait(self, nbytes: int) -> bool:
        return bool(self._waiters) or self._pick(nbytes) is None

    def _pick(self, nbytes: int) -> Optional[str]:
        fitting = [(w.jobs_used / w.jobs, w.bytes_used / w.nbytes, a) for a, w in self.workers.items() if w.fits(nbytes)]
        return min(fitting)[2] if fitting else None

    def _take(self, address: str, nbytes: int) -> "Lease":
        worker = self.workers[address]
        lease = Lease(address, worker, min(nbytes, worker.nbytes))
        worker.jobs_used += 1
        worker.bytes_used += lease.units
        return lease

    def join(self, nbytes: int) -> "asyncio.Future":
        """Take a worker for a job of ``nbytes`` now, or line up for one; without awaiting, so
        jobs are served in the order they join. The future's result is the job's :class:`Lease`."""
        fut = asyncio.get_running_loop().create_future()
        if self.would_wait(nbytes):
            self._waiters.append([nbytes, fut])
        else:
            fut.set_result(self._take(self._pick(nbytes), nbytes))
        return fut

    async def wait(self, fut: "asyncio.Future", refresh: Callable[[], Awaitable[None]]) -> "Lease":
        """The lease ``fut`` (from :meth:`join`) settles with; a cancelled caller leaves the line."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), WORKER_POLL_S)
                except asyncio.TimeoutError:
                    await refresh()  # a worker may have joined (or left)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            else:
                fut.cancel()  # its entry is dropped from the line
                self._wake()
            raise

    async def acquire(self, nbytes: int, refresh: Callable[[], Awaitable[None]]) -> "Lease":
        """Wait for a worker that can hold a job of ``nbytes``; returns the job's :class:`Lease`."""
        return await self.wait(self.join(nbytes), refresh)

    def release(self, lease: "Lease") -> None:
        """Give back what ``lease`` holds, on the worker it holds it on (a worker that left and
        came back at the same address is a new worker: the old lease is not taken from it)."""
        if not lease.held:
            return
        lease.held = False
        worker = lease.worker
        worker.jobs_used -= 1
        worker.bytes_used -= lease.units
        if worker.gone and not worker.jobs_used and self.workers.get(lease.address) is worker:
            del self.workers[lease.address]
        self._wake()

    def moved(self, lease: "Lease", address: str) -> None:
        """The job of ``lease`` runs on ``address`` now (the scheduler reran it there after its
        worker died): it counts against that worker's bounds from now on, not the dead one's."""
        worker = self.workers.get(address)
        if worker is None or worker is lease.worker or not lease.held:
            return
        self.release(lease)
        lease.address, lease.worker, lease.held = address, worker, True
        worker.jobs_used += 1  # it runs there already: over the bound, if need be, until it ends
        worker.bytes_used += lease.units

    def describe(self) -> str:
        return ", ".join(f"{a}: {w.jobs_used}/{w.jobs} jobs, {w.bytes_used / 2**20:.0f}/{w.nbytes / 2**20:.0f} MiB"
                         for a, w in sorted(self.workers.items())) or "no workers yet"

    def _wake(self) -> None:
        while self._waiters:
            nbytes, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            address = self._pick(nbytes)
            if address is None:
                break
            self._waiters.popleft()
            fut.set_result(self._take(address, nbytes))


# -- the runner --------------------------------------------------------------------------------


class ClusterRunner:
    """Runs engine calls on a Dask cluster for one :class:`~arrow_quant_v2.aio.AsyncArrowQuantV2`."""

    def __init__(self, cluster, jobs_per_worker: Optional[int] = None, bytes_per_worker: Optional[int] = None) -> None:
        check_cluster(cluster)
        self._given = cluster
        self._client = None
        self._owns_client = False
        self._connect_lock = threading.Lock()
        self._jobs = 0  # jobs running now (under _connect_lock: loops of several threads may run jobs)
        self._retired = False
        self.jobs_per_worker = jobs_per_worker
        self.bytes_per_worker = bytes_per_worker
        self.topic = f"arrow-quant-progress-{uuid.uuid4().hex}"
        self._routes: Dict[str, Callable[[dict], None]] = {}  # job id -> its progress route
        self._leases: Dict[str, Tuple[asyncio.AbstractEventLoop, WorkerSlots, Lease]] = {}  # job id -> its bounds
        self._slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WorkerSlots]" = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"ClusterRunner({self.address!r})"

    @property
    def address(self) -> str:
        """The scheduler's address (as given, until connected)."""
        if self._client is not None:
            return self._client.scheduler.address
        return self._given if isinstance(self._given, str) else self._given.scheduler.address

    # -- connection ----------------------------------------------------------------------------

    def client(self):
        """The connected ``distributed.Client`` (connecting on first use; blocking)."""
        with self._connect_lock:
            if self._client is None:
                client, owned = connect_client(self._given)
                client.subscribe_topic(self.topic, self._on_event)
                self._client, self._owns_client = client, owned
            if self._client.status in ("closing", "closed"):
                raise ClusterError(f"{self.address}: the connection to the Dask scheduler is closed")
            return self._client

    def workers(self) -> List[dict]:
        """The scheduler's workers: address, name, threads, memory limit (blocking; for dashboards)."""
        infos = self.client().scheduler_info(n_workers=-1)["workers"]
        return [{"address": a, "name": str(i.get("name", a)), "nthreads": i.get("nthreads"),
                 "memory_limit": i.get("memory_limit")} for a, i in sorted(infos.items())]

    def close(self) -> None:
        """Close the client this runner opened from an address (a passed-in Client is left open)."""
        with self._connect_lock:
            if self._client is not None:
                try:
                    self._client.unsubscribe_topic(self.topic)
                except Exception:  # noqa: BLE001 - the scheduler may be gone already
                    pass
                if self._owns_client:
                    self._client.close()
                self._client = None

    def retire(self) -> None:
        """Close (as :meth:`close`) once the jobs running now have finished, and again after any
        later job: the app calls it when the user chooses another place for new jobs."""
        with self._connect_lock:
            self._retired = True
            idle = not self._jobs
        if idle:
            self.close()

    def _job_started(self) -> None:
        with self._connect_lock:
            self._jobs += 1

    def _job_ended(self) -> None:
        with self._connect_lock:
            self._jobs -= 1
            last = self._retired and not self._jobs
        if last:  # closing blocks: off the loop, and nobody waits for it
            asyncio.get_running_loop().run_in_executor(None, self.close)

    def _on_event(self, item) -> None:
        """Called by the client for each event on our topic: ``(timestamp, message)``: a job's
        progress, or the worker it started on (a rerun moves its bounds there)."""
        _, msg = item
        if not isinstance(msg, dict):
            return
        if "started_on" in msg:
            placed = self._leases.get(msg.get("job"))
            if placed is not None:
                loop, slots, lease = placed
                try:
                    loop.call_soon_threadsafe(self._moved, slots, lease, msg["started_on"])
                except RuntimeError:  # the caller's loop is closed
                    pass
            return
        route = self._routes.get(msg.get("job"))
        if route is not None:
            route(msg)

    # -- bounds --------------------------------------------------------------------------------

    def _moved(self, slots: WorkerSlots, lease: Lease, address: str) -> None:
        """On the caller's loop: the job of ``lease`` started on ``address``."""
        if address == lease.address:
            return
        if address in slots.workers:
            slots.moved(lease, address)
            return

        async def learn_then_move() -> None:  # a worker that joined since the last look
            try:
                await self._refresh(slots)
            except ClusterError:
                return
            slots.moved(lease, address)  # nothing if the job has ended meanwhile

        asyncio.ensure_future(learn_then_move())

    def slots(self) -> WorkerSlots:
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = WorkerSlots(self.jobs_per_worker, self.bytes_per_worker)
        return slots

    async def _refresh(self, slots: WorkerSlots) -> None:
        try:
            infos = await asyncio.to_thread(lambda: self.client().scheduler_info(n_workers=-1)["workers"])
        except ClusterError:
            raise
        except Exception as e:  # noqa: BLE001 - the scheduler is unreachable
            raise ClusterError(f"{self.address}: the Dask scheduler does not answer ({type(e).__name__}: {e})") from None
        slots.update(infos)

    async def workers_now(self) -> Dict[str, object]:
        """The workers jobs can be placed on now (address -> bounds), as the scheduler lists them."""
        slots = self.slots()
        await self._refresh(slots)
        return {a: w for a, w in slots.workers.items() if not w.gone}

    async def place(self, nbytes: int, queued: Callable[[str], None]) -> Lease:
        """Wait for a worker with a free job slot and ``nbytes`` of budget; the job's lease."""
        slots = self.slots()
        async with slots.line:  # first come, first served: the threads awaited below finish in any order
            await asyncio.to_thread(self.client)
            await self._refresh(slots)
            if slots.would_wait(nbytes):
                queued(f"queued: waiting for a Dask worker ({slots.describe()})")
            fut = slots.join(nbytes)
        return await slots.wait(fut, lambda: self._refresh(slots))

    # -- one job -------------------------------------------------------------------------------

    async def run_job(self, fn: Callable[..., Any], *, nbytes: int, channel, queued: Callable[[str], None],
                      split: Optional[bool] = False) -> Any:
        """One job of the async API: ``fn(progress=, cancel=)`` on a worker, its events on
        ``channel`` (the job's progress channel, delivering on the caller's loop), the final one
        included. With ``split`` (``fn`` is then a ``quantize_model`` call; ``None``: models above
        :data:`.split.SPLIT_ABOVE_BYTES`) the model is split across the workers (:mod:`.split`)."""
        self._job_started()
        try:
            return await self._run_job(fn, nbytes=nbytes, channel=channel, queued=queued, split=split)
        finally:
            self._job_ended()

    async def _run_job(self, fn: Callable[..., Any], *, nbytes: int, channel, queued: Callable[[str], None],
                       split: Optional[bool]) -> Any:
        from . import split as splitting

        if split or (split is None and nbytes > splitting.SPLIT_ABOVE_BYTES):
            return await splitting.quantize_split(self, fn, channel=channel, queued=queued)
        final_seen = asyncio.Event()

        def deliver(event: ProgressEvent) -> None:
            channel.deliver(event)
            if event.fraction >= 1.0 or event.stage == "done":
                final_seen.set()

        result = await self.run(fn, nbytes=nbytes, queued=queued, on_event=deliver, interval=channel.interval,
                                name=fn.func.__name__)
        if channel.listening and not final_seen.is_set():  # events travel by another path than the result
            try:
                await asyncio.wait_for(final_seen.wait(), FINAL_EVENT_WAIT_S)
            except asyncio.TimeoutError:
                deliver(ProgressEvent(stage="done", fraction=1.0, message="done"))
        return result

    async def run(self, fn: Callable[..., Any], *, nbytes: int, queued: Callable[[str], None],
                  on_event: Optional[Callable[[ProgressEvent], None]], interval: float, name: str) -> Any:
        """Place a task (per-worker bounds), run ``fn(progress=, cancel=)`` there and return its
        result; its throttled events go to ``on_event`` on the caller's loop. Cancelling the
        awaiting task cancels the work on the worker and waits until it has stopped."""
        slots = self.slots()
        lease = await self.place(nbytes, queued)
        job_id = uuid.uuid4().hex
        self._leases[job_id] = (asyncio.get_running_loop(), slots, lease)
        try:
            return await self._submit(fn, job_id, on_event=on_event, interval=interval, worker=lease.address,
                                      name=name)
        finally:
            self._leases.pop(job_id, None)
            slots.release(lease)

    async def _submit(self, fn, job_id: str, *, on_event, interval: float, worker: Optional[str], name: str) -> Any:
        loop = asyncio.get_running_loop()
        client = await asyncio.to_thread(self.client)

        def route(msg: dict) -> None:  # on the client's thread
            fields = dict(msg["event"], time=time.monotonic())  # the worker's clock means nothing here
            try:
                loop.call_soon_threadsafe(on_event, ProgressEvent(**fields))
            except RuntimeError:  # the caller's loop is closed
                pass

        if on_event is not None:
            self._routes[job_id] = route
        try:
            future = client.submit(remote.run_job, fn, job_id, self.topic, interval, key=f"{name}-{job_id}",
                                   pure=False, workers=[worker] if worker else None, allow_other_workers=True)
            waiter = _bridge(future, loop, self.address)
            try:
                return await asyncio.shield(waiter)
            except asyncio.CancelledError:  # a second cancel must not cut this short: wait for the worker
                await wait_stopped(asyncio.ensure_future(asyncio.to_thread(self._cancel, client, job_id)))
                await wait_stopped(waiter)
                raise
            except Cancelled:  # only our event cancels a job, and then we are cancelled too
                raise asyncio.CancelledError() from None
        finally:
            self._routes.pop(job_id, None)

    def _cancel(self, client, job_id: str) -> None:
        from distributed import Event

        try:
            Event(remote.cancel_event_name(job_id), client=client).set()
        except Exception:  # noqa: BLE001 - the scheduler is gone: the worker's watcher stops the job itself
            pass


def _bridge(future, loop: asyncio.AbstractEventLoop, address: str) -> "asyncio.Future":
    """An asyncio future on ``loop`` settled with the Dask ``future``'s outcome; cluster
    failures become :class:`ClusterError`."""
    waiter = loop.create_future()

    def settle(outcome: Tuple[bool, Any]) -> None:
        if waiter.done():
            return
        ok, value = outcome
        waiter.set_result(value) if ok else waiter.set_exception(value)

    def done(f) -> None:  # on a thread of the client: blocking calls are fine here
        outcome = _outcome(f, address)
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the caller's loop is closed
            pass

    future.add_done_callback(done)
    return waiter


def _outcome(f, address: str) -> Tuple[bool, Any]:
    from distributed import KilledWorker

    if f.status == "cancelled":
        return False, ClusterError(f"{address}: the Dask scheduler went away (or cancelled the job) while it ran; "
                                   "check the cluster and run again")
    try:
        return True, f.result()
    except KilledWorker as e:
        return False, ClusterError(f"{address}: workers kept dying while running this job ({e}); "
                                   "check their memory limits and logs")
    except BaseException as e:  # noqa: BLE001 - the job's own error, raised on the caller's side
        if isinstance(e, asyncio.CancelledError):
            return False, ClusterError(f"{address}: the Dask scheduler went away while the job ran; run again")
        return False, e


def absolute(path) -> Any:
    """``path`` made absolute when it names something here (workers have another working
    folder); anything else (e.g. a hub id) is passed on untouched."""
    return os.path.abspath(path) if isinstance(path, (str, os.PathLike)) and os.path.exists(path) else path
