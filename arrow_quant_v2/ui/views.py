"""Panel views over the state classes: the pieces of the app and of the notebook dashboard.

Every view is a :class:`panel.viewable.Viewer`; widgets are made from parameters
(``from_param`` / ``pn.Param``). The shared state (library, job manager) is process-wide,
each browser tab gets its own views. The job board refreshes from the shared jobs on a
per-session periodic callback (every 0.1 s), so every tab sees every job and nothing of a
closed tab lingers.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ..errors import ArrowQuantError
from . import format as fmt
from .jobs import Job, JobManager, shared_manager
from .library import ModelLibrary
from .quality import QualityReport, diff_frame, layer_frame, report_from_store
from .roots import PathNotAllowed
from .settings import (BUDGET_FIELD, QuantSettings, cached_size_range, check_target, describe_range,
                       size_range_async)

log = logging.getLogger(__name__)

#: Milliseconds between two refreshes of the job board (progress events come every 0.1 s).
POLL_MS = 100

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
table.aq-table th { white-space: nowrap; }
.aq-scroll { overflow-x: auto; max-width: 100%; }
.aq-section { font-weight: 600; font-size: 13px; color: #1a202c; margin: 10px 0 4px 0; }
"""


def _html(text: str = "", **kw) -> pn.pane.HTML:
    kw.setdefault("margin", (2, 5))
    return pn.pane.HTML(text, stylesheets=[CSS], **kw)


