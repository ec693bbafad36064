"""What every view shares: the stylesheet, small HTML builders, session helpers (no state here)."""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
import panel as pn
import param

from .. import format as fmt


STATUS_COLORS = {
    "queued": "#718096", "preparing": "#805ad5", "running": "#2b6cb0", "validating": "#0f766e",
    "done": "#2f855a", "failed": "#c53030", "cancelled": "#975a16",
}
BAR_COLORS = {"running": "primary", "validating": "info", "done": "success", "failed": "danger",
              "cancelled": "warning", "queued": "secondary", "preparing": "secondary"}


CSS = """
:host { --aq-border: #e2e8f0; --aq-muted: #64748b; }
.aq-card { border: 1px solid #e2e8f0; border-radius: 8px; background: #fff; }
.aq-row { border: 1px solid #e2e8f0; border-radius: 8px; background: #fff; padding: 4px 10px; margin: 4px 0; }
.aq-title { font-weight: 600; font-size: 14px; color: #1a202c; }
.aq-muted { color: #64748b; font-size: 12px; }
.aq-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 11px;
            font-weight: 600; text-transform: uppercase; letter-spacing: .03em; margin-right: 6px; }
.aq-kv { display: inline-block; margin-right: 14px; font-size: 12px; color: #334155; }
.aq-kv b { color: #0f172a; font-weight: 600; }
.aq-error { color: #b91c1c; font-size: 12px; white-space: pre-wrap; }
.aq-tensor { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11.5px; color: #334155; }
.aq-stat { display: inline-block; min-width: 110px; margin: 0 10px 6px 0; padding: 6px 10px; border-radius: 8px;
           background: #f8fafc; border: 1px solid #e2e8f0; }
.aq-stat .v { font-size: 18px; font-weight: 600; color: #0f172a; }
.aq-stat .k { font-size: 11px; color: #64748b; text-transform: uppercase; letter-spacing: .04em; }
table.aq-table { border-collapse: collapse; font-size: 12px; width: 100%; }
table.aq-table th { text-align: left; color: #475569; font-weight: 600; border-bottom: 1px solid #cbd5e1; padding: 3px 6px; }
table.aq-table td { border-bottom: 1px solid #f1f5f9; padding: 3px 6px; white-space: nowrap; }
table.aq-table td.aq-wrap { white-space: normal; overflow-wrap: anywhere; min-width: 12em; }
table.aq-table th { white-space: nowrap; }
.aq-scroll { overflow-x: auto; max-width: 100%; }
.aq-section { font-weight: 600; font-size: 13px; color: #1a202c; margin: 10px 0 4px 0; }
"""


def html(text: str = "", **kw) -> pn.pane.HTML:
    kw.setdefault("margin", (2, 5))
    return pn.pane.HTML(text, stylesheets=[CSS], **kw)


def table(df: pd.DataFrame, empty: str = "none", wrap: Sequence[str] = ()) -> str:
    """An HTML table that scrolls sideways in a narrow window; the ``wrap`` columns (long paths,
    reasons) break their lines instead of widening it."""
    if df is None or df.empty:
        return f"<span class='aq-muted'>{fmt.esc(empty)}</span>"
    head = "".join(f"<th>{fmt.esc(c)}</th>" for c in df.columns)
    cls = ["aq-wrap" if c in wrap else "" for c in df.columns]
    body = "".join("<tr>" + "".join(f"<td class='{k}'>{fmt.esc(v)}</td>" for k, v in zip(cls, row)) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<div class='aq-scroll'><table class='aq-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def badge(status: str) -> str:
    return f"<span class='aq-badge' style='background:{STATUS_COLORS.get(status, '#718096')}'>{fmt.esc(status)}</span>"


def budget_text(budget: Optional[dict]) -> str:
    """A result's size budget in one line: ``budget 2.41 / 2.50 MiB ✓ met``, ``… ✗ over by 3.2 %``
    (empty without one)."""
    if not budget or budget.get("target_mb") is None:
        return ""
    measured, target = budget.get("measured_mb"), budget["target_mb"]
    met, words = fmt.budget_verdict(measured, target)
    mark = "" if met is None else f" <span style='color:{'#2f855a' if met else '#c53030'}'>{fmt.esc(words)}</span>"
    got = f"{measured:.2f}" if measured is not None else "?"
    note = f" <span class='aq-muted'>({fmt.esc(budget['note'])})</span>" if budget.get("note") else ""
    return f"<span class='aq-kv aq-budget-result'>budget <b>{got} / {target:.2f} MiB</b>{mark}</span>{note}"


def in_served_page() -> bool:
    """This code runs for a page ``panel serve`` serves (not a notebook, not a static export)."""
    doc = pn.state.curdoc
    return doc is not None and getattr(doc, "session_context", None) is not None


def in_session() -> bool:
    """A served page or a notebook kernel: somewhere a periodic refresh can run."""
    if pn.state.curdoc is not None:
        return True
    try:
        from IPython import get_ipython

        return get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except Exception:  # noqa: BLE001 - no IPython
        return False


def watch_shared(obj: param.Parameterized, fn, names) -> None:
    """Watch process-wide state from one browser session; the watcher goes when the session does."""
    watcher = obj.param.watch(fn, names)
    doc = pn.state.curdoc
    if doc is not None and getattr(doc, "session_context", None) is not None:
        def _unwatch(_ctx, obj=obj, watcher=watcher):
            try:
                obj.param.unwatch(watcher)
            except Exception:  # noqa: BLE001 - already gone
                pass

        doc.on_session_destroyed(_unwatch)



def stat(label: str, value: str) -> str:
    """A big figure with its label under it (the quality view's header)."""
    return f"<div class='aq-stat'><div class='v'>{fmt.esc(value)}</div><div class='k'>{fmt.esc(label)}</div></div>"
