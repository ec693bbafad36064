"""Output sensitivity: what quantizing one layer does to that layer's output on the model's own inputs.

With a graph (``calibration="graph"``), :mod:`arrow_quant_v2.calibration` gives each layer the
second moment ``H = X^T X`` of its inputs across the noise levels (each level weighing the
same). A quantized weight ``W + dW`` moves the layer's output on those inputs by ``X dW^T``;
relative to the output itself, its power is

    sensitivity = tr(dW H dW^T) / tr(W H W^T)

the relF² of the layer's *output* (for isotropic inputs, ``H = I``, it is the weights' relF²).
It is the H-weighted (Hessian-trace) estimate of how much the network output moves when
that layer alone is quantized: ``benchmarks/bench_sensitivity.py`` measures the network
output directly through the graph, one layer at a time, and reports the rank correlation
of the two (and of the weight error) on the terrain U-Net. Since independent layer errors
add up at the output, the size-budget allocator minimises the *sum* of the layers'
sensitivities (:func:`share`), and the accuracy fallback reads the layer's output cosine
on the calibration inputs instead of its weight cosine (:func:`figures`).

Every figure comes from four sums with the layout of the kernels' fused statistics
(``x·y, x·x, y·y, |x - y|²`` with the inner product ``<A, B> = tr(A H B^T)``), so
:func:`arrow_quant_v2.metrics.figures` turns them into cosine, relative error and SQNR and
row blocks of a tensor add up.

The estimate is layer-local: it does not see how much the layers after it amplify or damp that
error (on the terrain U-Net it ranks layers only Spearman +0.34 against the direct measurement,
and misses the first block's conv, which the network feels most). :func:`downstream_gains`
measures that through the graph: each layer quantized at the plan's width (data-free grid), the
network output's relative error power over the layer's own sensitivity is the layer's *gain*.
Layers are measured a group at a time (neighbours in the graph, whose errors add up at the
output), groups far above the median split down to single layers: a few dozen forward passes
instead of one per layer. The gain is measured at the real error, not a small probe of it: on
the terrain U-Net the first block's conv answers far from linearly (its gain at its int2 error
is 100 times its gain at 0.3 % of that error), and the direction of the error matters as much.
With ``downstream_gain=True`` (off by default: ``plan.BOUNDARY_PREFIXES`` says why) the plan reads
the layer's sensitivity times its gain relative to the median layer's (:func:`felt`,
:func:`felt_cosine`): a typical layer is judged as before, a layer the network amplifies gets more
bits, above the boundary layers' name-list floors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from . import e2e
from .errors import ConfigurationError
from .metrics import figures as _figures


def output_stats(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``[<W,Q>, <W,W>, <Q,Q>, <Q-W,Q-W>]`` under ``<A,B> = tr(A H B^T)``; ``w``, ``q`` (outputs, inputs).

    Rows are outputs, so the sums of a tensor's row blocks add up to the tensor's."""
    return compare(w, [q], h)[0]


def compare(w: np.ndarray, candidates, h: np.ndarray) -> list:
    """:func:`output_stats` of each of ``candidates`` against ``w`` (``W H`` computed once)."""
    w = np.asarray(w, np.float64)
    h = np.asarray(h, np.float64)
    wh = w @ h
    xx = float(np.sum(wh * w))
    out = []
    for q in candidates:
        d = np.asarray(q, np.float64) - w
        xd = float(np.sum(wh * d))
        dd = float(np.sum((d @ h) * d))
        out.append(np.array([xx + xd, xx, xx + 2.0 * xd + dd, dd]))
    return out


