"""Calibration data from the model's own graph, across the noise schedule.

For a model folder with an executable graph (``model.onnx``, see :mod:`arrow_quant_v2.e2e`)
the original network is run with onnxruntime at ``num_time_groups`` noise levels, on inputs
built like the end-to-end check's but from another random stream (other noise, other
clean samples, random conditioning): calibration never sees the inputs validation is
measured on. Every layer whose weight is to be quantized (Conv, Gemm, MatMul with the weight
as an initializer) has its input exposed as an extra graph output; its second moment
``H = X^T X`` (Conv inputs unfolded into patches, im2col) is accumulated per noise level,
normalised per level so every level weighs the same, and the activations are dropped
right away. Layers are calibrated a group at a time (the group's inputs at most
:data:`GROUP_BYTES` per pass, sizes from ONNX shape inference), so memory is the H matrices
(float32, one per distinct layer input and kernel geometry) plus one group's activations.

A ``.npz`` of graph inputs (arrays named like the graph's inputs, batch first) may replace
the synthetic inputs. :func:`collect` returns a :class:`Calibration`; the engine hands each
tensor's H to :mod:`arrow_quant_v2.kernels.solver`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from . import e2e, encodings, policy, sensitivity
from .errors import ConfigurationError

#: Largest number of rows (output pixels) one sample contributes to a Conv layer's H:
#: a random subset of positions, enough for a stable second moment at a fraction of the cost.
MAX_ROWS_PER_SAMPLE = 1024
#: Activations one forward pass exposes at most (bytes): the layers are calibrated a group at a time.
GROUP_BYTES = 192 << 20
#: Size assumed for an activation whose shape ONNX cannot infer.
UNKNOWN_ACTIVATION_BYTES = 8 << 20


@dataclass(frozen=True)
class Layer:
    """How one quantized weight meets its input in the graph."""

    weight: str
    activation: str            # the graph tensor the layer reads
    kind: str                  # "conv" | "gemm" | "matmul"
    transposed: bool           # the weight's 2-D view has the inputs along its rows (MatMul, Gemm transB=0)
    kernel: Tuple[int, ...] = ()
    pads: Tuple[int, ...] = ()
    strides: Tuple[int, ...] = ()
    dilations: Tuple[int, ...] = ()

    @property
    def key(self) -> tuple:
        """Layers reading the same tensor the same way share one H."""
        return (self.activation, self.kind, self.kernel, self.pads, self.strides, self.dilations)


@dataclass
class Calibration:
    """Per quantized tensor, its input's second moment (see the module docstring)."""

    hessians: Dict[str, np.ndarray]                  # weight name -> H (inputs x inputs, float32)
    layers: Dict[str, Layer]
    skipped: Dict[str, str] = field(default_factory=dict)  # weight name -> why it has no H
    levels: List[float] = field(default_factory=list)
    samples: int = 0
    source: str = ""
    seconds: float = 0.0
    #: the batch of calibration inputs the downstream gains are measured on (:func:`sensitivity.gain_inputs`)
    gain_feeds: Optional[dict] = field(default=None, repr=False)
    gains: Optional["sensitivity.Gains"] = None  # each layer's downstream gain (:func:`measure_gains`)

    def gain(self, name: str) -> Optional[float]:
        """The layer's downstream gain relative to the median layer's, None when not measured."""
        return self.gains.relative.get(name) if self.gains is not None else None

    def summary(self) -> dict:
        out = {"layers": len(self.hessians), "skipped": dict(self.skipped), "levels": self.levels,
               "samples_per_level": self.samples, "inputs": self.source, "seconds": round(self.seconds, 2)}
        if self.gains is not None:
            out["downstream_gain"] = self.gains.summary()
        return out


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def find_layers(model, names: Iterable[str]) -> Tuple[Dict[str, Layer], Dict[str, str]]:
    """The layers of an ONNX ``model`` whose weight initializer is in ``names``."""
    wanted = set(names)
    dims = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer if t.name in wanted}
    layers: Dict[str, Layer] = {}
    skipped: Dict[str, str] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in dims:
            continue
        w, a = node.input[1], _attrs(node)
        shape = dims[w]
        if w in layers:
            skipped[w] = "used by more than one layer"
            continue
        if node.op_type == "Conv" and len(shape) >= 3:
            if a.get("group", 1) != 1 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                skipped[w] = "grouped or auto-padded convolution"
                continue
            k = tuple(shape[2:])
            n = len(k)
            layers[w] = Layer(w, node.input[0], "conv", False, k, tuple(a.get("pads", [0] * 2 * n)),
                              tuple(a.get("strides", [1] * n)), tuple(a.get("dilations", [1] * n)))
        elif node.op_type == "Gemm" and len(shape) == 2 and not a.get("transA", 0):
            layers[w] = Layer(w, node.input[0], "gemm", not a.get("transB", 0))
        elif node.op_type == "MatMul" and len(shape) == 2:
            layers[w] = Layer(w, node.input[0], "matmul", True)
    for w in wanted - set(layers) - set(skipped):
        skipped[w] = "not the weight input of a Conv/Gemm/MatMul"
    for w in list(layers):
        if w in skipped:
            del layers[w]
    return layers, skipped


