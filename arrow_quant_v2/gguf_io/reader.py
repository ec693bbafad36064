"""GGUF in: read any GGUF file (this project's, llama-quantize's, ComfyUI-GGUF's) and compare it
tensor by tensor with the safetensors it was made from.

A GGUF file is untrusted input: every tensor's ggml type, shape and data range are checked
against the file before anything is read, and a failure is a :class:`ValidationError` naming
the file and the tensor. Tensors are dequantized by gguf-py's reference ``gguf.quants.dequantize``.
llama.cpp names are mapped back to source names through the same :mod:`.runtime` table the
writer uses (including the q/k row order of the Llama layout).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import gguf
import numpy as np

from ..config import DEFAULT_MIN_ACCURACY
from ..errors import ArrowQuantError, ValidationError
from ..kernels import rounding
from ..metrics import COSINE_AGREEMENT, figures, summarize
from ..progress import CancelToken, ProgressEvent, ProgressSink
from ..source import open_model
from . import runtime
from .writer import ORIG_SHAPE_KEY

FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def nominal_bits(qtype: gguf.GGMLQuantizationType) -> int:
    """The code width a ggml type is named for (Q4_K -> 4, IQ2_XS -> 2, F16 -> 16)."""
    name = qtype.name
    if name.startswith(("BF", "F")):
        return int(name.lstrip("BF"))
    digits = "".join(c for c in name.split("_")[0] if c.isdigit())
    return int(digits) if digits else 8


def threshold_for(bits: int) -> float:
    """The default cosine a tensor of ``bits`` must reach: the nearest configured width at or below it."""
    widths = sorted(DEFAULT_MIN_ACCURACY)
    below = [w for w in widths if w <= bits]
    return DEFAULT_MIN_ACCURACY[below[-1] if below else widths[0]]


class _CheckedReader(gguf.GGUFReader):
    """gguf-py's reader, with every tensor checked against the file before gguf-py maps it."""

    def __init__(self, path: Path) -> None:
        self._label = path
        super().__init__(path)

    def _build_tensors(self, start_offs: int, fields) -> None:  # noqa: D401 - gguf-py hook
        size = len(self.data)
        for f in fields:
            _, name_data, _, dims, raw_dtype, offset = f.parts
            name = bytes(name_data).decode("utf-8", "replace")
            code = int(raw_dtype[0])
            try:
                qtype = gguf.GGMLQuantizationType(code)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ValidationError(f"{self._label}: tensor {name!r} has ggml type {code}, which gguf-py "
                                      f"{_gguf_version()} does not know; upgrade gguf (pip install -U gguf)") from None
            ne = [int(d) for d in dims]
            if not ne or any(d <= 0 for d in ne) or ne[0] % block:
                raise ValidationError(f"{self._label}: tensor {name!r} has shape {ne[::-1]} which a {qtype.name} "
                                      f"tensor cannot have (rows of a multiple of {block} elements)")
            nbytes = math.prod(ne) // block * type_size
            begin = start_offs + int(offset[0])
            if begin + nbytes > size:
                raise ValidationError(f"{self._label}: tensor {name!r} ({qtype.name}, {nbytes} bytes at offset {begin}) "
                                      f"runs past the end of the file ({size} bytes): the file is truncated or corrupt")
        super()._build_tensors(start_offs, fields)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


