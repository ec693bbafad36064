"""Shipping a result: its absolute path, the Export actions (GGUF, safetensors) as cancellable jobs
with their files and sizes, and checking any GGUF file against its source."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import panel as pn
import param
from panel.viewable import Viewer

from .. import format as fmt
from ..exports import ExportJob, Exports, can_export, check_gguf, exports_for
from ..jobs import Job, JobManager
from .html import BAR_COLORS, CSS, badge, html, watch_shared


class ExportRow(Viewer):
    """One export: status, progress, the file with its size (or the error), Cancel."""

    export = param.ClassSelector(class_=ExportJob)

    def __init__(self, exports: Exports, **params):
        super().__init__(**params)
        self.exports = exports
        e = self.export
        self._line = html(sizing_mode="stretch_width", margin=(0, 5))
        self._bar = pn.indicators.Progress(value=0, max=1000, width=120, height=10, margin=(6, 5), bar_color="primary")
        self._cancel = pn.widgets.Button(name="Cancel", button_type="danger", button_style="outline", width=70,
                                         height=26, margin=(0, 5), css_classes=[f"aq-export-cancel-{e.export_id}"])
        self._cancel.on_click(lambda _: self.exports.cancel(self.export))
        self._last: tuple = ()
        self._layout = pn.Row(self._bar, self._line, self._cancel, sizing_mode="stretch_width", margin=0,
                              css_classes=["aq-export", f"aq-export-{e.export_id}"])
        self.sync()

    def sync(self) -> None:
        e = self.export
        key = (e.status, round(e.fraction, 3), e.message, e.size_bytes, e.error, tuple(e.notes))
        if key == self._last:
            return
        self._last = key
        self._bar.value = int(round(e.fraction * 1000))
        self._bar.bar_color = BAR_COLORS.get(e.status, "primary")
        self._bar.visible = e.active
        self._cancel.visible = e.active
        what = f"{badge(e.status)}<span class='aq-kv'>{fmt.esc(e.format)}</span>"
        if e.status == "done":
            size = fmt.human_bytes(e.size_bytes) if e.size_bytes is not None else "?"
            body = (f"<span class='aq-tensor aq-export-path'>{fmt.esc(e.output_path)}</span> "
                    f"<span class='aq-kv'><b>{size}</b></span>"
                    + "".join(f"<div class='aq-muted'>{fmt.esc(n)}</div>" for n in e.notes))
        elif e.status == "failed":
            body = f"<div class='aq-error'>{fmt.esc(e.error)}</div>"
        else:
            body = f"<span class='aq-muted'>{fmt.esc(e.message)}</span>"
        self._line.object = what + body

    def __panel__(self):
        return self._layout


class ExportPanel(Viewer):
    """Under a finished job: the store's absolute path (copyable) and Export GGUF / safetensors."""

    job = param.ClassSelector(class_=Job)

    def __init__(self, manager: JobManager, **params):
        super().__init__(**params)
        self.exports = exports_for(manager)
        jid = self.job.job_id
        self._path = pn.widgets.TextInput(value=str(Path(self.job.output_path).resolve()), disabled=False,
                                          sizing_mode="stretch_width", margin=(2, 5), css_classes=[f"aq-path-{jid}"],
                                          description="The store's absolute path: select and copy it")
        self._path.param.watch(self._keep_path, "value")  # shown for copying, not for editing
        self._gguf = pn.widgets.Button(name="Export GGUF", button_type="primary", button_style="outline", width=120,
                                       margin=(2, 5), css_classes=[f"aq-export-gguf-{jid}"],
                                       description="Lossless GGUF for llama.cpp, ComfyUI-GGUF and diffusers "
                                                   "(the store must use ggml types: target runtime gguf)")
        self._st = pn.widgets.Button(name="Export safetensors", button_type="default", button_style="outline",
                                     width=150, margin=(2, 5), css_classes=[f"aq-export-st-{jid}"],
                                     description="Dequantized float16 safetensors, for runtimes that read nothing else")
        self._gguf.on_click(lambda _: self._start("gguf"))
        self._st.on_click(lambda _: self._start("safetensors"))
        self._msg = html(margin=(0, 5))
        self._rows: Dict[int, ExportRow] = {}
        self._list = pn.Column(sizing_mode="stretch_width", margin=0)
        self._layout = pn.Column(self._path, pn.Row(self._gguf, self._st, self._msg, margin=0), self._list,
                                 sizing_mode="stretch_width", margin=0, stylesheets=[CSS])
        self.sync()

    def _keep_path(self, event) -> None:
        want = str(Path(self.job.output_path).resolve())
        if event.new != want:
            self._path.value = want

    def _start(self, fmt_name: str) -> Optional[ExportJob]:
        try:
            export = self.exports.start(self.job, fmt_name)
        except Exception as e:  # noqa: BLE001 - shown next to the buttons
            self._msg.object = f"<span class='aq-error'>{fmt.esc(e)}</span>"
            return None
        self._msg.object = ""
        self.sync()
        return export

    def sync(self) -> None:
        mine = self.exports.for_store(self.job.output_path)
        ids = [e.export_id for e in mine]
        if ids != list(self._rows):
            self._rows = {e.export_id: self._rows.get(e.export_id) or ExportRow(self.exports, export=e) for e in mine}
            self._list.objects = list(self._rows.values())
        for r in self._rows.values():
            r.sync()

    def __panel__(self):
        return self._layout


