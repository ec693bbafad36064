"""Size budgets: give bits where they buy the most quality (``target_model_size_mb``).

What is minimised
    The parameter-weighted squared relative Frobenius error of the quantized tensors,
    ``sum_i n_i * relF_i**2`` (``relF = ||W - Q(W)|| / ||W||``; ``n_i`` elements of tensor i).
    ``relF**2`` of a layer is the relative noise power it adds to its output for isotropic
    inputs (``E||dW x||**2 / E||W x||**2``), it is scale-free (a layer followed by a norm does
    not count more because its weights are large) and, weighted by ``n_i``, it is the measure
    whose model mean the quantize result reports, so "lower objective" means "lower reported
    error". Since a tensor's bytes also grow with ``n_i``, the marginal value of a step
    (error saved per byte) does not favour big tensors for being big.

How it is measured (cheaply)
    Each budgeted tensor is read on a deterministic sample of rows (:data:`SAMPLE_BLOCKS`
    evenly spaced blocks totalling about :data:`SAMPLE_ELEMENTS` elements; small tensors
    whole) and quantized at every candidate width (2, 3, 4, 5, 6, 8, each with the encoding
    and group ``policy.at_width`` gives it, the engine's chain judged by ``policy.accepts``: under ``target_runtime="gguf"`` the ggml types,
    and the finer steps ``policy.steps`` adds, IQ4_XS between int3 and int4);
    ``relF**2`` and the cosine are read from the encoding's statistics. Blob bytes are exact: ``encoding.nbytes`` over the store rows the engine
    will write (``layout.chunk_ranges``). The store is zstd-compressed Parquet, so the
    sample blobs are compressed with the same codec and the measured ratio scales the exact
    blob bytes. Lossless storage (the source bytes) is the top candidate of every tensor.

Overhead model
    Everything else a weight file holds - the per-row metadata columns, page headers, the
    per-row-group footer entries, one footer and magic per shard - is measured, not
    guessed: :func:`store_overhead` writes the planned rows through the real
    :class:`~arrow_quant_v2.store.StoreWriter` into a temporary folder with stand-in
    blobs of the exact sizes (same names, reasons, chunking and shard boundaries; each
    compresses to about its estimate, capped at 64 KiB) and subtracts the compressed size
    of the stand-ins. Sampled compressibility is modelled as ``a * n + b`` per blob field
    (``b``, the codec's fixed cost, from compressing the sample's halves apart), so small
    samples do not overcharge big blobs. The overhead is re-measured after allocating (it
    moves a little with the reasons and shard cuts) until it settles; 2-5 rounds of about
    0.3 s for the terrain U-Net's 514 rows.

Allocation
    Per tensor the candidates (bytes, weighted error) are reduced to their lower convex
    hull; steps along all hulls are taken greedily by error saved per byte while they fit
    (a step that does not fit ends that tensor's climb; cheaper steps of other tensors are
    still taken). For convex per-tensor curves this is the Lagrangian optimum up to the one
    step that straddles the budget. The slope of the first step that did not fit is the
    budget's "price" (relF**2 per MiB) and each tensor's reason says what its last step bought.

Rules that still hold
    ``plan.Planner.plan`` decides first: lossless tensors and ``bit_rules`` are fixed
    (their bytes count); protected tensors (time conditioning, embeddings/heads,
    ``sensitive_layers``) never go below ``sensitive_bits``; ordinary ones start at int2.

With a graph (``calibration="graph"``)
    The calibration's ``H = X^T X`` of each layer's inputs turns every candidate's error into
    the layer's output sensitivity, ``tr(dW H dW^T) / tr(W H W^T)`` on the sampled rows
    (:mod:`arrow_quant_v2.sensitivity`): the relF**2 of the layer's output on the model's own
    inputs across the noise levels. It replaces relF**2 in the curves, and since independent
    layer errors add up at the network output whatever a layer's size, every layer counts the
    same: the objective is the layers' mean output sensitivity. Each layer's curve is scaled by
    its downstream gain when the calibration measured one (``downstream_gain=True``; the network output's error per unit
    of the layer's own, relative to the median layer's: ``sensitivity.downstream_gains``), so the
    objective is what the network output feels (the boundary layers' name-list floors stay under
    it unless ``protect_embeddings=False``: see ``plan.BOUNDARY_PREFIXES``). Widths are judged by the layer
    output's cosine (``policy.measure_for``), scaled the same way, as the engine judges them.
    Layers the graph does not calibrate keep their relF**2, with the same per-layer weight.

The per-layer accuracy fallback
    Each width is judged as the engine will judge it (:mod:`arrow_quant_v2.policy`): its
    candidates in the engine's order (the width's encoding, then the same-width alternate),
    the first accepted one kept. A width none of whose candidates reaches ``min_accuracy``,
    or clears it by less than ``policy.SAMPLE_MARGIN`` standard errors of the sample estimate
    (row blocks as sampling units),
    is dropped before allocating, because the engine would re-quantize
    it wider anyway; so the fallback is already paid for in the plan and the smallest
    reachable size honours ``min_accuracy``. Near the threshold the estimate can still be
    wrong: the engine then falls back as always and the size can exceed the target; the
    quantize result's ``budget`` entry reports the measured size, the fallbacks and by how
    much the target was missed.
"""
from __future__ import annotations

