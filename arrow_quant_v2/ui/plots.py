"""HoloViews plots of per-layer quality (used by the views; no Panel widgets here).

Colour is **nines** = ``-log10(1 - cosine)`` on a fixed range (0.9 … 0.99999), so 0.99 and
0.999 are a whole colour step apart and two models' maps can be read side by side; the
colour bar is labelled in cosine.
"""
from __future__ import annotations

import math
from typing import Sequence

import holoviews as hv
import numpy as np
import pandas as pd
from bokeh.models import FixedTicker, HoverTool

from .quality import MAX_NINES, NINES_RANGE, PSNR_CAP_DB, cosine_label, module_order

CMAP = "RdYlBu"  # red = poor, yellow = fair, blue = near-lossless
DIFF_CMAP = "RdBu"  # red = B worse than A, blue = B better
CELL_PX = 26
LABELS_UP_TO = 400  # write the cosine in each cell up to this many cells

HOVER_FIELDS = [
    ("tensor", "@name"), ("shape", "@shape"), ("bits", "@bits"), ("reason", "@reason"),
    ("cosine", "@cosine{0.000000}"), ("rel. error", "@rel_error{0.00000}"),
]


def _ensure_extension() -> None:
    if hv.Store.current_backend != "bokeh" or "bokeh" not in hv.Store.renderers:
        hv.extension("bokeh", logo=False)


def _colorbar(lo: float, hi: float) -> dict:
    ticks = [float(t) for t in range(int(math.ceil(lo)), int(math.floor(hi)) + 1)]
    return {"ticker": FixedTicker(ticks=ticks),
            "major_label_overrides": {t: cosine_label(t) for t in ticks}}


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
    """Tall enough for readable rows: roomy for a few blocks, denser for hundreds of tensors."""
    px = CELL_PX if n_rows <= 40 else 16 if n_rows <= 150 else 12
    return int(min(max(n_rows * px + 110, 260), 6000))


def quality_heatmap(cells: pd.DataFrame, layout: str, title: str = "") -> hv.Overlay:
    """The per-layer heatmap: block × module (``layout="block"``) or tensor × metric."""
    _ensure_extension()
    vdims = ["value", "cosine", "rel_error", "name", "shape", "bits", "reason"]
    data = cells[["x", "y", *vdims]].copy()
    data["shape"] = data["shape"].astype(str)
    data["reason"] = data["reason"].astype(str)
    data = _plain(data)
    if layout == "block":
        xs = module_order(data["x"])
        ys = [str(y) for y in sorted(data["y"].unique())]
        data["y"] = data["y"].astype(str)
        xlabel, ylabel = "module", "block"
    else:
        xs = list(dict.fromkeys(data["x"]))
        ys = list(dict.fromkeys(data["y"]))
        xlabel, ylabel = "metric", "tensor"
    hover = HoverTool(tooltips=HOVER_FIELDS + ([("metric", "@x")] if layout != "block" else []))
    hm = hv.HeatMap(data, kdims=["x", "y"], vdims=vdims).redim.values(x=xs, y=ys[::-1])
    longest = max((len(str(y)) for y in ys), default=10)
    width = max(420, 80 * len(xs) + 200) if layout == "block" else min(300 + 90 * len(xs) + 6 * longest, 900)
    hm = hm.opts(
        cmap=CMAP, clim=NINES_RANGE, colorbar=True, colorbar_opts=_colorbar(*NINES_RANGE), tools=[hover],
        xlabel=xlabel, ylabel=ylabel, title=title, height=_height(len(ys)), width=min(width, 900),
        clabel="cosine", line_color="white", line_width=1, toolbar="above",
        default_tools=["save", "reset"], xaxis="top", clipping_colors={"NaN": "#dddddd"},
        fontsize={"title": "11pt", "labels": "10pt", "ticks": "9pt"},
    )
    if layout != "block":
        hm = hm.opts(yaxis="left", xrotation=0)
    if len(data) <= LABELS_UP_TO:
        text = data.assign(text=[_cell_text(c) if layout == "block" or x == "cosine" else ""
                                 for c, x in zip(data["cosine"], data["x"])])
        text = _plain(text[text["text"] != ""])
        # white on the darkest colours (deep red, deep blue), near-black elsewhere
        text["ink"] = ["white" if v < 1.6 or v > 4.3 else "#1d1d1d" for v in text["value"]]
        labels = hv.Labels(text, kdims=["x", "y"], vdims=["text", "ink"]).opts(
            text_font_size="8pt", text_color="ink")
        return (hm * labels).opts(title=title)
    return hm


