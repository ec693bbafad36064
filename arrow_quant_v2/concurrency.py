"""Asyncio helpers the async API and the cluster runner share: a weighted semaphore, waiting
for an executor call to really stop, and the default bound on bytes in flight."""
from __future__ import annotations

import asyncio
import collections
import os
from typing import Deque


def default_max_bytes_in_flight() -> int:
    """A quarter of the machine's RAM (at least 256 MiB)."""
    total = 0
    try:
        import psutil

        total = psutil.virtual_memory().total
    except Exception:  # noqa: BLE001 - psutil is optional
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            total = 8 << 30
    return max(total // 4, 256 << 20)


class WeightedSemaphore:
    """A first-come-first-served counting semaphore with weighted acquire, for one event loop
    (the async API's job slots and bytes in flight)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: Deque[list] = collections.deque()  # [units, future]

    def would_wait(self, units: int) -> bool:
        units = min(units, self.capacity)
        return bool(self._waiters) or self.used + units > self.capacity

    async def acquire(self, units: int) -> int:
        """Take ``units`` (capped at the capacity); returns how many were taken."""
        units = min(units, self.capacity)
        if not self.would_wait(units):
            self.used += units
            return units
        fut = asyncio.get_running_loop().create_future()
        entry = [units, fut]
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: give it back
                self.release(units)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()  # we may have been blocking smaller requests behind us
            raise
        return units

    def release(self, units: int) -> None:
        self.used -= units
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            units, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + units > self.capacity:
                break
            self._waiters.popleft()
            self.used += units
            fut.set_result(None)


async def wait_stopped(fut: "asyncio.Future") -> None:
    """Wait until the executor call behind ``fut`` has returned, whatever it returned,
    even if the waiting task is cancelled again meanwhile."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
        except BaseException:  # noqa: BLE001 - the worker's outcome no longer matters
            break
    if fut.done() and not fut.cancelled():
        fut.exception()  # mark it retrieved