import functools
import heapq
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from . import encodings, policy, sensitivity
from .config import BIT_WIDTHS, DiffusionQuantConfig
from .errors import ConfigurationError
from .layout import chunk_ranges
from .metrics import figures
from .plan import Planner, TensorPlan
from .policy import LOSSLESS, plan_label
from .source import DTYPES, ModelSource, TensorInfo, open_model
from .store import RAW, ChunkRecord, StoreWriter

#: About this many elements of each tensor are quantized per candidate width.
SAMPLE_ELEMENTS = 1 << 16
#: The sample is (up to) this many evenly spaced blocks of consecutive rows.
SAMPLE_BLOCKS = 32
#: Candidate code widths of budgeted tensors (lossless is always the top candidate).
WIDTHS = BIT_WIDTHS
#: The codec of the store's Parquet files (``store.StoreWriter``); used to measure compressibility.
CODEC = "zstd"
MIB = 2 ** 20
#: A budget counts as met up to this fraction over the target (docs/configuration.md states it):
#: the sampled estimate cannot promise the last bytes of Parquet pages.
MET_TOLERANCE = 0.01


@dataclass
class Option:
    """One way to store a tensor."""

    bits: int              # 0 = lossless
    encoding: str
    blob_bytes: int        # exact bytes of its blobs (encoding.nbytes over the store rows)
    disk_bytes: float      # estimated bytes of those blobs in the zstd Parquet file
    rel_error2: float      # relF**2 measured on the sample (0 for lossless)
    cosine: float
    #: per blob field: (share of the blob bytes, zstd bytes per byte, zstd fixed bytes per store row)
    fields: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)
    group: int = 0         # the encoding's group size (0 for lossless)
    #: with a graph: the layer's output sensitivity on the calibration inputs (``sensitivity``), else None
    sensitivity: Optional[float] = None
    output_cosine: Optional[float] = None

    @property
    def error(self) -> float:
        """What the allocator minimises for this option: the output sensitivity when measured, else relF**2."""
        return self.rel_error2 if self.sensitivity is None else self.sensitivity

    @property
    def label(self) -> str:
        return "lossless" if self.bits == LOSSLESS else f"int{self.bits}"


@dataclass
class TensorBudget:
    """A tensor's candidates and what the allocator picked."""

    name: str
    numel: int
    role: str                  # lossless / rule / protected / ordinary (from Planner.plan)
    base: TensorPlan           # Planner.plan's decision (width floor for protected tensors)
    options: List[Option]      # allowed, sorted by disk bytes
    sampled: float             # fraction of the tensor's rows that were measured
    excluded: List[Tuple[int, float]] = field(default_factory=list)  # (bits, sampled cosine) dropped for min_accuracy
    chosen: int = 0            # index into options
    slope: float = 0.0         # objective per MiB bought by the step into the chosen option
    next_slope: float = 0.0    # ... what the next step would have bought (0 = none)
    #: how much this tensor's option.error counts in the objective (set by allocate): its share of
    #: the budgeted parameters for relF**2, 1 / layers for output sensitivity (``sensitivity.share``)
    share: float = 0.0
    #: the layer's downstream gain (relative to the median layer's) its sensitivities are scaled by, if measured
    gain: Optional[float] = None

    @property
    def by_output(self) -> bool:
        """Whether this tensor's curve is its output sensitivity (a graph calibrated it)."""
        return any(o.sensitivity is not None for o in self.options)

    @property
    def option(self) -> Option:
        return self.options[self.chosen]

    @property
    def fixed(self) -> bool:
        return len(self.options) == 1


