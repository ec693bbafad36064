"""The model library view: samples and folders under the model roots."""
from __future__ import annotations

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ...errors import ArrowQuantError
from .. import format as fmt
from ..library import ModelLibrary
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
        self._add = pn.widgets.Button(name="Add", button_type="primary", width=80, align="end")
        self._refresh = pn.widgets.Button(name="Rescan", width=90, align="end")
        self._add.on_click(self._on_add)
        self._refresh.on_click(self._on_rescan)
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
        self._table.object = table(pd.DataFrame(rows), "no models") + \
            f"<div class='aq-muted' style='margin-top:6px'>Model roots: {fmt.esc(roots)}</div>"
        self._alert.object = self.library.message
        self._alert.visible = bool(self.library.message)

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
            self._alert, sizing_mode="stretch_width",
        )

