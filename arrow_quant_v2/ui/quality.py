"""Per-layer quality as tables: the data behind the heatmaps (no Panel, no HoloViews).

* :func:`place` reads ``(block, module)`` from a tensor name of a transformer
  (Dream/Qwen2/LLaMA ``model.layers.3.mlp.down_proj.weight``, BERT
  ``encoder.layer.3.attention.self.query.weight``, GPT-2 ``h.3.attn.c_attn.weight``), a DiT
  (``blocks.3.attn.qkv.weight``, ``blocks.3.adaLN_modulation.1.weight``) or a U-Net (ADM/LDM
  ``input_blocks.4.1.qkv.weight`` → row ``in 4``, ``middle_block.0.in_layers.2`` → ``mid 0``,
  ``output_blocks.2.0.emb_layers.1`` → ``out 2``; diffusers ``down_blocks.1.resnets.0.conv1``
  → ``down 1.0``), with modules renamed to a common short vocabulary (q, k, v, qkv, o, gate,
  up, down, in_layers, ...); a name that fits none says why.
* :func:`layer_frame` turns a validation report's ``per_layer`` into one row per tensor with
  the colour value: **nines** = ``-log10(1 - cosine)``, so 0.9 → 1, 0.99 → 2, 0.999 → 3.
* :func:`heatmap_frame` lays it out block × module (transformers) or layer × metric (others).
* :class:`QualityReport` holds one result's report and the derived tables.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import pandas as pd
import param

#: Highest nines shown (a cosine of exactly 1 is clipped here rather than infinite).
MAX_NINES = 7.0

_BLOCK_RE = re.compile(
    r"(?:^|\.)(?:layers|layer|blocks|block|h|transformer_blocks|single_transformer_blocks|encoder_layers|decoder_layers)"
    r"\.(\d+)\.(.+)$"
)
#: U-Nets (ADM/LDM ``input_blocks.N.M.…``; diffusers ``down_blocks.N.resnets.M.…``): stage, then
#: the block's place in it. Rows go down the encoder, through the middle, up the decoder.
_UNET_RE = re.compile(r"(?:^|\.)(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)"
                      r"(?:\.(\d+))?\.(.+)$")
_UNET_STAGE = {"input_blocks": ("in", 0), "down_blocks": ("down", 0), "middle_block": ("mid", 1),
               "mid_block": ("mid", 1), "output_blocks": ("out", 2), "up_blocks": ("up", 2)}
#: diffusers: ``resnets.M`` and ``attentions.M`` run in pairs, so they share row ``N.M``.
_DIFFUSERS_PART_RE = re.compile(r"^(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_SUFFIX_RE = re.compile(r"\.(weight|bias|scale|qweight)$")
#: Why a name got no cell in the block × module grid.
NO_BLOCK = ("no numbered block in the name (layers.N, blocks.N, h.N, input_blocks.N, down_blocks.N …): "
            "embeddings, heads, time/label embedding and in/out convs sit outside the blocks")


class Placement(NamedTuple):
    """Where a tensor sits in the block × module grid, or why it sits nowhere."""

    block: Optional[Union[int, str]]  # a transformer's block index, or a U-Net row such as "in 4" / "mid" / "up 1.2"
    order: Optional[Tuple[int, ...]]  # sorts the rows: encoder, middle, decoder
    module: Optional[str]
    why: str = ""  # empty when placed

#: Module path (or its tail) -> short canonical name. Longest/most specific first.
_MODULE_ALIASES: List[Tuple[str, str]] = [
    ("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
    ("attention.output.dense", "o"), ("intermediate.dense", "up"), ("output.dense", "down"),
    ("attn.c_attn", "qkv"), ("attn.c_proj", "o"), ("mlp.c_fc", "up"), ("mlp.c_proj", "down"),
    ("attn.to_out.0", "o"), ("attn.to_q", "q"), ("attn.to_k", "k"), ("attn.to_v", "v"),
    ("attn1.to_out.0", "o"), ("attn1.to_q", "q"), ("attn1.to_k", "k"), ("attn1.to_v", "v"),
    ("attn2.to_out.0", "x.o"), ("attn2.to_q", "x.q"), ("attn2.to_k", "x.k"), ("attn2.to_v", "x.v"),
    ("ff.net.0.proj", "up"), ("ff.net.2", "down"), ("mlp.fc1", "up"), ("mlp.fc2", "down"),
    ("attn.proj", "o"), ("attn.qkv", "qkv"), ("adaLN_modulation.1", "adaLN"),
]
_LEAF_ALIASES: Dict[str, str] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o", "qkv_proj": "qkv", "Wqkv": "qkv",
    "query": "q", "key": "k", "value": "v", "wq": "q", "wk": "k", "wv": "v", "wo": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
    "fc1": "up", "fc2": "down", "c_attn": "qkv", "c_fc": "up", "to_q": "q", "to_k": "k", "to_v": "v",
    "qkv": "qkv", "gate_up_proj": "gate_up",
}
#: Column order of the block × module heatmap; other modules follow alphabetically.
MODULE_ORDER = ("q", "k", "v", "qkv", "o", "x.q", "x.k", "x.v", "x.o", "gate", "gate_up", "up", "down", "adaLN")
#: Columns of the layer × metric heatmap: (column label, report key, nines of the value).
METRICS: Tuple[Tuple[str, str], ...] = (("cosine", "cosine"), ("rel. error", "rel_error"), ("SQNR", "sqnr_db"))


def parse_block_module(name: str) -> Tuple[Optional[Union[int, str]], Optional[str]]:
    """``(block, module)`` of a tensor name, or ``(None, None)`` outside blocks (see :func:`place`).

    >>> parse_block_module("model.layers.3.mlp.down_proj.weight")
    (3, 'down')
    >>> parse_block_module("encoder.layer.5.attention.self.query.weight")
    (5, 'q')
    >>> parse_block_module("network.input_blocks.4.1.qkv.weight")
    ('in 4', 'qkv')
    >>> parse_block_module("model.embed_tokens.weight")
    (None, None)
    """
    p = place(name)
    return p.block, p.module


def place(name: str) -> Placement:
    """The tensor's block and module in a transformer, DiT or U-Net, or why it fits none."""
    m = _UNET_RE.search(name)
    if m:
        return _place_unet(m.group(1), m.group(2), _SUFFIX_RE.sub("", m.group(3)))
    m = _BLOCK_RE.search(name)
    if not m:
        return Placement(None, None, None, NO_BLOCK)
    block = int(m.group(1))
    return Placement(block, (0, block), _module_name(_SUFFIX_RE.sub("", m.group(2))))