@dataclass
class BudgetPlan:
    """The allocation for one model and config; ``plans`` is what the engine runs."""

    target_bytes: float
    estimated_bytes: float
    min_bytes: float
    max_bytes: float
    overhead_bytes: float
    objective: float           # parameter-weighted mean relF**2 of the quantized tensors (estimated)
    price: float               # relF**2 per MiB of the first step the budget refused (the Lagrange multiplier)
    tensors: Dict[str, TensorBudget]
    plans: Dict[str, TensorPlan]
    seconds: float
    quantized_params: int
    #: True: the objective is the layers' mean output sensitivity (a graph calibrated them), else weight relF**2
    by_output: bool = False

    def summary(self) -> dict:
        """JSON-ready figures (no per-tensor candidates)."""
        per_bits: Dict[str, int] = {}
        for t in self.tensors.values():
            per_bits[t.option.label] = per_bits.get(t.option.label, 0) + 1
        return {
            "target_mb": self.target_bytes / MIB,
            "estimated_mb": self.estimated_bytes / MIB,
            "min_mb": self.min_bytes / MIB,
            "max_mb": self.max_bytes / MIB,
            "overhead_mb": self.overhead_bytes / MIB,
            "objective": OUTPUT_UNIT if self.by_output else WEIGHT_UNIT,
            "estimated_weighted_rel_error2": self.objective,
            "price_rel_error2_per_mib": self.price,
            "tensors_per_width": per_bits,
            "excluded_for_min_accuracy": sum(len(t.excluded) for t in self.tensors.values()),
            "planning_time_s": self.seconds,
        }

    def outcome(self, measured_bytes: int, final: Dict[str, dict]) -> dict:
        """The budget entry of a quantize result: target versus what was measured on disk."""
        fallbacks = [n for n, t in final.items() if n in self.plans and t["bits"] != self.plans[n].bits]
        over = measured_bytes - self.target_bytes
        return dict(
            self.summary(),
            measured_mb=measured_bytes / MIB,
            error_vs_target_pct=100.0 * over / self.target_bytes,
            estimate_error_pct=100.0 * (measured_bytes - self.estimated_bytes) / self.estimated_bytes,
            met=bool(measured_bytes <= self.target_bytes * (1 + MET_TOLERANCE)),
            fallbacks=fallbacks,
            note=("over the target because the accuracy fallback widened " + ", ".join(fallbacks[:5])
                  if fallbacks and over > 0 else ""),
        )


# -- measuring --------------------------------------------------------------------------------


def sample_ranges(info: TensorInfo) -> List[Tuple[int, int]]:
    """Deterministic row blocks of ``info``'s 2-D view holding about SAMPLE_ELEMENTS elements."""
    rows, cols = info.matrix_shape
    want = max(1, math.ceil(SAMPLE_ELEMENTS / max(cols, 1)))
    if want >= rows:
        return [(0, rows)]
    blocks = min(SAMPLE_BLOCKS, want)
    per = math.ceil(want / blocks)
    starts = np.linspace(0, rows - per, blocks).round().astype(int)
    out: List[Tuple[int, int]] = []
    for s in starts:
        s = int(s)
        if out and s < out[-1][1]:
            s = out[-1][1]
        if s < rows:
            out.append((s, min(s + per, rows)))
    return out


@functools.lru_cache(maxsize=None)
def _codec() -> pa.Codec:
    return pa.Codec(CODEC)


def compressed_len(blob: np.ndarray) -> int:
    data = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
    return len(_codec().compress(data)) if data.size else 0


def compression_model(blob: np.ndarray) -> Tuple[float, float]:
    """``(a, b)`` so that the codec stores ``n`` bytes like ``blob``'s in about ``a * n + b`` bytes.

    ``b`` (frame and table costs) is what compressing the two halves separately costs more
    than the whole; ``a`` is the rest per byte. A sample's ratio alone would charge a big
    blob the fixed costs of a small one.
    """
    data = np.ascontiguousarray(blob).view(np.uint8).reshape(-1)
    if data.size == 0:
        return 1.0, 0.0
    whole = compressed_len(data)
    if data.size < 1024:
        return whole / data.size, 0.0
    half = data.size // 2
    fixed = max(0.0, float(compressed_len(data[:half]) + compressed_len(data[half:]) - whole))
    fixed = min(fixed, whole / 2)
    return (whole - fixed) / data.size, fixed


def _cosine_stderr(x: np.ndarray, y: np.ndarray, fraction: float, blocks: List[int]) -> float:
    """Standard error of the tensor cosine estimated from the sampled rows ``x`` (``y`` their
    dequantized values): the row blocks (``blocks`` rows each) are the sampling units of the
    ratio estimator relF**2 = sum err / sum norm (neighbouring rows can be alike, so rows
    are not independent units), and cos ~ 1 - relF**2 / 2 near 1."""
    x64 = x.astype(np.float64)
    return _ratio_stderr(((x64 - y) ** 2).sum(axis=1), (x64 ** 2).sum(axis=1), fraction, blocks)


