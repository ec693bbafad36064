"""GGUF out: a store's tensors, byte for byte, in a file llama.cpp / ComfyUI-GGUF / diffusers read.

Nothing is re-quantized. A quantized tensor is exported only when its encoding has a ggml form
(the encoding class's ``ggml_type``; its ``codes`` blob is exactly ggml's block bytes, rows in
order), so the GGUF tensor's data is the concatenation of the stored chunks' codes and gguf-py's
``gguf.quants.dequantize`` gives back exactly what :meth:`QuantizedModel.dequantize` gives.
Lossless tensors go out in their source dtype. A store quantized with ArrowQuant's own encodings
gets :class:`ExportError` naming those tensors and the fix (``target_runtime="gguf"``).

The file is written to a hidden temporary sibling and moved into place only when complete; an
existing file is replaced only with ``overwrite=True``. Temporaries of a killed export are removed
by the next export to the same path.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gguf
import numpy as np

from .. import encodings
from .._version import __version__
from ..errors import ExportError, OutputError
from ..paths import export_temporary, remove_stale_export_temporaries
from ..progress import CancelToken, ProgressEvent, ProgressSink
from . import runtime

#: Lossless store dtypes (safetensors names) and the ggml type that holds the same bytes.
RAW_GGML: Dict[str, str] = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
                            "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}
#: Metadata key (ComfyUI-GGUF's) for the source shape of a tensor stored as its 2-D row view.
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape.{}"


def ggml_type_of(entry) -> Optional[gguf.GGMLQuantizationType]:
    """The ggml type a store tensor is exported as, or None when its encoding has no ggml form."""
    if not entry.quantized:
        name = RAW_GGML.get(entry.dtype)
    else:
        try:
            cls = type(encodings.get_encoding(entry.encoding, entry.bits, entry.group_size))
        except Exception:  # noqa: BLE001 - an encoding this version does not know has no ggml form either
            return None
        name = getattr(cls, "ggml_type", None)
    return gguf.GGMLQuantizationType[name] if name else None


def _row_view(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """The store's 2-D view of a tensor: (rows, elements per row)."""
    if len(shape) > 1:
        return shape[0], math.prod(shape[1:])
    return (shape[0], 1) if shape else (1, 1)


def _gguf_shape(entry, qtype) -> Tuple[int, ...]:
    """Shape in the file (numpy order): quantized tensors keep the rows their blocks run along."""
    if entry.quantized and len(entry.shape) != 2:
        return _row_view(entry.shape)
    return entry.shape if entry.shape else (1,)


def _file_type(types: Counter) -> int:
    """``general.file_type``: the llama.cpp file type of the type holding most weights."""
    main = types.most_common(1)[0][0].name if types else "F32"
    for candidate in (f"MOSTLY_{main}", f"MOSTLY_{main}_M", "ALL_F32" if main == "F32" else ""):
        if candidate in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[candidate])
    return int(gguf.LlamaFileType.GUESSED)


