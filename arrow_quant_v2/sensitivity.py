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
"""
from __future__ import annotations

from typing import Dict, Mapping

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

def measure_directly(model_path, variants: Mapping[str, Mapping[str, np.ndarray]], *, num_levels: int = 4,
                     batch: int = 1, seed: int = e2e.DEFAULT_SEED, threads: int = 1) -> Dict[str, dict]:
    """The network output with each variant's weights swapped in, against the original: the direct
    measurement the H estimate stands in for (one forward pass of ``num_levels * batch`` inputs per
    variant, so it is for checks and benchmarks, not for planning).

    ``variants``: label -> {initializer name: its replacement}. Inputs are e2e's validation inputs
    (its stream, ``num_levels`` noise levels, ``batch`` per level). Returns label -> ``{"mean_error",
    "worst_error", "errors"}``: 1 - output cosine averaged over the levels, the largest, each level's.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    graph = e2e.find_graph(model_path)
    if graph is None:
        raise ConfigurationError(f"{model_path}: no executable graph ({' / '.join(e2e.GRAPH_NAMES)}) to measure through")
    model = onnx.load(str(graph))
    inits = {t.name: t for t in model.graph.initializer}
    swapped = sorted({n for v in variants.values() for n in v})
    unknown = [n for n in swapped if n not in inits]
    if unknown:
        raise ConfigurationError(f"{graph}: {unknown[:3]} are not initializers of the graph")
    for name in swapped:  # an initializer that is also a graph input can be overridden per run
        t = inits[name]
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    found = e2e.noise_levels(e2e._model_config(graph), num_levels)
    if found is None:
        raise ConfigurationError(f"{graph}: config.json gives no noise range")
    levels = found[0]
    spec = e2e._Feeds([i for i in session.get_inputs() if i.name not in inits], e2e._model_config(graph), batch)
    if spec.problems:
        raise ConfigurationError(f"{graph}: cannot build inputs: " + "; ".join(spec.problems))
    inputs = e2e.noisy_inputs(session, spec, levels, e2e.input_rng(seed, e2e.VALIDATION_STREAM))
    _, feeds, _ = next(e2e.level_batches(spec, levels, inputs, len(levels)))
    reference = session.run(None, feeds)[0]
    shapes = {n: tuple(int(d) for d in inits[n].dims) for n in swapped}
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


__all__ = ["compare", "output_stats", "row_stats", "view_stats", "oriented", "rel_error2", "figures", "share", "measure_directly"]