def _module_name(rest: str) -> str:
    """A block's module path in the common short vocabulary (q, k, v, o, gate, up, down, ...)."""
    for path, short in _MODULE_ALIASES:
        if rest == path or rest.endswith("." + path):
            return short
    leaf = rest.rsplit(".", 1)[-1]
    if leaf in _LEAF_ALIASES:
        return _LEAF_ALIASES[leaf]
    for prefix in ("self_attn.", "attention.", "attn.", "mlp.", "feed_forward.", "ffn."):
        if rest.startswith(prefix) and rest[len(prefix):]:
            return rest[len(prefix):]
    return rest


def _place_unet(stage: str, index: Optional[str], rest: str) -> Placement:
    short, rank = _UNET_STAGE[stage]
    n = int(index) if index is not None else 0
    part = _DIFFUSERS_PART_RE.match(rest)
    if part:  # diffusers: down_blocks.N.resnets.M.conv1 -> row "down N.M", module conv1
        kind, m, inner = part.group(1), int(part.group(2)), part.group(3)
        if kind in ("downsamplers", "upsamplers"):
            return Placement(f"{short} {n}" if index else short, (rank, n, 99), "resample")
        row = f"{short} {n}.{m}" if index is not None else f"{short} {m}"
        return Placement(row, (rank, n, m), _unet_module(inner))
    if stage == "middle_block":  # ADM middle_block.M.<module>: resnet, attention, resnet, a row each
        return Placement(f"{short} {n}", (rank, n, 0), _unet_module(rest))
    sub = re.match(r"^\d+(?:\.(.+))?$", rest)  # ADM input_blocks.N.M.<module>: M orders resnet/attention
    if not sub:
        return Placement(None, None, None, f"{stage}.{n}: expected a numbered layer after the block, got {rest!r}")
    return Placement(f"{short} {n}", (rank, n, 0), _unet_module(sub.group(1)) if sub.group(1) else "conv")