class GGUFFile:
    """A GGUF file opened for reading: its metadata and tensors, dequantized on demand.

    Raises:
        ValidationError: the file is missing, not GGUF, truncated or corrupt, or a tensor has a
            ggml type or shape gguf-py cannot read (the message names the file and the tensor).
    """

    def __init__(self, path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValidationError(f"{self.path}: no such GGUF file")
        try:
            self.reader = _CheckedReader(self.path)
        except ArrowQuantError:
            raise
        except Exception as e:  # noqa: BLE001 - gguf-py raises whatever its parsing hits on a damaged file
            raise ValidationError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                                  "it is truncated, corrupt or not GGUF") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.value("general.architecture")

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, number, bool or list), or ``default``."""
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception:  # noqa: BLE001 - a damaged value reads as absent
            return default

    @property
    def provenance(self) -> Dict[str, dict]:
        """This project's per-tensor record (GGUF name -> encoding, cosine, ...), {} for other files."""
        try:
            value = json.loads(self.value("arrowquant.tensors", "{}"))
        except (TypeError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def shape(self, name: str) -> Tuple[int, ...]:
        """The tensor's shape in numpy order (ComfyUI's recorded source shape where there is one)."""
        orig = self.value(ORIG_SHAPE_KEY.format(name))
        if isinstance(orig, list) and orig:
            return tuple(int(d) for d in orig)
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 through gguf-py's reference dequantizer, in the file's own shape."""
        t = self.tensors[name]
        try:
            y = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValidationError(f"{self.path}: tensor {name!r} is {t.tensor_type.name}, which gguf-py "
                                  f"{_gguf_version()} cannot dequantize") from None
        return np.asarray(y, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))

    @property
    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def summary(self) -> List[dict]:
        """One dict per tensor: name, shape, ggml type, bits, bits per weight, and this project's record if any."""
        record = self.provenance
        rows = []
        for name, t in self.tensors.items():
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            rec = record.get(name, {})
            rows.append(dict(name=name, source=rec.get("source"), shape=list(self.shape(name)),
                             ggml_type=t.tensor_type.name, bits=nominal_bits(t.tensor_type),
                             bits_per_weight=size * 8 / block, nbytes=int(t.n_bytes), encoding=rec.get("encoding"),
                             cosine=rec.get("cosine")))
        return rows


def _match_names(gf: GGUFFile, source, folder: Optional[Path]) -> Tuple[Dict[str, str], runtime.Target]:
    """Source name -> GGUF name, trying the runtime's name, then the name itself, then without a checkpoint prefix."""
    names = list(source.tensors)
    arch = gf.architecture if isinstance(gf.architecture, str) else None
    target = runtime.describe(folder, names, {n: t.shape for n, t in source.tensors.items()},
                              arch=arch, with_metadata=False)
    mapping, missing = {}, []
    for n in names:
        for candidate in (target.names.get(n), n, runtime.strip_prefix(n)):
            if candidate in gf.tensors:
                mapping[n] = candidate
                break
        else:
            missing.append(n)
    prefixes = {n[: len(n) - len(g)] for n, g in mapping.items() if n != g and n.endswith(g)}
    if len(prefixes) == 1:  # a denoiser-only file (ComfyUI-GGUF) made from a full checkpoint: the rest is not in it
        prefix = prefixes.pop()
        skipped = [n for n in missing if not n.startswith(prefix)]
        missing = [n for n in missing if n.startswith(prefix)]
        target.warnings.append(f"{len(skipped)} source tensors outside {prefix!r} are not in this file "
                               "(a denoiser-only GGUF of a full checkpoint) and were not compared")
    if missing:
        raise ValidationError(f"{gf.path}: {len(missing)} tensors of the source are not in the GGUF "
                              f"(architecture {arch!r}): {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; is it made from another model?")
    return mapping, target


def validate_gguf(original_path, gguf_path, *, min_accuracy: Optional[float] = None,
                  progress: Optional[ProgressSink] = None, cancel: Optional[CancelToken] = None,
                  keep: Optional[Dict[str, np.ndarray]] = None, share: float = 1.0) -> dict:
    """Compare every tensor of a GGUF file with the source model; the same per-layer report as a store's,
    plus ``format``, ``architecture``, ``unmatched_gguf_tensors``, ``warnings`` and ``config`` (the
    config this project recorded in the file, None for other files).

    ``keep`` (if given) collects, under the source names and shapes, every tensor that differs
    from the source, dequantized (what an end-to-end check puts into the network). Progress events
    are those of the ``validate`` stage, whose ``fraction`` of the whole operation ends at ``share``.
    """
    cancel = cancel or CancelToken()
    try:
        source = open_model(original_path)
    except ArrowQuantError as e:
        raise ValidationError(f"cannot read the original model: {e}") from e
    gf = GGUFFile(gguf_path)
    recorded = gf.value("arrowquant.source.header_checksum")
    if recorded and recorded != source.header_checksum:
        raise ValidationError(f"{gguf_path}: was made from a different model than {original_path} "
                              "(header checksum differs)")
    folder = source.path if source.path.is_dir() else source.path.parent
    mapping, target = _match_names(gf, source, folder)
    record = gf.provenance
    per_layer: Dict[str, dict] = {}
    lossless = 0
    total = max(source.total_bytes, 1)
    done = 0
    if progress is not None:  # at once, so nothing sits at "0 %" while the first tensor is read
        progress(ProgressEvent(stage="validate", fraction=0.0, stage_fraction=0.0, tensors_total=len(mapping),
                               bytes_total=total, message=f"per-layer check: {len(mapping)} tensors against the source"))
    for i, (name, gname) in enumerate(mapping.items()):
        cancel.check()
        info = source.tensors[name]
        shape = gf.shape(gname)
        if math.prod(shape) != info.numel or (shape != info.shape and len(info.shape) > 0):
            raise ValidationError(f"{gguf_path}: tensor {gname!r} (source {name!r}) is {list(shape)} in the GGUF "
                                  f"but {list(info.shape)} in {original_path}")
        t = gf.tensors[gname]
        y = gf.dequantize(gname).reshape(info.shape)
        heads = target.permute_heads.get(name)
        if heads:
            y = runtime.permute_qk(y, heads, inverse=True)
        x = source.read_float32(name).reshape(info.shape)
        if t.tensor_type.name in FLOAT_TYPES and np.array_equal(x, y, equal_nan=True):
            lossless += 1
        else:
            fig = figures(rounding.error_stats(np.ascontiguousarray(x.reshape(x.shape[0] if x.ndim else 1, -1)),
                                              np.ascontiguousarray(y.reshape(x.shape[0] if x.ndim else 1, -1))))
            stored = record.get(gname, {}).get("cosine")
            if isinstance(stored, (int, float)) and not math.isclose(fig["cosine"], stored, rel_tol=0,
                                                                   abs_tol=COSINE_AGREEMENT):
                raise ValidationError(f"{gguf_path}: tensor {gname!r} measures cosine {fig['cosine']:.6f} but the "
                                      f"file recorded {stored:.6f}: it is corrupt or does not match the source")
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            bits = nominal_bits(t.tensor_type)
            need = min_accuracy if min_accuracy is not None else threshold_for(bits)
            per_layer[name] = dict(fig, bits=bits, encoding=t.tensor_type.name.lower(), group_size=block,
                                   shape=list(info.shape), numel=info.numel, bits_per_weight=size * 8 / block,
                                   reason=record.get(gname, {}).get("reason") or f"{t.tensor_type.name} in the GGUF",
                                   gguf_name=gname, threshold=need, passed=fig["cosine"] >= need)
            if keep is not None:
                keep[name] = y
        done += info.nbytes
        if progress is not None:
            progress(ProgressEvent(stage="validate", fraction=min(share * done / total, 0.99),
                                   stage_fraction=done / total, message=f"per-layer check: {name}",
                                   tensor=name, tensors_done=i + 1, tensors_total=len(mapping),
                                   bytes_done=done, bytes_total=total))
    report = summarize(per_layer, num_tensors=len(mapping), source_bytes=source.total_bytes,
                       weight_bytes=gf.weight_bytes, modality=gf.value("arrowquant.modality") or target.family)
    report["format"] = "gguf"
    report["architecture"] = gf.architecture
    report["unmatched_gguf_tensors"] = sorted(set(gf.tensors) - set(mapping.values()))
    report["warnings"] = list(target.warnings)
    report["config"] = _recorded_config(gf)
    return report


def _recorded_config(gf: GGUFFile) -> Optional[dict]:
    """The quantization config this project recorded in the file (``arrowquant.config``), else None."""
    try:
        value = json.loads(gf.value("arrowquant.config", "null"))
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
