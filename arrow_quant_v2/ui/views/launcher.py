"""The launcher: pick a model and a profile (or tune the config), see the reachable sizes, start a job."""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

import panel as pn
import param
from panel.viewable import Viewer

from ...errors import ArrowQuantError
from .. import format as fmt
from ..jobs import Job, JobManager
from ..settings import (AUTO, BUDGET_FIELD, CALIBRATION_FIELD, RUNTIME_FIELD, QuantSettings, ReachableSizes,
                        cached_size_range, calibration_problem, check_target, describe_range)
from .compute import ComputeChoice
from .html import html, in_served_page, watch_shared


def config_form(obj: param.Parameterized, names: List[str]) -> pn.Column:
    """A form for generated config parameters, one widget per parameter, made from it.

    Numbers get text boxes checked as typed (:func:`number_input`; their bounds can be huge:
    a slider would be useless), short choice lists get labelled button groups, None reads "auto".
    Each widget carries the field's doc as its tooltip and the field name as a CSS class.
    """
    rows = []
    for n in names:
        p = obj.param[n]
        css = [f"aq-field-{n}"]
        desc = p.doc or None
        if isinstance(p, param.Boolean):
            w = pn.widgets.Checkbox.from_param(p, css_classes=css)
        elif isinstance(p, param.Number):  # Integer too: typed text, checked by the settings, refused inline
            w = number_input(obj, n)
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


def _as_text(value) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def number_input(settings: QuantSettings, name: str, *, label: Optional[str] = None, placeholder: Optional[str] = None,
                 css: Sequence[str] = ()) -> pn.Column:
    """A text box for a numeric setting, checked on every keystroke by :meth:`QuantSettings.set_text`,
    with the reason it cannot be used right under it (and the value unchanged until it can)."""
    p = settings.param[name]
    box = pn.widgets.TextInput(name=label or p.label, value=_as_text(getattr(settings, name)),
                               placeholder=placeholder if placeholder is not None else "auto" if p.allow_None else "",
                               description=p.doc or None, css_classes=[f"aq-field-{name}", *css],
                               sizing_mode="stretch_width")
    why = html("", css_classes=["aq-field-error"], margin=(0, 5), visible=False)

    def typed(event):
        settings.set_text(name, event.new)

    def shown(*_):
        problem = settings.errors.get(name)
        why.object = f"<div class='aq-error'>{fmt.esc(problem)}</div>" if problem else ""
        why.visible = bool(problem)
        value = getattr(settings, name)
        typed_now = box.value_input if box.value_input is not None else box.value
        if not problem and _parsed(typed_now) != value:
            box.value = _as_text(value)  # set elsewhere (a profile): show it, but never rewrite "1." while typed

    box.param.watch(typed, "value_input")
    settings.param.watch(shown, [name, "errors"])
    return pn.Column(box, why, margin=0, sizing_mode="stretch_width")


def _parsed(text):
    try:
        return float(text) if (text or "").strip() else None
    except ValueError:
        return object()  # never equal to a value


