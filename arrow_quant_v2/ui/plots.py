"""HoloViews plots of per-layer quality (used by the views; no Panel widgets here).

Colour is **nines** = ``-log10(1 - cosine)``, so 0.99 and 0.999 are a whole step apart, over
the range of the data shown (a model whose layers all sit between 0.99 and 0.999 still shows
which are worse); the colour bar is labelled in cosine and marks each bit width's pass
threshold: below it reds, above it amber (the worst that pass) through to deep blue.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import holoviews as hv
import numpy as np
import pandas as pd
from bokeh.models import FixedTicker, HoverTool

from .quality import MAX_NINES, PSNR_CAP_DB, block_rows, cosine_label, module_order, nines

CELL_PX = 26
LABELS_UP_TO = 400  # write the cosine in each cell up to this many cells

def _ensure_extension() -> None:
    """The Bokeh backend, registered without ``hv.extension`` (which, in a notebook, loads BokehJS
    again after ``pn.extension()`` already did)."""
    if "bokeh" not in hv.Store.renderers:
        import holoviews.plotting.bokeh  # noqa: F401 - registers the renderer and its default options
    if hv.Store.current_backend != "bokeh":
        hv.Store.set_current_backend("bokeh")


def _mix(c0: str, c1: str, t: float) -> str:
    x0, x1 = (np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)]) for c in (c0, c1))
    return "#%02x%02x%02x" % tuple(int(round(v)) for v in x0 + (x1 - x0) * t)


def _ramp(stops: Sequence[str], n: int) -> List[str]:
    if n <= 0:
        return []
    if n == 1:
        return [stops[-1]]
    out = []
    for i in range(n):
        t = i / (n - 1) * (len(stops) - 1)
        k = min(int(t), len(stops) - 2)
        out.append(_mix(stops[k], stops[k + 1], t - k))
    return out


#: Below the pass threshold: deep red to pale; above it: pale to deep blue.
FAIL_STOPS = ("#8b0d1c", "#d6604d", "#f6c7b3")
PASS_STOPS = ("#fbd36b", "#cfe6c6", "#74add1", "#16457a")  # the worst passing layers stand out in amber
#: A metric without a threshold (rel. error, SQNR): pale where best, deep orange where worst.
WORSE_STOPS = ("#7f2704", "#e6550d", "#fdae6b", "#fff5eb")


def pass_palette(lo: float, hi: float, threshold: float, n: int = 200) -> List[str]:
    """A palette over ``[lo, hi]`` that turns from reds to blues exactly at ``threshold``."""
    split = int(round(n * min(max((threshold - lo) / max(hi - lo, 1e-9), 0.0), 1.0)))
    return _ramp(FAIL_STOPS, split) + _ramp(PASS_STOPS, n - split)


def nines_range(values, thresholds=(), focus=None) -> Tuple[float, float]:
    """The colour range of the data shown (in nines): from the worst value (or a pass threshold just
    under it) up to the best of ``focus``, the values of the most common bit width, so those layers
    spread over the palette; wider, near-lossless tensors (INT8, protected layers) saturate."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    f = np.asarray(focus if focus is not None else values, dtype=float)
    f = f[np.isfinite(f)]
    ts = [t for t in thresholds if np.isfinite(t)]
    lo = float(v.min()) if v.size else 1.0
    hi = float(f.max()) if f.size else float(v.max()) if v.size else 3.0
    below = [t for t in ts if t <= lo]
    if below and lo - max(below) < 0.25 * max(hi - lo, 0.3):  # a threshold just under the data: show it
        lo = max(below)
    if hi - lo < 0.2:  # a nearly uniform model: keep some room so one shade is not all there is
        mid = (hi + lo) / 2
        lo, hi = mid - 0.1, mid + 0.1
    return float(lo - 0.02 * (hi - lo)), float(hi + 0.02 * (hi - lo))


def _common_width(frame: pd.DataFrame):
    """A mask of the cells quantized at the most common bit width."""
    return frame["bits"] == frame["bits"].mode().iloc[0] if len(frame) else frame["bits"] == frame["bits"]


def _colorbar(lo: float, hi: float, marks: Dict[float, str] = None) -> dict:
    """Ticks in cosine at whole nines (and halves on a short range), plus the marks (pass thresholds)."""
    step = next(st for st in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0) if (hi - lo) / st <= 6)  # about 3 to 6 ticks
    ticks = [t for t in np.arange(math.ceil(lo / step) * step, hi + 1e-9, step)]
    marks = marks or {}
    ticks = [float(t) for t in ticks if all(abs(t - m) > 0.15 * (hi - lo) / 2 for m in marks)]
    labels = {t: cosine_label(t) for t in ticks}
    labels.update(marks)
    return {"ticker": FixedTicker(ticks=sorted([*ticks, *marks])), "major_label_overrides": labels}