def _check_exportable(model) -> Dict[str, gguf.GGMLQuantizationType]:
    types, bad = {}, []
    for e in model.tensors.values():
        t = ggml_type_of(e)
        if t is None:
            bad.append(e)
        else:
            types[e.name] = t
    if bad:
        encs = sorted({f"{e.encoding} int{e.bits}" if e.quantized else f"dtype {e.dtype}" for e in bad})
        listing = ", ".join(e.name for e in bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise ExportError(
            f"{model.path}: {len(bad)} tensors have no GGUF form ({'; '.join(encs)}): {listing}. "
            "ArrowQuant's own encodings are not ggml block types and are never re-quantized on export: "
            "quantize the model again with target_runtime=\"gguf\" (CLI: --target-runtime gguf), or export "
            "dequantized safetensors instead (--format safetensors). Nothing was written.")
    for e in model.tensors.values():
        t = types[e.name]
        if e.quantized:
            block, size = gguf.GGML_QUANT_SIZES[t]
            rows, cols = _row_view(e.shape)
            if cols % block or e.nbytes != rows * cols // block * size:
                raise ExportError(f"{model.path}: tensor {e.name!r} claims ggml type {t.name} but stores {e.nbytes} "
                                  f"bytes for {rows}x{cols} (a {t.name} row needs a multiple of {block} elements, "
                                  f"{size} bytes per block); the store is corrupt")
    return types


def _tensor_bytes(model, entry, qtype, reorder) -> np.ndarray:
    """The tensor's data as it goes in the file: a uint8 array, rows first."""
    if entry.quantized:
        rows, _ = _row_view(entry.shape)
        blob = np.frombuffer(b"".join(bytes(c["codes"] or b"") for c in model.chunks(entry.name)), dtype=np.uint8)
        if blob.size != entry.nbytes:
            raise ExportError(f"{model.path}: tensor {entry.name!r} holds {blob.size} bytes of codes, its index says "
                              f"{entry.nbytes}; the store is corrupt")
        data = blob.reshape(rows, -1)
    else:
        data = model.raw(entry.name)
        data = data.reshape(data.shape[0], -1) if data.ndim else data.reshape(1, 1)
    if reorder is not None:
        data = reorder(data)
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if something appeared at ``out`` meanwhile: never clobber it
    except FileExistsError:
        raise OutputError(f"{out}: appeared while exporting; nothing was overwritten "
                          "(pass overwrite=True / --overwrite to replace it)") from None
    except OSError:  # a file system without hard links
        if out.exists():
            raise OutputError(f"{out}: already exists; pass overwrite=True (CLI: --overwrite)") from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def _provenance(model, target, types) -> List[Tuple[str, object, object]]:
    V = gguf.GGUFValueType
    tensors = {target.names[e.name]: {"source": e.name, "encoding": e.encoding, "bits": e.bits,
                                      "ggml_type": types[e.name].name, "cosine": e.cosine,
                                      "rel_error": e.rel_error, "reason": e.reason}
               for e in model.tensors.values()}
    source = model.manifest.get("source", {})
    return [
        ("arrowquant.version", __version__, V.STRING),
        ("arrowquant.config", json.dumps(model.manifest.get("config", {}), sort_keys=True), V.STRING),
        ("arrowquant.source.header_checksum", str(source.get("header_checksum", "")), V.STRING),
        ("arrowquant.modality", str((model.manifest.get("modality") or {}).get("name", "")), V.STRING),
        ("arrowquant.cosine_similarity", float((model.manifest.get("totals") or {}).get("cosine_similarity", 1.0)),
         V.FLOAT64),
        ("arrowquant.tensors", json.dumps(tensors, allow_nan=True), V.STRING),
    ]


def export_gguf(model, path, *, overwrite: bool = False, progress: Optional[ProgressSink] = None,
                cancel: Optional[CancelToken] = None) -> dict:
    """Write ``model`` (a :class:`~arrow_quant_v2.QuantizedModel`) to the GGUF file ``path``.

    Returns ``{"path", "format", "architecture", "family", "bytes", "tensors", "ggml_types",
    "has_tokenizer", "warnings", "notes"}``; ``notes`` says what a runtime will still need
    (e.g. a tokenizer).

    Raises:
        ExportError: a tensor's encoding has no ggml form, or config.json lacks a hyper-parameter
            llama.cpp needs (the message names the tensors or the field and the fix).
        OutputError: ``path`` exists and ``overwrite`` is False, or it cannot be written.
    """
    cancel = cancel or CancelToken()
    out = Path(path)
    types = _check_exportable(model)
    shapes = {e.name: e.shape for e in model.tensors.values()}
    try:
        target = runtime.describe(model.path, list(model.tensors), shapes, source_label=str(model.path))
    except KeyError as e:
        raise ExportError(f"{e.args[0]}; add it to {model.path / 'config.json'} and export again") from None
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass overwrite=True (CLI: --overwrite) or choose another path")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file path ending in .gguf")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_export_temporaries(out)
    except OSError as e:
        raise OutputError(f"{out.parent}: cannot create the output folder ({e})") from None
    tmp = export_temporary(out)
    entries = list(model.tensors.values())
    total = max(sum(e.nbytes for e in entries), 1)
    writer = gguf.GGUFWriter(tmp, target.arch)
    try:
        _write(writer, model, target, types, entries, total, progress, cancel)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, out, overwrite)
    except OSError as e:
        raise OutputError(f"{out}: write failed ({e.strerror or e}); nothing was written") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    counts = Counter(types[e.name].name for e in entries)
    if progress is not None:
        progress(ProgressEvent(stage="done", fraction=1.0, message=f"exported {out.name}", tensors_done=len(entries),
                               tensors_total=len(entries), bytes_done=total, bytes_total=total))
    return {"path": str(out.resolve()), "format": "gguf", "architecture": target.arch, "family": target.family,
            "bytes": out.stat().st_size, "tensors": len(entries), "ggml_types": dict(counts),
            "has_tokenizer": target.has_tokenizer, "warnings": list(target.warnings), "notes": list(target.notes)}


def _write(writer, model, target, types, entries, total, progress, cancel) -> None:
    V = gguf.GGUFValueType
    weights = Counter()
    for e in entries:
        if len(e.shape) > 1:
            weights[types[e.name]] += e.numel
    src = model.manifest.get("source", {}).get("path") or model.path.name
    writer.add_name(Path(str(src)).name or model.path.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_file_type(weights))
    for key, value, vtype in target.metadata + _provenance(model, target, types):
        if vtype is None:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for e in entries:
        shape = _gguf_shape(e, types[e.name])
        if shape != e.shape:
            writer.add_array(ORIG_SHAPE_KEY.format(target.names[e.name]), [int(d) for d in e.shape])
        writer.add_tensor_info(target.names[e.name], shape, np.dtype(np.float32), e.nbytes, raw_dtype=types[e.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    done = 0
    for i, e in enumerate(entries):
        cancel.check()
        data = _tensor_bytes(model, e, types[e.name], runtime.reorder(target, e.name))
        if data.size != e.nbytes:
            raise ExportError(f"{model.path}: tensor {e.name!r} holds {data.size} bytes, its index says {e.nbytes}; "
                              "the store is corrupt")
        writer.write_tensor_data(data)
        done += e.nbytes
        if progress is not None:
            progress(ProgressEvent(stage="export", fraction=min(done / total, 0.99), tensor=e.name,
                                   message=f"exporting {e.name} as {types[e.name].name} [{i + 1}/{len(entries)}]",
                                   tensors_done=i + 1, tensors_total=len(entries), bytes_done=done, bytes_total=total))
    writer.flush()

