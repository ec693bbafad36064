"""The quantization settings a person edits: a ``param`` class generated from ``field_specs()``.

Each :class:`~arrow_quant_v2.config.DiffusionQuantConfig` field becomes a parameter with
the declared default, doc, choices and bounds, so a field added to the config shows up in
the app's form with no change here or in the view. Choosing a profile loads its values;
:meth:`QuantSettings.to_config` builds (and so validates) the config.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import param

from .. import encodings
from ..config import PROFILES, DiffusionQuantConfig, field_specs
from ..errors import ConfigurationError

#: Fields the form does not show: the profile selector stands for ``deployment_profile``.
HIDDEN_FIELDS = ("deployment_profile",)
#: Shown first, above the fold; the rest go in the "advanced" part of the form.
MAIN_FIELDS = ("bit_width", "group_size", "min_accuracy", "enable_time_aware", "protect_embeddings", "sensitive_bits")
#: The size budget: shown next to the profile (with the reachable range), not in the tuning form.
BUDGET_FIELD = "target_model_size_mb"
#: Where the model will run: chosen next to the profile, and kept when the profile changes.
RUNTIME_FIELD = "target_runtime"
#: Graph calibration: a toggle next to the profile, kept when the profile changes.
CALIBRATION_FIELD = "calibration"
#: Fields a profile does not set: they say where and how, not how many bits.
KEPT_ACROSS_PROFILES = (RUNTIME_FIELD, CALIBRATION_FIELD)


#: What a person calls the fields whose config names are not words (messages and the form use these).
FIELD_LABELS = {
    "target_model_size_mb": "Size budget (MiB)", "min_accuracy": "Minimum cosine", "lossless_below": "Keep tensors "
    "smaller than (elements) lossless", "num_threads": "Threads (0 = all cores)", "num_time_groups": "Noise levels",
    "max_shard_mb": "Largest shard (MiB)", "bit_width": "Bit width", "group_size": "Group size",
    "sensitive_bits": "Bits for sensitive layers",
}


def _label(name: str) -> str:
    return FIELD_LABELS.get(name) or name.replace("_", " ").capitalize()


def user_words(message: str) -> str:
    """A config error in the form's words: ``target_model_size_mb=1`` → ``Size budget (MiB) = 1``."""
    for name, label in FIELD_LABELS.items():
        message = message.replace(f"{name}=", f"{label} = ").replace(name, label)
    return message


#: What a None choice (e.g. "detect the modality") is called in the form.
AUTO = "auto"


def _named(choices):
    """Selector objects; a None choice is the string "auto" in the form (widgets cannot show None)."""
    return [AUTO if c is None else c for c in choices]


def _to_form(value):
    return AUTO if value is None else list(value) if isinstance(value, tuple) else value


def _from_form(param_obj, value):
    if value == AUTO and isinstance(param_obj, param.Selector) and AUTO in param_obj.objects:
        return None
    return value


def parameter_for(name: str, spec: Dict[str, Any]) -> param.Parameter:
    """The ``param.Parameter`` that stands for one config field's declaration."""
    default, doc, typ = spec["default"], spec.get("doc", ""), str(spec.get("type", ""))
    choices, bounds, kind = spec.get("choices"), spec.get("bounds"), spec.get("kind")
    optional = typ.startswith("Optional") or default is None
    common = dict(doc=doc, label=_label(name))
    if isinstance(default, bool) or typ == "bool":
        return param.Boolean(default=bool(default), **common)
    if choices is not None:
        return param.Selector(default=_to_form(default), objects=_named(choices), **common)
    if kind == "encoding":
        return param.Selector(default=_to_form(default), objects=_named([None, *encodings.encoding_names()]), **common)
    if bounds is not None:
        lo, hi = bounds
        hi = None if hi is None or (isinstance(hi, float) and math.isinf(hi)) else hi
        if typ == "int" or (isinstance(default, int) and "float" not in typ):
            return param.Integer(default=default, bounds=(lo, hi), allow_None=optional, **common)
        return param.Number(default=default, bounds=(lo, hi), allow_None=optional, **common)
    if kind == "patterns" or isinstance(default, (tuple, list)):
        return param.List(default=list(default or []), item_type=str, **common)
    if kind == "rules" or isinstance(default, dict):
        return param.Dict(default=dict(default or {}), **common)
    if isinstance(default, int):
        return param.Integer(default=default, allow_None=optional, **common)
    if isinstance(default, float):
        return param.Number(default=default, allow_None=optional, **common)
    return param.String(default=default, allow_None=optional, **common)