def _unet_module(path: str) -> str:
    """``in_layers.2`` -> ``in_layers``; ``transformer_blocks.0.attn1.to_q`` -> ``q``; ``op`` -> ``resample``."""
    path = re.sub(r"^transformer_blocks\.\d+\.", "", path)
    short = _module_name(path)
    if short != path:
        return short
    head = re.sub(r"\.\d+$", "", path)  # in_layers.2 -> in_layers
    return "resample" if head in ("op", "conv") else head  # ADM's Downsample.op / Upsample.conv

def nines(cosine) -> np.ndarray:
    """``-log10(1 - cosine)``, clipped to [0, MAX_NINES]: 0.9 → 1, 0.99 → 2, 0.999 → 3."""
    c = np.asarray(cosine, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -np.log10(np.clip(1.0 - c, 10.0 ** -MAX_NINES, None))
    return np.clip(out, 0.0, MAX_NINES)


def cosine_label(n: float) -> str:
    """The cosine a nines value stands for: 2 → '0.99', 2.5 → '0.9968'."""
    if n is None or not np.isfinite(n):
        return ""
    if float(n).is_integer():
        return "0." + "9" * int(n) if n > 0 else "0"
    return f"{1 - 10 ** -n:.{int(n) + 2}f}"


def _fmt_shape(shape) -> str:
    return "×".join(str(int(s)) for s in shape) if shape is not None and len(shape) else "scalar"


def layer_frame(per_layer: Dict[str, dict]) -> pd.DataFrame:
    """One row per quantized tensor: name, block, module, cosine, nines, rel_error, bits, reason, ..."""
    rows = []
    for order, (name, p) in enumerate(per_layer.items()):
        where = place(name)
        cos = p.get("cosine", float("nan"))
        rows.append({
            "name": name, "order": order, "block": where.block, "block_order": where.order, "module": where.module,
            "placed_why": where.why,
            "cosine": cos, "nines": float(nines(cos)) if cos == cos else float("nan"),
            "rel_error": p.get("rel_error", float("nan")), "sqnr_db": p.get("sqnr_db", float("nan")),
            "bits": int(p.get("bits", 0) or 0), "encoding": p.get("encoding", ""),
            "shape": _fmt_shape(p.get("shape")), "numel": int(p.get("numel", 0) or 0),
            "bits_per_weight": p.get("bits_per_weight", float("nan")), "reason": p.get("reason", ""),
            "threshold": p.get("threshold", float("nan")), "passed": bool(p.get("passed", True)),
            "fallback": "fallback" in (p.get("reason") or ""),
        })
    cols = ["name", "order", "block", "block_order", "module", "placed_why", "cosine", "nines", "rel_error", "sqnr_db", "bits", "encoding",
            "shape", "numel", "bits_per_weight", "reason", "threshold", "passed", "fallback"]
    frame = pd.DataFrame(rows, columns=cols)
    # block indices stay ints (a column with None would make them floats: "3.0"); U-Net rows are labels
    frame["block"] = pd.Series([r["block"] for r in rows], dtype=object)
    return frame


def fits_block_grid(frame: pd.DataFrame) -> bool:
    """Block × module reads well: most quantized tensors sit in ≥ 2 blocks of a few module kinds
    (transformers, DiTs, U-Nets)."""
    if frame.empty:
        return False
    inside = frame.dropna(subset=["block"])
    return (len(inside) >= 0.6 * len(frame) and inside["block"].nunique() >= 2
            and inside["module"].nunique() <= 24)


def module_order(modules) -> List[str]:
    mods = list(dict.fromkeys(modules))
    known = [m for m in MODULE_ORDER if m in mods]
    return known + sorted(m for m in mods if m not in MODULE_ORDER)


def heatmap_frame(frame: pd.DataFrame, layout: Optional[str] = None) -> Tuple[pd.DataFrame, str]:
    """``(cells, layout)``: the heatmap's cells with ``x``, ``y`` and ``value`` (nines) columns.

    ``layout`` is ``"block"`` (x = module, y = block index; tensors outside blocks are left
    out: see :func:`outside_blocks`) or ``"metric"`` (x = metric, y = tensor name; value is the
    metric on the cosine's nines scale, since 1 − cos ≈ err²/2 ≈ 10^(−SQNR/10)/2 for small errors:
    cosine ``-log10(1-cos)``, rel. error ``-log10(err²/2)``, SQNR ``dB/10 + log10 2``).
    Chosen automatically when None.
    """
    layout = layout or ("block" if fits_block_grid(frame) else "metric")
    if layout == "block":
        cells = frame.dropna(subset=["block"]).copy()
        cells["x"] = cells["module"]
        cells["y"] = cells["block"]
        cells["metric"] = "cosine"
        cells["value"] = cells["nines"]
        rank = {m: i for i, m in enumerate(module_order(cells["x"]))}
        cells["x_rank"] = cells["x"].map(rank)
        # a block with two tensors of the same module kind (e.g. MoE experts): keep the worst
        cells = cells.sort_values("cosine").drop_duplicates(["x", "y"])
        cells = cells.iloc[sorted(range(len(cells)), key=lambda i: (cells["block_order"].iloc[i], cells["x_rank"].iloc[i]))]
        return cells.drop(columns="x_rank").reset_index(drop=True), layout
    parts = []
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: natural_key(frame["name"].iloc[i]))]
    for label, key in METRICS:
        part = frame.copy()
        part["x"] = label
        part["y"] = part["name"]
        part["metric"] = label
        v = part[key].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            if key == "cosine":
                part["value"] = part["nines"]
            elif key == "rel_error":  # on the cosine scale: 1 - cos ≈ err² / 2
                part["value"] = np.clip(-np.log10(np.clip(v, 1e-12, None) ** 2 / 2), 0, MAX_NINES)
            else:  # SQNR: noise/signal = 10^(-dB/10) ≈ err², so the same scale is dB/10 + log10(2)
                part["value"] = np.clip(v / 10.0 + math.log10(2), 0, MAX_NINES)
        parts.append(part)
    cells = pd.concat(parts, ignore_index=True) if parts else frame.assign(x=[], y=[], metric=[], value=[])
    return cells, layout


