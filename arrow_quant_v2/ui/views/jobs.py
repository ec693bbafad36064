"""The job board: every job of the process with its stage, progress, ETA and results."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import panel as pn
import param
from panel.viewable import Viewer

from ...progress import STAGE_LABELS
from .. import format as fmt
from ..jobs import Job, JobManager
from .exports import ExportPanel, can_export
from .html import BAR_COLORS, CSS, badge, budget_text, html, in_session

log = logging.getLogger(__name__)

#: Milliseconds between two refreshes of the job board (progress events come every 0.1 s).
POLL_MS = 100


class JobRow(Viewer):
    """One job: status, stage, progress bar, current tensor, elapsed/ETA, results, Cancel/Quality."""

    job = param.ClassSelector(class_=Job)

    def __init__(self, manager: JobManager, on_open: Optional[Callable[[Job], None]] = None, **params):
        super().__init__(**params)
        self.manager = manager
        self._on_open = on_open
        job = self.job
        self._head = html(sizing_mode="stretch_width", margin=(4, 5, 0, 5))
        self._bar = pn.indicators.Progress(value=0, max=1000, sizing_mode="stretch_width", height=14, margin=(2, 5),
                                           bar_color="primary", css_classes=[f"aq-progress-{job.job_id}"])
        self._line = html(sizing_mode="stretch_width", margin=(0, 5))
        self._results = html(sizing_mode="stretch_width", margin=(0, 5, 4, 5))
        self._cancel = pn.widgets.Button(name="Cancel", button_type="danger", button_style="outline", width=90,
                                         css_classes=[f"aq-cancel-{job.job_id}"], margin=(4, 5))
        self._open = pn.widgets.Button(name="Quality ▸", button_type="success", button_style="outline", width=90,
                                       css_classes=[f"aq-open-{job.job_id}"], margin=(4, 5), visible=False)
        self._cancel.on_click(lambda e: self.manager.cancel(self.job))
        self._open.on_click(lambda e: self._on_open and self._on_open(self.job))
        self._last: tuple = ()
        self._ship = None  # the ExportPanel, once the job has a store to ship
        self._ship_box = pn.Column(sizing_mode="stretch_width", margin=0)
        self._layout = pn.Row(
            pn.Column(self._head, self._bar, self._line, self._results, self._ship_box, sizing_mode="stretch_width",
                      margin=0),
            pn.Column(self._cancel, self._open, width=100, margin=0),
            sizing_mode="stretch_width", css_classes=["aq-row", f"aq-job-{job.job_id}"], stylesheets=[CSS],
        )
        self.sync()

    def sync(self) -> None:
        j = self.job
        self._sync_ship()
        active = j.active
        eta = j.eta
        key = (j.status, j.stage, round(j.fraction, 4), round(j.stage_fraction, 3), j.tensor, j.message, j.error, bool(j.result), bool(j.report),
               int((j.elapsed or 0) * 2) if active else None, None if eta is None else int(eta))
        if key == self._last:
            return
        self._last = key
        self._head.object = (
            f"{badge(j.status)}<span class='aq-title'>#{j.job_id} {fmt.esc(j.model_name)}</span>"
            f"<span class='aq-muted'> · {fmt.esc(j.label)} · → {fmt.esc(Path(j.output_path).name)}</span>"
        )
        self._bar.value = int(round(j.fraction * 1000))
        self._bar.bar_color = BAR_COLORS.get(j.status, "primary")
        self._bar.visible = not j.from_disk
        if active:
            stage = STAGE_LABELS.get(j.stage, j.stage or j.status)
            pct = f"{j.stage_fraction * 100:.0f}%"
            counts = f" [{j.tensors_done}/{j.tensors_total}]" if j.tensors_total and j.stage != "end-to-end" else ""
            now = (f" · <span class='aq-tensor'>{fmt.esc(j.tensor)}</span>{counts}"
                   if j.tensor and j.stage != "end-to-end" else f" · {fmt.esc(j.message)}")
            # no ETA until the stage has a rate: a guess from the first event would be wrong by hours
            eta_text = f"<span class='aq-kv'>ETA <b>{fmt.duration(eta)}</b></span>" if eta is not None else ""
            self._line.object = (
                f"<span class='aq-kv aq-stage'><b>{fmt.esc(stage)}</b> {pct}</span>"
                f"<span class='aq-kv'>elapsed <b>{fmt.duration(j.elapsed)}</b></span>{eta_text}{now}"
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

    def _sync_ship(self) -> None:
        """Path and Export actions appear once the job has a store (done, or cancelled during validation)."""
        if self._ship is None:
            if self.job.status not in ("done", "cancelled") or not can_export(self.job):
                return
            self._ship = ExportPanel(self.manager, job=self.job)
            self._ship_box.objects = [self._ship]
        self._ship.sync()

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
        self._empty = html("<div class='aq-empty' style='padding:16px'><div class='aq-title'>No jobs yet</div>"
                           "<div class='aq-muted' style='font-size:13px;margin-top:4px'>Pick a model in <b>New job</b>, "
                           "choose a profile (edge = int2, local = int4, cloud = int8) or a size budget, then press "
                           "<b>▶ Start quantizing</b>. Jobs run side by side: start more while they run. A finished "
                           "job's per-layer quality opens from its <b>Quality ▸</b> button.</div></div>",
                           sizing_mode="stretch_width")
        # before the first job the board says what to do, rather than showing nothing
        self._column = pn.Column(self._empty, sizing_mode="stretch_width", margin=0)
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
        if self._cb is None and in_session():
            self._cb = pn.state.add_periodic_callback(self._safe_sync, period=POLL_MS)

    def _safe_sync(self):
        try:
            self.sync()
        except Exception:  # noqa: BLE001 - a bad row must not stop the board
            log.exception("job board refresh failed")

    def __panel__(self):
        self.start_polling()
        return self._column