def _table(df: pd.DataFrame, empty: str = "none") -> str:
    if df is None or df.empty:
        return f"<span class='aq-muted'>{fmt.esc(empty)}</span>"
    head = "".join(f"<th>{fmt.esc(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt.esc(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<div class='aq-scroll'><table class='aq-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _badge(status: str) -> str:
    return f"<span class='aq-badge' style='background:{STATUS_COLORS.get(status, '#718096')}'>{fmt.esc(status)}</span>"


def budget_text(budget: Optional[dict]) -> str:
    """A result's size budget in one line: ``budget 2.41 / 2.50 MiB ✓ met`` (empty without one)."""
    if not budget or budget.get("target_mb") is None:
        return ""
    measured, target = budget.get("measured_mb"), budget["target_mb"]
    met = budget.get("met")
    mark = "" if met is None else (" <span style='color:#2f855a'>✓ met</span>" if met
                                   else " <span style='color:#c53030'>✗ over</span>")
    got = f"{measured:.2f}" if measured is not None else "?"
    note = f" <span class='aq-muted'>({fmt.esc(budget['note'])})</span>" if budget.get("note") else ""
    return f"<span class='aq-kv aq-budget-result'>budget <b>{got} / {target:.2f} MiB</b>{mark}</span>{note}"


def _in_session() -> bool:
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


# ----------------------------------------------------------------------------- library


class LibraryView(Viewer):
    """The models the app can quantize: samples and folders under the model roots."""

    library = param.ClassSelector(class_=ModelLibrary)
    path = param.String(default="", label="Add a model folder (inside a model root)")

    def __init__(self, **params):
        super().__init__(**params)
        self._table = _html(sizing_mode="stretch_width")
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width")
        self._add = pn.widgets.Button(name="Add", button_type="primary", width=80, align="end")
        self._refresh = pn.widgets.Button(name="Rescan", width=90, align="end")
        self._add.on_click(self._on_add)
        self._refresh.on_click(lambda e: self.library.refresh())
        watch_shared(self.library, self._render, ["models", "message"])
        self._render()

    def _render(self, *_):
        rows = []
        for e in self.library.models:
            rows.append({
                "model": e.name, "source": e.kind, "parameters": fmt.human_count(e.params),
                "dtype": e.dtype or ("built on first use" if not e.available else "—"),
                "size on disk": fmt.human_bytes(e.size_bytes), "shards": e.shards if e.shards is not None else "—",
                "modality": e.modality or "—", "path / note": e.error or e.path,
            })
        roots = ", ".join(str(r) for r in self.library.allowed_roots)
        self._table.object = _table(pd.DataFrame(rows), "no models") + \
            f"<div class='aq-muted' style='margin-top:6px'>Model roots: {fmt.esc(roots)}</div>"
        self._alert.object = self.library.message
        self._alert.visible = bool(self.library.message)

    def _on_add(self, _):
        try:
            self.library.add_path(self.path)
        except (PathNotAllowed, ArrowQuantError, OSError) as e:
            self.library.message = str(e)

    def __panel__(self):
        return pn.Column(
            self._table,
            pn.Row(pn.widgets.TextInput.from_param(self.param.path, placeholder="/models/my-model",
                                                  sizing_mode="stretch_width"), self._add, self._refresh,
                   sizing_mode="stretch_width"),
            self._alert, sizing_mode="stretch_width",
        )


# ----------------------------------------------------------------------------- launcher


def config_form(obj: param.Parameterized, names: List[str]) -> pn.Column:
    """A form for generated config parameters, one widget per parameter, made from it.

    Numbers get numeric inputs (they may be None, and their bounds can be huge: a slider
    would be useless), short choice lists get labelled button groups, None reads "auto".
    Each widget carries the field's doc as its tooltip and the field name as a CSS class.
    """
    rows = []
    for n in names:
        p = obj.param[n]
        css = [f"aq-field-{n}"]
        desc = p.doc or None
        lo, hi = getattr(p, "bounds", None) or (None, None)
        if isinstance(p, param.Boolean):
            w = pn.widgets.Checkbox.from_param(p, css_classes=css)
        elif isinstance(p, param.Integer):
            w = pn.widgets.IntInput.from_param(p, start=lo, end=hi, description=desc, css_classes=css,
                                               placeholder="auto" if p.allow_None else "")
        elif isinstance(p, param.Number):
            w = pn.widgets.FloatInput.from_param(p, start=lo, end=hi, step=0.001 if hi is not None and hi <= 1 else 1.0,
                                                 description=desc, css_classes=css,
                                                 placeholder="auto" if p.allow_None else "")
        elif isinstance(p, param.Selector) and len(p.objects) <= 5 and None not in p.objects:
            w = pn.Column(
                _html(f"<div class='aq-muted' title='{fmt.esc(desc or '')}'>{fmt.esc(p.label)}</div>", margin=(4, 5, 0, 5)),
                pn.widgets.RadioButtonGroup.from_param(p, name="", button_type="default", css_classes=css,
                                                       sizing_mode="stretch_width", margin=(2, 5)),
                sizing_mode="stretch_width", margin=0)
        else:
            w = pn.Param(obj, parameters=[n], show_name=False, sizing_mode="stretch_width", css_classes=css,
                         margin=0)
        if not isinstance(w, pn.Column):
            w.sizing_mode = "stretch_width"
        rows.append(w)
    return pn.Column(*rows, sizing_mode="stretch_width", margin=0)


class Launcher(Viewer):
    """Pick a model and a profile (or tune the config) and start a job."""

    manager = param.ClassSelector(class_=JobManager)
    model = param.Selector(default=None, objects=[], label="Model")
    settings = param.ClassSelector(class_=QuantSettings)
    status = param.String(default="")

    def __init__(self, **params):
        params.setdefault("settings", QuantSettings("local"))
        super().__init__(**params)
        self._start = pn.widgets.Button(name="▶  Start quantizing", button_type="primary", sizing_mode="stretch_width",
                                        height=40)
        self._start.on_click(self._on_start)
        self._info = _html(sizing_mode="stretch_width")
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width", margin=(5, 5))
        self._note = _html(sizing_mode="stretch_width")
        self._range = _html(sizing_mode="stretch_width", margin=(0, 5), css_classes=["aq-budget-range"])
        self._range_seq = 0
        self._range_task = None
        watch_shared(self.manager.library, self._update_models, "models")
        self._update_models()
        self.param.watch(self._update_info, "model")
        self.settings.param.watch(self._update_info, list(self.settings.param))
        self.param.watch(self._update_range, "model")
        self.settings.param.watch(self._update_range, [n for n in self.settings.param if n != "name"])
        self._update_info()
        self._update_range()

    def _update_models(self, *_):
        entries = [e for e in self.manager.library.models if not e.error]
        objects = {e.label: e.name for e in entries}
        current = self.model
        self.param.model.objects = objects
        if current not in objects.values():
            self.model = entries[0].name if entries else None

    def _entry(self):
        return self.manager.library.get(self.model) if self.model else None

    def _update_info(self, *_):
        try:
            e = self._entry()
        except (KeyError, ArrowQuantError):
            e = None
        if e is None:
            self._info.object = "<span class='aq-muted'>No model selected.</span>"
            return
        bits = [fmt.human_count(e.params) + " params", e.dtype or ("built on first use" if not e.available else ""),
                fmt.human_bytes(e.size_bytes) if e.size_bytes else "",
                f"{e.shards} shard{'s' if e.shards != 1 else ''}" if e.shards else "", e.modality]
        line = " · ".join(b for b in bits if b)
        why = f"<div class='aq-muted'>modality: {fmt.esc(e.modality_reason)}</div>" if e.modality_reason else ""
        out = ""
        try:
            out = self.manager.plan_output(e, self.settings.label).name
        except Exception:  # noqa: BLE001 - only a preview
            pass
        self._info.object = (f"<div class='aq-muted'>{fmt.esc(line)}</div>{why}"
                             f"<div class='aq-muted'>→ output: <code>{fmt.esc(out)}</code></div>")

    def _range_source(self):
        """``(model path, config)`` the reachable range is computed for, or a reason it cannot be."""
        try:
            e = self._entry()
        except (KeyError, ArrowQuantError):
            return None, "no model selected"
        if e is None:
            return None, "no model selected"
        if not e.available:
            return None, "reachable sizes show once the sample is built (start a job or open it)"
        try:
            return (e.path, self.settings.to_config()), ""
        except ArrowQuantError as err:
            return None, f"fix the settings first: {err}"

    def _show_range(self, r: Optional[dict], why: str = "") -> None:
        target = self.settings.target_model_size_mb
        if r is None:
            self._range.object = f"<div class='aq-muted'>{fmt.esc(why)}</div>"
            return
        text = f"Reachable: {describe_range(r)}"
        try:
            check_target(target, r, self.model or "the model")
        except ArrowQuantError as err:
            self._range.object = (f"<div class='aq-muted'>{fmt.esc(text)}</div>"
                                  f"<div class='aq-error'>{fmt.esc(err)}</div>")
            return
        self._range.object = f"<div class='aq-muted'>{fmt.esc(text)}</div>"

    def _update_range(self, *events):
        """Show the reachable sizes for the model and settings; computed in a worker thread, cached."""
        if events and all(e.name == BUDGET_FIELD for e in events):
            src, why = self._range_source()
            self._show_range(cached_size_range(*src) if src else None, why or "computing the reachable sizes…")
            return
        self._range_seq += 1
        src, why = self._range_source()
        if src is None:
            self._show_range(None, why)
            return
        cached = cached_size_range(*src)
        if cached is not None:
            self._show_range(cached)
            return
        try:
            import asyncio

            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here (e.g. built outside a session): nothing to compute on
            self._show_range(None, "reachable sizes: shown in the app")
            return
        self._show_range(None, "computing the reachable sizes…")
        if pn.state.curdoc is not None and getattr(pn.state.curdoc, "session_context", None) is not None:
            # in a session: Panel runs it on the loop with this session's document, so the result is pushed
            pn.state.execute(partial(self._compute_range, self._range_seq, *src))
        else:
            self._range_task = loop.create_task(self._compute_range(self._range_seq, *src))

    async def _compute_range(self, seq: int, path, config) -> None:
        try:
            r = await size_range_async(path, config)
        except Exception as err:  # noqa: BLE001 - e.g. an unsupported model: say so, the job says more
            if seq == self._range_seq:
                self._show_range(None, f"reachable sizes unknown: {err}")
            return
        if seq == self._range_seq:  # the model or settings have not changed since
            self._show_range(r)

    def _on_start(self, _=None) -> Optional[Job]:
        self._alert.visible = False
        try:
            config = self.settings.to_config()
            src, _why = self._range_source()
            if src is not None:
                check_target(config.target_model_size_mb, cached_size_range(*src), self.model)
            job = self.manager.submit(self.model, config, label=self.settings.label)
        except (ArrowQuantError, ValueError, KeyError, PermissionError) as e:
            self._alert.object = f"Cannot start: {e}"
            self._alert.visible = True
            return None
        self.status = f"started job #{job.job_id}"
        self._note.object = f"<span class='aq-muted'>Started {fmt.esc(job.title)}. Start another any time.</span>"
        self._update_info()
        return job

    def start(self) -> Optional[Job]:
        """Start a job with the current choices (what the button does)."""
        return self._on_start()

    def __panel__(self):
        s = self.settings
        main = config_form(s, QuantSettings.main_fields())
        advanced = pn.Card(config_form(s, QuantSettings.advanced_fields()), title="Advanced", collapsed=True,
                           sizing_mode="stretch_width", margin=(5, 5))
        return pn.Column(
            _html("<div class='aq-title'>New job</div>"),
            pn.widgets.Select.from_param(self.param.model, sizing_mode="stretch_width", css_classes=["aq-model"]),
            self._info,
            _html("<div class='aq-muted' style='margin-top:4px'>Profile</div>"),
            pn.widgets.RadioButtonGroup.from_param(s.param.profile, button_type="primary", button_style="outline",
                                                   sizing_mode="stretch_width", name=""),
            pn.widgets.FloatInput.from_param(s.param[BUDGET_FIELD], name="Size budget (MiB, optional)", start=0.001,
                                             step=1.0, placeholder="none: the profile's widths",
                                             description=s.param[BUDGET_FIELD].doc, sizing_mode="stretch_width",
                                             css_classes=["aq-budget"]),
            self._range,
            pn.Card(main, title="Tune the config", collapsed=True, sizing_mode="stretch_width", margin=(5, 5)),
            advanced,
            self._start, self._alert, self._note,
            sizing_mode="stretch_width",
        )


# ----------------------------------------------------------------------------- job board


class JobRow(Viewer):
    """One job: status, stage, progress bar, current tensor, elapsed/ETA, results, Cancel/Quality."""

    job = param.ClassSelector(class_=Job)

    def __init__(self, manager: JobManager, on_open: Optional[Callable[[Job], None]] = None, **params):
        super().__init__(**params)
        self.manager = manager
        self._on_open = on_open
        job = self.job
        self._head = _html(sizing_mode="stretch_width", margin=(4, 5, 0, 5))
        self._bar = pn.indicators.Progress(value=0, max=1000, sizing_mode="stretch_width", height=14, margin=(2, 5),
                                           bar_color="primary", css_classes=[f"aq-progress-{job.job_id}"])
        self._line = _html(sizing_mode="stretch_width", margin=(0, 5))
        self._results = _html(sizing_mode="stretch_width", margin=(0, 5, 4, 5))
        self._cancel = pn.widgets.Button(name="Cancel", button_type="danger", button_style="outline", width=90,
                                         css_classes=[f"aq-cancel-{job.job_id}"], margin=(4, 5))
        self._open = pn.widgets.Button(name="Quality ▸", button_type="success", button_style="outline", width=90,
                                       css_classes=[f"aq-open-{job.job_id}"], margin=(4, 5), visible=False)
        self._cancel.on_click(lambda e: self.manager.cancel(self.job))
        self._open.on_click(lambda e: self._on_open and self._on_open(self.job))
        self._last: tuple = ()
        self._layout = pn.Row(
            pn.Column(self._head, self._bar, self._line, self._results, sizing_mode="stretch_width", margin=0),
            pn.Column(self._cancel, self._open, width=100, margin=0),
            sizing_mode="stretch_width", css_classes=["aq-row", f"aq-job-{job.job_id}"], stylesheets=[CSS],
        )
        self.sync()

    def sync(self) -> None:
        j = self.job
        active = j.active
        eta = j.eta
        key = (j.status, j.stage, round(j.fraction, 4), j.tensor, j.message, j.error, bool(j.result), bool(j.report),
               int((j.elapsed or 0) * 2) if active else None, None if eta is None else int(eta))
        if key == self._last:
            return
        self._last = key
        self._head.object = (
            f"{_badge(j.status)}<span class='aq-title'>#{j.job_id} {fmt.esc(j.model_name)}</span>"
            f"<span class='aq-muted'> · {fmt.esc(j.label)} · → {fmt.esc(Path(j.output_path).name)}</span>"
        )
        self._bar.value = int(round(j.fraction * 1000))
        self._bar.bar_color = BAR_COLORS.get(j.status, "primary")
        self._bar.visible = not j.from_disk
        pct = f"{j.fraction * 100:.0f}%"
        if active:
            counts = f" [{j.tensors_done}/{j.tensors_total}]" if j.tensors_total else ""
            tensor = f" · <span class='aq-tensor'>{fmt.esc(j.tensor)}</span>{counts}" if j.tensor else f" · {fmt.esc(j.message)}"
            self._line.object = (
                f"<span class='aq-kv'><b>{fmt.esc(j.stage or j.status)}</b> {pct}</span>"
                f"<span class='aq-kv'>elapsed <b>{fmt.duration(j.elapsed)}</b></span>"
                f"<span class='aq-kv'>ETA <b>{fmt.duration(eta)}</b></span>{tensor}"
            )
        elif j.status == "done" and j.from_disk:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.created))
            self._line.object = f"<span class='aq-kv'>made <b>{when}</b></span><span class='aq-muted'>{fmt.esc(j.message)}</span>"
        elif j.status == "done":
            self._line.object = (f"<span class='aq-kv'>took <b>{fmt.duration(j.elapsed)}</b></span>"
                                 f"<span class='aq-muted'>{fmt.esc(j.message)}</span>")
        else:
            self._line.object = f"<span class='aq-kv'>after <b>{fmt.duration(j.elapsed)}</b></span>" \
                                f"<span class='aq-muted'>{fmt.esc(j.message)}</span>"
        if j.status == "failed":
            self._results.object = f"<div class='aq-error'>{fmt.esc(j.error)}</div>"
        elif j.status == "done":
            s = j.summary()
            passed = "" if s["passed"] is None else (
                "<span class='aq-kv' style='color:#2f855a'><b>✓ passed</b></span>" if s["passed"]
                else "<span class='aq-kv' style='color:#c53030'><b>✗ below threshold</b></span>")
            ratio = f"{s['compression_ratio']:.2f}×" if s["compression_ratio"] else "—"
            size = fmt.human_bytes(s["size_mb"] * 2**20) if s["size_mb"] is not None else "—"
            self._results.object = (
                f"<span class='aq-kv'>size <b>{size}</b></span><span class='aq-kv'>compression <b>{ratio}</b></span>"
                f"<span class='aq-kv'>mean cos <b>{fmt.cos(s['cosine'])}</b></span>"
                f"<span class='aq-kv'>min cos <b>{fmt.cos(s['min_cosine'])}</b></span>"
                + (f"<span class='aq-kv'>bpw <b>{s['bits_per_weight']:.2f}</b></span>" if s["bits_per_weight"] else "")
                + (f"<span class='aq-kv'>fallbacks <b>{s['fallbacks']}</b></span>" if s["fallbacks"] else "")
                + budget_text((j.result or {}).get("budget")) + passed
            )
        else:
            self._results.object = ""
        self._cancel.visible = active
        self._open.visible = j.status == "done"

    def __panel__(self):
        return self._layout