def _build_class() -> Type[param.Parameterized]:
    specs = field_specs()
    attrs: Dict[str, Any] = {
        "profile": param.Selector(default="local", objects=list(PROFILES), label="Profile",
                                  doc="edge: int2, smallest; local: int4; cloud: int8, accuracy first."),
    }
    for name, spec in specs.items():
        if name not in HIDDEN_FIELDS:
            attrs[name] = parameter_for(name, spec)
    return type("QuantSettingsBase", (param.Parameterized,), attrs)


class QuantSettings(_build_class()):
    """A profile plus every config field as a parameter (generated from ``field_specs()``).

    Numbers typed in the form go through :meth:`set_text`: a value the config cannot use
    leaves the field unchanged and puts a message in :attr:`errors` (in the form's words),
    so the form can say why inline and keep Start disabled until it is empty.
    """

    errors = param.Dict(default={}, doc="Field name -> why the text typed for it cannot be used.")

    def __init__(self, profile: str = "local", **params):
        super().__init__(**params)
        self._loading = False
        self._loaded = False
        self.load_profile(profile)

    @property
    def calibrated(self) -> bool:
        """Graph calibration is on."""
        return getattr(self, CALIBRATION_FIELD, None) == "graph"

    @property
    def valid(self) -> bool:
        """True when every typed value could be used."""
        return not self.errors

    def set_text(self, name: str, text: str) -> Optional[str]:
        """Set a numeric field from what was typed; returns why it cannot be used (None when set)."""
        p = self.param[name]
        why = _number_problem(p, text)
        errors = dict(self.errors)
        if why is None:
            errors.pop(name, None)
            raw = (text or "").strip()
            value = None if raw == "" else int(float(raw)) if isinstance(p, param.Integer) else float(raw)
            self.param.update({name: value, "errors": errors})
        else:
            errors[name] = f"{p.label}: {why}"
            self.errors = errors
        return None if why is None else errors[name]

    @classmethod
    def field_names(cls) -> List[str]:
        """The config fields the form shows."""
        return [n for n in field_specs() if n not in HIDDEN_FIELDS]

    @classmethod
    def main_fields(cls) -> List[str]:
        """The fields under "Tune the config"."""
        return [n for n in MAIN_FIELDS if n in cls.field_names()]

    @classmethod
    def advanced_fields(cls) -> List[str]:
        """The fields under "More settings"."""
        return [n for n in cls.field_names()
                if n not in MAIN_FIELDS and n not in (BUDGET_FIELD, RUNTIME_FIELD, CALIBRATION_FIELD)]

    def load_profile(self, profile: str) -> None:
        """Set every field to the profile's value (what was mistyped is dropped with it)."""
        config = DiffusionQuantConfig.from_profile(profile)
        values = {n: _to_form(getattr(config, n)) for n in self.field_names()}
        values = {n: v if v != AUTO or AUTO in getattr(self.param[n], "objects", ()) else None for n, v in values.items()}
        if self._loaded:  # a profile says how many bits, not where the model runs nor whether it is calibrated
            for name in KEPT_ACROSS_PROFILES:
                values.pop(name, None)
        self._loading = True
        try:
            self.param.update(profile=profile, errors={}, **values)
        finally:
            self._loading = False
        self._loaded = True

    @param.depends("profile", watch=True)
    def _on_profile(self) -> None:
        if not self._loading:
            self.load_profile(self.profile)

    def values(self) -> Dict[str, Any]:
        """The fields as the config takes them ("auto" back to None)."""
        return {n: _from_form(self.param[n], getattr(self, n)) for n in self.field_names()}

    def changed_from_profile(self) -> Dict[str, Any]:
        """The fields that differ from the chosen profile (what the person tuned)."""
        base = DiffusionQuantConfig.from_profile(self.profile)
        out = {}
        for n, v in self.values().items():
            b = getattr(base, n)
            if (list(b) if isinstance(b, tuple) else b) != v:
                out[n] = v
        return out

    def to_config(self) -> DiffusionQuantConfig:
        """The config (raises :class:`~arrow_quant_v2.ConfigurationError` naming a bad field in the
        form's words, including a value typed that could not be used)."""
        if self.errors:
            raise ConfigurationError("; ".join(self.errors.values()))
        values = self.values()
        values = {n: tuple(v) if n == "sensitive_layers" else v for n, v in values.items()}
        try:
            return DiffusionQuantConfig(deployment_profile=self.profile, **values)
        except ConfigurationError as e:
            raise ConfigurationError(user_words(str(e))) from e

    @property
    def label(self) -> str:
        """Short name for outputs and job rows, saying what makes this job different: the profile,
        ``int4-g32`` when only widths were tuned, ``local · 17 MiB`` with a size budget, ``-gguf`` for llama.cpp,
        ``· calibrated`` with graph calibration."""
        changed = {n: v for n, v in self.changed_from_profile().items() if n not in KEPT_ACROSS_PROFILES}
        runtime = "-gguf" if getattr(self, RUNTIME_FIELD, None) == "gguf" else ""
        if self.calibrated:
            runtime += " · calibrated"
        budget = changed.pop(BUDGET_FIELD, None)
        if not changed:
            base = self.profile
        elif set(changed) <= {"bit_width", "group_size"}:
            group = {None: "", AUTO: "", 0: "-grow"}.get(self.group_size, f"-g{self.group_size}")
            base = f"int{self.bit_width}{group}"
        else:
            base = f"{self.profile} · " + ", ".join(f"{_short(n)} {_fmt_value(v)}" for n, v in sorted(changed.items())[:2]) \
                + (" …" if len(changed) > 2 else "")
        base += runtime
        return base if budget is None else f"{base} · {budget:g} MiB"


