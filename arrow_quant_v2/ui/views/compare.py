"""The compare view: two results of the same model, size vs quality and a difference heatmap."""
from __future__ import annotations

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ...errors import ArrowQuantError
from .. import format as fmt
from ..jobs import Job, JobManager
from ..quality import diff_frame, layer_frame, output_error_change
from .html import html, table


class CompareView(Viewer):
    """Two results of the same model: size vs quality and a difference heatmap."""

    manager = param.ClassSelector(class_=JobManager)
    a = param.Selector(default=None, objects=[], allow_None=True, label="Result A")
    b = param.Selector(default=None, objects=[], allow_None=True, label="Result B (same model)")
    live = param.Boolean(default=True, doc="Draw now; when False (a hidden tab) drawing waits until it is shown.")

    def __init__(self, **params):
        super().__init__(**params)
        self._dirty = True
        self._scatter = pn.pane.HoloViews(None, sizing_mode="fixed", linked_axes=False)  # the plot's own fixed width
        self._diff = pn.pane.HoloViews(None, linked_axes=False)
        self._table = html(sizing_mode="stretch_width")
        self._msg = html()
        self.refresh_options()
        self.param.watch(self._on_a, "a")
        self.param.watch(self._render, ["a", "b"])
        self.param.watch(lambda e: self._dirty and self.live and self._render(), "live")
        self._render()

    def refresh_options(self) -> None:
        opts = self.manager.result_options()
        if opts != self.param.a.names:
            self.param.a.objects = opts
        if self.a not in opts.values():
            self.a = next(iter(opts.values()), None)
        self._on_a()

    def _on_a(self, *_):
        model = self.manager.get(self.a).model_name if self.a is not None else None
        opts = {k: v for k, v in self.manager.result_options(model).items() if v != self.a} if model else {}
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
        from ..plots import diff_heatmap, size_quality_plot

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
        pair = [(tag, j, j.summary()) for tag, j in (("A", ja), ("B", jb)) if j is not None]
        # the network's own output (models with a graph) and the calibration: what calibrating bought
        graph = any(s["output_cosine"] is not None or s["calibrated"] for _, _, s in pair)
        rows = []
        for tag, j, s in pair:
            row = {"": tag, "result": f"#{j.job_id} {j.label}",
                   "size": fmt.human_bytes(s["size_mb"] * 2**20) if s["size_mb"] is not None else "—",
                   "compression": f"{s['compression_ratio']:.2f}×" if s["compression_ratio"] else "—",
                   "mean cos": fmt.cos(s["cosine"]), "min cos": fmt.cos(s["min_cosine"]),
                   "bpw": f"{s['bits_per_weight']:.2f}" if s["bits_per_weight"] else "—"}
            if graph:
                row["calibration"] = "graph" if s["calibrated"] else "none"
                row["output cos mean / worst"] = (f"{fmt.cos(s['output_cosine'], 5)} / {fmt.cos(s['output_worst'], 5)}"
                                                  if s["output_cosine"] is not None else "not measured")
            rows.append(row)
        change = output_error_change(pair[0][2], pair[1][2]) if len(pair) == 2 else None
        self._table.object = table(pd.DataFrame(rows)) + (
            f"<div class='aq-muted aq-output-change'>{fmt.esc(change)}</div>" if change else "")
        if jb is None:
            self._msg.object = "<div class='aq-muted'>Only one result of this model so far: start it with another " \
                               "profile to compare.</div>"
            self._diff.object = None
            return
        self._msg.object = ""
        try:
            fa, fb = layer_frame(ja.quality_report()["per_layer"]), layer_frame(jb.quality_report()["per_layer"])
        except ArrowQuantError as e:  # a store on disk that turns out damaged: say so, the rest still works
            self._msg.object = f"<div class='aq-error'>{fmt.esc(str(e))}</div>"
            self._diff.object = None
            return
        cells, layout = diff_frame(fa, fb)
        self._diff.object = diff_heatmap(cells, layout, labels=(f"#{ja.job_id}", f"#{jb.job_id}"),
                                         title=f"Δ per layer: #{jb.job_id} {jb.label} vs #{ja.job_id} {ja.label}")

    def __panel__(self):
        return pn.Column(
            pn.FlexBox(pn.widgets.Select.from_param(self.param.a, min_width=220, max_width=320, sizing_mode="stretch_width",
                                                    css_classes=["aq-compare-a"]),
                       pn.widgets.Select.from_param(self.param.b, min_width=220, max_width=320, sizing_mode="stretch_width",
                                                    css_classes=["aq-compare-b"]),
                       flex_wrap="wrap", sizing_mode="stretch_width"),
            self._msg,
            # the table and the chart side by side, the chart under the table in a narrow window. A Row that
            # wraps, not a FlexBox: a FlexBox has no Bokeh layout of its own, and BokehJS does not reach one that
            # sits two Bokeh layouts below the page's root (a notebook's dashboard: Row > Tabs > this Column), so
            # a chart in it kept a 0 x 0 frame in its 460-px canvas; in a Row the chart is in the layout tree.
            # The table asks for about its width (500 px) before the line wraps: the Row would start it at
            # 0 px and keep it at 300, cutting off its columns, rather than wrap
            pn.Row(pn.Column(self._table, min_width=300, max_width=560, sizing_mode="stretch_width",
                             styles={"flex": "1 1 500px"}),
                   self._scatter, stylesheets=[":host { flex-wrap: wrap; }"], sizing_mode="stretch_width"),
            pn.Column(self._diff, scroll=True, sizing_mode="stretch_width", max_height=900, css_classes=["aq-diff-view"]),
            sizing_mode="stretch_width",
        )

