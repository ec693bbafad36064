"""Where jobs run: this machine, or a Dask cluster at an address (``param`` state, no Panel).

One :class:`ComputePlace` per :class:`~arrow_quant_v2.ui.jobs.JobManager` (so every browser
tab sees the same choice). Applying a cluster connects to its scheduler off the event loop,
lists its workers, and from then on the manager's new jobs run there; jobs already running
finish where they started.
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

    async def apply(self) -> bool:
        """Use the current choice for new jobs; True if it took (a bad address leaves the last one)."""
        if self.where == THIS_MACHINE:
            self._install(None)
            self.param.update(workers=[], active=THIS_MACHINE, status="jobs run on this machine")
            return True
        address = self.address.strip()
        if not address:
            self.status = "enter the scheduler's address (e.g. tcp://127.0.0.1:8786)"
            return False
        from ..aio import AsyncArrowQuantV2

        self.param.update(busy=True, status=f"connecting to {address}…")
        try:
            quantizer = AsyncArrowQuantV2(cluster=address, progress_interval=self._progress_interval)
            workers: List[dict] = await asyncio.to_thread(quantizer.cluster.workers)
        except (ArrowQuantError, OSError) as e:
            self.param.update(busy=False, status=f"cannot use {address}: {e}")
            return False
        self._install(quantizer)
        threads = sum(w.get("nthreads") or 0 for w in workers)
        self.param.update(busy=False, workers=workers, active=f"{DASK} at {address}",
                          status=f"jobs run on the Dask cluster at {address}: {len(workers)} workers, {threads} threads")
        return True