def _ratio_stderr(err_rows: np.ndarray, nrm_rows: np.ndarray, fraction: float, blocks: List[int]) -> float:
    """:func:`_cosine_stderr` from each sampled row's error and norm (of its weights, or of its output)."""
    m = len(blocks)
    if m < 2:
        return 0.0
    edges = np.cumsum([0] + list(blocks))[:-1]
    err = np.add.reduceat(err_rows, edges)
    nrm = np.add.reduceat(nrm_rows, edges)
    total = nrm.sum()
    if total <= 0:
        return 0.0
    r = err.sum() / total
    var = ((err - r * nrm) ** 2).sum() / (m - 1) * m / total ** 2 * max(0.0, 1.0 - fraction)
    return 0.5 * math.sqrt(var)


def _field_sizes(nbytes: int, fields: Dict[str, Tuple[float, float, float]]) -> Dict[str, int]:
    names = list(fields)
    out = {k: int(nbytes * fields[k][0]) for k in names[:-1]}
    out[names[-1]] = nbytes - sum(out.values())
    return out


def _disk(fields: Dict[str, Tuple[float, float, float]], chunk_nbytes: List[int]) -> float:
    """Estimated zstd bytes of the blobs of store rows holding ``chunk_nbytes`` blob bytes each."""
    total = 0.0
    for n in chunk_nbytes:
        for k, size in _field_sizes(n, fields).items():
            _, a, b = fields[k]
            total += min(a * size + b, size + 16.0) if size else 0.0
    return total


def _judge(x: np.ndarray, y: Optional[np.ndarray], stats: np.ndarray, graph: Optional[tuple],
           ranges: List[Tuple[int, int]], fraction: float) -> Tuple[float, float, Optional[float]]:
    """``(cosine the policy judges, its standard error, output sensitivity or None)`` of one candidate on the
    sample ``x`` (``y`` dequantized, None when ``x`` is the whole tensor and there is no graph); with a
    downstream gain, the cosine and the sensitivity as the network feels them (``sensitivity.felt``)."""
    blocks = [r1 - r0 for r0, r1 in ranges]
    if graph is None:
        return figures(stats)["cosine"], (0.0 if y is None or fraction >= 1 else _cosine_stderr(x, y, fraction, blocks)), None
    h, transposed, gain = graph
    if transposed:  # the sampled rows are inputs: their block of H, the weight cosine's error as the estimate's
        rows = np.concatenate([np.arange(r0, r1) for r0, r1 in ranges])
        out = sensitivity.view_stats(x, y, h, True, rows)
        stderr = 0.0 if fraction >= 1 else _cosine_stderr(x, y, fraction, blocks)
    else:  # rows are outputs: each row's output error adds up, row blocks are the sampling units
        per_row = sensitivity.row_stats(x, y, h)
        out = per_row.sum(axis=0)
        stderr = 0.0 if fraction >= 1 else _ratio_stderr(per_row[:, 3], per_row[:, 1], fraction, blocks)
    cos = sensitivity.figures(out)["cosine"]
    return (sensitivity.felt_cosine(cos, gain), stderr * (gain or 1.0),
            sensitivity.felt(sensitivity.rel_error2(out), gain))