#: Seconds a notebook cell waits for the reachable sizes (0.3 s to 11 s for the samples, by the machine's load)
#: before it shows them as not computed, with how to compute them.
RANGE_WAIT_S = 30.0


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
        self._shown_once = False  # the first range (a notebook cell's) is waited for, later ones are not
        self.sizes.param.watch(self._show_range, ["value", "reason"])
        self._blocked = html(sizing_mode="stretch_width", css_classes=["aq-start-blocked"], margin=(0, 5))
        self._calibrate = pn.widgets.Checkbox(name="Calibrate through the model's graph", value=self.settings.calibrated,
                                              css_classes=["aq-calibrate"], sizing_mode="stretch_width")
        self._calibrate.param.watch(lambda e: setattr(self.settings, CALIBRATION_FIELD, "graph" if e.new else AUTO), "value")
        self._calibration_note = html(sizing_mode="stretch_width", css_classes=["aq-calibration-note"], margin=(0, 5))
        self.param.watch(self._update_calibration, "model")
        self.settings.param.watch(self._update_calibration, [CALIBRATION_FIELD, "num_time_groups"])
        self._update_calibration()
        self.param.watch(self._update_start, "model")
        self.settings.param.watch(self._update_start, ["errors", BUDGET_FIELD, CALIBRATION_FIELD])
        self.sizes.param.watch(self._update_start, "value")
        watch_shared(self.manager.library, self._update_models, "models")
        self._update_models()
        self.param.watch(self._update_info, "model")
        self.settings.param.watch(self._update_info, list(self.settings.param))
        self.param.watch(self._update_range, "model")
        self.settings.param.watch(self._update_range, [n for n in self.settings.param if n != "name"])
        self._update_info()
        self._update_range()
        self._update_start()

    def form_problem(self) -> Optional[str]:
        """Why Start cannot run now (a mistyped field, an unreachable budget, no model), or None."""
        if self.model is None:
            return "Pick a model first."
        if self.settings.errors:
            return "Fix first: " + "; ".join(self.settings.errors.values())
        if self._calibration_problem():
            return "Calibration cannot run for this model (see above)."
        try:
            check_target(self.settings.target_model_size_mb, self.sizes.value, self.model)
        except ArrowQuantError:
            return "Start waits for a size budget within the reachable sizes (above)."
        return None

    def _calibration_problem(self) -> Optional[str]:
        """Why the calibration asked for cannot run on the chosen model (no graph), or None."""
        e = self._entry_or_none()
        if not self.settings.calibrated or e is None or not e.available:
            return None
        return calibration_problem(e.path)

    def _update_calibration(self, *_):
        """The toggle follows the settings (a profile keeps it); under it, what calibration will do or why it cannot."""
        self._calibrate.value = self.settings.calibrated
        e, problem = self._entry_or_none(), self._calibration_problem()
        if problem:
            text = f"<div class='aq-error'>{fmt.esc(problem)}</div>"
        elif not self.settings.calibrated:
            text = ""
        elif e is not None and not e.available:
            text = (f"<div class='aq-muted'>Whether {fmt.esc(e.name)} has a graph shows once the sample is built; "
                    "without one the job stops and says so.</div>")
        else:
            text = (f"<div class='aq-muted'>First runs the graph at {self.settings.num_time_groups} noise levels "
                    "(its own stage in Jobs), then rounds with error compensation: same bits per weight.</div>")
        self._calibration_note.object = text

    def _entry_or_none(self):
        try:
            return self._entry()
        except (KeyError, ArrowQuantError):
            return None

    def _update_start(self, *_):
        problem = self.form_problem()
        self._start.disabled = problem is not None
        self._blocked.object = f"<div class='aq-error'>{fmt.esc(problem)}</div>" if problem else ""

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
        if in_served_page():  # Panel runs the work with this session's document, so the result is pushed
            self.sizes.request(src, why, run=pn.state.execute)
        elif not self._shown_once:  # a notebook cell: computed before it returns, so a saved or exported page
            self._shown_once = True  # shows it; bounded, and the cell says what it waits for
            self._range_in_cell(src, why)
        else:  # a change in a live notebook: computed on the kernel's loop, the widgets stay responsive
            self.sizes.request(src, why)

    def _range_in_cell(self, src, why) -> None:
        if src is None or cached_size_range(*src) is not None:
            self.sizes.request(src, why)
            return
        print(f"Launcher: reachable sizes of {self.model}: reading a sample of every tensor "
              f"(at most {RANGE_WAIT_S:.0f} s)…", end=" ", flush=True)
        started = time.perf_counter()
        self.sizes.request(src, why, wait=RANGE_WAIT_S)
        # a notebook saves this as an output of its own: it names what it is about
        print(f"Launcher: reachable sizes of {self.model}: {'done' if self.sizes.value is not None else 'stopped waiting'}"
              f" after {time.perf_counter() - started:.1f} s", flush=True)

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
        # one above the other: side by side, the two labels are wider than the 340-px sidebar
        return [html("<div class='aq-muted' style='margin-top:4px'>Target runtime</div>"),
                pn.widgets.RadioButtonGroup.from_param(
                    s.param[RUNTIME_FIELD], name="", button_type="primary", button_style="outline",
                    options={"ArrowQuant (most accurate)": AUTO, "GGUF (llama.cpp, ComfyUI)": "gguf"},
                    orientation="vertical", sizing_mode="stretch_width", css_classes=["aq-runtime"],
                    description=s.param[RUNTIME_FIELD].doc)]

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
            self._calibrate, self._calibration_note,
            number_input(s, BUDGET_FIELD, label="Size budget (MiB, optional)", placeholder="none: the profile's widths",
                         css=["aq-budget"]),
            self._range,
            pn.Card(main, title="Tune the config", collapsed=True, sizing_mode="stretch_width", margin=(5, 5)),
            advanced,
            ComputeChoice(place=self.manager.compute),
            self._start, self._blocked, self._alert, self._note,
            sizing_mode="stretch_width",
        )

