"""The model library view: samples and folders under the model roots."""
from __future__ import annotations

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ...errors import ArrowQuantError
from .. import format as fmt
from ..library import HOW_TO_ADD_A_ROOT, WHERE_MODELS_COME_FROM, ModelLibrary
from ..roots import PathNotAllowed
from .html import html, table, watch_shared


class LibraryView(Viewer):
    """The models the app can quantize: samples and folders under the model roots."""

    library = param.ClassSelector(class_=ModelLibrary)
    path = param.String(default="", label="Add a model folder (inside a model root)")

    def __init__(self, **params):
        super().__init__(**params)
        self._table = html(sizing_mode="stretch_width")
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width")
        self._notice = pn.pane.Alert("", alert_type="success", visible=False, sizing_mode="stretch_width")
        self._add = pn.widgets.Button(name="Add", button_type="primary", width=80, align="end")
        self._refresh = pn.widgets.Button(name="Rescan", width=90, align="end")
        self._add.on_click(self._on_add)
        self._refresh.on_click(self._on_rescan)
        watch_shared(self.library, self._render, ["models", "message", "notice"])
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
        roots = "".join(f"<li><code>{fmt.esc(r)}</code></li>" for r in self.library.roots) or \
            "<li class='aq-muted'>none configured</li>"
        self._table.object = (
            f"<div class='aq-muted aq-where' style='margin-bottom:6px'>{fmt.esc(WHERE_MODELS_COME_FROM)}</div>"
            + table(pd.DataFrame(rows), "no models", wrap=("path / note",))
            + f"<div class='aq-section'>Model roots</div><ul style='margin:0 0 4px 0'>{roots}</ul>"
            f"<div class='aq-muted'>{fmt.esc(HOW_TO_ADD_A_ROOT)}.</div>")
        self._alert.object = self.library.message
        self._alert.visible = bool(self.library.message)
        self._notice.object = self.library.notice
        self._notice.visible = bool(self.library.notice) and not self.library.message

    async def _on_rescan(self, _):
        await self.library.refresh_async()  # a large model root or hub cache is scanned off the event loop

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
            self._alert, self._notice, sizing_mode="stretch_width",
        )