def natural_key(name: str):
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def outside_blocks(frame: pd.DataFrame) -> pd.DataFrame:
    """Quantized tensors outside the numbered blocks (embeddings, heads, time embedding...)."""
    return frame[frame["block"].isna()]


def block_rows(cells: pd.DataFrame) -> List:
    """The heatmap's row labels in model order (blocks: encoder, middle, decoder; tensors: by name)."""
    return list(dict.fromkeys(cells["y"]))


def page_of(cells: pd.DataFrame, page: int, rows_per_page: int) -> Tuple[pd.DataFrame, int]:
    """``(cells of page ``page`` (0-based), number of pages)``: a long model is read a page of rows at a time."""
    rows = block_rows(cells)
    pages = max(1, math.ceil(len(rows) / rows_per_page))
    page = min(max(page, 0), pages - 1)
    keep = set(rows[page * rows_per_page:(page + 1) * rows_per_page])
    return cells[cells["y"].isin(keep)], pages


def output_error_change(a: dict, b: dict) -> Optional[str]:
    """How B's network output error (1 − output cosine, mean and worst over the noise levels) compares with
    A's, from two :meth:`Job.summary` dicts: ``"output error of B: mean 0.05×, worst 0.04× A's"``; None when
    either lacks end-to-end figures."""
    ratios = []
    for key, word in (("output_cosine", "mean"), ("output_worst", "worst")):
        ea, eb = (None if s.get(key) is None else 1.0 - s[key] for s in (a, b))
        if ea is None or eb is None:
            return None
        ratios.append(f"{word} {eb / ea:.3g}×" if ea > 0 else f"{word} {eb:.3g} (A: 0)")
    return "output error (1 − cosine) of B: " + ", ".join(ratios) + " A's"