def row_stats(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> np.ndarray:
    """:func:`output_stats` of every row (output) of ``w`` alone, ``(rows, 4)``: they add up to the whole's."""
    w = np.asarray(w, np.float64)
    d = np.asarray(q, np.float64) - w
    h = np.asarray(h, np.float64)
    wh = w @ h
    xx = np.sum(wh * w, axis=1)
    xd = np.sum(wh * d, axis=1)
    dd = np.sum((d @ h) * d, axis=1)
    return np.stack([xx + xd, xx, xx + 2.0 * xd + dd, dd], axis=1)


def oriented(a: np.ndarray, transposed: bool) -> np.ndarray:
    """A weight's 2-D view turned outputs x inputs (the orientation of H)."""
    return a.T if transposed else a


def view_stats(w2d: np.ndarray, q2d, h: np.ndarray, transposed: bool, rows: np.ndarray):
    """:func:`output_stats` of the rows ``rows`` (indices) of a weight's 2-D view, held in ``w2d``
    (``q2d`` one array, or a list of them: then a list of statistics).

    A transposed view (MatMul, Gemm transB=0: its rows are the layer's inputs) counts with ``H``'s
    block of those inputs only: the cross terms with the inputs left out are missing (exact when
    ``rows`` are all of them)."""
    many = isinstance(q2d, (list, tuple))
    qs = list(q2d) if many else [q2d]
    if transposed:
        found = compare(w2d.T, [q.T for q in qs], np.asarray(h)[np.ix_(rows, rows)])
    else:
        found = compare(w2d, qs, h)
    return found if many else found[0]


def rel_error2(stats: np.ndarray) -> float:
    """The sensitivity (relative output error power) of these sums."""
    return float(stats[3] / stats[1]) if stats[1] > 0 else 0.0


def figures(stats: np.ndarray) -> Dict[str, float]:
    """The layer output's cosine, relative error and SQNR on the calibration inputs."""
    return _figures(stats)


def share(layers: int) -> float:
    """How much one layer's sensitivity counts in the budget's objective: every layer the same
    (independent relative errors of the layers add up at the network output, whatever a layer's
    size), so the objective is the layers' mean sensitivity."""
    return 1.0 / max(layers, 1)


def _swappable_session(graph, names: Sequence[str], threads: int):
    """``(session, initializer dims)`` of ``graph`` whose initializers ``names`` can be replaced per run."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(graph))
    inits = {t.name: t for t in model.graph.initializer}
    unknown = [n for n in names if n not in inits]
    if unknown:
        raise ConfigurationError(f"{graph}: {list(unknown)[:3]} are not initializers of the graph")
    for name in names:  # an initializer that is also a graph input can be overridden per run
        t = inits[name]
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    return session, {n: tuple(int(d) for d in inits[n].dims) for n in names}


def measure_directly(model_path, variants: Mapping[str, Mapping[str, np.ndarray]], *, num_levels: int = 4,
                     batch: int = 1, seed: int = e2e.DEFAULT_SEED, threads: int = 1) -> Dict[str, dict]:
    """The network output with each variant's weights swapped in, against the original: the direct
    measurement the H estimate stands in for (one forward pass of ``num_levels * batch`` inputs per
    variant, so it is for checks and benchmarks, not for planning).

    ``variants``: label -> {initializer name: its replacement}. Inputs are e2e's validation inputs
    (its stream, ``num_levels`` noise levels, ``batch`` per level). Returns label -> ``{"mean_error",
    "worst_error", "errors"}``: 1 - output cosine averaged over the levels, the largest, each level's.
    """
    graph = e2e.find_graph(model_path)
    if graph is None:
        raise ConfigurationError(f"{model_path}: no executable graph ({' / '.join(e2e.GRAPH_NAMES)}) to measure through")
    swapped = sorted({n for v in variants.values() for n in v})
    session, shapes = _swappable_session(graph, swapped, threads)
    found = e2e.noise_levels(e2e._model_config(graph), num_levels)
    if found is None:
        raise ConfigurationError(f"{graph}: config.json gives no noise range")
    levels = found[0]
    spec = e2e._Feeds([i for i in session.get_inputs() if i.name not in shapes], e2e._model_config(graph), batch)
    if spec.problems:
        raise ConfigurationError(f"{graph}: cannot build inputs: " + "; ".join(spec.problems))
    inputs = e2e.noisy_inputs(session, spec, levels, e2e.input_rng(seed, e2e.VALIDATION_STREAM))
    _, feeds, _ = next(e2e.level_batches(spec, levels, inputs, len(levels)))
    reference = session.run(None, feeds)[0]
    out = {}
    for label, weights in variants.items():
        swap = {n: np.ascontiguousarray(np.asarray(w, np.float32).reshape(shapes[n])) for n, w in weights.items()}
        y = session.run(None, dict(feeds, **swap))[0]
        errors = []
        for k in range(len(levels)):
            a = reference[k * batch:(k + 1) * batch].astype(np.float64).ravel()
            b = y[k * batch:(k + 1) * batch].astype(np.float64).ravel()
            den = np.linalg.norm(a) * np.linalg.norm(b)
            errors.append(float(1.0 - (a @ b / den if den > 0 else 1.0)))
        out[label] = {"mean_error": float(np.mean(errors)), "worst_error": float(np.max(errors)), "errors": errors}
    return out


# -- downstream gain ------------------------------------------------------------------------------

#: A group whose gain is this many times the median group's is split in halves, down to single layers.
GAIN_SPLIT = 2.0
#: Forward passes at most: the first round (the layers in groups of neighbours in the graph, which share
#: most of their path to the output, so their gains are alike unless one stands out) takes two thirds,
#: splitting the rest; layers of groups not split keep their group's gain.
GAIN_PASSES = 48
#: Calibration inputs every gain pass runs on (one batch), from the noisier half of the schedule, where
#: a denoiser's output is mostly its own prediction (near sigma_min it is mostly its input).
GAIN_INPUTS = 2


@dataclass
class Gains:
    """Each probed layer's downstream gain: the network output's relative error power per unit of its
    own output sensitivity, and the same relative to the median layer's (what the plan reads)."""

    gain: Dict[str, float]
    relative: Dict[str, float]
    probed_with: Dict[str, int]  # how many layers shared the pass its gain comes from (1: measured alone)
    passes: int
    inputs: int
    seconds: float

    def summary(self) -> dict:
        return {"passes": self.passes, "inputs": self.inputs, "seconds": round(self.seconds, 2),
                "median_gain": float(np.median(list(self.gain.values()))) if self.gain else 0.0}


def gain_inputs(feeds: List[dict], count: int = GAIN_INPUTS) -> dict:
    """One batch of ``count`` calibration inputs: the first item of feeds evenly spaced over the
    first (noisiest) half of ``feeds`` (one feed per noise level, from high to low noise)."""
    picks = sorted({int(round(i)) for i in np.linspace(0, (len(feeds) - 1) / 2, max(count, 1))})
    first = [{k: (v[:1] if np.ndim(v) else v) for k, v in feeds[i].items()} for i in picks]
    return {k: (np.concatenate([f[k] for f in first]) if np.ndim(first[0][k]) else first[0][k]) for k in first[0]}


def _error_power(reference: np.ndarray, y: np.ndarray) -> float:
    """The output's relative error power, averaged over the batch's items."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    d = y.reshape(len(y), -1).astype(np.float64) - a
    return float(np.mean(np.sum(d * d, axis=1) / np.maximum(np.sum(a * a, axis=1), np.finfo(np.float64).tiny)))


def downstream_gains(graph, probes: Callable[[str], Optional[tuple]], names: Sequence[str], feeds: dict, *,
                     reads: Optional[Mapping[str, str]] = None, threads: int = 1, check: Optional[Callable[[], None]] = None,
                     on_pass: Optional[Callable[[int, int], None]] = None) -> Gains:
    """Every layer's downstream gain, measured through ``graph`` on the input batch ``feeds``.

    ``names``: the layers' weight initializers in graph order; ``probes(name)``: ``(quantized weight in the
    initializer's layout, its output sensitivity)``, or None for a layer not to probe; ``reads``: the graph
    tensor each layer reads (layers reading the same one are grouped together). A group's gain is
    the network output's relative error power with the group's layers quantized, over the sum of their
    sensitivities. See the module docstring for the rounds.
    """
    started = time.perf_counter()
    weights: Dict[str, np.ndarray] = {}
    estimate: Dict[str, float] = {}
    for n in names:
        p = probes(n)
        if p is not None and p[1] > 0:
            weights[n], estimate[n] = p
    order = _by_input([n for n in names if n in weights], reads or {})
    session, shapes = _swappable_session(graph, order, threads)
    reference = session.run(None, feeds)[0]
    passes = [0]

    def measure(group: tuple) -> float:
        if check:
            check()
        swap = {n: np.ascontiguousarray(weights[n].reshape(shapes[n]), np.float32) for n in group}
        power = _error_power(reference, session.run(None, dict(feeds, **swap))[0])
        passes[0] += 1
        if on_pass:
            on_pass(passes[0], total)
        return power / sum(estimate[n] for n in group)

    size = -(-len(order) // (2 * GAIN_PASSES // 3))  # a small model's layers are measured alone
    groups = [tuple(order[i:i + size]) for i in range(0, len(order), size)]
    total = min(GAIN_PASSES, max(len(groups), 1) + 8)
    found = {g: measure(g) for g in groups}
    median = float(np.median(list(found.values()))) if found else 0.0
    todo = sorted((g for g in found if len(g) > 1 and found[g] > GAIN_SPLIT * median), key=found.get, reverse=True)
    while todo and passes[0] + 2 <= GAIN_PASSES:
        g = todo.pop(0)
        total = max(total, passes[0] + 2)
        for half in (g[:len(g) // 2], g[len(g) // 2:]):
            found[half] = measure(half)
            if len(half) > 1 and found[half] > GAIN_SPLIT * median:
                todo.append(half)
        todo.sort(key=found.get, reverse=True)
    gain, probed_with = {}, {}
    for g in sorted(found, key=len, reverse=True):  # the smallest group measured holding a layer decides
        for n in g:
            gain[n], probed_with[n] = max(found[g], 0.0), len(g)
    mid = float(np.median(list(gain.values()))) if gain else 0.0
    relative = {n: (v / mid if mid > 0 else 1.0) for n, v in gain.items()}
    if on_pass:
        on_pass(passes[0], passes[0])
    return Gains(gain, relative, probed_with, passes[0], len(reference), time.perf_counter() - started)


def _by_input(probed: List[str], reads: Mapping[str, str]) -> List[str]:
    """``probed`` (in graph order), except that layers reading the same tensor (a denoiser's per-block
    projections of the time embedding) move together to where the first of them is: their gains differ
    from their neighbours' and would otherwise sit in every group."""
    first: Dict[str, int] = {}
    for i, n in enumerate(probed):
        first.setdefault(reads.get(n, n), i)
    return sorted(probed, key=lambda n: first[reads.get(n, n)])


def felt(rel_error2: float, gain: Optional[float]) -> float:
    """A layer's sensitivity as the network output feels it: times its gain relative to the median layer's
    (``gain`` None: not measured, counted as a median layer)."""
    return rel_error2 if gain is None else rel_error2 * gain


def felt_cosine(cosine: float, gain: Optional[float]) -> float:
    """The layer output's cosine with its error scaled as :func:`felt` scales it (1 - cos ~ relF² / 2)."""
    return cosine if gain is None else 1.0 - gain * (1.0 - cosine)


__all__ = ["compare", "output_stats", "row_stats", "view_stats", "oriented", "rel_error2", "figures", "share", "measure_directly",
           "Gains", "downstream_gains", "gain_inputs", "felt", "felt_cosine"]