def diff_heatmap(cells: pd.DataFrame, layout: str, title: str = "", labels: Sequence[str] = ("A", "B")) -> hv.HeatMap:
    """B − A in nines per tensor: blue where B is better, red where worse."""
    _ensure_extension()
    data = cells.copy()
    data["shape"] = data["shape"].astype(str)
    data = _plain(data)
    a, b = labels
    vdims = ["value", "cosine_a", "cosine_b", "bits_a", "bits_b", "name", "shape", "reason_b"]
    m = float(np.nanmax(np.abs(data["value"]))) if len(data) else 1.0
    m = max(m if np.isfinite(m) else 1.0, 0.25)
    if layout == "block":
        xs, ys = module_order(data["x"]), [str(y) for y in sorted(data["y"].unique())][::-1]
        data["y"] = data["y"].astype(str)
    else:
        xs, ys = list(dict.fromkeys(data["x"])), list(dict.fromkeys(data["y"]))[::-1]
    hover = HoverTool(tooltips=[("tensor", "@name"), ("shape", "@shape"), (f"cosine {a}", "@cosine_a{0.000000}"),
                                (f"cosine {b}", "@cosine_b{0.000000}"), (f"bits {a} → {b}", "@bits_a → @bits_b"),
                                ("Δ nines", "@value{+0.00}"), (f"reason {b}", "@reason_b")])
    return hv.HeatMap(data, kdims=["x", "y"], vdims=vdims).redim.values(x=xs, y=ys).opts(
        cmap=DIFF_CMAP, clim=(-m, m), colorbar=True, tools=[hover], toolbar="above", default_tools=["save", "reset"],
        clabel=f"Δ nines ({b} − {a})", title=title, xaxis="top",
        xlabel="module" if layout == "block" else "", ylabel="block" if layout == "block" else "tensor",
        height=_height(len(ys)), width=min(max(420, 80 * len(xs) + 200), 900) if layout == "block" else 560,
        line_color="white", line_width=1,
    )


def size_quality_plot(points: pd.DataFrame, highlight: Sequence[str] = (), title: str = "") -> hv.Overlay:
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
    text = hv.Labels(data, ["size_mb", "nines"], "label").opts(text_font_size="9pt", yoffset=0.18, text_color="#333")
    return (mean_pts * min_pts * ring * text).opts(
        hv.opts.Scatter(yticks=yticks, ylim=(lo - 0.2, hi + 0.3)),
    ).opts(title=title, xlabel="size (MiB)", ylabel="cosine", height=320, responsive=True, min_width=360,
           legend_position="bottom_right", toolbar="above", show_grid=True)


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
    common = dict(logx=True, width=FIDELITY_WIDTH, height=190, show_grid=True, toolbar=None,
                  default_tools=[], fontsize={"title": "10pt", "labels": "9pt", "ticks": "8pt"})
    cos = (hv.Curve(data, "sigma", vd).opts(color="#2b6cb0", line_width=2)
           * hv.Scatter(data, "sigma", vd).opts(color="#2b6cb0", size=7, tools=[hover])).opts(
        title=title or "output cosine per noise level", xlabel="", ylabel="output cosine", **common)
    psnr_vd = ["psnr_db", "cosine", "rel_error", "psnr_text", "update_cosine"]
    psnr = (hv.Curve(data, "sigma", psnr_vd).opts(color="#c05621", line_width=2)
            * hv.Scatter(data, "sigma", psnr_vd).opts(color="#c05621", size=7, marker="square", tools=[hover])).opts(
        title="", xlabel="noise level σ (log)", ylabel="PSNR (dB)", **common)
    return (cos + psnr).cols(1).opts(shared_axes=False)
