"""Figures that say how much quantization moved the weights, for a tensor and for a model.

The definitions every report shares (quantize results, validation of a store or of a GGUF file):
a tensor's cosine, relative Frobenius error and SQNR from the fused statistics the kernels return;
a model's cosine as the parameter-weighted mean; the validation report's model-level figures.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np


def weighted_cosine(tensors) -> float:
    """A model's cosine similarity: the parameter-weighted mean over its quantized tensors
    (each an object or dict with ``numel`` and ``cosine``); 1.0 when none is quantized."""
    pairs = [(t["numel"], t["cosine"]) for t in tensors]
    params = sum(n for n, _ in pairs)
    return float(sum(n * c for n, c in pairs) / params) if params else 1.0


def figures(stats: np.ndarray) -> Dict[str, float]:
    """Cosine, relative Frobenius error and SQNR (dB) from fused statistics."""
    xy, xx, yy, ee = (float(v) for v in stats)
    if xx == 0.0:
        cos = 1.0 if yy == 0.0 else 0.0
        return {"cosine": cos, "rel_error": 0.0 if ee == 0.0 else math.inf, "sqnr_db": math.inf if ee == 0 else -math.inf}
    cos = xy / math.sqrt(xx * yy) if yy > 0 else 0.0
    rel = math.sqrt(ee / xx)
    sqnr = math.inf if ee == 0.0 else 10.0 * math.log10(xx / ee)
    return {"cosine": min(cos, 1.0), "rel_error": rel, "sqnr_db": sqnr}


#: How far a re-measured cosine may drift from the stored one before the store is called inconsistent.
COSINE_AGREEMENT = 1e-6


def summarize(per_layer: Dict[str, dict], *, num_tensors: int, source_bytes: int, weight_bytes: int,
              modality: Optional[str]) -> dict:
    """The validation report's figures from the per-layer records (a store's or a GGUF file's)."""
    params = sum(p["numel"] for p in per_layer.values())
    worst = sorted(per_layer, key=lambda n: per_layer[n]["cosine"])[:10]
    return {
        "cosine_similarity": weighted_cosine(per_layer.values()),
        "compression_ratio": source_bytes / weight_bytes if weight_bytes else 0.0,
        "source_bytes": source_bytes,
        "per_layer_accuracy": {n: p["cosine"] for n, p in per_layer.items()},
        "passed": all(p["passed"] for p in per_layer.values()),
        "min_cosine": min((p["cosine"] for p in per_layer.values()), default=1.0),
        "worst_layers": [(n, per_layer[n]["cosine"]) for n in worst],
        "failed_layers": [n for n, p in per_layer.items() if not p["passed"]],
        "per_layer": per_layer,
        "model_size_mb": weight_bytes / 2**20,
        "bits_per_weight": sum(p["bits_per_weight"] * p["numel"] for p in per_layer.values()) / params if params else 0.0,
        "num_quantized": len(per_layer),
        "num_lossless": num_tensors - len(per_layer),
        "modality": modality,
    }


def end_to_end_unavailable(reason: str, **extra) -> dict:
    """The ``end_to_end`` entry of a validation report when the network could not be run."""
    return dict({"available": False, "reason": reason, "levels": []}, **extra)