def patches(x: np.ndarray, layer: Layer, rows: int, rng: np.random.Generator) -> np.ndarray:
    """im2col of one sample ``x`` (C, *spatial) for a Conv: ``(positions, C * prod(kernel))``,
    at most ``rows`` output positions drawn at random; columns in the weight's (C, k...) order."""
    n = len(layer.kernel)
    pad = [(0, 0)] + [(layer.pads[i], layer.pads[i + n]) for i in range(n)]
    xp = np.pad(x, pad)
    span = tuple(d * (k - 1) + 1 for k, d in zip(layer.kernel, layer.dilations))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(1, n + 1)))
    win = win[(slice(None),) + tuple(slice(None, None, s) for s in layer.strides)
              + tuple(slice(None, None, d) for d in layer.dilations)]
    out_shape = win.shape[1:1 + n]
    total = int(np.prod(out_shape))
    pick = np.sort(rng.choice(total, rows, replace=False)) if total > rows else np.arange(total)
    idx = np.unravel_index(pick, out_shape)
    cols = win[(slice(None),) + idx]              # (C, positions, k...)
    cols = np.moveaxis(cols, 1, 0)                # (positions, C, k...)
    return np.ascontiguousarray(cols.reshape(len(pick), -1), dtype=np.float32)


def layer_rows(act: np.ndarray, layer: Layer, rng: np.random.Generator) -> np.ndarray:
    """The rows ``X`` (one per output position, one column per weight input) of a layer's input batch."""
    if layer.kind == "conv":
        return np.concatenate([patches(s, layer, MAX_ROWS_PER_SAMPLE, rng) for s in act])
    return np.ascontiguousarray(act.reshape(-1, act.shape[-1]), dtype=np.float32)