def measure_tensor(source: ModelSource, info: TensorInfo, base: TensorPlan, config: DiffusionQuantConfig,
                   graph: Optional[tuple] = None) -> TensorBudget:
    """The candidates of one tensor, measured on its sample. ``graph``: the layer's input second
    moment ``H``, whether its 2-D view is transposed (inputs along rows) and its downstream gain (None
    when not measured), from a calibration; then each candidate is judged by, and the allocator
    minimises, its output sensitivity (times the gain)."""
    rows, cols = info.matrix_shape
    ranges = sample_ranges(info)
    sampled_rows = sum(r1 - r0 for r0, r1 in ranges)
    chunks = chunk_ranges(*info.matrix_shape)
    raw_bytes = info.numel * DTYPES[info.dtype].itemsize

    raw = np.concatenate([source.read_raw(info.name, r0 * cols, (r1 - r0) * cols) for r0, r1 in ranges])
    raw_fields = {"codes": (1.0,) + compression_model(raw)}
    itemsize = DTYPES[info.dtype].itemsize
    raw_disk = _disk(raw_fields, [(r1 - r0) * cols * itemsize for r0, r1 in chunks])
    lossless = Option(LOSSLESS, RAW, raw_bytes, raw_disk, 0.0, 1.0, raw_fields,
                      sensitivity=0.0 if graph is not None else None, output_cosine=1.0 if graph is not None else None)
    role = base.role or ("lossless" if base.lossless else "ordinary")
    if role == "lossless":
        return TensorBudget(info.name, info.numel, role, base, [lossless], sampled_rows / max(rows, 1))

    if role == "rule":
        widths = [b for b in WIDTHS if b >= base.bits]
    elif role == "protected":
        widths = [b for b in WIDTHS if b >= config.sensitive_bits]
    else:
        widths = list(WIDTHS)

    x = np.ascontiguousarray(np.concatenate([source.read_rows(info.name, r0, r1) for r0, r1 in ranges]))
    exact = sampled_rows >= rows
    options: List[Option] = []
    excluded: List[Tuple[int, float]] = []
    if not np.isfinite(x).all():  # the engine keeps such tensors lossless
        return TensorBudget(info.name, info.numel, "lossless", base, [lossless], sampled_rows / max(rows, 1))
    seen = set()
    for candidates in policy.steps(config, widths, cols):  # the engine's chain at each step, judged on the sample
        if not candidates or (candidates[0].encoding, candidates[0].bits) in seen:  # widths can share a ggml type
            continue
        seen.add((candidates[0].encoding, candidates[0].bits))
        missed = []
        for c in candidates:
            name, bits = c.encoding, c.bits
            enc = encodings.get_encoding(name, bits, c.group)
            blobs, stats = encodings.quantize(x, enc)
            fig = figures(stats)
            y = None if exact and graph is None else encodings.dequantize(blobs, enc, *x.shape)
            judged, stderr, sens = _judge(x, y, stats, graph, ranges, sampled_rows / rows)
            if policy.accepts(config, bits, judged, stderr):
                break
            missed.append(judged)
        else:
            excluded.append((candidates[0].bits, missed[0]))
            continue
        present = {k: v for k, v in blobs.items() if v is not None and v.size}
        total = sum(int(v.size) for v in present.values()) or 1
        fields = {k: (v.size / total,) + compression_model(v) for k, v in present.items()} or {"codes": (1.0, 1.0, 0.0)}
        chunk_nbytes = [enc.nbytes(r1 - r0, cols) for r0, r1 in chunks]
        rel2 = float(stats[3] / stats[1]) if stats[1] > 0 else 0.0
        options.append(Option(bits, name, sum(chunk_nbytes), _disk(fields, chunk_nbytes), rel2, fig["cosine"], fields,
                              c.group, sens, judged if graph is not None else None))
        if role == "rule":
            break  # a rule fixes the width; only the fallback chain may widen it
    if role == "rule" and options:
        return TensorBudget(info.name, info.numel, role, base, options, sampled_rows / max(rows, 1), excluded)
    options.append(lossless)
    options.sort(key=lambda o: o.disk_bytes)
    return TensorBudget(info.name, info.numel, role, base, options, sampled_rows / max(rows, 1), excluded)


def measure_model(source: ModelSource, config: DiffusionQuantConfig, planner: Optional[Planner] = None,
                  calibration=None) -> Dict[str, TensorBudget]:
    """Every tensor's candidates; with a :class:`~arrow_quant_v2.calibration.Calibration`, the layers it
    holds an ``H`` for are measured by their output sensitivity."""
    planner = planner or Planner(config)
    tensors = {}
    for name, info in source.tensors.items():
        graph = None
        if calibration is not None and name in calibration.hessians:
            graph = (calibration.hessians[name], calibration.layers[name].transposed, calibration.gain(name))
        tensors[name] = measure_tensor(source, info, planner.plan(info), config, graph)
        tensors[name].gain = graph[2] if graph is not None else None
    return tensors


def _set_shares(tensors: Dict[str, TensorBudget]) -> bool:
    """Each budgeted tensor's weight in the objective: with output sensitivities (a graph), every layer
    the same (``sensitivity.share``); else its share of the budgeted parameters. Returns which."""
    budgeted = [t for t in tensors.values() if t.role != "lossless"]
    by_output = any(t.by_output for t in budgeted)
    n_total = max(sum(t.numel for t in budgeted), 1)
    for t in budgeted:
        t.share = sensitivity.share(len(budgeted)) if by_output else t.numel / n_total
    return by_output


# -- the Parquet overhead ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _noise(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)


#: Stand-in blobs compress to at most this many bytes: enough for the page-header and footer
#: integers to get the width they will have (within a byte), without writing a whole model's
#: worth of bytes to the temporary folder for a large model.
STAND_IN_CAP = 1 << 16


def _stand_in(size: int, compressed: float) -> Tuple[np.ndarray, int]:
    """``size`` bytes that compress to about ``min(compressed, STAND_IN_CAP)`` bytes (random
    bytes, then zeros), and their compressed length."""
    k = int(min(max(compressed, 0), size, STAND_IN_CAP))
    blob = np.zeros(size, np.uint8)
    if k:
        blob[:k] = _noise(STAND_IN_CAP)[:k]
    return blob, _stand_in_len(size, k)