def _ink(values, palette: Sequence[str], lo: float, hi: float) -> List[str]:
    """White text on dark cells, near-black on light ones (from the cell's own colour's luminance)."""
    out = []
    for v in values:
        k = int(np.clip((v - lo) / max(hi - lo, 1e-9) * (len(palette) - 1), 0, len(palette) - 1))
        r, g, b = (int(palette[k][i:i + 2], 16) for i in (1, 3, 5))
        out.append("white" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#1d1d1d")
    return out


def _marks_in(marks: Dict[float, str], lo: float, hi: float) -> Dict[float, str]:
    """Threshold marks on the colour bar: a threshold off the scale is drawn at its end, saying so."""
    out = {}
    for n, text in marks.items():
        if n < lo:
            out[lo] = text.replace("◀", "▼") + " (all above)"
        elif n > hi:
            out[hi] = text.replace("◀", "▲") + " (above the scale)"
        else:
            out[n] = text
    return out


def _threshold_marks(frame: pd.DataFrame) -> Dict[float, str]:
    """``{nines of threshold: "◀ pass int4 ≥ 0.99"}`` for each bit width's threshold in the data."""
    marks = {}
    if "threshold" not in frame or "bits" not in frame:
        return marks
    for (bits, thr), _ in frame.groupby(["bits", "threshold"]):
        if thr == thr and 0 < thr < 1:
            n = float(nines(thr))
            marks[n] = (marks[n] + f"/int{bits}") if n in marks else f"◀ pass int{bits} ≥ {thr:g}"
    return marks


def _cell_text(cos: float) -> str:
    if cos is None or not np.isfinite(cos):
        return ""
    n = min(int(-math.log10(max(1 - cos, 1e-7))), 5)
    return f"{cos:.{n + 2}f}".lstrip("0")


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Object dtype for text columns: HoloViews' aggregation reshapes columns, Arrow strings cannot."""
    df = df.copy()
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = df[c].astype(object)
    return df


def _height(n_rows: int) -> int:
    """Tall enough for readable rows; a page holds at most ROWS_PER_PAGE rows, so this stays bounded."""
    px = CELL_PX if n_rows <= 30 else 16
    return int(max(n_rows * px + 130, 260))


#: Rows of one heatmap page (a whole 52-row U-Net fits): a long model is paged, never drawn
#: thousands of pixels tall.
ROWS_PER_PAGE = 56


def quality_heatmap(cells: pd.DataFrame, layout: str, title: str = "", width: int = 640):
    """The per-layer heatmap: block × module (``layout="block"``), else tensor × metric with each
    metric column on its own colour scale. Colour covers the data shown; the colour bar marks the
    pass threshold of each bit width, and cosines under it are red."""
    _ensure_extension()
    if layout != "block":
        return _metric_columns(cells, title, width)
    vdims = ["value", "cosine", "rel_error", "sqnr_db", "name", "shape", "bits", "reason", "threshold", "verdict"]
    verdict = np.where(cells["cosine"] >= cells["threshold"], "passes", "below threshold")
    data = cells.assign(verdict=np.where(cells["threshold"].isna(), "", verdict))  # no threshold: no verdict
    data = data[["x", "y", *vdims]].copy()
    data["shape"], data["reason"], data["y"] = data["shape"].astype(str), data["reason"].astype(str), data["y"].astype(str)
    data = _plain(data)
    xs, ys = module_order(data["x"]), [str(y) for y in block_rows(cells)]
    marks = _threshold_marks(cells)
    lo, hi = nines_range(data["value"], marks, focus=data["value"][_common_width(data).to_numpy()])
    marks = _marks_in(marks, lo, hi)
    main_thr = float(nines(cells["threshold"].mode().iloc[0])) if cells["threshold"].notna().any() else lo
    hover = HoverTool(tooltips=[("tensor", "@name"), ("shape", "@shape"), ("bits", "@bits"), ("reason", "@reason"),
                                ("cosine", "@cosine{0.000000}"), ("pass at", "@threshold{0.000}"), ("", "@verdict"),
                                ("rel. error", "@rel_error{0.00000}"), ("SQNR", "@sqnr_db{0.0} dB")])
    palette = pass_palette(lo, hi, main_thr)
    hm = hv.HeatMap(data, kdims=["x", "y"], vdims=vdims).redim.values(x=xs, y=ys[::-1]).opts(
        cmap=palette, clim=(lo, hi), colorbar=True, colorbar_opts=_colorbar(lo, hi, marks),
        tools=[hover], xlabel="module", ylabel="block", title=title, height=_height(len(ys)),
        width=min(max(420, 70 * len(xs) + 230), width), clabel="cosine", line_color="white", line_width=1,
        toolbar="above", default_tools=["save", "reset"], xaxis="top", clipping_colors={"NaN": "#dddddd"},
        fontsize={"title": "11pt", "labels": "10pt", "ticks": "9pt"}, xrotation=35 if sum(map(len, xs)) > 30 else 0,
    )
    if len(data) > LABELS_UP_TO:
        return hm
    text = data.assign(text=[("✗ " if v == "below threshold" else "") + _cell_text(c)
                             for c, v in zip(data["cosine"], data["verdict"])])
    text = _plain(text[text["text"] != ""])
    text["ink"] = _ink(text["value"], palette, lo, hi)
    labels = hv.Labels(text, kdims=["x", "y"], vdims=["text", "ink"]).opts(text_font_size="8pt", text_color="ink")
    return (hm * labels).opts(title=title)


#: layer × metric: (column, report key, hover format); each column is coloured by its own metric
_METRIC_COLUMNS = (
    ("cosine", "cosine", "@cosine{0.000000}"),
    ("rel. error", "rel_error", "@rel_error{0.00000}"),
    ("SQNR", "sqnr_db", "@sqnr_db{0.0} dB"),
)


def _metric_columns(cells: pd.DataFrame, title: str, width: int) -> hv.Layout:
    """One heatmap column per metric, side by side, each coloured by its own metric on its own scale."""
    frame = cells[cells["x"] == cells["x"].iloc[0]] if len(cells) else cells
    ys = block_rows(frame)
    height = _height(len(ys))
    plots = []
    longest = max((len(str(y)) for y in ys), default=10)
    for i, (label, key, fmt_) in enumerate(_METRIC_COLUMNS):
        data = frame.assign(x=label, y=frame["y"].astype(str), shape=frame["shape"].astype(str),
                            reason=frame["reason"].astype(str))
        vdims = ["value", "cosine", "rel_error", "sqnr_db", "name", "shape", "bits", "reason", "threshold"]
        raw = data[key].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            if key == "cosine":
                data["value"] = data["nines"]
                marks = _threshold_marks(frame)
                lo, hi = nines_range(data["value"], marks, focus=data["value"][_common_width(data).to_numpy()])
                marks = _marks_in(marks, lo, hi)
                thr = float(nines(frame["threshold"].mode().iloc[0])) if frame["threshold"].notna().any() else lo
                cmap, cbar, clabel = pass_palette(lo, hi, thr), _colorbar(lo, hi, marks), "cosine"
            elif key == "rel_error":  # smaller is better: −log10 so better is bluer, labelled in the error itself
                data["value"] = -np.log10(np.clip(raw, 1e-9, None))
                lo, hi = nines_range(data["value"], focus=data["value"][_common_width(data).to_numpy()])
                cmap, clabel = _ramp(WORSE_STOPS, 200), "rel. error"
                cbar = _log_ticks(lo, hi, lambda t: f"{10 ** -t:.2g}")
            else:
                data["value"] = raw
                lo, hi = (float(np.nanmin(raw)), float(np.nanmax(raw))) if raw.notna().any() else (0.0, 1.0)
                lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1 else (lo, hi)
                cmap, clabel, cbar = _ramp(WORSE_STOPS, 200), "SQNR (dB)", {}
        data = _plain(data[["x", "y", *vdims]])
        hover = HoverTool(tooltips=[("tensor", "@name"), ("shape", "@shape"), ("bits", "@bits"), ("reason", "@reason"),
                                    (label, fmt_)])
        first = i == 0
        col_w = (150 + 7 * longest) if first else 120
        plots.append(hv.HeatMap(data, kdims=["x", "y"], vdims=vdims).redim.values(y=ys[::-1]).opts(
            cmap=cmap, clim=(lo, hi), colorbar=True, colorbar_position="bottom", colorbar_opts=cbar, clabel=clabel,
            tools=[hover], toolbar=None, default_tools=[], xaxis="top", xlabel="", ylabel="tensor" if first else "",
            yaxis="left" if first else None, height=height, width=col_w, line_color="white", line_width=1,
            fontsize={"labels": "10pt", "ticks": "8pt"},
        ))
    return hv.Layout(plots).cols(len(plots)).opts(shared_axes=False, title=title)


def _log_ticks(lo: float, hi: float, label) -> dict:
    ticks = [float(t) for t in range(int(math.ceil(lo)), int(math.floor(hi)) + 1)] or [round((lo + hi) / 2, 1)]
    return {"ticker": FixedTicker(ticks=ticks), "major_label_overrides": {t: label(t) for t in ticks}}


#: The Δ heatmap's diverging palette: red where B is worse, white at no change, blue where better.
DIFF_STOPS = ("#8b0d1c", "#e07b67", "#f7f7f7", "#6aa6cf", "#16457a")


def diff_heatmap(cells: pd.DataFrame, layout: str, title: str = "", labels: Sequence[str] = ("A", "B")):
    """B − A in nines per tensor on a diverging scale centred on no change, with the Δ written in
    each cell while they fit: blue where B is better, red where worse."""
    _ensure_extension()
    data = cells.copy()
    data["shape"] = data["shape"].astype(str)
    data = _plain(data)
    a, b = labels
    vdims = ["value", "cosine_a", "cosine_b", "bits_a", "bits_b", "name", "shape", "reason_b"]
    m = float(np.nanmax(np.abs(data["value"]))) if len(data) else 1.0
    m = max(m if np.isfinite(m) else 1.0, 0.25)
    ys = [str(y) for y in block_rows(cells)][::-1]
    data["y"] = data["y"].astype(str)
    xs = module_order(data["x"]) if layout == "block" else list(dict.fromkeys(data["x"]))
    hover = HoverTool(tooltips=[("tensor", "@name"), ("shape", "@shape"), (f"cosine {a}", "@cosine_a{0.000000}"),
                                (f"cosine {b}", "@cosine_b{0.000000}"), (f"bits {a} → {b}", "@bits_a → @bits_b"),
                                ("Δ nines", "@value{+0.00}"), (f"reason {b}", "@reason_b")])
    diff_palette = _ramp(DIFF_STOPS, 201)
    hm = hv.HeatMap(data, kdims=["x", "y"], vdims=vdims).redim.values(x=xs, y=ys).opts(
        cmap=diff_palette, clim=(-m, m), colorbar=True, tools=[hover], toolbar="above",
        default_tools=["save", "reset"], clabel=f"Δ nines ({b} − {a}): + better, − worse", title=title, xaxis="top",
        xlabel="module" if layout == "block" else "", ylabel="block" if layout == "block" else "tensor",
        height=_height(len(ys)), width=min(max(420, 70 * len(xs) + 230), 900) if layout == "block" else 560,
        line_color="white", line_width=1, xrotation=35 if sum(map(len, xs)) > 30 else 0,
    )
    if len(data) > LABELS_UP_TO:
        return hm
    text = _plain(data.assign(text=[f"{v:+.1f}" if np.isfinite(v) else "" for v in data["value"]],
                              ink=_ink(data["value"], diff_palette, -m, m)))
    marks = hv.Labels(text, kdims=["x", "y"], vdims=["text", "ink"]).opts(text_font_size="8pt", text_color="ink")
    return (hm * marks).opts(title=title)


#: The size-vs-quality chart's width: beside the compare table, or under it in a narrow window.
SIZE_QUALITY_WIDTH = 460


def size_quality_plot(points: pd.DataFrame, highlight: Sequence[str] = (), title: str = "",
                      width: int = SIZE_QUALITY_WIDTH) -> hv.Overlay:
    """Results of one model: size (MiB) against mean cosine (as nines, labelled in cosine)."""
    _ensure_extension()
    data = _plain(points)
    data["nines"] = [float(np.clip(-np.log10(max(1 - c, 10 ** -MAX_NINES)), 0, MAX_NINES)) for c in data["cosine"]]
    data["min_nines"] = [float(np.clip(-np.log10(max(1 - c, 10 ** -MAX_NINES)), 0, MAX_NINES)) for c in data["min_cosine"]]
    data["chosen"] = data["label"].isin(list(highlight))
    lo = math.floor(min(data["min_nines"].min(), data["nines"].min(), 1.0) if len(data) else 1.0)
    hi = math.ceil(max(data["nines"].max() if len(data) else 3.0, lo + 2))
    ticks = list(range(int(lo), int(hi) + 1))
    yticks = [(t, cosine_label(t)) for t in ticks]
    hover = HoverTool(tooltips=[("result", "@label"), ("size", "@size_mb{0.00} MiB"), ("mean cosine", "@cosine{0.00000}"),
                                ("min cosine", "@min_cosine{0.00000}"), ("ratio", "@ratio{0.00}×")])
    vd = ["nines", "label", "cosine", "min_cosine", "ratio", "chosen", "min_nines"]
    mean_pts = hv.Scatter(data, "size_mb", vd, label="mean cosine").opts(
        size=11, color="#2b6cb0", tools=[hover], line_color="white")
    min_pts = hv.Scatter(data, "size_mb", ["min_nines", "label", "cosine", "min_cosine", "ratio"], label="min cosine").opts(
        size=8, marker="triangle", color="#c05621", tools=[hover])
    ring = hv.Scatter(data[data["chosen"]], "size_mb", vd).opts(size=20, fill_alpha=0, line_color="#111", line_width=2)
    # labels above the points (the min-cosine marks sit below), neighbours in size order on two
    # heights so close results do not overlap
    order = data["size_mb"].rank(method="first").astype(int) if len(data) else data["size_mb"]
    text = (hv.Labels(data[order % 2 == 1], ["size_mb", "nines"], "label").opts(
                text_font_size="9pt", yoffset=0.2, text_color="#333", text_baseline="bottom")
            * hv.Labels(data[order % 2 == 0], ["size_mb", "nines"], "label").opts(
                text_font_size="9pt", yoffset=0.45, text_color="#333", text_baseline="bottom"))
    sizes = data["size_mb"] if len(data) else pd.Series([0.0, 1.0])
    span = max(float(sizes.max() - sizes.min()), float(sizes.max()) * 0.1, 1e-3)
    return (mean_pts * min_pts * ring * text).opts(
        title=title, xlabel="size (MiB)", ylabel="cosine", height=340, width=width,
        yticks=yticks, ylim=(lo - 0.45, hi + 0.75),
        xlim=(float(sizes.min()) - 0.25 * span, float(sizes.max()) + 0.25 * span),  # room for the labels
        legend_position="top", legend_cols=2, toolbar="above", show_grid=True)


FIDELITY_WIDTH = 370


def fidelity_plot(levels: pd.DataFrame, title: str = "") -> hv.Layout:
    """Output cosine (top) and PSNR (bottom) of the quantized network against the noise level, log sigma."""
    _ensure_extension()
    data = _plain(levels)
    data["psnr_text"] = [f"> {PSNR_CAP_DB:.0f} (identical)" if c else f"{p:.1f}"
                         for p, c in zip(data["psnr_db"], data["psnr_capped"])]
    hover = HoverTool(tooltips=[("sigma", "@sigma{0.0000}"), ("output cosine", "@cosine{0.000000}"),
                                ("rel. error", "@rel_error{0.00000}"), ("PSNR (dB)", "@psnr_text"),
                                ("update cosine", "@update_cosine{0.000000}")])
    vd = ["cosine", "rel_error", "psnr_db", "psnr_text", "update_cosine"]
    sig = data["sigma"].astype(float)
    # a log axis one step wider than the levels on each side: the end points (σ = 80) are drawn whole
    xlim = (float(sig.min()) / 2, float(sig.max()) * 2) if len(sig) else (None, None)
    common = dict(logx=True, xlim=xlim, width=FIDELITY_WIDTH, height=190, show_grid=True, toolbar=None,
                  default_tools=[], fontsize={"title": "10pt", "labels": "9pt", "ticks": "8pt"})
    cos = (hv.Curve(data, "sigma", vd).opts(color="#2b6cb0", line_width=2)
           * hv.Scatter(data, "sigma", vd).opts(color="#2b6cb0", size=7, tools=[hover])).opts(
        title=title or "output cosine per noise level", xlabel="", ylabel="output cosine", **common)
    psnr_vd = ["psnr_db", "cosine", "rel_error", "psnr_text", "update_cosine"]
    psnr = (hv.Curve(data, "sigma", psnr_vd).opts(color="#c05621", line_width=2)
            * hv.Scatter(data, "sigma", psnr_vd).opts(color="#c05621", size=7, marker="square", tools=[hover])).opts(
        title="", xlabel="noise level σ (log)", ylabel="PSNR (dB)", **common)
    return (cos + psnr).cols(1).opts(shared_axes=False)