class JobBoard(Viewer):
    """Every job of the process, newest first, refreshed 10 times a second."""

    manager = param.ClassSelector(class_=JobManager)
    changed = param.Event(doc="Fires when a job appears or changes status.")

    def __init__(self, on_open: Optional[Callable[[Job], None]] = None, **params):
        super().__init__(**params)
        self._on_open = on_open
        self._rows: Dict[int, JobRow] = {}
        self._column = pn.Column(sizing_mode="stretch_width", margin=0)
        self._empty = _html("<div class='aq-muted' style='padding:12px'>No jobs yet: pick a model and a profile, "
                            "then <b>Start</b>. Start more while they run.</div>")
        self._statuses: tuple = ()
        self._cb = None
        self.sync()

    def sync(self) -> None:
        jobs = list(self.manager.jobs)
        ids = [j.job_id for j in jobs]
        if ids != list(self._rows):
            rows = {}
            for j in jobs:
                rows[j.job_id] = self._rows.get(j.job_id) or JobRow(self.manager, self._on_open, job=j)
            self._rows = rows
            self._column.objects = [r for r in rows.values()] or [self._empty]
        for r in self._rows.values():
            r.sync()
        statuses = tuple((j.job_id, j.status) for j in jobs)
        if statuses != self._statuses:
            self._statuses = statuses
            self.param.trigger("changed")

    def start_polling(self) -> None:
        if self._cb is None and _in_session():
            self._cb = pn.state.add_periodic_callback(self._safe_sync, period=POLL_MS)

    def _safe_sync(self):
        try:
            self.sync()
        except Exception:  # noqa: BLE001 - a bad row must not stop the board
            log.exception("job board refresh failed")

    def __panel__(self):
        self.start_polling()
        return self._column