@functools.lru_cache(maxsize=8192)
def _stand_in_len(size: int, k: int) -> int:
    blob = np.zeros(size, np.uint8)
    if k:
        blob[:k] = _noise(STAND_IN_CAP)[:k]
    return compressed_len(blob) if size else 0


def store_overhead(source: ModelSource, tensors: Dict[str, TensorBudget], plans: Dict[str, TensorPlan],
                   config: DiffusionQuantConfig) -> float:
    """Bytes of the weight files that are not blob data, for these plans.

    Writes the planned rows through the real :class:`StoreWriter` into a temporary folder,
    each blob replaced by a stand-in of its exact size that compresses to about its
    estimated size (so page headers and footer entries get their real widths), and
    subtracts the compressed size of the stand-ins.
    """
    with tempfile.TemporaryDirectory(prefix="aq-budget-") as tmp:
        writer = StoreWriter(Path(tmp) / "calibration", max_shard_bytes=config.max_shard_mb << 20)
        blob_disk = 0
        try:
            for name, info in source.tensors.items():
                t, plan = tensors[name], plans[name]
                opt = t.option
                _, cols = info.matrix_shape
                rel = str(info.file.relative_to(source.root)) if source.path.is_dir() else info.file.name
                records = []
                for i, (r0, r1) in enumerate(chunk_ranges(*info.matrix_shape)):
                    if plan.lossless:
                        n = (r1 - r0) * cols * DTYPES[info.dtype].itemsize
                        fields = opt.fields if opt.bits == LOSSLESS else {"codes": (1.0, 1.0, 0.0)}
                    else:
                        n = encodings.get_encoding(plan.encoding, plan.bits, plan.group_size).nbytes(r1 - r0, cols)
                        fields = opt.fields
                    blobs = {}
                    for k, v in _field_sizes(n, fields).items():
                        blobs[k], stored = _stand_in(v, fields[k][1] * v + fields[k][2])
                        blob_disk += stored
                    records.append(ChunkRecord(name, rel, info.shape, info.dtype, i, r0, r1 - r0,
                                               RAW if plan.lossless else plan.encoding, plan.bits,
                                               plan.group_size, blobs))
                fig = {"cosine": opt.cosine, "rel_error": math.sqrt(opt.rel_error2),
                       "sqnr_db": 10.0 * math.log10(1.0 / opt.rel_error2) if opt.rel_error2 > 0 else math.inf}
                writer.write_tensor(records, fig, plan.reason, {})
            total = writer.close()
        finally:
            writer.abort()
    return float(total - blob_disk)


# -- allocating -------------------------------------------------------------------------------


def _hull(t: TensorBudget) -> List[int]:
    """Indices of the options on the lower convex hull of (disk bytes, weighted error)."""
    pts = [(o.disk_bytes, t.share * o.error, i) for i, o in enumerate(t.options)]
    hull: List[Tuple[float, float, int]] = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # dominated: more bytes, no less error
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y0 - y1) * (p[0] - x1) <= (y1 - p[1]) * (x1 - x0):
                hull.pop()  # the middle point is above the chord: not worth stopping at
            else:
                break
        hull.append(p)
    return [i for _, _, i in hull]


def _slope(t: TensorBudget, a: int, b: int) -> float:
    oa, ob = t.options[a], t.options[b]
    dy = t.share * (oa.error - ob.error)
    dx = (ob.disk_bytes - oa.disk_bytes) / MIB
    return dy / dx if dx > 0 else math.inf


def _greedy(tensors: Dict[str, TensorBudget], budget: float) -> Tuple[float, List[str]]:
    """Climb the hulls by error saved per byte within ``budget`` blob bytes; returns the price and step order."""
    hulls = {n: _hull(t) for n, t in tensors.items()}
    heap = []
    spent = 0.0
    for n, t in tensors.items():
        t.chosen = hulls[n][0]
        t.slope = 0.0
        t.next_slope = 0.0
        spent += t.option.disk_bytes
        if len(hulls[n]) > 1:
            s = _slope(t, hulls[n][0], hulls[n][1])
            t.next_slope = s
            heapq.heappush(heap, (-s, n, 1))
    price, rejected = 0.0, None
    steps: List[str] = []
    while heap:
        neg, n, k = heapq.heappop(heap)
        t, h = tensors[n], hulls[n]
        cost = t.options[h[k]].disk_bytes - t.option.disk_bytes
        if spent + cost > budget:
            rejected = -neg if rejected is None else rejected  # the first step the budget refused: its price
            continue  # this tensor stops here; cheaper steps of others may still fit
        spent += cost
        t.chosen, t.slope = h[k], -neg
        price = price if rejected is not None else -neg
        steps.append(n)
        t.next_slope = 0.0
        if k + 1 < len(h):
            s = _slope(t, h[k], h[k + 1])
            t.next_slope = s
            heapq.heappush(heap, (-s, n, k + 1))
    return (rejected if rejected is not None else price), steps


