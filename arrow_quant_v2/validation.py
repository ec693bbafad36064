"""Validating a store against its source, re-reading both independently.

Nothing recorded at write time is trusted: every tensor is dequantized from the
store and compared with the source read afresh. The figures stored in the Parquet
rows must agree with the re-measured ones, which catches a store that does not
match its source (or a corrupted one) even when the headers happen to agree.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from . import kernels
from .config import DEFAULT_MIN_ACCURACY
from .encodings import figures
from .errors import ArrowQuantError, ValidationError
from .progress import CancelToken, ProgressEvent, ProgressSink
from .source import open_model
from .store import load_quantized

#: How far a re-measured cosine may drift from the stored one before the store is called inconsistent.
COSINE_AGREEMENT = 1e-6


def validate_store(original_path, quantized_path, *, min_accuracy: Optional[float] = None,
                   progress: Optional[ProgressSink] = None, cancel: Optional[CancelToken] = None) -> dict:
    """Compare every tensor of the store with the source; see README for the result keys."""
    cancel = cancel or CancelToken()
    try:
        source = open_model(original_path)
    except ArrowQuantError as e:
        raise ValidationError(f"cannot read the original model: {e}") from e
    store = load_quantized(quantized_path)
    recorded = store.manifest.get("source", {}).get("header_checksum")
    if recorded != source.header_checksum:
        raise ValidationError(
            f"{quantized_path}: was made from a different model than {original_path} (header checksum differs)"
        )
    missing = sorted(set(source.tensors) - set(store.tensors))
    extra = sorted(set(store.tensors) - set(source.tensors))
    if missing or extra:
        raise ValidationError(f"{quantized_path}: tensors missing {missing[:5]} / unexpected {extra[:5]} versus the source")

    per_layer: Dict[str, dict] = {}
    total = max(source.total_bytes, 1)
    done = 0
    for i, (name, entry) in enumerate(store.tensors.items()):
        cancel.check()
        info = source.tensors[name]
        if entry.shape != info.shape or entry.dtype != info.dtype:
            raise ValidationError(f"{quantized_path}: tensor {name!r} is {entry.dtype}{list(entry.shape)} in the store "
                                  f"but {info.dtype}{list(info.shape)} in the source")
        if not entry.quantized:
            if not np.array_equal(store.raw(name).reshape(-1).view(np.uint8), source.read_raw(name).view(np.uint8)):
                raise ValidationError(f"{quantized_path}: lossless tensor {name!r} differs from the source")
        else:
            x = source.read_float32(name)
            y = store.dequantize(name)
            fig = figures(kernels.error_stats(np.ascontiguousarray(x), np.ascontiguousarray(y)))
            if not math.isclose(fig["cosine"], entry.cosine, rel_tol=0, abs_tol=COSINE_AGREEMENT):
                raise ValidationError(
                    f"{quantized_path}: tensor {name!r} measures cosine {fig['cosine']:.6f} but the store recorded "
                    f"{entry.cosine:.6f}: the store is corrupt or does not match the source"
                )
            need = min_accuracy if min_accuracy is not None else DEFAULT_MIN_ACCURACY[entry.bits]
            per_layer[name] = dict(
                fig, bits=entry.bits, encoding=entry.encoding, group_size=entry.group_size, shape=list(entry.shape),
                numel=entry.numel, bits_per_weight=entry.bits_per_weight, reason=entry.reason,
                threshold=need, passed=fig["cosine"] >= need,
            )
        done += info.nbytes
        if progress is not None:
            progress(ProgressEvent(stage="validate", fraction=min(done / total, 0.99), message=f"checking {name}",
                                   tensor=name, tensors_done=i + 1, tensors_total=len(store.tensors),
                                   bytes_done=done, bytes_total=total))
    params = sum(p["numel"] for p in per_layer.values())
    cos = sum(p["numel"] * p["cosine"] for p in per_layer.values()) / params if params else 1.0
    worst = sorted(per_layer, key=lambda n: per_layer[n]["cosine"])[:10]
    weight_bytes = store.weight_bytes
    report = {
        "cosine_similarity": float(cos),
        "compression_ratio": source.total_bytes / weight_bytes if weight_bytes else 0.0,
        "per_layer_accuracy": {n: p["cosine"] for n, p in per_layer.items()},
        "passed": all(p["passed"] for p in per_layer.values()),
        "min_cosine": min((p["cosine"] for p in per_layer.values()), default=1.0),
        "worst_layers": [(n, per_layer[n]["cosine"]) for n in worst],
        "failed_layers": [n for n, p in per_layer.items() if not p["passed"]],
        "per_layer": per_layer,
        "model_size_mb": weight_bytes / 2**20,
        "bits_per_weight": sum(p["bits_per_weight"] * p["numel"] for p in per_layer.values()) / params if params else 0.0,
        "num_quantized": len(per_layer),
        "num_lossless": len(store.tensors) - len(per_layer),
        "modality": store.manifest.get("modality", {}).get("name"),
    }
    if progress is not None:
        progress(ProgressEvent(stage="done", fraction=1.0, message="validation done",
                               tensors_done=len(store.tensors), tensors_total=len(store.tensors),
                               bytes_done=total, bytes_total=total))
    return report
