"""Where jobs run: "this machine" or "Dask cluster at …", with the cluster's workers."""
from __future__ import annotations

import panel as pn
import param
from panel.viewable import Viewer

from .. import format as fmt
from ..compute import ComputePlace
from .html import html, watch_shared


def workers_html(workers) -> str:
    if not workers:
        return ""
    rows = "".join(
        f"<tr><td>{fmt.esc(w['address'])}</td><td>{fmt.esc(w['name'])}</td><td>{w.get('nthreads') or '?'}</td>"
        f"<td>{(w.get('memory_limit') or 0) / 2**30:.1f} GiB</td></tr>" for w in workers)
    return (f"<table class='aq-table aq-workers'><tr><th>worker</th><th>name</th><th>threads</th><th>memory</th></tr>"
            f"{rows}</table>")


class ComputeChoice(Viewer):
    """Pick where new jobs run and see the cluster's workers (the state is the manager's, shared by every tab)."""

    place = param.ClassSelector(class_=ComputePlace)

    def __init__(self, **params):
        super().__init__(**params)
        self._apply = pn.widgets.Button(name="Use", button_type="default", width=70, css_classes=["aq-compute-apply"])
        self._apply.on_click(self._on_apply)
        self._status = html(sizing_mode="stretch_width", css_classes=["aq-compute-status"])
        self._workers = html(sizing_mode="stretch_width", css_classes=["aq-compute-workers"])
        watch_shared(self.place, self._show, ["status", "workers", "busy"])
        self._show()

    def _show(self, *_) -> None:
        self._status.object = f"<span class='aq-muted'>{fmt.esc(self.place.status)}</span>"
        self._workers.object = workers_html(self.place.workers)
        self._apply.disabled = self.place.busy

    async def _on_apply(self, _=None) -> None:
        await self.place.apply()

    def __panel__(self):
        p = self.place
        address = pn.widgets.TextInput.from_param(p.param.address, name="", placeholder="tcp://host:8786",
                                                  sizing_mode="stretch_width", css_classes=["aq-compute-address"])
        address.visible = p.where != "this machine"
        p.param.watch(lambda e: setattr(address, "visible", e.new != "this machine"), "where")
        return pn.Column(
            html("<div class='aq-muted' style='margin-top:4px'>Run jobs on</div>"),
            pn.widgets.RadioButtonGroup.from_param(p.param.where, name="", button_type="default",
                                                   sizing_mode="stretch_width", css_classes=["aq-compute-where"]),
            pn.Row(address, self._apply, sizing_mode="stretch_width", margin=0),
            self._status, self._workers,
            sizing_mode="stretch_width", margin=0)