def calibration_problem(model_path) -> Optional[str]:
    """Why graph calibration cannot run for the model at ``model_path`` (it has no graph), or None."""
    from ..e2e import GRAPH_NAMES, find_graph

    if find_graph(model_path) is not None:
        return None
    return (f"Calibration needs the model's graph ({' or '.join(GRAPH_NAMES)} next to its weights) and this model "
            "has none: turn calibration off, or add the graph to the model's folder.")


def _short(name: str) -> str:
    return {"min_accuracy": "min cos", "enable_time_aware": "time-aware", "protect_embeddings": "protect emb",
            "num_time_groups": "levels", "lossless_below": "lossless <", "sensitive_bits": "sensitive int"}.get(
        name, name.replace("_", " "))


def _fmt_value(v) -> str:
    return "on" if v is True else "off" if v is False else "auto" if v is None else f"{v:g}" \
        if isinstance(v, float) else str(v)


def _number_problem(p: param.Parameter, text: str) -> Optional[str]:
    """Why ``text`` cannot be the value of numeric parameter ``p`` (bounds from the config's field
    specs), or None if it can."""
    raw = (text or "").strip()
    if raw == "":
        return None if p.allow_None else "needs a value"
    try:
        value = float(raw)
    except ValueError:
        return f"“{raw}” is not a number"
    if not math.isfinite(value):
        return f"“{raw}” is not a finite number"
    if isinstance(p, param.Integer) and not value.is_integer():
        return f"“{raw}” is not a whole number"
    lo, hi = p.bounds or (None, None)
    if lo is not None and value < lo:
        return f"must be at least {lo:g}" + (" (a size above zero)" if lo > 0 and lo < 1 else "") + f"; got {raw}"
    if hi is not None and value > hi:
        return f"must be at most {hi:g}; got {raw}"
    return None


# ----------------------------------------------------------------------------- size budget

#: Reachable size ranges, per (model path, config without its target): computing one reads
#: samples of every tensor (0.3-3 s), so each is computed once per process.
_RANGES: Dict[tuple, dict] = {}


def range_key(model_path, config: DiffusionQuantConfig) -> tuple:
    """What a reachable range depends on: the model and the config, whatever its target."""
    body = config.replace(target_model_size_mb=None).to_dict()
    return str(model_path), json.dumps(body, sort_keys=True, default=str)


def cached_size_range(model_path, config: DiffusionQuantConfig) -> Optional[dict]:
    """The range :func:`size_range_async` found for this model and config, or None."""
    return _RANGES.get(range_key(model_path, config))


def size_range_now(model_path, config: DiffusionQuantConfig) -> dict:
    """:func:`arrow_quant_v2.budget.size_range`, blocking, cached like :func:`size_range_async`."""
    key = range_key(model_path, config)
    if key not in _RANGES:
        from ..budget import size_range

        _RANGES[key] = size_range(model_path, config)
    return _RANGES[key]


async def size_range_async(model_path, config: DiffusionQuantConfig) -> dict:
    """:func:`arrow_quant_v2.budget.size_range` in a worker thread (the event loop stays free), cached."""
    key = range_key(model_path, config)
    if key not in _RANGES:
        from ..budget import size_range

        _RANGES[key] = await asyncio.to_thread(size_range, model_path, config)
    return _RANGES[key]


