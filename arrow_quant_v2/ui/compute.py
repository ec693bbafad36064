"""Where jobs run: this machine, or a Dask cluster at an address (``param`` state, no Panel).

One :class:`ComputePlace` per :class:`~arrow_quant_v2.ui.jobs.JobManager` (so every browser
tab sees the same choice). Applying a cluster connects to its scheduler off the event loop,
lists its workers, and from then on the manager's new jobs run there; jobs already running
finish where they started, and the connection to the cluster chosen before is closed once they have.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, List, Optional

import param

from ..errors import ArrowQuantError

THIS_MACHINE = "this machine"
DASK = "Dask cluster"


class ComputePlace(param.Parameterized):
    """The choice "this machine" / "Dask cluster at ADDRESS", and the cluster's workers."""

    where = param.Selector(default=THIS_MACHINE, objects=[THIS_MACHINE, DASK], label="Run jobs on")
    address = param.String(default="", label="Scheduler address",
                           doc="The Dask scheduler, e.g. tcp://127.0.0.1:8786; paths must be shared with its workers.")
    workers = param.List(default=[], doc="The cluster's workers: address, name, nthreads, memory_limit.")
    active = param.String(default=THIS_MACHINE, doc="Where new jobs run now (after the last apply).")
    status = param.String(default="jobs run on this machine")
    busy = param.Boolean(default=False, doc="Connecting to a scheduler.")

    def __init__(self, install: Callable[[Optional[Any]], None], progress_interval: float = 0.1, **params):
        """``install(quantizer)`` makes the manager use ``quantizer`` for new jobs (None: this machine)."""
        super().__init__(**params)
        self._install = install
        self._progress_interval = progress_interval
        self._cluster_quantizer: Optional[Any] = None  # the one made for the cluster in use, if any

    async def _use(self, quantizer: Optional[Any]) -> None:
        """Install ``quantizer`` for new jobs; the cluster connection made before is closed once
        its running jobs end (a user switching places must not leave a client open per switch)."""
        self._install(quantizer)
        old, self._cluster_quantizer = self._cluster_quantizer, quantizer
        if old is not None and old is not quantizer:
            await asyncio.to_thread(old.cluster.retire)

    async def apply(self) -> bool:
        """Use the current choice for new jobs; True if it took (a bad address leaves the last one)."""
        if self.where == THIS_MACHINE:
            await self._use(None)
            self.param.update(workers=[], active=THIS_MACHINE, status="jobs run on this machine")
            return True
        address = self.address.strip()
        if not address:
            self.status = "enter the scheduler's address (e.g. tcp://127.0.0.1:8786)"
            return False
        from ..aio import AsyncArrowQuantV2

        self.param.update(busy=True, status=f"connecting to {address}…")
        quantizer = None
        try:
            quantizer = AsyncArrowQuantV2(cluster=address, progress_interval=self._progress_interval)
            workers: List[dict] = await asyncio.to_thread(quantizer.cluster.workers)
        except (ArrowQuantError, OSError) as e:
            if quantizer is not None:  # it may have connected before the worker list failed
                await asyncio.to_thread(quantizer.close)
            self.param.update(busy=False, status=f"cannot use {address}: {e}")
            return False
        await self._use(quantizer)
        threads = sum(w.get("nthreads") or 0 for w in workers)
        self.param.update(busy=False, workers=workers, active=f"{DASK} at {address}",
                          status=f"jobs run on the Dask cluster at {address}: {len(workers)} workers, {threads} threads")
        return True