#: How a reason names what a budget step buys: the layers' mean output sensitivity (a graph) or relF².
OUTPUT_UNIT, WEIGHT_UNIT = "output sensitivity", "relF²"


def _reason(t: TensorBudget, plan_label: str, price: float) -> str:
    if t.role == "lossless":
        return t.base.reason
    measure = (policy.WEIGHT_COSINE if not t.by_output else
               policy.OUTPUT_COSINE if t.gain is None else policy.felt_measure(t.gain))
    misses = ", ".join(policy.sampled_miss(b, c, measure) for b, c in t.excluded)
    if t.role == "rule":
        if t.option.bits == t.base.bits:
            return t.base.reason
        return f"{plan_label}: {t.base.reason.split(': ', 1)[-1]}, widened: " + misses
    floor = t.base.reason.split(": ", 1)[1] if t.role == "protected" and ": " in t.base.reason else ""
    why = f"{floor}, " if floor else ""
    unit = OUTPUT_UNIT if t.by_output else WEIGHT_UNIT
    if t.slope > 0:
        why += f"budget (saves {t.slope:.3g} {unit} per MiB)"
    elif t.next_slope > 0:
        why += f"budget ({t.options[_next(t)].label} would save {t.next_slope:.3g} {unit} per MiB; price {price:.3g})"
    else:
        why += "budget"
    if t.gain is not None:
        why += f"; x{t.gain:.3g} downstream gain measured through the graph"
    if t.excluded:
        why += "; " + misses
    return f"{plan_label}: {why}"


def _next(t: TensorBudget) -> int:
    for i, o in enumerate(t.options):
        if o.disk_bytes > t.option.disk_bytes and o.error < t.option.error:
            return i
    return t.chosen


def _plans(tensors: Dict[str, TensorBudget], config: DiffusionQuantConfig, price: float) -> Dict[str, TensorPlan]:
    plans = {}
    for n, t in tensors.items():
        o = t.option
        if t.role == "lossless":
            plans[n] = t.base
            continue
        g = o.group
        label = "lossless" if o.bits == LOSSLESS else plan_label(o.bits, o.encoding, g)
        reason = _reason(t, label, price)
        if o.bits == LOSSLESS:
            plans[n] = TensorPlan(n, LOSSLESS, 0, reason, role=t.role)
        else:
            plans[n] = TensorPlan(n, o.bits, g, reason, o.encoding, t.role)
    return plans


def _objective(tensors: Dict[str, TensorBudget], by_output: bool) -> Tuple[float, int]:
    """The estimated objective (mean layer output sensitivity, or parameter-weighted relF**2 of the
    quantized tensors) and the quantized parameters."""
    q = [t for t in tensors.values() if t.role != "lossless" and t.option.bits != LOSSLESS]
    n = sum(t.numel for t in q)
    if by_output:
        return sum(t.share * t.option.error for t in tensors.values() if t.role != "lossless"), n
    return (sum(t.numel * t.option.rel_error2 for t in q) / n if n else 0.0), n


def _extremes(source, tensors, config) -> Tuple[float, float, float]:
    """(overhead, smallest, largest) estimated sizes in bytes."""
    for t in tensors.values():
        t.chosen, t.slope, t.next_slope = 0, 0.0, 0.0
    low = _plans(tensors, config, 0.0)
    overhead = store_overhead(source, tensors, low, config)
    smallest = overhead + sum(t.options[0].disk_bytes for t in tensors.values())
    largest = overhead + sum(max(o.disk_bytes for o in t.options) for t in tensors.values())
    return overhead, smallest, largest


#: Allocate / re-measure the overhead at most this many times; stop when it moves less than OVERHEAD_SETTLED bytes.
OVERHEAD_ROUNDS = 4
OVERHEAD_SETTLED = 512


def _snapshot(tensors: Dict[str, TensorBudget]) -> Dict[str, Tuple[int, float, float]]:
    return {n: (t.chosen, t.slope, t.next_slope) for n, t in tensors.items()}


def _restore(tensors: Dict[str, TensorBudget], snap: Dict[str, Tuple[int, float, float]]) -> None:
    for n, (chosen, slope, next_slope) in snap.items():
        tensors[n].chosen, tensors[n].slope, tensors[n].next_slope = chosen, slope, next_slope