def diff_frame(a: pd.DataFrame, b: pd.DataFrame, layout: Optional[str] = None) -> Tuple[pd.DataFrame, str]:
    """Cells of B minus A in nines, for tensors quantized in both (same model, two configs)."""
    m = a.merge(b, on="name", suffixes=("_a", "_b"))
    base = pd.DataFrame({
        "name": m["name"], "order": m["order_a"], "block": m["block_a"], "block_order": m["block_order_a"],
        "module": m["module_a"],
        "cosine_a": m["cosine_a"], "cosine_b": m["cosine_b"], "bits_a": m["bits_a"], "bits_b": m["bits_b"],
        "reason_a": m["reason_a"], "reason_b": m["reason_b"], "shape": m["shape_a"],
        "delta": m["nines_b"] - m["nines_a"], "cosine": m["cosine_b"], "nines": m["nines_b"] - m["nines_a"],
        "rel_error": m["rel_error_b"], "sqnr_db": m["sqnr_db_b"],
    })
    layout = layout or ("block" if fits_block_grid(a) else "metric")
    if layout == "block":
        cells = base.dropna(subset=["block"]).copy()
        cells["x"] = cells["module"]
        cells["y"] = cells["block"]
    else:
        cells = base.copy()
        cells["x"] = "Δ cosine"
        cells["y"] = cells["name"]
    cells["value"] = cells["delta"]
    cells = cells.sort_values("order")
    if layout == "block":  # rows in model order: encoder, middle, decoder
        cells = cells.iloc[sorted(range(len(cells)), key=lambda i: cells["block_order"].iloc[i])]
    return cells.reset_index(drop=True), layout


def fallbacks(frame: pd.DataFrame, result: Optional[dict] = None) -> pd.DataFrame:
    """Tensors that fell back to more bits, with why (from the result, else from the stored reasons)."""
    rows = []
    for fb in (result or {}).get("fallbacks") or []:
        rows.append({"name": fb.get("tensor"), "from": f"int{fb.get('from_bits')}",
                     "to": f"int{fb.get('to_bits')}" if fb.get("to_bits") else "lossless",
                     "cosine before": fb.get("cosine"), "why": ""})
    reasons = dict(zip(frame["name"], frame["reason"])) if not frame.empty else {}
    if rows:
        for r in rows:
            r["why"] = reasons.get(r["name"], "")
    else:
        for _, r in frame[frame["fallback"]].iterrows():
            rows.append({"name": r["name"], "from": "", "to": f"int{r['bits']}", "cosine before": None, "why": r["reason"]})
    return pd.DataFrame(rows, columns=["name", "from", "to", "cosine before", "why"])


#: PSNR of a level whose outputs are identical is infinite; the chart shows it at this many dB.
PSNR_CAP_DB = 120.0