# ----------------------------------------------------------------------------- quality


def _report_for(job: Job) -> dict:
    """The job's validation report; for stores found on disk, the figures the store recorded."""
    if job.report:
        return job.report
    report = report_from_store(job.output_path)
    job.report = report
    return report


def _stat(label: str, value: str) -> str:
    return f"<div class='aq-stat'><div class='v'>{fmt.esc(value)}</div><div class='k'>{fmt.esc(label)}</div></div>"


def _result_options(manager: JobManager, model: Optional[str] = None) -> Dict[str, int]:
    return {f"#{j.job_id} {j.model_name} · {j.label}": j.job_id for j in manager.results(model)}


class QualityView(Viewer):
    """Per-layer quality of one finished job: heatmap with hover, worst layers, fallbacks."""

    manager = param.ClassSelector(class_=JobManager)
    job_id = param.Selector(default=None, objects=[], label="Result", allow_None=True)
    layout = param.Selector(default="auto", objects=["auto", "block × module", "layer × metric"], label="Layout")
    live = param.Boolean(default=True, doc="Draw now; when False (a hidden tab) drawing waits until it is shown.")

    def __init__(self, **params):
        super().__init__(**params)
        self._dirty = True
        self._stats = _html(sizing_mode="stretch_width")
        self._plot = pn.pane.HoloViews(None, sizing_mode="fixed", linked_axes=False)
        self._fidelity = pn.pane.HoloViews(None, linked_axes=False)
        self._fidelity_text = _html(sizing_mode="stretch_width", css_classes=["aq-fidelity"])
        self._worst = _html(sizing_mode="stretch_width")
        self._fallbacks = _html(sizing_mode="stretch_width")
        self._bits = _html(sizing_mode="stretch_width")
        self._outside = _html(sizing_mode="stretch_width")
        self._msg = _html()
        self.refresh_options()
        self.param.watch(self._render, ["job_id", "layout"])
        self.param.watch(self._on_live, "live")
        self._render()

    def _on_live(self, *_):
        if self.live and self._dirty:
            self._render()

    def refresh_options(self) -> None:
        opts = _result_options(self.manager)
        current = self.job_id
        if opts != self.param.job_id.names:
            self.param.job_id.objects = opts
        if current not in opts.values():
            self.job_id = next(iter(opts.values()), None)

    def show(self, job: Job) -> None:
        self.refresh_options()
        self.job_id = job.job_id

    def report(self) -> Optional[QualityReport]:
        if self.job_id is None:
            return None
        job = self.manager.get(self.job_id)
        layout = {"auto": None, "block × module": "block", "layer × metric": "metric"}[self.layout]
        return QualityReport(title=job.title, report=_report_for(job), result=job.result or {}, layout=layout)

    def _render(self, *_):
        if not self.live:
            self._dirty = True
            return
        self._dirty = False
        try:
            q = self.report()
        except Exception as e:  # noqa: BLE001 - e.g. the store was deleted
            self._msg.object = f"<div class='aq-error'>Cannot read this result: {fmt.esc(e)}</div>"
            self._plot.object = None
            return
        if q is None:
            self._msg.object = "<div class='aq-muted' style='padding:12px'>No finished job yet. When a job is done, " \
                               "its per-layer heatmap shows here.</div>"
            self._plot.object, self._stats.object = None, ""
            self._fidelity.object = None
            for p in (self._worst, self._fallbacks, self._bits, self._outside, self._fidelity_text):
                p.object = ""
            return
        from .plots import quality_heatmap

        self._msg.object = ""
        job = self.manager.get(self.job_id)
        rep, s = q.report, job.summary()
        cells, layout = q.cells()
        how = "block × module" if layout == "block" else "layer × metric"
        self._plot.object = quality_heatmap(cells, layout, title=f"{job.title}: per-layer cosine ({how})")
        recorded = " (figures recorded while writing)" if rep.get("recorded") else " (re-measured by validation)"
        size = fmt.human_bytes(s["size_mb"] * 2**20) if s["size_mb"] is not None else "—"
        self._stats.object = (
            _stat("size", size) + _stat("compression", f"{s['compression_ratio']:.2f}×" if s["compression_ratio"] else "—")
            + _stat("mean cosine", fmt.cos(s["cosine"])) + _stat("min cosine", fmt.cos(s["min_cosine"]))
            + _stat("bits / weight", f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] else "—")
            + _stat("thresholds", "passed" if rep.get("passed") else "missed")
            + f"<div class='aq-muted'>{len(q.frame)} quantized tensors{recorded}. Colour: −log10(1 − cosine), "
              "so 0.99 and 0.999 are a full step apart. Hover a cell for the tensor.</div>"
            + (f"<div>{budget_text((job.result or {}).get('budget'))}</div>" if (job.result or {}).get("budget") else "")
        )
        self._render_fidelity(q)
        worst = q.worst().assign(cosine=lambda d: d["cosine"].map(lambda c: f"{c:.6f}"),
                                 rel_error=lambda d: d["rel_error"].map(lambda c: f"{c:.4f}"))
        self._worst.object = "<div class='aq-section'>Worst layers</div>" + _table(worst)
        fb = q.fallbacks()
        if not fb.empty and fb["cosine before"].notna().any():
            fb["cosine before"] = fb["cosine before"].map(lambda c: "" if c is None or c != c else f"{c:.4f}")
        self._fallbacks.object = "<div class='aq-section'>Fell back to more bits</div>" + _table(
            fb, "no tensor needed more bits than planned")
        bits = q.bits_table()
        if not bits.empty:
            bits["mean cosine"] = bits["mean cosine"].map(lambda c: f"{c:.5f}")
            bits["params"] = bits["params"].map(fmt.human_count)
        self._bits.object = "<div class='aq-section'>Bits</div>" + _table(bits)
        out = q.outside_blocks()
        if layout == "block" and not out.empty:
            out = out.assign(cosine=out["cosine"].map(lambda c: f"{c:.6f}"), rel_error=out["rel_error"].map(lambda c: f"{c:.4f}"))
            self._outside.object = "<div class='aq-section'>Outside the blocks</div>" + _table(out)
        else:
            self._outside.object = ""

    def _render_fidelity(self, q: QualityReport) -> None:
        """The output fidelity per noise level next to the heatmap (models with a graph), else why not."""
        e2e, levels = q.end_to_end, q.fidelity()
        if not e2e.get("available") or levels.empty:
            self._fidelity.object = None
            self._fidelity_text.object = (f"<div class='aq-muted'>End-to-end: not measured: "
                                          f"{fmt.esc(e2e.get('reason') or 'no levels')}</div>")
            return
        from .plots import fidelity_plot

        self._fidelity.object = fidelity_plot(levels, title="Network output vs original, per noise level")
        psnr = e2e.get("mean_psnr_db")
        self._fidelity_text.object = (
            "<div class='aq-section'>End-to-end fidelity</div>"
            + _stat("mean output cos", fmt.cos(e2e.get("mean_cosine"), 6))
            + _stat(f"worst, at noise {e2e.get('worst_sigma', float('nan')):.3g}", fmt.cos(e2e.get("worst_cosine"), 6))
            + _stat("mean PSNR", f"{psnr:.1f} dB" if psnr is not None and psnr == psnr and psnr != float("inf") else "∞")
            + f"<div class='aq-muted'>{fmt.esc(e2e.get('reason', ''))}</div>")

    def __panel__(self):
        return pn.Column(
            pn.Row(pn.widgets.Select.from_param(self.param.job_id, width=380, css_classes=["aq-quality-result"]),
                   pn.widgets.RadioButtonGroup.from_param(self.param.layout, align="end", button_type="default")),
            self._msg, self._stats,
            # the fidelity and bit tables go beside the heatmap, or under it when the window is narrow
            pn.FlexBox(self._plot, pn.Column(self._fidelity_text, self._fidelity, self._bits, self._outside, width=400),
                       flex_wrap="wrap", align_items="flex-start",
                   sizing_mode="stretch_width"),
            self._worst, self._fallbacks,
            sizing_mode="stretch_width",
        )


