"""Small text formatters shared by the views (no Panel)."""
from __future__ import annotations

import html
import math
from typing import Optional, Tuple


def human_count(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "—"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def duration(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def cos(c: Optional[float], digits: int = 5) -> str:
    if c is None or not isinstance(c, (int, float)) or c != c:
        return "—"
    return f"{c:.{digits}f}"


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def budget_verdict(measured_mb: Optional[float], target_mb: float) -> Tuple[Optional[bool], str]:
    """``(met, words)`` for a size against its budget: met only within the tolerance the docs state
    (``budget.MET_TOLERANCE``), and then saying by how much it is over; otherwise "over by x %"."""
    from ..budget import MET_TOLERANCE

    if measured_mb is None or not target_mb:
        return None, ""
    over = 100.0 * (measured_mb - target_mb) / target_mb
    if over <= 0:
        return True, "✓ met"
    if over <= 100 * MET_TOLERANCE:
        return True, f"✓ met (over by {over:.2f} %, within the {100 * MET_TOLERANCE:g} % tolerance)"
    return False, f"✗ over by {over:.1f} %"
