"""Reading model folders: safetensors headers, validated, and tensors one chunk at a time.

A model is a Hugging Face folder (``model.safetensors`` or shards with
``model.safetensors.index.json``; one weight variant such as ``fp16`` at a time), a diffusers
pipeline (components in subfolders, their tensor names prefixed ``component/``; by default the
denoiser), or a single ``.safetensors`` file. :mod:`arrow_quant_v2.pipelines` decides which files.

Every header is checked before any weight is read (offsets inside the file, no
overlaps or holes, byte counts matching dtype x shape, sane shapes, a header that is
a JSON object without duplicate names), so a damaged file fails early with a
:class:`ModelFormatError` naming the file. Weights are read with ``os.preadv`` (:func:`read_at`) chunk by
chunk rather than through a long-lived memory map: mapped pages count as resident
memory until unmapped, and we want peak RSS bounded by a few chunks, not the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import pipelines
from .errors import ConfigurationError, ModelFormatError, ModelNotFoundError

#: safetensors dtype -> numpy dtype used to hold its raw bytes (BF16 as uint16 words).
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the safetensors reference implementation accepts
#: Bounds on a declared shape, so that a hostile header cannot make later code build
#: absurd arrays (a zero-size tensor of shape (0, 2**62) would pass the byte-count check).
MAX_RANK = 32
MAX_ELEMENTS = 1 << 48
INDEX_NAME = "model.safetensors.index.json"
#: Other serialisations of the weights: not copied into a store (they would carry the
#: full-precision weights along); end-to-end validation reads them from the source.
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def matrix_shape(self) -> Tuple[int, int]:
        """The 2-D view quantization works on: (first axis, product of the rest)."""
        if len(self.shape) == 0:
            return (1, 1)
        return (self.shape[0], math.prod(self.shape[1:]) if len(self.shape) > 1 else 1)


def bf16_to_float32(words: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 words (uint16) to float32: they are float32's top 16 bits."""
    return (words.astype(np.uint32) << 16).view(np.float32)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw values of safetensors ``dtype`` (BF16 as uint16 words) as float32."""
    if dtype == "BF16":
        return bf16_to_float32(raw)
    return raw.astype(np.float32)


def _reject_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile header cannot make a 100 MB message."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _loads(raw: bytes, strict: bool = False):
    """``json.loads`` that turns every way bad bytes can fail into ValueError.

    Besides JSONDecodeError, Python raises plain ValueError for integers of more than
    4300 digits and RecursionError for deeply nested arrays; duplicate keys are refused
    when ``strict`` (headers: a repeated tensor name would silently hide a tensor).
    """
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates if strict else None)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _check_shape(shape) -> Optional[str]:
    """Why ``shape`` is not acceptable, or None."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return "dimensions must be a list of non-negative integers"
    if len(shape) > MAX_RANK:
        return f"rank {len(shape)} exceeds {MAX_RANK}"
    n = 1
    for d in shape:
        if d > MAX_ELEMENTS:
            return f"dimension {d} exceeds {MAX_ELEMENTS}"
        n *= d or 1
        if n > MAX_ELEMENTS:
            return f"more than {MAX_ELEMENTS} elements"
    return None


def _open_error(file: Path, e: OSError):
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return ModelNotFoundError(f"{file}: cannot be opened ({e.strerror})")
    return ModelFormatError(f"{file}: cannot be read ({e.strerror or e})")


def read_header(file: Path) -> Tuple[dict, int]:
    """Parse and return ``(header dict, data start offset)``; raise ModelFormatError on damage."""
    try:
        size = file.stat().st_size
        if size < 8:
            raise ModelFormatError(f"{file}: truncated safetensors file ({size} bytes, no header length)")
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise ModelFormatError(f"{file}: header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)")
            if 8 + n > size:
                raise ModelFormatError(f"{file}: truncated: header says {n} bytes but the file has {size - 8} after the length")
            raw = f.read(n)
    except OSError as e:
        raise _open_error(file, e) from None
    if len(raw) != n:
        raise ModelFormatError(f"{file}: truncated while reading its header (file changed?)")
    try:
        header = _loads(raw, strict=True)
    except ValueError as e:
        raise ModelFormatError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{file}: header is not a JSON object")
    return header, 8 + n