def _session(model, extra: List[str], threads: int):
    import onnx
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    for name in extra:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False  # give each pass's activations back instead of keeping the peak
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def _activation_sizes(model) -> Dict[str, int]:
    """Bytes per sample of each float tensor whose shape ONNX shape inference can tell (others: unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - sizes only steer grouping
        return {}
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
        if dims and all(d > 0 for d in dims):
            out[v.name] = 4 * int(np.prod(dims))
    return out


def _groups(names: List[str], sizes: Dict[str, int], samples: int) -> List[List[str]]:
    """Activations split so one forward pass exposes at most :data:`GROUP_BYTES` of them."""
    groups: List[List[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name, UNKNOWN_ACTIVATION_BYTES) * samples
        if groups[-1] and used + size > GROUP_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _user_batches(path: Path, graph_inputs: List[str], per_run: int):
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"{path}: not a readable .npz of graph inputs ({e})") from None
    missing = [n for n in graph_inputs if n not in arrays]
    if missing:
        raise ConfigurationError(f"{path}: has no array for the graph input(s) {missing} "
                                 f"(it holds {sorted(arrays)}); name them like the graph's inputs")
    n = {len(arrays[k]) for k in graph_inputs}
    if len(n) != 1 or 0 in n:
        raise ConfigurationError(f"{path}: the graph inputs must all have the same, non-zero batch length (got {n})")
    total = n.pop()
    for first in range(0, total, per_run):
        yield {k: np.ascontiguousarray(arrays[k][first:first + per_run]) for k in graph_inputs}


def _synthetic_batches(reference, config: dict, samples: int, num_levels: int, seed: int):
    """Per noise level one feed of ``samples`` inputs, from the calibration stream (never validation's)."""
    assert e2e.CALIBRATION_STREAM != e2e.VALIDATION_STREAM
    rng = e2e.input_rng(seed, e2e.CALIBRATION_STREAM)
    found = e2e.noise_levels(config, num_levels)
    if found is None:
        raise ConfigurationError("calibration needs the model's noise range: config.json gives neither "
                                 "sigma_min/sigma_max nor num_train_timesteps")
    levels = found[0]
    spec = e2e._Feeds(reference.get_inputs(), config, samples, conditioning=rng.uniform(0.0, 1.0, samples))
    if spec.problems:
        raise ConfigurationError("calibration cannot build inputs for the graph: " + "; ".join(spec.problems))
    inputs = e2e.noisy_inputs(reference, spec, levels, rng)
    for group, feeds, _ in e2e.level_batches(spec, levels, inputs, 1):
        yield float(levels[group[0]]), feeds


def collect(model_path, names: Iterable[str], *, samples: int, num_levels: int = 10,
            seed: int = e2e.DEFAULT_SEED, inputs: Optional[Path] = None, threads: int = 1,
            check: Optional[Callable[[], None]] = None,
            on_pass: Optional[Callable[[int, int], None]] = None) -> Calibration:
    """Run the original graph next to ``model_path`` and collect H for the weights in ``names``.

    ``inputs``: a ``.npz`` of graph inputs replacing the synthetic ones (then every batch of
    ``samples`` counts the same). ``on_pass(done, total)`` reports forward passes.
    Raises :class:`ConfigurationError` when the model has no usable graph.
    """
    started = time.perf_counter()
    graph = check_model(model_path)
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigurationError(f"calibration needs onnx and onnxruntime ({e.name} is missing): "
                                 "pip install 'arrow-quant-v2[onnx]'") from None
    try:
        model = onnx.load(str(graph))
    except Exception as e:  # noqa: BLE001 - any unreadable graph is a bad input
        raise ConfigurationError(f"{graph}: cannot be loaded as ONNX ({e})") from None
    layers, skipped = find_layers(model, names)
    if not layers:
        raise ConfigurationError(f"{graph}: none of the tensors to quantize is the weight of a Conv/Gemm/MatMul "
                                 "node, so the graph cannot calibrate them")
    config = e2e._model_config(graph)
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    sizes = _activation_sizes(model)
    del model
    reference = _session(onnx.load(str(graph)), [], threads)
    rng = e2e.input_rng(seed, e2e.CALIBRATION_STREAM + 1)  # which conv positions enter H
    if inputs is not None:
        feeds_list = [(None, f) for f in _user_batches(Path(inputs), graph_inputs, samples)]
        source = f"user inputs {Path(inputs).name}"
    else:
        feeds_list = list(_synthetic_batches(reference, config, samples, num_levels, seed))
        source = f"synthetic, stream {e2e.CALIBRATION_STREAM} of seed {seed}"
    del reference
    if not feeds_list:
        raise ConfigurationError(f"{inputs}: holds no calibration samples")
    by_key: Dict[tuple, List[str]] = {}
    for w, layer in layers.items():
        by_key.setdefault(layer.key, []).append(w)
    groups = _groups(sorted({k[0] for k in by_key}), sizes, samples)
    sums: Dict[tuple, np.ndarray] = {}
    total, done = len(groups) * len(feeds_list), 0
    for group in groups:  # a few layers' inputs per forward pass: memory is one group's activations
        session = _session(onnx.load(str(graph)), group, threads)
        keys = [k for k in by_key if k[0] in group]
        for _, feeds in feeds_list:
            if check:
                check()
            acts = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            for key in keys:
                x = layer_rows(acts[key[0]], layers[by_key[key][0]], rng)
                h = x.T @ x
                # Every pass (noise level) weighs the same whatever the activations' scale at that level:
                # the error that matters is relative to each level's own signal (an output cosine per level).
                h /= max(float(np.trace(h)), np.finfo(np.float32).tiny)
                sums[key] = h if key not in sums else sums[key].__iadd__(h)
            del acts
            done += 1
            if on_pass:
                on_pass(done, total)
        del session
    for h in sums.values():
        h /= np.float32(len(feeds_list))
    hessians = {w: sums[layer.key] for w, layer in layers.items()}  # layers reading the same input share it
    level_list = [lv for lv, _ in feeds_list if lv is not None]
    return Calibration(hessians, layers, skipped, level_list, samples, source, time.perf_counter() - started,
                       gain_feeds=sensitivity.gain_inputs([f for _, f in feeds_list]))


def measure_gains(model_path, source, calibrated: Calibration, config, bits: Dict[str, int], *, threads: int = 1,
                  check: Optional[Callable[[], None]] = None,
                  on_pass: Optional[Callable[[int, int], None]] = None) -> "sensitivity.Gains":
    """Each calibrated layer's downstream gain (:func:`sensitivity.downstream_gains`), measured with the
    layer quantized at ``bits[name]`` (the plan's width, data-free rounding on ``config``'s grid for it).
    Sets ``calibrated.gains`` and returns it."""
    started = time.perf_counter()

    def probe(name: str) -> Optional[tuple]:
        info = source.tensors[name]
        rows, cols = info.matrix_shape
        c = policy.choose(config, bits.get(name) or config.bit_width, cols)
        if c.encoding is None:
            return None
        w = source.read_rows(name, 0, rows)
        enc = encodings.get_encoding(c.encoding, c.bits, c.group)
        q = encodings.dequantize(encodings.quantize(w, enc)[0], enc, rows, cols)
        layer = calibrated.layers[name]
        est = sensitivity.rel_error2(sensitivity.view_stats(w, q, calibrated.hessians[name], layer.transposed,
                                                            np.arange(rows)))
        return q.astype(np.float32).ravel(), est

    reads = {n: layer.activation for n, layer in calibrated.layers.items()}
    calibrated.gains = sensitivity.downstream_gains(check_model(model_path), probe, list(calibrated.layers),
                                                    calibrated.gain_feeds, reads=reads, threads=threads,
                                                    check=check, on_pass=on_pass)
    calibrated.seconds += time.perf_counter() - started
    return calibrated.gains


def weight_matrix(w2d: np.ndarray, layer: Layer) -> np.ndarray:
    """The weight's 2-D view turned outputs x inputs (the orientation H belongs to)."""
    return w2d.T if layer.transposed else w2d


def check_model(model_path) -> Path:
    """The graph calibration will use, or :class:`ConfigurationError` saying that calibration needs one."""
    graph = e2e.find_graph(model_path)
    if graph is None:
        raise ConfigurationError(
            f"{model_path}: calibration='graph' needs the model's executable graph "
            f"({' / '.join(e2e.GRAPH_NAMES)}) next to the weights; this folder has none. "
            "Quantize without calibration (calibration=None), or add the graph.")
    return graph


__all__ = ["Calibration", "Layer", "collect", "measure_gains", "check_model", "find_layers", "patches", "weight_matrix",
           "MAX_ROWS_PER_SAMPLE"]