def fidelity_frame(e2e: Optional[dict]) -> pd.DataFrame:
    """One row per noise level of a report's ``end_to_end`` part: sigma, cosine, rel_error,
    psnr_db (infinite clipped to :data:`PSNR_CAP_DB`, ``psnr_capped`` says which), update_cosine."""
    cols = ["sigma", "cosine", "rel_error", "psnr_db", "psnr_capped", "update_cosine"]
    if not e2e or not e2e.get("available"):
        return pd.DataFrame(columns=cols)
    rows = []
    for lv in e2e.get("levels") or []:
        psnr = float(lv.get("psnr_db", float("nan")))
        rows.append({"sigma": float(lv["sigma"]), "cosine": float(lv.get("cosine", float("nan"))),
                     "rel_error": float(lv.get("rel_error", float("nan"))),
                     "psnr_db": min(psnr, PSNR_CAP_DB) if psnr == psnr else psnr, "psnr_capped": psnr > PSNR_CAP_DB,
                     "update_cosine": float(lv.get("update_cosine", float("nan")))})
    frame = pd.DataFrame(rows, columns=cols)
    frame = frame[frame["sigma"] > 0]  # a log axis
    return frame.sort_values("sigma").reset_index(drop=True)


def store_sensitivity(path) -> Optional[dict]:
    """The manifest's ``sensitivity`` part (a store quantized with ``calibration="graph"``), or None."""
    from ..storecheck import read_manifest

    entry = read_manifest(Path(path)).get("sensitivity")
    return entry if isinstance(entry, dict) else None


def sensitivity_per_layer(entry: Optional[dict], per_layer: Dict[str, dict]) -> Dict[str, dict]:
    """A store's output sensitivity in the shape of a report's ``per_layer``, so the weight heatmap's code
    draws it: each calibrated layer's output cosine on the calibration inputs as its ``cosine`` (shape and
    size from the weights' report); no pass threshold. Empty for a store without one."""
    out = {}
    for name, s in ((entry or {}).get("tensors") or {}).items():
        cos, plain = s.get("output_cosine"), s.get("plain_output_cosine")
        if not isinstance(cos, (int, float)):
            continue
        w = per_layer.get(name, {})
        out[name] = dict(cosine=float(cos), bits=s.get("bits", w.get("bits", 0)), shape=w.get("shape"),
                         numel=w.get("numel", 0), threshold=float("nan"),
                         rel_error=math.sqrt(s["output_rel_error2"]) if isinstance(s.get("output_rel_error2"), (int, float))
                         else float("nan"),
                         reason=f"output cos with plain rounding {plain:.6f}" if isinstance(plain, (int, float)) else "")
    return out


def report_from_store(path) -> dict:
    """A report in validate_quality's shape from the figures a store recorded while writing
    (no re-reading of the source): used for stores found on disk."""
    from ..config import DEFAULT_MIN_ACCURACY
    from ..store import load_quantized

    store = load_quantized(path)
    per_layer = {}
    for e in store.tensors.values():
        if not e.quantized:
            continue
        need = DEFAULT_MIN_ACCURACY.get(e.bits, 0.0)
        per_layer[e.name] = dict(cosine=e.cosine, rel_error=e.rel_error, sqnr_db=e.sqnr_db, bits=e.bits,
                                 encoding=e.encoding, group_size=e.group_size, shape=list(e.shape), numel=e.numel,
                                 bits_per_weight=e.bits_per_weight, reason=e.reason, threshold=need,
                                 passed=e.cosine >= need)
    params = sum(p["numel"] for p in per_layer.values())
    cos = sum(p["numel"] * p["cosine"] for p in per_layer.values()) / params if params else 1.0
    totals = store.manifest.get("totals", {})
    worst = sorted(per_layer, key=lambda n: per_layer[n]["cosine"])[:10]
    return {
        "cosine_similarity": cos,
        "compression_ratio": totals.get("compression_ratio") if isinstance(totals.get("compression_ratio"), (int, float))
        else None,
        "per_layer_accuracy": {n: p["cosine"] for n, p in per_layer.items()},
        "passed": all(p["passed"] for p in per_layer.values()),
        "min_cosine": min((p["cosine"] for p in per_layer.values()), default=1.0),
        "worst_layers": [(n, per_layer[n]["cosine"]) for n in worst],
        "per_layer": per_layer,
        "model_size_mb": store.weight_bytes / 2**20,
        "bits_per_weight": totals.get("bits_per_weight"),
        "recorded": True,
    }


