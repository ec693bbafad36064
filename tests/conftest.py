"""Shared, generic pytest fixtures.

Keep fixtures here model- and API-agnostic so any test module can use them:

* ``make_model``: a factory of small deterministic safetensors models (F32/F16).
* ``big_model``: one model with a single >= 100M-element F32 tensor (~420 MB), built
  once per session, for cancellation tests. Never quantize it to the end in a test.
* ``repo_root``: the repository folder.

The repository root is put on ``sys.path`` so the tests run against the working tree
without an install (``python -m pytest`` from the root does that anyway).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Named sizes for ``make_model(size=...)``: (hidden, intermediate, layers, vocab).
MODEL_SIZES: Dict[str, Tuple[int, int, int, int]] = {
    "tiny": (64, 128, 2, 256),       # ~0.1M params: every Linear just above the lossless floor
    "small": (128, 256, 2, 512),     # ~0.4M params
    "medium": (256, 768, 4, 2048),   # ~4M params
    "large": (512, 1536, 4, 8192),   # ~17M params, ~68 MB F32
}


def model_tensors(hidden: int, intermediate: int, layers: int, vocab: int, *, dtype: str = "float32",
                  seed: int = 0) -> Dict[str, np.ndarray]:
    """Linear-like 2-D weights, 1-D norms and a biased time embedding, Hugging Face names."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    t: Dict[str, np.ndarray] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1.0 + w(hidden)).astype(dtype)
        t[p + "self_attn.q_proj.weight"] = w(hidden, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        t[p + "mlp.up_proj.weight"] = w(intermediate, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, intermediate)
    t["time_embed.0.weight"] = w(hidden, hidden)
    t["time_embed.0.bias"] = w(hidden)
    t["model.norm.weight"] = np.ones(hidden, dtype=dtype)
    return t


def write_model(folder: Path, tensors: Dict[str, np.ndarray], config: dict) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """``make_model(size="small", *, dtype="float32", seed=0, name=None) -> Path`` of a model folder.

    ``size`` is a key of :data:`MODEL_SIZES` or a ``(hidden, intermediate, layers, vocab)`` tuple;
    ``dtype`` is ``"float32"`` or ``"float16"``. The same arguments give the same folder
    (built once per session): treat it as read-only. Pass ``name`` for a private copy.
    """
    built: Dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("models")

    def make(size="small", *, dtype: str = "float32", seed: int = 0, name=None) -> Path:
        dims = MODEL_SIZES[size] if isinstance(size, str) else tuple(size)
        key = (dims, dtype, seed, name)
        if key not in built:
            label = name or f"{size if isinstance(size, str) else 'x'.join(map(str, dims))}-{dtype}-s{seed}"
            hidden, inter, layers, vocab = dims
            config = {"model_type": "dream", "architectures": ["DreamModel"], "hidden_size": hidden,
                      "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
                      "torch_dtype": dtype}
            built[key] = write_model(base / label, model_tensors(*dims, dtype=dtype, seed=seed), config)
        return built[key]

    return make


#: The big tensor: 10240 x 10240 = 104,857,600 float32 elements (400 MiB).
BIG_SHAPE = (10240, 10240)


def write_big_safetensors(path: Path, name: str, shape, *, seed: int = 0, rows_per_block: int = 512) -> Path:
    """Stream one F32 tensor to a safetensors file block by block (never all in memory)."""
    rows, cols = shape
    nbytes = rows * cols * 4
    header = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for r in range(0, rows, rows_per_block):
            block = rng.standard_normal((min(rows_per_block, rows - r), cols), dtype=np.float32)
            block *= 0.02
            f.write(block.tobytes())
    return path


@pytest.fixture(scope="session")
def big_model(tmp_path_factory) -> Path:
    """A model folder whose one weight has >= 100M elements (~420 MB on disk), built once per session."""
    folder = tmp_path_factory.mktemp("big-model")
    write_big_safetensors(folder / "model.safetensors", "model.layers.0.mlp.up_proj.weight", BIG_SHAPE)
    (folder / "config.json").write_text(json.dumps({"model_type": "dream"}), encoding="utf-8")
    return folder