class CompareView(Viewer):
    """Two results of the same model: size vs quality and a difference heatmap."""

    manager = param.ClassSelector(class_=JobManager)
    a = param.Selector(default=None, objects=[], allow_None=True, label="Result A")
    b = param.Selector(default=None, objects=[], allow_None=True, label="Result B (same model)")
    live = param.Boolean(default=True, doc="Draw now; when False (a hidden tab) drawing waits until it is shown.")

    def __init__(self, **params):
        super().__init__(**params)
        self._dirty = True
        self._scatter = pn.pane.HoloViews(None, sizing_mode="stretch_width", min_width=360, max_width=720)
        self._diff = pn.pane.HoloViews(None, linked_axes=False)
        self._table = _html(sizing_mode="stretch_width")
        self._msg = _html()
        self.refresh_options()
        self.param.watch(self._on_a, "a")
        self.param.watch(self._render, ["a", "b"])
        self.param.watch(lambda e: self._dirty and self.live and self._render(), "live")
        self._render()

    def refresh_options(self) -> None:
        opts = _result_options(self.manager)
        if opts != self.param.a.names:
            self.param.a.objects = opts
        if self.a not in opts.values():
            self.a = next(iter(opts.values()), None)
        self._on_a()

    def _on_a(self, *_):
        model = self.manager.get(self.a).model_name if self.a is not None else None
        opts = {k: v for k, v in _result_options(self.manager, model).items() if v != self.a} if model else {}
        if opts != self.param.b.names:
            self.param.b.objects = opts
        if self.b not in opts.values():
            self.b = next(iter(opts.values()), None)

    def compare(self, a: Job, b: Job) -> None:
        self.refresh_options()
        self.a = a.job_id
        self._on_a()
        self.b = b.job_id

    def _render(self, *_):
        from .plots import diff_heatmap, size_quality_plot

        if not self.live:
            self._dirty = True
            return
        self._dirty = False
        if self.a is None:
            self._msg.object = "<div class='aq-muted' style='padding:12px'>Finish two jobs of the same model " \
                               "(e.g. edge and local) to compare them.</div>"
            self._scatter.object = self._diff.object = None
            self._table.object = ""
            return
        ja = self.manager.get(self.a)
        jobs = self.manager.results(ja.model_name)
        pts = []
        for j in jobs:
            s = j.summary()
            if s["size_mb"] is None or s["cosine"] is None:
                continue
            pts.append({"label": f"#{j.job_id} {j.label}", "size_mb": s["size_mb"], "cosine": s["cosine"],
                        "min_cosine": s["min_cosine"] if s["min_cosine"] is not None else s["cosine"],
                        "ratio": s["compression_ratio"] or 0.0})
        jb = self.manager.get(self.b) if self.b is not None else None
        chosen = [f"#{j.job_id} {j.label}" for j in (ja, jb) if j is not None]
        self._scatter.object = size_quality_plot(pd.DataFrame(pts), chosen, title=f"{ja.model_name}: size vs quality")
        rows = []
        for tag, j in (("A", ja), ("B", jb)):
            if j is None:
                continue
            s = j.summary()
            rows.append({"": tag, "result": f"#{j.job_id} {j.label}",
                         "size": fmt.human_bytes(s["size_mb"] * 2**20) if s["size_mb"] is not None else "—",
                         "compression": f"{s['compression_ratio']:.2f}×" if s["compression_ratio"] else "—",
                         "mean cos": fmt.cos(s["cosine"]), "min cos": fmt.cos(s["min_cosine"]),
                         "bpw": f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] else "—"})
        self._table.object = _table(pd.DataFrame(rows))
        if jb is None:
            self._msg.object = "<div class='aq-muted'>Only one result of this model so far: start it with another " \
                               "profile to compare.</div>"
            self._diff.object = None
            return
        self._msg.object = ""
        fa, fb = layer_frame(_report_for(ja)["per_layer"]), layer_frame(_report_for(jb)["per_layer"])
        cells, layout = diff_frame(fa, fb)
        self._diff.object = diff_heatmap(cells, layout, labels=(f"#{ja.job_id}", f"#{jb.job_id}"),
                                         title=f"Δ per layer: #{jb.job_id} {jb.label} vs #{ja.job_id} {ja.label}")

    def __panel__(self):
        return pn.Column(
            pn.Row(pn.widgets.Select.from_param(self.param.a, width=320, css_classes=["aq-compare-a"]),
                   pn.widgets.Select.from_param(self.param.b, width=320, css_classes=["aq-compare-b"])),
            self._msg,
            pn.Row(pn.Column(self._table, width=560), self._scatter, sizing_mode="stretch_width"),
            self._diff,
            sizing_mode="stretch_width",
        )


