"""The launcher: pick a model and a profile (or tune the config), see the reachable sizes, start a job."""
from __future__ import annotations

from typing import List, Optional

import panel as pn
import param
from panel.viewable import Viewer

from ...errors import ArrowQuantError
from .. import format as fmt
from ..jobs import Job, JobManager
from ..settings import (AUTO, BUDGET_FIELD, RUNTIME_FIELD, QuantSettings, ReachableSizes, cached_size_range,
                        check_target, describe_range)
from .compute import ComputeChoice
from .html import html, watch_shared


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
                html(f"<div class='aq-muted' title='{fmt.esc(desc or '')}'>{fmt.esc(p.label)}</div>", margin=(4, 5, 0, 5)),
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
        self._info = html(sizing_mode="stretch_width")
        self._alert = pn.pane.Alert("", alert_type="danger", visible=False, sizing_mode="stretch_width", margin=(5, 5))
        self._note = html(sizing_mode="stretch_width")
        self._range = html(sizing_mode="stretch_width", margin=(0, 5), css_classes=["aq-budget-range"])
        self.sizes = ReachableSizes()
        self.sizes.param.watch(self._show_range, ["value", "reason"])
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

    def _show_range(self, *_) -> None:
        r, target = self.sizes.value, self.settings.target_model_size_mb
        if r is None:
            self._range.object = f"<div class='aq-muted'>{fmt.esc(self.sizes.reason)}</div>"
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
        """Ask for the reachable sizes of the model and settings (the budget alone does not change them)."""
        if events and all(e.name == BUDGET_FIELD for e in events):
            self._show_range()
            return
        src, why = self._range_source()
        doc = pn.state.curdoc
        in_served_page = doc is not None and getattr(doc, "session_context", None) is not None
        # in a served page Panel runs the work with this session's document, so the result is pushed
        self.sizes.request(src, why, run=pn.state.execute if in_served_page else None)

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

    def _runtime_choice(self) -> list:
        """ArrowQuant's encodings (most accurate) or GGUF's block types (lossless export), by the profile."""
        s = self.settings
        if RUNTIME_FIELD not in s.param:
            return []
        return [html("<div class='aq-muted' style='margin-top:4px'>Target runtime</div>"),
                pn.widgets.RadioButtonGroup.from_param(
                    s.param[RUNTIME_FIELD], name="", button_type="primary", button_style="outline",
                    options={"ArrowQuant (most accurate)": AUTO, "GGUF (llama.cpp, ComfyUI)": "gguf"},
                    sizing_mode="stretch_width", css_classes=["aq-runtime"], description=s.param[RUNTIME_FIELD].doc)]

    def __panel__(self):
        s = self.settings
        main = config_form(s, QuantSettings.main_fields())
        advanced = pn.Card(config_form(s, QuantSettings.advanced_fields()), title="Advanced", collapsed=True,
                           sizing_mode="stretch_width", margin=(5, 5))
        return pn.Column(
            html("<div class='aq-title'>New job</div>"),
            pn.widgets.Select.from_param(self.param.model, sizing_mode="stretch_width", css_classes=["aq-model"]),
            self._info,
            html("<div class='aq-muted' style='margin-top:4px'>Profile</div>"),
            pn.widgets.RadioButtonGroup.from_param(s.param.profile, button_type="primary", button_style="outline",
                                                   sizing_mode="stretch_width", name=""),
            *self._runtime_choice(),
            pn.widgets.FloatInput.from_param(s.param[BUDGET_FIELD], name="Size budget (MiB, optional)", start=0.001,
                                             step=1.0, placeholder="none: the profile's widths",
                                             description=s.param[BUDGET_FIELD].doc, sizing_mode="stretch_width",
                                             css_classes=["aq-budget"]),
            self._range,
            pn.Card(main, title="Tune the config", collapsed=True, sizing_mode="stretch_width", margin=(5, 5)),
            advanced,
            ComputeChoice(place=self.manager.compute),
            self._start, self._alert, self._note,
            sizing_mode="stretch_width",
        )

