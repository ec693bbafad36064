"""Validating a store against its source, re-reading both independently.

Nothing recorded at write time is trusted: every tensor is dequantized from the
store and compared with the source read afresh. The figures stored in the Parquet
rows must agree with the re-measured ones, which catches a store that does not
match its source (or a corrupted one) even when the headers happen to agree.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .config import DEFAULT_MIN_ACCURACY
from .kernels import rounding
from .metrics import COSINE_AGREEMENT, end_to_end_unavailable, figures, summarize
from .errors import ArrowQuantError, ValidationError
from .progress import CancelToken, ProgressEvent, ProgressSink
from .source import open_model
from .store import load_quantized

#: The part of the whole validation's fraction the per-layer check takes when an end-to-end check
#: follows (their costs are not known in advance, so the ETA uses each stage's own fraction).
PER_LAYER_SHARE = 0.5


def validate_store(original_path, quantized_path, *, min_accuracy: Optional[float] = None,
                   progress: Optional[ProgressSink] = None, cancel: Optional[CancelToken] = None,
                   end_to_end: Optional[bool] = None, num_time_groups: Optional[int] = None) -> dict:
    """Compare every tensor of the store (or GGUF file) with the source; see README for the result keys.

    ``original_path`` may be a Hugging Face repo id (``org/name[@revision]``) in the local cache.

    ``end_to_end`` (None = whenever the model folder keeps an executable graph, e.g.
    ``model.onnx``; False = never) also runs the original and the dequantized network at
    ``num_time_groups`` noise levels (None = the value in the store's config) and reports
    per-level output fidelity under ``report["end_to_end"]`` (see :mod:`arrow_quant_v2.e2e`).
    A GGUF file gets the same check: its tensors, dequantized by gguf-py and mapped back to the
    source names, replace the graph's weights (10 levels unless its recorded config says otherwise).
    """
    from . import e2e, hub
    from .gguf_io import looks_like_gguf

    try:
        original_path = hub.resolve(original_path)  # a Hugging Face repo id: its cached snapshot
    except ArrowQuantError as e:
        raise ValidationError(f"cannot read the original model: {e}") from e
    cancel = cancel or CancelToken()
    graph = e2e.find_graph(original_path) if end_to_end is not False else None
    keep: Optional[Dict[str, np.ndarray]] = {} if graph is not None else None  # dequantized weights for the graph
    # the two stages' relative costs are not known in advance: each reports its own stage_fraction
    layer_share = PER_LAYER_SHARE if graph is not None else 1.0
    store = None
    if looks_like_gguf(quantized_path):
        from .gguf_io import validate_gguf

        report = validate_gguf(original_path, quantized_path, min_accuracy=min_accuracy, progress=progress,
                               cancel=cancel, keep=keep, share=layer_share)
        recorded = report.get("config") or {}
    else:
        store = load_quantized(quantized_path)
        report = _compare_store(original_path, quantized_path, store, min_accuracy, progress, cancel, keep, layer_share)
        recorded = store.manifest.get("config", {})
    n_tensors = report["num_quantized"] + report["num_lossless"]
    total = max(report["source_bytes"], 1)
    if graph is None:
        report["end_to_end"] = end_to_end_unavailable(
            "not requested (end_to_end=False)" if end_to_end is False else
            f"no executable graph ({' / '.join(e2e.GRAPH_NAMES)}) next to the weights of {Path(original_path).name}")
    else:
        groups = int(num_time_groups or recorded.get("num_time_groups") or 10)

        def at(part: float, message: str) -> None:
            if progress is not None:
                progress(ProgressEvent(stage="end-to-end", fraction=min(layer_share + (1 - layer_share) * part, 0.99),
                                       stage_fraction=part, message=f"end-to-end check at {groups} noise levels: {message}",
                                       tensors_done=n_tensors, tensors_total=n_tensors, bytes_done=total,
                                       bytes_total=total))

        at(0.0, f"loading {graph.name}")
        report["end_to_end"] = e2e.end_to_end(
            original_path, store, num_time_groups=groups, weights=keep, check=cancel.check,
            on_level=lambda done, passes: at(done / max(passes, 1), f"forward pass {done}/{passes}"))
    if progress is not None:
        progress(ProgressEvent(stage="done", fraction=1.0, message="validation done", tensors_done=n_tensors,
                               tensors_total=n_tensors, bytes_done=total, bytes_total=total))
    return report


def _compare_store(original_path, quantized_path, store, min_accuracy: Optional[float],
                   progress: Optional[ProgressSink], cancel: CancelToken,
                   keep: Optional[Dict[str, np.ndarray]], layer_share: float) -> dict:
    """The per-layer check of a store: every tensor re-read from both sides; ``keep`` (if given)
    collects the dequantized tensors for the end-to-end check."""
    made_from = store.manifest.get("source", {})  # the components and variant the store was made from
    try:
        source = open_model(original_path, components=made_from.get("components"), variant=made_from.get("variant"))
    except ArrowQuantError as e:
        raise ValidationError(f"cannot read the original model: {e}") from e
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
    n_tensors = len(store.tensors)
    if progress is not None:  # at once, so nothing sits at "0 %" while the first tensor is read
        progress(ProgressEvent(stage="validate", fraction=0.0, stage_fraction=0.0, tensors_total=n_tensors,
                               bytes_total=total, message=f"per-layer check: {n_tensors} tensors against the source"))
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
            if keep is not None:
                keep[name] = y
            fig = figures(rounding.error_stats(np.ascontiguousarray(x), np.ascontiguousarray(y)))
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
            progress(ProgressEvent(stage="validate", fraction=min(layer_share * done / total, 0.99),
                                   stage_fraction=done / total, message=f"per-layer check: {name}",
                                   tensor=name, tensors_done=i + 1, tensors_total=n_tensors,
                                   bytes_done=done, bytes_total=total))
    report = summarize(per_layer, num_tensors=len(store.tensors), source_bytes=source.total_bytes,
                       weight_bytes=store.weight_bytes, modality=store.manifest.get("modality", {}).get("name"))
    return report
