"""The ``terrain-unet`` sample: a real consistency-distilled diffusion U-Net, from its PyPI wheel.

:func:`build_terrain_unet` converts the wheel's ONNX graph into ``model.safetensors`` (the
``network.*`` initializers) and keeps the graph as ``model.onnx``; :func:`run_terrain_onnx` runs
that graph with other (e.g. dequantized) weights, which is how end-to-end validation works.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ModelNotFoundError
from ..safetensors_writer import TensorSpec, write_safetensors
from .wheels import PinnedWheel

TERRAIN_WHEEL = PinnedWheel(
    "adaptive-terrain-diffusion", "0.4.2", "adaptive_terrain_diffusion-0.4.2-py3-none-any.whl",
    "dd803be2c98d764e4e64db18c631eef46c210282b398c4dd080f4cda3fa7c84d", "ARROW_QUANT_TERRAIN_WHEEL",
)

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


def build_terrain_unet(folder: Path, wheel: Path) -> None:
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