# ----------------------------------------------------------------------------- dashboard


class Dashboard(Viewer):
    """Launcher, job board, quality and comparison, and the model library: the whole app.

    In a served app ``sidebar`` and ``main`` go into a template; in a notebook the
    dashboard displays itself as one row.
    """

    manager = param.ClassSelector(class_=JobManager)

    def __init__(self, manager: Optional[JobManager] = None, **params):
        super().__init__(manager=manager or shared_manager(), **params)
        self.library_view = LibraryView(library=self.manager.library)
        self.launcher = Launcher(manager=self.manager)
        self.board = JobBoard(manager=self.manager, on_open=self.open_quality)
        self.quality = QualityView(manager=self.manager, live=False)
        self.compare = CompareView(manager=self.manager, live=False)
        self.tabs = pn.Tabs(
            ("Jobs", self.board), ("Quality", self.quality), ("Compare", self.compare), ("Models", self.library_view),
            sizing_mode="stretch_width", dynamic=False,
        )
        self.board.param.watch(self._on_jobs_changed, "changed")
        self.tabs.param.watch(self._on_tab, "active")

    def _on_tab(self, *_):
        self.quality.live = self.tabs.active == 1
        self.compare.live = self.tabs.active == 2

    def _on_jobs_changed(self, *_):
        self.quality.refresh_options()
        self.compare.refresh_options()

    def open_quality(self, job: Job) -> None:
        self.quality.show(job)
        self.tabs.active = 1

    def open_compare(self, a: Job, b: Job) -> None:
        self.compare.compare(a, b)
        self.tabs.active = 2

    @property
    def sidebar(self) -> pn.viewable.Viewable:
        return self.launcher

    @property
    def main(self) -> pn.viewable.Viewable:
        return self.tabs

    def __panel__(self):
        self.board.start_polling()
        return pn.Row(pn.Column(self.launcher, width=330), self.tabs, sizing_mode="stretch_width")


def dashboard(manager: Optional[JobManager] = None, **kwargs) -> Dashboard:
    """The whole dashboard in one call (for notebooks): ``arrow_quant_v2.ui.dashboard()``.

    ``kwargs`` go to :class:`JobManager` when no manager is given (e.g. ``output_root=``,
    ``library=ModelLibrary(roots=[...])``).
    """
    if manager is None:
        manager = JobManager(**kwargs) if kwargs else shared_manager()
    return Dashboard(manager=manager)
