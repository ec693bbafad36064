"""Exporting a store: the one place that picks the format and describes the result.

``export_store`` backs ``arrow-quant export``, ``AsyncArrowQuantV2.export_async`` and the app's
Export actions: GGUF (:meth:`QuantizedModel.to_gguf`, lossless, for llama.cpp / ComfyUI-GGUF /
diffusers) or a folder of dequantized safetensors (:meth:`QuantizedModel.to_safetensors`). Both
stop at the next tensor when cancelled and leave nothing behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import ConfigurationError
from .progress import CancelToken, ProgressEvent, ProgressSink
from .store import load_quantized

FORMATS = ("gguf", "safetensors")
SAFETENSORS_DTYPES = ("float16", "bfloat16", "float32")


def export_format(output, fmt: Optional[str] = None) -> str:
    """``fmt`` if given, else ``gguf`` for a ``.gguf`` path and ``safetensors`` (a folder) otherwise.

    Raises:
        ConfigurationError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt is None:
        return "gguf" if Path(output).suffix.lower() == ".gguf" else "safetensors"
    if fmt not in FORMATS:
        raise ConfigurationError(f"format={fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    return fmt


def export_store(store_path, output, *, format: Optional[str] = None, dtype: Optional[str] = None,
                 overwrite: bool = False, progress: Optional[ProgressSink] = None,
                 cancel: Optional[CancelToken] = None) -> dict:
    """Export the store at ``store_path`` to ``output``; returns ``{"path", "format", "bytes", "warnings",
    "notes", ...}`` (GGUF adds ``architecture``, ``ggml_types``, ``has_tokenizer``).

    Raises:
        ConfigurationError: an unknown ``format``, ``dtype`` given for GGUF, or ``overwrite`` for safetensors.
        ExportError: the store has tensors without a GGUF form (see :meth:`QuantizedModel.to_gguf`).
        OutputError: ``output`` exists (and ``overwrite`` is False) or cannot be written.
        ValidationError: ``store_path`` is not a readable store.
    """
    fmt = export_format(output, format)
    if fmt == "gguf" and dtype is not None:
        raise ConfigurationError(f"dtype={dtype!r} applies to safetensors exports only (GGUF keeps the stored types)")
    if fmt == "safetensors" and overwrite:
        raise ConfigurationError("overwrite=True applies to GGUF exports only; remove the folder or choose another")
    cancel = cancel or CancelToken()
    store = load_quantized(store_path)
    if fmt == "gguf":
        return store.to_gguf(output, overwrite=overwrite, progress=progress, cancel=cancel)
    dtype = dtype or "float16"
    if dtype not in SAFETENSORS_DTYPES:
        raise ConfigurationError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(SAFETENSORS_DTYPES)}")
    cancel.check()
    if progress is not None:
        progress(ProgressEvent(stage="export", fraction=0.0, message=f"exporting {Path(output).name} ({dtype})"))
    out = Path(store.to_safetensors(output, dtype=dtype, progress=progress, cancel=cancel))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if progress is not None:
        progress(ProgressEvent(stage="done", fraction=1.0, message=f"exported {out.name}"))
    return {"path": str(out.resolve()), "format": "safetensors", "dtype": dtype, "bytes": size,
            "tensors": len(store.tensors), "warnings": [], "notes": []}