class ReachableSizes(param.Parameterized):
    """The sizes a model can be quantized to with some settings: computed off the event loop, cached.

    :meth:`request` shows a cached range at once, else starts computing it on the running
    loop (through ``run`` when given: a served page passes its session's scheduler so the
    result reaches that page) and sets :attr:`value` when done, unless a newer request came.
    """

    value = param.Dict(default=None, allow_None=True, doc="budget.size_range's answer, once known.")
    reason = param.String(default="", doc="Why there is no value yet (cannot be computed, or computing).")
    computing = param.Boolean(default=False)

    def __init__(self, **params):
        super().__init__(**params)
        self._seq = 0
        self._task: Optional[asyncio.Task] = None

    def request(self, source: Optional[Tuple[Any, DiffusionQuantConfig]], why: str = "",
                run: Optional[Callable] = None, wait: float = 0.0) -> None:
        """Show the range for ``source`` = ``(model path, config)``, or ``why`` there is none.

        ``wait`` > 0 computes it now, blocking for at most that many seconds (a notebook cell, whose
        output is saved as it returns); past that the reason says it was not computed and how to
        compute it, and the range still shows when it arrives (in a live kernel).
        """
        self._seq += 1
        if source is None:
            self.param.update(value=None, reason=why, computing=False)
            return
        cached = cached_size_range(*source)
        if cached is not None:
            self.param.update(value=cached, reason="", computing=False)
            return
        if wait > 0:
            self._wait_for(self._seq, source, wait)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here (e.g. built outside a session): nothing to compute on
            self.param.update(value=None, computing=False, reason="reachable sizes not computed here (no event loop): "
                              "arrow_quant_v2.budget.size_range(model, config) gives them")
            return
        self.param.update(value=None, reason="computing the reachable sizes…", computing=True)
        work = partial(self._compute, self._seq, *source)
        if run is not None:
            run(work)
        else:
            self._task = loop.create_task(work())

    def _wait_for(self, seq: int, source, wait: float) -> None:
        """Compute in a worker thread, waiting at most ``wait`` seconds; a late answer is applied on the
        running loop (if any) when it comes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        work = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aq-size-range")
        future = work.submit(size_range_now, *source)
        work.shutdown(wait=False)
        try:
            self._apply(seq, future.result(timeout=wait))
        except concurrent.futures.TimeoutError:
            self.param.update(value=None, computing=False, reason=(
                f"reachable sizes not computed: reading a sample of every tensor took over {wait:.0f} s. "
                "They show here when done (in a live kernel); arrow_quant_v2.budget.size_range(model, config) "
                "gives them."))

            def late(f, seq=seq):
                if loop is not None and loop.is_running():
                    loop.call_soon_threadsafe(self._apply, seq, f)
                else:
                    self._apply(seq, f)
            future.add_done_callback(late)
        except Exception as err:  # noqa: BLE001 - e.g. an unsupported model: say so, the job says more
            self._apply(seq, err)

    def _apply(self, seq: int, answer) -> None:
        """Show ``answer`` (a range, an exception, or a finished future of either) unless a newer request
        came meanwhile (the model or settings changed)."""
        if isinstance(answer, concurrent.futures.Future):
            answer = answer.exception() or answer.result()
        if seq != self._seq:
            return
        if isinstance(answer, BaseException):
            self.param.update(value=None, reason=f"reachable sizes unknown: {answer}", computing=False)
        else:
            self.param.update(value=answer, reason="", computing=False)

    async def _compute(self, seq: int, path, config) -> None:
        try:
            answer = await size_range_async(path, config)
        except Exception as err:  # noqa: BLE001 - e.g. an unsupported model: say so, the job says more
            answer = err
        self._apply(seq, answer)


def describe_range(r: dict) -> str:
    """``≈ 0.9–6.1 MiB (int2 ≈ 1.1, int4 ≈ 1.9, int8 ≈ 3.4)``."""
    uni = r.get("uniform_mb") or {}
    widths = ", ".join(f"{k} ≈ {uni[k]:.{_digits(uni[k])}f}" for k in ("int2", "int4", "int8") if k in uni)
    lo, hi = r["min_mb"], r["max_mb"]
    return f"≈ {lo:.{_digits(lo)}f}–{hi:.{_digits(hi)}f} MiB" + (f" ({widths})" if widths else "")


def _digits(mb: float) -> int:
    return 0 if mb >= 100 else 1 if mb >= 1 else 3


def check_target(target: Optional[float], r: Optional[dict], model: str = "the model") -> None:
    """Raise :class:`ConfigurationError` (as the allocator would) when ``target`` is outside range ``r``."""
    if target is None or r is None:
        return
    if not r["min_mb"] <= target <= r["max_mb"] * 1.01:
        raise ConfigurationError(
            f"Size budget {target:g} MiB cannot be reached for {model}: "
            f"reachable sizes are {r['min_mb']:.3f} to {r['max_mb']:.3f} MiB")