def allocate(source: ModelSource, config: DiffusionQuantConfig, planner: Optional[Planner] = None,
             tensors: Optional[Dict[str, TensorBudget]] = None, calibration=None) -> BudgetPlan:
    """Plan every tensor of ``source`` so the store's weight files fit ``config.target_model_size_mb``.
    With a ``calibration`` (:class:`~arrow_quant_v2.calibration.Calibration`) the layers it calibrated
    are measured and allocated by their output sensitivity (see the module docstring).

    Raises :class:`ConfigurationError` naming the smallest and largest reachable sizes when
    the target is outside them.
    """
    started = time.perf_counter()
    target = float(config.target_model_size_mb) * MIB
    tensors = tensors if tensors is not None else measure_model(source, config, planner, calibration)
    by_output = _set_shares(tensors)
    overhead, smallest, largest = _extremes(source, tensors, config)
    if not smallest <= target <= largest * 1.01:
        excluded = sum(1 for t in tensors.values() if t.excluded)
        hint = (f"; {excluded} tensor(s) cannot go narrower because they would miss min_accuracy "
                "(lower min_accuracy to allow it)" if excluded and target < smallest else "")
        raise ConfigurationError(
            f"target_model_size_mb={config.target_model_size_mb!r} cannot be reached for {source.path.name}: "
            f"allowed: {smallest / MIB:.3f} to {largest / MIB:.3f} MiB (smallest: every tensor at its narrowest "
            f"allowed width; largest: every budgeted tensor lossless){hint}"
        )
    # The overhead depends a little on the plan (reasons, varint widths, shard cuts): allocate
    # against the last measured overhead, re-measure, and keep the fullest plan that fits.
    best = None
    for _ in range(OVERHEAD_ROUNDS):
        price, steps = _greedy(tensors, target - overhead)
        plans = _plans(tensors, config, price)
        measured = store_overhead(source, tensors, plans, config)
        estimated = measured + sum(t.option.disk_bytes for t in tensors.values())
        if estimated <= target and (best is None or estimated > best[0]):
            best = (estimated, measured, price, plans, _snapshot(tensors))
        settled = abs(measured - overhead) <= OVERHEAD_SETTLED
        overhead = measured
        if settled:
            break
    if best is None:  # still over: undo the last steps until the estimate fits
        while steps and estimated > target:
            n = steps.pop()
            t = tensors[n]
            h = _hull(t)
            k = h.index(t.chosen)
            estimated -= t.option.disk_bytes - t.options[h[k - 1]].disk_bytes
            t.chosen = h[k - 1]
            t.slope = _slope(t, h[k - 2], h[k - 1]) if k >= 2 else 0.0
        plans = _plans(tensors, config, price)
        overhead = store_overhead(source, tensors, plans, config)
        estimated = overhead + sum(t.option.disk_bytes for t in tensors.values())
    else:
        estimated, overhead, price, plans, snap = best
        _restore(tensors, snap)
    objective, nq = _objective(tensors, by_output)
    return BudgetPlan(target, estimated, smallest, largest, overhead, objective, price, tensors, plans,
                      time.perf_counter() - started, nq, by_output)


# -- for the app ------------------------------------------------------------------------------


def size_range(model_path, config: Optional[DiffusionQuantConfig] = None) -> dict:
    """The reachable sizes of ``model_path`` under ``config`` (its budget field is ignored).

    Returns ``{"min_mb", "max_mb", "uniform_mb": {"int2": .., "int4": .., "int8": ..}, "seconds"}``:
    the estimated weight-file MiB with every budgeted tensor at its narrowest allowed width,
    every budgeted tensor lossless, and every ordinary tensor at one width (protected tensors
    at their floor) - good anchors for a budget slider.
    """
    started = time.perf_counter()
    config = (config or DiffusionQuantConfig()).replace(target_model_size_mb=None)
    source = open_model(model_path)
    tensors = measure_model(source, config)
    overhead, smallest, largest = _extremes(source, tensors, config)
    uniform = {}
    for bits in WIDTHS:
        total = overhead
        for t in tensors.values():
            fits = [o for o in t.options if o.bits != LOSSLESS and o.bits >= bits] or t.options
            total += min(fits, key=lambda o: o.disk_bytes).disk_bytes
        uniform[f"int{bits}"] = total / MIB
    return {"min_mb": smallest / MIB, "max_mb": largest / MIB, "uniform_mb": uniform,
            "overhead_mb": overhead / MIB, "seconds": time.perf_counter() - started}


def plan_budget(model_path, config: DiffusionQuantConfig) -> BudgetPlan:
    """The allocation ``quantize_model`` would run for ``config`` (nothing is written)."""
    if config.target_model_size_mb is None:
        raise ConfigurationError("target_model_size_mb=None is not allowed here; allowed: a size in MiB > 0")
    return allocate(open_model(model_path), config, Planner(config))