def parse_tensors(file: Path, prefix: str = "") -> Tuple[List[TensorInfo], dict, bytes]:
    """Validated tensor entries of one file, its ``__metadata__`` and its raw header bytes' digest input."""
    header, data_start = read_header(file)
    try:
        data_len = file.stat().st_size - data_start
    except OSError as e:
        raise _open_error(file, e) from None
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ModelFormatError(f"{file}: '__metadata__' is {type(metadata).__name__}, not a JSON object of strings")
    infos = []
    for name, entry in header.items():
        where = f"{file}: tensor {_short(name)}"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ModelFormatError(f"{where}: tensor name is not valid UTF-8") from None
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ModelFormatError(f"{where}: header entry lacks dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(f"{where}: unsupported dtype {_short(dtype)}; supported: {', '.join(DTYPES)}")
        why = _check_shape(shape)
        if why:
            raise ModelFormatError(f"{where}: bad shape {_short(shape)}: {why}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ModelFormatError(f"{where}: bad data_offsets {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ModelFormatError(f"{where}: bad data_offsets {_short(offsets)}")
        if end > data_len:
            raise ModelFormatError(f"{where}: data_offsets {_short(offsets)} run past the end of the data ({data_len} bytes): truncated file?")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise ModelFormatError(f"{where}: {end - begin} bytes stored but dtype {dtype} x shape {shape} needs {expected}")
        infos.append(TensorInfo(prefix + name, dtype, tuple(shape), file, data_start + begin, data_start + end))
    ordered = sorted(infos, key=lambda t: (t.start, t.end))
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise ModelFormatError(f"{file}: tensors {_short(a.name)} and {_short(b.name)} overlap in the file")
    # The format requires the data section to be exactly covered, without holes (this also
    # catches a header length that lies by a few padding bytes, which would shift every tensor).
    pos = data_start
    for t in ordered:
        if t.start != pos:
            raise ModelFormatError(f"{file}: {t.start - pos} bytes before tensor {_short(t.name)} belong to no tensor "
                                   "(holes are not allowed in safetensors data)")
        pos = t.end
    if pos != data_start + data_len:
        raise ModelFormatError(f"{file}: the last {data_start + data_len - pos} bytes belong to no tensor "
                               "(trailing data: wrong header length or corrupt offsets?)")
    try:
        with open(file, "rb") as f:
            header_bytes = f.read(data_start)
    except OSError as e:
        raise _open_error(file, e) from None
    return ordered, metadata, header_bytes


class ModelSource:
    """A validated model: its tensors (in file order), config, metadata and non-weight files.

    ``variant`` chooses among weight variants stored side by side (``model.fp16.safetensors``;
    default: the weights without a variant). For a diffusers pipeline (``model_index.json``),
    ``components`` chooses the components read (default: the denoiser, ``unet`` or
    ``transformer``); tensor names are prefixed ``<component>/``. See :mod:`arrow_quant_v2.pipelines`.
    """

    def __init__(self, path, *, components: Optional[Sequence[str]] = None, variant: Optional[str] = None) -> None:
        self.path = Path(path)
        #: The pipeline components asked for (None: the denoiser of a pipeline, or the whole model).
        self.components = None if components is None else (
            [components] if isinstance(components, str) else list(components))
        if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"\w+", variant)):
            raise ConfigurationError(f"variant={variant!r} is not allowed; allowed: None or a name such as 'fp16'")
        self.variant = variant
        #: The components read (None when the model is not split into components).
        self.selected: Optional[List[str]] = None
        #: The variant read in each folder ("" = the top folder; None = the default weights).
        self.chosen_variants: Dict[str, Optional[str]] = {}
        try:
            exists = self.path.exists()
        except (OSError, ValueError):  # e.g. a NUL byte or a name too long
            exists = False
        if not exists:
            raise ModelNotFoundError(f"{self.path}: no such file or folder")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.files = self._weight_files()
        self.tensors: Dict[str, TensorInfo] = {}
        self.metadata: Dict[str, str] = {}
        digest = hashlib.sha256()
        for file, prefix in self.files:
            infos, metadata, header_bytes = parse_tensors(file, prefix)
            digest.update(str(file.relative_to(self.root)).encode() + b"\0" + header_bytes)
            self.metadata.update({k: str(v) for k, v in metadata.items()})
            for info in infos:
                if info.name in self.tensors:
                    raise ModelFormatError(
                        f"{file}: tensor {_short(info.name)} also appears in {self.tensors[info.name].file}"
                    )
                self.tensors[info.name] = info
        self._check_index()
        self.header_checksum = digest.hexdigest()
        self.config = self._read_json(self.root / "config.json") if self.path.is_dir() else {}

    # -- discovery ------------------------------------------------------------------

    def _weight_files(self) -> List[Tuple[Path, str]]:
        """``(file, tensor name prefix)`` of the weights to read, and which folders they come from."""
        self._indexes: List[Tuple[Path, Dict[str, Path]]] = []  # (index file, its weight map) per sharded folder
        self._unselected: List[pipelines.WeightSet] = []  # a pipeline's other components: copied as they are
        if self.path.is_file():
            if self.path.suffix != ".safetensors":
                raise ModelNotFoundError(f"{self.path}: not a .safetensors file")
            if self.components is not None or self.variant is not None:
                raise ConfigurationError(f"{self.path}: components= and variant= apply to model folders, not a single file")
            return [(self.path, "")]
        components = pipelines.pipeline_components(self.path)
        is_pipeline = components is not None
        if components is None and pipelines.weight_sets(self.path):
            if self.components is not None:
                raise ConfigurationError(f"components={self.components!r}: {self.path} is not a diffusers pipeline "
                                         f"(no {pipelines.PIPELINE_INDEX}) and has its weights at the top")
            return self._folder_files(self.path, "")
        if not components:  # no (usable) model_index.json: each subfolder with weights is a component
            components = {p.name: p for p in sorted(self.path.iterdir())
                          if p.is_dir() and not p.name.startswith(".") and pipelines.weight_sets(p)}
        with_weights = [name for name, folder in components.items() if pipelines.weight_sets(folder)]
        if not with_weights and self.components is None:
            raise ModelNotFoundError(
                f"{self.path}: no .safetensors weights found (expected model.safetensors, shards with {INDEX_NAME}, "
                "or diffusers component subfolders)"
            )
        if is_pipeline or self.components is not None:
            self.selected = pipelines.select_components(self.path, with_weights, self.components)
        else:  # subfolders without a pipeline index: they are all one model
            self.selected = with_weights
        files: List[Tuple[Path, str]] = []
        for name in with_weights:
            if name in self.selected:
                files += self._folder_files(components[name], f"{name}/")
            else:
                folder = components[name]
                self._unselected.append(pipelines.choose(folder, pipelines.weight_sets(folder), self.variant))
        return files

    def _folder_files(self, folder: Path, prefix: str) -> List[Tuple[Path, str]]:
        """The weight files of one folder, of the chosen variant (through its shard index if it has one)."""
        chosen = pipelines.choose(folder, pipelines.weight_sets(folder), self.variant)
        self.chosen_variants[prefix.rstrip("/")] = chosen.variant
        if chosen.index is None:
            return [(f, prefix) for f in chosen.files]
        index = chosen.index
        weight_map = self._read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: no 'weight_map' object")
        for tensor, shard in weight_map.items():
            # Lexical check only: shards may be symlinks (the Hugging Face cache links to ../../blobs).
            if (not isinstance(shard, str) or not shard or Path(shard).is_absolute()
                    or ".." in Path(shard).parts or "\0" in shard):
                raise ModelFormatError(
                    f"{index}: weight_map[{_short(tensor)}] = {_short(shard)} is not a shard file name inside {folder}"
                )
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFormatError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
        self._indexes.append((index, {prefix + k: folder / v for k, v in weight_map.items()}))
        return [(folder / n, prefix) for n in names]

    def _check_index(self) -> None:
        for index, weight_map in self._indexes:
            for name, file in weight_map.items():
                info = self.tensors.get(name)
                if info is None:
                    raise ModelFormatError(f"{index}: lists tensor {_short(name)} which no shard holds")
                if info.file != file:
                    raise ModelFormatError(f"{index}: says {_short(name)} is in {file.name} but it is in {info.file.name}")

    @staticmethod
    def _read_json(path: Path) -> dict:
        if not path.exists():
            return {}
        try:
            data = _loads(path.read_bytes())
        except OSError as e:
            raise _open_error(path, e) from None
        except ValueError as e:
            raise ModelFormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ModelFormatError(f"{path}: not a JSON object")
        return data

    def extra_files(self) -> List[Path]:
        """Files to copy beside the store, relative to the root: configs, tokenizers, ... and, for a
        pipeline, the other components' weights (of the chosen variant) as they are."""
        if not self.path.is_dir():
            return []
        read = {f for f, _ in self.files} | {index for index, _ in self._indexes}
        copied = {p for ws in self._unselected for p in ws.paths}
        if any(ws.index is not None for ws in self._unselected):  # shards named by an index of a copied component
            for ws in self._unselected:
                if ws.index is not None:
                    weight_map = self._read_json(ws.index).get("weight_map") or {}
                    copied |= {ws.index.parent / v for v in weight_map.values() if isinstance(v, str)}
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path)
            if not p.is_file() or p in read or any(part.startswith(".") for part in rel.parts):
                continue
            if (p.suffix in WEIGHT_SUFFIXES or pipelines.is_index(p.name)) and p not in copied:
                continue  # the weights read (they are in the store) and every other serialisation or variant
            out.append(rel)
        return out

    # -- reading --------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_raw(self, name: str, first: int = 0, count: Optional[int] = None) -> np.ndarray:
        """Elements ``[first, first+count)`` of a tensor, flat, in its stored dtype (BF16 as uint16)."""
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        count = info.numel - first if count is None else count
        offset = info.start + first * dtype.itemsize
        nbytes = count * dtype.itemsize
        buf = bytearray(nbytes)
        try:
            with open(info.file, "rb", buffering=0) as f:
                got = read_at(f, buf, offset) if nbytes else 0
        except FileNotFoundError:
            raise ModelNotFoundError(f"{info.file}: vanished while reading tensor {name!r}") from None
        if got != nbytes:
            raise ModelFormatError(f"{info.file}: tensor {name!r} is cut short (file changed or truncated while reading)")
        return np.frombuffer(buf, dtype=dtype)

    def read_rows(self, name: str, row0: int, row1: int) -> np.ndarray:
        """Rows ``[row0, row1)`` of the tensor's 2-D view, widened to float32."""
        info = self.tensors[name]
        _, cols = info.matrix_shape
        raw = self.read_raw(name, row0 * cols, (row1 - row0) * cols)
        return to_float32(raw, info.dtype).reshape(row1 - row0, cols)

    def read_float32(self, name: str) -> np.ndarray:
        """The whole tensor ``name`` as float32 in its shape (BF16/F16 widened exactly, F64 rounded)."""
        info = self.tensors[name]
        return to_float32(self.read_raw(name), info.dtype).reshape(info.shape)


def read_at(f, buf: bytearray, offset: int) -> int:
    """Fill ``buf`` from byte ``offset`` of the open file ``f``; the number of bytes read (short at EOF).

    One ``preadv`` system call where the OS has it (Linux, the BSDs, macOS 11+); elsewhere a seek and
    ``readinto`` loop, which is as safe here because every read opens its own file object.
    """
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [buf], offset)
    view, got = memoryview(buf), 0
    f.seek(offset)
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def open_model(path, *, components: Optional[Sequence[str]] = None, variant: Optional[str] = None) -> ModelSource:
    """Open and validate a model folder or .safetensors file (``components``/``variant``: see :class:`ModelSource`)."""
    return ModelSource(path, components=components, variant=variant)
