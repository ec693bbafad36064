"""The synthetic Dream generator: diffusion LMs in the Dream-7B / Qwen2 layout, any size.

Weights are heavy-tailed (Student-t, per-row log-normal scales, outlier input channels like
LLMs' massive-activation dimensions), produced tensor by tensor in row chunks and seeded per
tensor name, so output is a pure function of the arguments and a 7B shape fits in memory.
The ``tiny-dream`` sample is :data:`DREAM_PRESETS` ``["tiny"]``.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..safetensors_writer import TensorSpec, float32_to_bf16_bits, write_sharded


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


def dream_params(preset: Mapping[str, int]) -> int:
    dims = {k: v for k, v in preset.items() if k != "max_shard_bytes"}
    return sum(s.numel for s in dream_tensor_specs(**dims))



def build_tiny_dream(folder: Path, wheel: Path | None) -> None:
    generate_dream(folder, seed=0, **DREAM_PRESETS["tiny"])
