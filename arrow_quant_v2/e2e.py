"""Time-aware end-to-end validation: run the original and the dequantized network.

Per-tensor figures say how much each weight moved; what a user cares about is the output,
and for a diffusion model the output at every noise level. When a model folder carries an
executable graph (``model.onnx`` beside the weights, whose initializers are named like the
safetensors tensors - the ``terrain-unet`` sample keeps one), :func:`end_to_end` runs the
graph twice with onnxruntime on CPU - once as shipped, once with every quantized tensor
replaced by its dequantized values from the store (or from a GGUF file) - on the same fixed, seeded inputs at
``num_time_groups`` noise levels log-spaced over the model's range, and compares outputs.

Inputs
    The range is ``sigma_min``..``sigma_max`` from ``config.json`` (EDM/consistency models;
    0.002..80 for the terrain U-Net), else ``0``..``num_train_timesteps - 1`` (DDPM-style
    integer timesteps, linearly spaced). A clean sample ``x0`` is the original network's own
    one-step output from pure noise at the top level (a sample from the model's
    distribution, so low-noise inputs look like real data, not like noise); the input at
    level ``s`` is ``x0 + s * n_s`` with fixed seeded noise ``n_s``. The batch
    (:data:`DEFAULT_BATCH` samples) spreads the other inputs: float conditioning (e.g. the
    terrain model's ``difficulty``) over :data:`CONDITIONING_SPAN` (0.1, 0.5, 0.9 for
    three samples), integer labels over the model's ``num_classes``. The inputs come from
    the :data:`VALIDATION_STREAM` of the seed; calibration (:mod:`arrow_quant_v2.calibration`)
    draws from another stream with random conditioning, so its inputs are never the ones
    validated on. A graph whose inputs cannot be read this way is reported as
    unavailable with the reason.

Figures per level (the reference is the original network's output ``y``; ``q`` the quantized one's)
    ``cosine`` cos(y, q); ``rel_error`` ||q - y|| / ||y||; ``psnr_db`` 20 log10(range(y) /
    rms(q - y)); ``update_cosine`` cos(y - x, q - x), the agreement of the denoising update
    itself (``x`` the input): models with a skip connection (consistency models return
    ``c_skip(s) x + c_out(s) F``) have ``cosine`` near 1 at low noise whatever ``F`` does,
    and this one shows whether the network's own contribution survived.
    ``sample_cosines`` / ``worst_sample_cosine``: each sample's cosine alone and the lowest,
    the spread a batch figure hides (the summary's ``worst_sample_cosine`` is the lowest
    over all samples and levels).

Cost: ``2 * num_time_groups + 1`` forward passes (batch 3 per level; a few seconds for
the terrain U-Net at 128x128 and 10 levels), so :func:`arrow_quant_v2.validation.validate_store` runs it
by default whenever a graph is present (``end_to_end=False`` skips it).
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .metrics import end_to_end_unavailable

GRAPH_NAMES = ("model.onnx",)
#: Samples per noise level: each one its own clean sample, noise and conditioning value.
DEFAULT_BATCH = 3
DEFAULT_SEED = 0
#: Float conditioning (e.g. the terrain model's ``difficulty``) of the validation samples
#: spans this range across the batch: low, middle and high difficulty, not one draw.
CONDITIONING_SPAN = (0.1, 0.9)
#: Random streams, one per purpose: validation and calibration inputs come from different
#: streams of the same seed, so they can never coincide (calibration asserts it).
VALIDATION_STREAM = 0
CALIBRATION_STREAM = 1
_LEVEL_INPUT = re.compile(r"(sigma|timestep|time|noise_level|^t$)", re.I)
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def find_graph(model_path) -> Optional[Path]:
    """The executable graph kept with a model folder (or beside a .safetensors file), if any."""
    p = Path(model_path)
    folder = p if p.is_dir() else p.parent
    for name in GRAPH_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def input_rng(seed: int, stream: int) -> np.random.Generator:
    """The generator of one purpose's inputs (:data:`VALIDATION_STREAM`, :data:`CALIBRATION_STREAM`)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def _model_config(graph: Path) -> dict:
    cfg = graph.parent / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    except (OSError, ValueError):
        return {}


