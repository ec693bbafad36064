"""The quality view: one finished job's per-layer heatmap, fidelity, worst layers and fallbacks."""
from __future__ import annotations

from typing import Optional

import panel as pn
import param
from panel.viewable import Viewer

from .. import format as fmt
from ..jobs import Job, JobManager
from ..quality import QualityReport, block_rows, page_of
from .html import budget_text, html, stat, table


class QualityView(Viewer):
    """Per-layer quality of one finished job: heatmap with hover, worst layers, fallbacks."""

    manager = param.ClassSelector(class_=JobManager)
    job_id = param.Selector(default=None, objects=[], label="Result", allow_None=True)
    layout = param.Selector(default="auto", objects=["auto", "block × module", "layer × metric"], label="Layout")
    live = param.Boolean(default=True, doc="Draw now; when False (a hidden tab) drawing waits until it is shown.")
    page = param.Integer(default=0, bounds=(0, None), doc="Which page of rows the heatmap shows (long models).")

    def __init__(self, **params):
        super().__init__(**params)
        self._dirty = True
        self._pages = 1
        self._stats = html(sizing_mode="stretch_width")
        self._plot = pn.pane.HoloViews(None, sizing_mode="fixed", linked_axes=False, css_classes=["aq-heatmap"])
        # a calibrated store's output sensitivity, beside the weight cosines (nothing for other stores)
        self._sensitivity = pn.pane.HoloViews(None, sizing_mode="fixed", linked_axes=False,
                                              css_classes=["aq-sensitivity-heatmap"])
        self._sensitivity_box = pn.Column(self._sensitivity, scroll=True, max_width=900, sizing_mode="stretch_width",
                                          visible=False)
        self._pager_text = html(css_classes=["aq-pager"], align="center")
        self._prev = pn.widgets.Button(name="‹ rows before", width=120, css_classes=["aq-page-prev"], visible=False)
        self._next = pn.widgets.Button(name="rows after ›", width=120, css_classes=["aq-page-next"], visible=False)
        self._prev.on_click(lambda e: self.param.update(page=max(self.page - 1, 0)))
        self._next.on_click(lambda e: self.param.update(page=min(self.page + 1, self._pages - 1)))
        self._fidelity = pn.pane.HoloViews(None, linked_axes=False)
        self._fidelity_text = html(sizing_mode="stretch_width", css_classes=["aq-fidelity"])
        self._worst = html(sizing_mode="stretch_width")
        self._fallbacks = html(sizing_mode="stretch_width")
        self._bits = html(sizing_mode="stretch_width")
        self._outside = html(sizing_mode="stretch_width", css_classes=["aq-outside"])
        self._msg = html()
        self.refresh_options()
        self.param.watch(self._first_page, ["job_id", "layout"])
        self.param.watch(self._render, ["job_id", "layout", "page"])
        self.param.watch(self._on_live, "live")
        self._render()

    def _first_page(self, *_):
        self.page = 0

    def _on_live(self, *_):
        if self.live and self._dirty:
            self._render()

    def refresh_options(self) -> None:
        opts = self.manager.result_options()
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
        return QualityReport(title=job.title, report=job.quality_report(), result=job.result or {}, layout=layout,
                             sensitivity=job.output_sensitivity())

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
            self._sensitivity.object, self._sensitivity_box.visible = None, False
            self._fidelity.object = None
            for p in (self._worst, self._fallbacks, self._bits, self._outside, self._fidelity_text):
                p.object = ""
            return
        self._msg.object = ""
        job = self.manager.get(self.job_id)
        rep, s = q.report, job.summary()
        self._render_heatmap(q, job)
        recorded = " (figures recorded while writing)" if rep.get("recorded") else " (re-measured by validation)"
        size = fmt.human_bytes(s["size_mb"] * 2**20) if s["size_mb"] is not None else "—"
        self._stats.object = (
            stat("size", size) + stat("compression", f"{s['compression_ratio']:.2f}×" if s["compression_ratio"] else "—")
            + stat("mean cosine", fmt.cos(s["cosine"])) + stat("min cosine", fmt.cos(s["min_cosine"]))
            + stat("bits / weight", f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] else "—")
            + stat("thresholds", "passed" if rep.get("passed") else "missed")
            + f"<div class='aq-muted'>{len(q.frame)} quantized tensors{recorded}. Colour: −log10(1 − cosine) over "
              "the range shown, so 0.99 and 0.999 are a full step apart; red is below the pass threshold marked "
              "on the colour bar, amber the worst that pass, deep blue the best. Hover a cell for the tensor.</div>"
            + (f"<div>{budget_text((job.result or {}).get('budget'))}</div>" if (job.result or {}).get("budget") else "")
        )
        self._render_fidelity(q)
        worst = q.worst().assign(cosine=lambda d: d["cosine"].map(lambda c: f"{c:.6f}"),
                                 rel_error=lambda d: d["rel_error"].map(lambda c: f"{c:.4f}"))
        self._worst.object = "<div class='aq-section'>Worst layers</div>" + table(worst, wrap=("name", "reason"))
        fb = q.fallbacks()
        if not fb.empty and fb["cosine before"].notna().any():
            fb["cosine before"] = fb["cosine before"].map(lambda c: "" if c is None or c != c else f"{c:.4f}")
        self._fallbacks.object = "<div class='aq-section'>Fell back to more bits</div>" + table(
            fb, "no tensor needed more bits than planned", wrap=("name", "why"))
        bits = q.bits_table()
        if not bits.empty:
            bits["mean cosine"] = bits["mean cosine"].map(lambda c: f"{c:.5f}")
            bits["params"] = bits["params"].map(fmt.human_count)
        self._bits.object = "<div class='aq-section'>Bits</div>" + table(bits)
        out = q.outside_blocks()
        if q.cells()[1] == "block" and not out.empty:
            out = out.assign(cosine=out["cosine"].map(lambda c: f"{c:.6f}"), rel_error=out["rel_error"].map(lambda c: f"{c:.4f}"))
            self._outside.object = "<div class='aq-section'>Outside the blocks</div>" + table(
                out, wrap=("name", "why not in a block"))
        else:
            self._outside.object = ""

    def _render_heatmap(self, q: QualityReport, job: Job) -> None:
        """One page of rows (a long model is paged, so the chart keeps a bounded height)."""
        from ..plots import ROWS_PER_PAGE, quality_heatmap

        cells, layout = q.cells()
        shown, self._pages = page_of(cells, self.page, ROWS_PER_PAGE)
        rows, first = block_rows(cells), min(self.page, self._pages - 1) * ROWS_PER_PAGE
        how = "block × module" if layout == "block" else "layer × metric"
        title = f"{job.title}: per-layer quality ({how})"
        self._plot.object = quality_heatmap(shown, layout, title=title)
        sens = q.sensitivity_cells()
        self._sensitivity_box.visible = sens is not None
        self._sensitivity.object = None if sens is None else quality_heatmap(
            page_of(sens[0], self.page, ROWS_PER_PAGE)[0], sens[1],
            title=f"{job.title}: output sensitivity (layer output cosine on the calibration inputs)")
        paged = self._pages > 1
        what = "blocks" if layout == "block" else "tensors"
        self._pager_text.object = (f"<span class='aq-muted'>{what} {first + 1}–{first + len(block_rows(shown))} "
                                   f"of {len(rows)}</span>") if paged else ""
        self._prev.visible = self._next.visible = paged
        self._prev.disabled, self._next.disabled = self.page <= 0, self.page >= self._pages - 1

    def _render_fidelity(self, q: QualityReport) -> None:
        """The output fidelity per noise level next to the heatmap (models with a graph), else why not."""
        e2e, levels = q.end_to_end, q.fidelity()
        if not e2e.get("available") or levels.empty:
            self._fidelity.object = None
            self._fidelity_text.object = (f"<div class='aq-muted'>End-to-end: not measured: "
                                          f"{fmt.esc(e2e.get('reason') or 'no levels')}</div>")
            return
        from ..plots import fidelity_plot

        self._fidelity.object = fidelity_plot(levels, title="Network output vs original, per noise level")
        psnr = e2e.get("mean_psnr_db")
        self._fidelity_text.object = (
            "<div class='aq-section'>End-to-end fidelity</div>"
            + stat("mean output cos", fmt.cos(e2e.get("mean_cosine"), 6))
            + stat(f"worst, at noise {e2e.get('worst_sigma', float('nan')):.3g}", fmt.cos(e2e.get("worst_cosine"), 6))
            + stat("mean PSNR", f"{psnr:.1f} dB" if psnr is not None and psnr == psnr and psnr != float("inf") else "∞")
            + f"<div class='aq-muted'>{fmt.esc(e2e.get('reason', ''))}</div>")

    def __panel__(self):
        return pn.Column(
            pn.FlexBox(pn.widgets.Select.from_param(self.param.job_id, min_width=220, max_width=380,
                                                    sizing_mode="stretch_width", css_classes=["aq-quality-result"]),
                       pn.widgets.RadioButtonGroup.from_param(self.param.layout, align="end", button_type="default"),
                       flex_wrap="wrap", align_items="flex-end", sizing_mode="stretch_width"),
            self._msg, self._stats,
            # what to look at first, above the chart: the worst layers and what fell back
            self._worst, self._fallbacks,
            pn.Row(self._prev, self._pager_text, self._next, margin=(8, 0, 0, 0)),
            # the fidelity and bit tables go beside the heatmap, or under it when the window is narrow
            pn.FlexBox(pn.Column(self._plot, scroll=True, max_width=900, sizing_mode="stretch_width",
                                 css_classes=["aq-heatmap-view"]),
                       self._sensitivity_box,
                       pn.Column(self._fidelity_text, self._fidelity, self._bits, width=400),
                       flex_wrap="wrap", align_items="flex-start", sizing_mode="stretch_width"),
            self._outside,
            sizing_mode="stretch_width",
        )

