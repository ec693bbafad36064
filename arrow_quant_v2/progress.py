"""Progress events, their throttle, and the cancel token shared by engine and async layer.

The engine reports a :class:`ProgressEvent` after every unit of work and checks a
:class:`CancelToken` between chunks; it knows nothing of event loops or UIs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional


#: What each stage is called to a person (the CLI's bars, the app's job rows).
STAGE_LABELS = {"prepare": "preparing", "plan": "planning", "calibrate": "calibrating", "quantize": "quantizing",
                "write": "writing",
                "finalize": "finishing", "validate": "per-layer check", "end-to-end": "end-to-end check",
                "done": "done"}


class Cancelled(Exception):
    """Raised inside a worker when its CancelToken is set; the async layer turns it into CancelledError."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report.

    ``fraction`` is monotonic in [0, 1] and weighted by bytes (reading, quantizing,
    writing and checking a tensor each move it); ``message`` is a readable line such
    as ``"quantizing model.layers.3.mlp.down_proj int2 [57/340]"``. An operation of
    several stages whose relative costs are not known in advance (validation: the
    per-layer check, then the end-to-end check) also gives ``stage_fraction``, how far
    the current stage is: a rate, and so an ETA, is only meaningful within one stage.
    """

    stage: str  # "plan", "calibrate", "quantize", "write", "finalize", "validate", "end-to-end", "done"
    fraction: float
    message: str
    tensor: str = ""
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    model_index: Optional[int] = None
    time: float = field(default_factory=time.monotonic)
    stage_fraction: Optional[float] = None

    @property
    def stage_progress(self) -> float:
        """How far the current stage is, in [0, 1] (the whole operation's fraction if it has one stage)."""
        return self.fraction if self.stage_fraction is None else self.stage_fraction

    def for_model(self, index: int) -> "ProgressEvent":
        """A copy of this event tagged with ``model_index`` (multi-model runs)."""
        return replace(self, model_index=index)


ProgressSink = Callable[[ProgressEvent], None]


class CancelToken:
    """A thread-safe flag; workers call :meth:`check` between chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to stop; it raises :class:`Cancelled` at its next :meth:`check`."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if :meth:`cancel` was called; otherwise return at once."""
        if self._event.is_set():
            raise Cancelled()


class Throttle:
    """Let an event through at most once per ``interval`` seconds.

    The first event and the final one (``fraction >= 1`` or stage ``done``) always pass,
    so a listener sees the start and the end whatever the interval.
    """

    def __init__(self, interval: float) -> None:
        self.interval = float(interval)
        self._last: Optional[float] = None
        self._lock = threading.Lock()

    def admit(self, event: ProgressEvent) -> bool:
        """True if ``event`` should be delivered now (and then it starts the next interval); thread-safe."""
        with self._lock:
            final = event.fraction >= 1.0 or event.stage == "done"
            if final or self._last is None or event.time - self._last >= self.interval:
                self._last = event.time
                return True
            return False