def noise_levels(config: dict, n: int) -> Optional[Tuple[np.ndarray, str]]:
    """``(levels from high to low noise, description)`` for a model config, or None if it gives no range."""
    lo, hi = config.get("sigma_min"), config.get("sigma_max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi:
        levels = np.geomspace(hi, lo, n) if n > 1 else np.array([math.sqrt(lo * hi)])
        return levels, f"sigma log-spaced over [{lo}, {hi}] (config.json)"
    steps = config.get("num_train_timesteps")
    if isinstance(steps, int) and steps > 1:
        levels = np.round(np.linspace(steps - 1, 0, n)) if n > 1 else np.array([steps // 2])
        return levels.astype(float), f"timesteps over [0, {steps - 1}] (config.json num_train_timesteps)"
    return None


class _Feeds:
    """Maps a graph's inputs to: the sample, the noise level, and fixed conditioning."""

    def __init__(self, inputs, config: dict, batch: int, conditioning: Optional[np.ndarray] = None) -> None:
        self.sample = self.level = None
        self.fixed: Dict[str, np.ndarray] = {}
        self.problems: List[str] = []
        self.level_dtype = np.float32
        for i in inputs:
            dtype = _ORT_DTYPES.get(i.type)
            shape = list(i.shape)
            if dtype is None:
                self.problems.append(f"input {i.name!r} has type {i.type}")
                continue
            if len(shape) >= 3 and np.issubdtype(dtype, np.floating):
                dims = [batch] + [self._dim(d, config) for d in shape[1:]]
                if any(d is None for d in dims):
                    self.problems.append(f"input {i.name!r} has unknown dimensions {shape}")
                self.sample, self.sample_shape, self.sample_dtype = i.name, dims, dtype
            elif len(shape) <= 1 and _LEVEL_INPUT.search(i.name) and self.level is None:
                self.level, self.level_dtype, self.level_rank = i.name, dtype, len(shape)
            elif len(shape) <= 1:
                classes = max(int(config.get("num_classes", batch) or batch), 1)
                if conditioning is not None:  # values in [0, 1): calibration draws them at random
                    u = np.asarray(conditioning, np.float64)
                else:
                    u = np.linspace(*CONDITIONING_SPAN, batch) if batch > 1 else np.array([0.5])
                v = u if np.issubdtype(dtype, np.floating) else np.minimum((u * classes).astype(np.int64), classes - 1)
                self.fixed[i.name] = v.astype(dtype).reshape(shape and [batch] or [])
            else:
                self.problems.append(f"input {i.name!r} of shape {shape} is neither the sample nor a per-item value")
        if self.sample is None:
            self.problems.append("no image/latent-like input (rank >= 3, float)")
        if self.level is None:
            self.problems.append("no noise-level input (a rank <= 1 input named sigma/timestep/t)")

    @staticmethod
    def _dim(d, config: dict):
        if isinstance(d, int) and d > 0:
            return d
        size = config.get("sample_size")
        return int(size) if isinstance(size, int) else None

    def feeds(self, x: np.ndarray, levels: np.ndarray, repeat: int = 1) -> Dict[str, np.ndarray]:
        """Inputs for ``x`` (its batch is ``repeat`` copies of the base batch) at per-item ``levels``."""
        levels = np.asarray(levels, dtype=self.level_dtype).reshape(-1)
        lv = np.broadcast_to(levels, (x.shape[0],)).copy() if self.level_rank == 1 else levels[0]
        fixed = {k: (np.tile(v, repeat) if v.ndim else v) for k, v in self.fixed.items()}
        return dict(fixed, **{self.sample: x.astype(self.sample_dtype), self.level: lv})


def _conditioning_desc(spec: "_Feeds") -> str:
    return ", ".join(f"{k} {', '.join(f'{v:g}' for v in np.ravel(a))}" for k, a in spec.fixed.items()) or "no conditioning"


def _figures(y: np.ndarray, q: np.ndarray, x: np.ndarray) -> dict:
    y, q, x = (a.astype(np.float64).ravel() for a in (y, q, x))
    d = q - y
    ny, nq = np.linalg.norm(y), np.linalg.norm(q)
    cos = float(y @ q / (ny * nq)) if ny > 0 and nq > 0 else (1.0 if ny == nq else 0.0)
    rel = float(np.linalg.norm(d) / ny) if ny > 0 else (0.0 if not d.any() else math.inf)
    rms = float(np.sqrt(np.mean(d * d)))
    peak = float(y.max() - y.min())
    psnr = math.inf if rms == 0 else (20.0 * math.log10(peak / rms) if peak > 0 else -math.inf)
    uy, uq = y - x, q - x
    nu, nv = np.linalg.norm(uy), np.linalg.norm(uq)
    ucos = float(uy @ uq / (nu * nv)) if nu > 0 and nv > 0 else 1.0
    return {"cosine": min(cos, 1.0), "rel_error": rel, "psnr_db": psnr, "update_cosine": min(ucos, 1.0)}


def noisy_inputs(reference, spec: "_Feeds", levels: np.ndarray, rng: np.random.Generator) -> List[np.ndarray]:
    """One input batch per noise level: a clean sample plus that level's seeded noise.

    The clean sample ``x0`` is the network's own one-step output from pure noise at the top
    level (so low-noise inputs look like the model's data, not like noise); a network that
    does not return a sample of the input's shape gets the noise itself as ``x0``.
    """
    noise0 = rng.standard_normal(spec.sample_shape)
    top = float(levels.max())
    x0 = reference.run(None, spec.feeds((noise0 * top).astype(np.float32), np.array([top])))[0]
    if x0.shape != tuple(spec.sample_shape):
        x0 = noise0.astype(np.float32)
    return [(x0 + float(level) * rng.standard_normal(spec.sample_shape)).astype(np.float32) for level in levels]


def level_batches(spec: "_Feeds", levels: np.ndarray, inputs: List[np.ndarray], per_run: int):
    """``(level indices, feeds, stacked input)`` with ``per_run`` levels stacked per forward pass."""
    batch = spec.sample_shape[0]
    for first in range(0, len(levels), per_run):  # several levels per pass: far fewer, bigger runs
        group = range(first, min(first + per_run, len(levels)))
        x = np.concatenate([inputs[k] for k in group])
        lv = np.repeat([levels[k] for k in group], batch)
        yield group, spec.feeds(x, lv, repeat=len(group)), x


def _level_figures(y: np.ndarray, q: np.ndarray, x: np.ndarray) -> dict:
    """One level's figures over its whole batch, plus each sample's cosine (the spread)."""
    if y.shape != x.shape:  # not a denoiser of its input: no update to compare
        fig = {k: v for k, v in _figures(y, q, np.zeros_like(y)).items() if k != "update_cosine"}
    else:
        fig = _figures(y, q, x)
    samples = [_figures(y[i], q[i], np.zeros_like(y[i]))["cosine"] for i in range(y.shape[0])]
    return dict(fig, sample_cosines=samples, worst_sample_cosine=min(samples))


def end_to_end(original_path, store=None, *, num_time_groups: int = 10, weights: Optional[Dict[str, np.ndarray]] = None,
               batch: int = DEFAULT_BATCH,
               seed: int = DEFAULT_SEED, threads: int = 1, levels_per_run: int = 5,
               check: Optional[Callable[[], None]] = None,
               on_level: Optional[Callable[[int, int], None]] = None) -> dict:
    """Compare the original and the dequantized network's outputs over the noise range.

    ``store`` is a :class:`~arrow_quant_v2.store.QuantizedModel` or a store path; ``weights``
    may hold tensors already dequantized from it (the rest are read from the store). Without a
    store, ``weights`` holds every replaced tensor under its source name (a GGUF file's tensors,
    dequantized and mapped back by :mod:`arrow_quant_v2.gguf_io`). Returns
    ``{"available", "reason", "levels": [{"sigma", "cosine", "rel_error", "psnr_db",
    "update_cosine"}, ...], "mean_cosine", "worst_cosine", "worst_sigma", "mean_rel_error",
    "worst_rel_error", "mean_psnr_db", "worst_psnr_db", ...}``; ``available`` is False (with
    the reason) for a model without a usable graph or without onnxruntime. ``levels_per_run``
    noise levels share one forward pass (their batches stacked). ``check`` is called between
    forward passes (e.g. a cancel token's ``check``); ``on_level(done, total)`` reports passes done.
    """
    started = time.perf_counter()
    graph = find_graph(original_path)
    if graph is None:
        return end_to_end_unavailable(f"no executable graph ({' / '.join(GRAPH_NAMES)}) next to the weights of {Path(original_path).name}")
    try:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
    except ImportError as e:
        return end_to_end_unavailable(f"onnx/onnxruntime are not installed ({e.name}); pip install 'arrow-quant-v2[onnx]'",
                            graph=str(graph))
    from .store import QuantizedModel, load_quantized

    if store is not None and not isinstance(store, QuantizedModel):
        store = load_quantized(store)
    config = _model_config(graph)
    levels = noise_levels(config, num_time_groups)
    if levels is None:
        return end_to_end_unavailable("config.json gives no noise range (sigma_min/sigma_max or num_train_timesteps)",
                            graph=str(graph))
    levels, level_desc = levels
    try:
        model = onnx.load(str(graph))
    except Exception as e:  # noqa: BLE001 - any unreadable graph is "unavailable", not a failed validation
        return end_to_end_unavailable(f"{graph.name} cannot be loaded ({e})", graph=str(graph))
    inits = {t.name: t for t in model.graph.initializer}
    quantized = [n for n, e in store.tensors.items() if e.quantized] if store is not None else list(weights or {})
    replaced = [n for n in quantized if n in inits]
    if quantized and not replaced:
        what = "the store's quantized tensors" if store is not None else "the quantized tensors"
        return end_to_end_unavailable(f"none of {what} is an initializer of {graph.name}", graph=str(graph))

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        reference = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        for name in replaced:
            t = inits[name]
            want = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            arr = (weights[name] if weights and name in weights else store.dequantize(name))
            arr = np.asarray(arr).reshape(tuple(int(d) for d in t.dims))
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=want), name))
        candidate = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return end_to_end_unavailable(f"onnxruntime cannot run {graph.name} ({e})", graph=str(graph))
    del model, inits
    spec = _Feeds(reference.get_inputs(), config, batch)
    if spec.problems:
        return end_to_end_unavailable("cannot build inputs for the graph: " + "; ".join(spec.problems), graph=str(graph))

    rng = input_rng(seed, VALIDATION_STREAM)
    per_run = max(1, levels_per_run)
    total = 1 + 2 * math.ceil(len(levels) / per_run)
    try:
        inputs = noisy_inputs(reference, spec, levels, rng)
        done = 1
        if on_level:
            on_level(done, total)
        rows = []
        for group, feeds, x in level_batches(spec, levels, inputs, per_run):
            outs = []
            for session in (reference, candidate):
                if check:
                    check()
                outs.append(session.run(None, feeds)[0])
                done += 1
                if on_level:
                    on_level(done, total)
            for j, k in enumerate(group):
                y, q, xi = (a[j * batch:(j + 1) * batch] for a in (outs[0], outs[1], x))
                rows.append(dict({"sigma": float(levels[k])}, **_level_figures(y, q, xi)))
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ == "Cancelled":
            raise
        return end_to_end_unavailable(f"onnxruntime failed while running {graph.name} ({e})", graph=str(graph))

    cos = [r["cosine"] for r in rows]
    rel = [r["rel_error"] for r in rows]
    psnr = [r["psnr_db"] for r in rows]
    worst = int(np.argmin(cos))
    report = {
        "available": True,
        "reason": f"{graph.name}: original vs dequantized weights, {len(rows)} noise levels ({level_desc}), "
                  f"batch {batch} ({_conditioning_desc(spec)}), seed {seed}",
        "graph": str(graph),
        "levels": rows,
        "num_levels": len(rows),
        "batch": batch,
        "seed": seed,
        "input_shape": list(spec.sample_shape),
        "replaced_tensors": len(replaced),
        "mean_cosine": float(np.mean(cos)),
        "worst_cosine": float(cos[worst]),
        "worst_sigma": rows[worst]["sigma"],
        "mean_rel_error": float(np.mean(rel)),
        "worst_rel_error": float(np.max(rel)),
        "mean_psnr_db": float(np.mean([p for p in psnr if math.isfinite(p)] or [math.inf])),
        "worst_psnr_db": float(np.min(psnr)),
        "worst_sample_cosine": float(min(r["worst_sample_cosine"] for r in rows)),
        "conditioning": {k: v.tolist() for k, v in spec.fixed.items()},
        "seconds": time.perf_counter() - started,
    }
    if all("update_cosine" in r for r in rows):
        report["worst_update_cosine"] = float(min(r["update_cosine"] for r in rows))
    return report