class QualityReport(param.Parameterized):
    """One result's per-layer quality: the report plus the tables the views draw."""

    title = param.String(default="")
    report = param.Dict(default={})
    result = param.Dict(default={}, allow_None=True)
    layout = param.Selector(default=None, objects=[None, "block", "metric"], allow_None=True,
                            doc="Heatmap layout; None chooses block × module for transformers.")
    worst_count = param.Integer(default=10, bounds=(1, 100))
    sensitivity = param.Dict(default=None, allow_None=True,
                             doc="The store's output sensitivity (manifest 'sensitivity', calibrated stores).")

    @property
    def frame(self) -> pd.DataFrame:
        key = id(self.report)
        if getattr(self, "_frame_key", None) != key:
            self._frame = layer_frame((self.report or {}).get("per_layer") or {})
            self._frame_key = key
        return self._frame

    def cells(self) -> Tuple[pd.DataFrame, str]:
        """The heatmap's cells and the layout used (``"block"`` × module or ``"metric"``)."""
        return heatmap_frame(self.frame, self.layout)

    def sensitivity_cells(self) -> Optional[Tuple[pd.DataFrame, str]]:
        """The output-sensitivity heatmap's cells, in the weight heatmap's layout; None without a sensitivity."""
        per_layer = sensitivity_per_layer(self.sensitivity, (self.report or {}).get("per_layer") or {})
        return heatmap_frame(layer_frame(per_layer), self.cells()[1]) if per_layer else None

    def worst(self) -> pd.DataFrame:
        """The ``worst_count`` tensors with the lowest cosine."""
        cols = ["name", "cosine", "rel_error", "bits", "shape", "reason"]
        return self.frame.nsmallest(self.worst_count, "cosine")[cols].reset_index(drop=True)

    def fallbacks(self) -> pd.DataFrame:
        """The tensors that were re-quantized wider because they missed ``min_accuracy``."""
        return fallbacks(self.frame, self.result)

    def outside_blocks(self) -> pd.DataFrame:
        """The quantized tensors that belong to no transformer block (embeddings, heads, ...)."""
        cols = ["name", "cosine", "rel_error", "bits", "shape", "placed_why"]
        return outside_blocks(self.frame)[cols].rename(columns={"placed_why": "why not in a block"}).reset_index(drop=True)

    @property
    def end_to_end(self) -> dict:
        """The report's end-to-end part (``{"available": False, "reason": ...}`` when it has none)."""
        e2e = (self.report or {}).get("end_to_end")
        if e2e:
            return e2e
        why = ("figures recorded while writing: the network was not run" if (self.report or {}).get("recorded")
               else "no end-to-end figures in this report")
        return {"available": False, "reason": why}

    def fidelity(self) -> pd.DataFrame:
        """The per-noise-level output fidelity as a table (empty when not available)."""
        return fidelity_frame(self.end_to_end)

    def bits_table(self) -> pd.DataFrame:
        """Tensors and parameters per bit width (quantized tensors only)."""
        f = self.frame
        if f.empty:
            return pd.DataFrame(columns=["bits", "tensors", "params", "mean cosine"])
        g = f.groupby("bits")
        out = pd.DataFrame({"tensors": g.size(), "params": g["numel"].sum(),
                            "mean cosine": g.apply(lambda d: np.average(d["cosine"], weights=d["numel"].clip(lower=1)),
                                                   include_groups=False)})
        out.index = [f"int{b}" for b in out.index]
        return out.reset_index(names="bits")