class GGUFCheckForm(Viewer):
    """Check a GGUF file (any: ours, llama-quantize's, ComfyUI-GGUF's) against its source model."""

    manager = param.ClassSelector(class_=JobManager)
    model = param.Selector(default=None, objects=[], label="Source model")
    gguf_path = param.String(default="", label="GGUF file")

    def __init__(self, on_started=None, **params):
        super().__init__(**params)
        self._on_started = on_started
        self._msg = html(margin=(0, 5))
        self._button = pn.widgets.Button(name="Check GGUF", button_type="primary", button_style="outline", width=120,
                                         align="end", css_classes=["aq-gguf-check"])
        self._button.on_click(lambda _: self.start())
        watch_shared(self.manager.library, self.refresh_models, "models")
        self.refresh_models()

    def refresh_models(self, *_) -> None:
        names = [e.name for e in self.manager.library.models if e.usable]
        self.param.model.objects = names
        if self.model not in names:
            self.model = names[0] if names else None

    def start(self) -> Optional[Job]:
        if not self.model or not self.gguf_path.strip():
            self._msg.object = "<span class='aq-error'>Pick the source model and give the GGUF file's path.</span>"
            return None
        try:
            job = check_gguf(self.manager, self.model, self.gguf_path.strip())
        except Exception as e:  # noqa: BLE001 - e.g. a path outside the roots: shown here
            self._msg.object = f"<span class='aq-error'>{fmt.esc(e)}</span>"
            return None
        self._msg.object = f"<span class='aq-muted'>checking: job #{job.job_id} on the Jobs tab</span>"
        if self._on_started:
            self._on_started(job)
        return job

    def __panel__(self):
        return pn.Column(
            html("<div class='aq-section'>Check a GGUF file against its source</div>"
                 "<div class='aq-muted'>Any GGUF — exported here, by llama-quantize, or by ComfyUI-GGUF — compared "
                 "tensor by tensor with the safetensors it was made from (inside the model folders).</div>"),
            pn.Row(pn.widgets.Select.from_param(self.param.model, width=220, css_classes=["aq-gguf-model"]),
                   pn.widgets.TextInput.from_param(self.param.gguf_path, placeholder="path/to/model.gguf",
                                                   css_classes=["aq-gguf-path"], sizing_mode="stretch_width"),
                   self._button, sizing_mode="stretch_width"),
            self._msg, sizing_mode="stretch_width", stylesheets=[CSS])


__all__ = ["ExportPanel", "ExportRow", "GGUFCheckForm", "can_export"]
