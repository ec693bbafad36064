"""Streaming safetensors writer: the one place the project writes ``.safetensors`` files.

The safetensors format (https://github.com/huggingface/safetensors) is::

    u64 little-endian N | N bytes of JSON header | tensor data

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the start of the data section) plus an optional ``"__metadata__"``
string-to-string map. The reference writer orders tensors by descending dtype (its enum order,
which follows alignment) and then by name, serialises the header as compact JSON and pads it
with spaces to a multiple of 8 bytes so every tensor starts 8-aligned. This module writes the
same bytes the reference ``safetensors.numpy.save_file`` writes for the same tensors, but
computes the header from ``dtype`` and ``shape`` alone and then streams the data one tensor
(or one chunk of a tensor) at a time, so a multi-GB model never has to be in memory.

numpy has no bfloat16: BF16 tensors are handled as their raw ``uint16`` words (the top half of
a float32), see :func:`float32_to_bf16_bits` and :func:`bf16_bits_to_float32`. The FP8 dtypes
are handled the same way as raw ``uint8`` bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np

from .errors import OutputError

__all__ = [
    "DTYPES",
    "TensorSpec",
    "float32_to_bf16_bits",
    "bf16_bits_to_float32",
    "build_header",
    "write_safetensors",
    "write_sharded",
    "plan_shards",
    "SINGLE_FILE_NAME",
    "INDEX_FILE_NAME",
]

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# safetensors dtype -> numpy dtype used to hold its raw little-endian data, in the order of the
# reference implementation's ``Dtype`` enum (the sort key of its writer). BF16 and the FP8
# formats have no numpy type and travel as raw unsigned words of their width.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "F8_E5M2": np.dtype("<u1"),
    "F8_E4M3": np.dtype("<u1"),
    "F8_E8M0": np.dtype("<u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_DTYPE_RANK = {name: i for i, name in enumerate(DTYPES)}
_NUMPY_TO_SAFETENSORS = {
    np.dtype("bool"): "BOOL",
    np.dtype("u1"): "U8",
    np.dtype("i1"): "I8",
    np.dtype("i2"): "I16",
    np.dtype("u2"): "U16",
    np.dtype("f2"): "F16",
    np.dtype("i4"): "I32",
    np.dtype("u4"): "U32",
    np.dtype("f4"): "F32",
    np.dtype("f8"): "F64",
    np.dtype("i8"): "I64",
    np.dtype("u8"): "U64",
}

ArrayOrChunks = Union[np.ndarray, Iterable[np.ndarray]]
Producer = Union[np.ndarray, Callable[[], ArrayOrChunks]]


# --------------------------------------------------------------------------- bfloat16 bits


def float32_to_bf16_bits(a: Any) -> np.ndarray:
    """Round float values to bfloat16 (round to nearest, ties to even) and return the raw bits.

    The input is first converted to float32 (as ``torch`` does for ``.to(torch.bfloat16)`` of a
    float32 tensor). Infinities stay infinities, values past the largest bfloat16 round to
    infinity, NaNs stay (quiet) NaNs with their sign. Returns a ``uint16`` array of the same shape.
    """
    f = np.asarray(a, dtype=np.float32)
    u = f.view(np.uint32) if f.flags.c_contiguous else np.ascontiguousarray(f).view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u  # wraps only for NaN payloads, which are fixed below
    r >>= 16
    out = r.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return out.reshape(f.shape)


def bf16_bits_to_float32(u16: Any) -> np.ndarray:
    """Widen raw bfloat16 bits (``uint16``/``int16``/bytes-compatible array) to float32, exactly."""
    u = np.asarray(u16)
    if u.dtype.itemsize != 2 or u.dtype.kind not in "ui":
        raise ValueError(f"bfloat16 bits must be a 16-bit integer array, got dtype {u.dtype}")
    return (u.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- specs and header


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write.

    ``dtype`` is a safetensors dtype string (a key of :data:`DTYPES`), ``shape`` its shape.
    ``produce`` is the data: a numpy array, or a zero-argument callable returning either an
    array or an iterable of arrays (chunks) whose C-order bytes, concatenated, make up the
    tensor. The callable is only called when the tensor is written, one tensor at a time.
    The arrays must have the numpy dtype of :data:`DTYPES` (``uint16`` bits for BF16).
    """

    name: str
    dtype: str
    shape: tuple
    produce: Producer

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"tensor {self.name!r}: unsupported safetensors dtype {self.dtype!r}; "
                f"choose one of {', '.join(DTYPES)}"
            )
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {self.name!r}: negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, dtype: str | None = None) -> "TensorSpec":
        """A spec for an in-memory array; ``dtype`` defaults from the array (pass "BF16" for bits)."""
        array = np.asarray(array)
        if dtype is None:
            dtype = _NUMPY_TO_SAFETENSORS.get(array.dtype.newbyteorder("="))
            if dtype is None:
                raise ValueError(f"tensor {name!r}: no safetensors dtype for numpy {array.dtype}")
        return cls(name, dtype, array.shape, array)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


def _as_specs(tensors: Iterable[TensorSpec] | Mapping[str, np.ndarray]) -> list[TensorSpec]:
    if isinstance(tensors, Mapping):
        specs = [
            v if isinstance(v, TensorSpec) else TensorSpec.from_array(k, v)
            for k, v in tensors.items()
        ]
    else:
        specs = list(tensors)
    seen: set[str] = set()
    for s in specs:
        if not isinstance(s, TensorSpec):
            raise TypeError(f"expected TensorSpec, got {type(s).__name__}")
        if s.name in seen:
            raise ValueError(f"duplicate tensor name {s.name!r}")
        seen.add(s.name)
    return specs


def _ordered(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The reference writer's data order: descending dtype rank, then name (byte order)."""
    return sorted(specs, key=lambda s: (-_DTYPE_RANK[s.dtype], s.name.encode("utf-8")))


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        out[k] = v
    return dict(sorted(out.items()))


def build_header(
    tensors: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[TensorSpec]]:
    """Compute the padded header bytes (without the 8-byte length) and the data order."""
    specs = _ordered(_as_specs(tensors))
    header: dict[str, Any] = {}
    md = _check_metadata(metadata)
    if md is not None:
        header["__metadata__"] = md
    offset = 0
    for s in specs:
        n = s.nbytes
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return raw, specs


# --------------------------------------------------------------------------- writing


def _chunks(spec: TensorSpec) -> Iterator[np.ndarray]:
    data = spec.produce() if callable(spec.produce) else spec.produce
    if isinstance(data, np.ndarray) or np.isscalar(data):
        arr = np.asarray(data)
        if arr.shape != spec.shape:
            raise ValueError(
                f"tensor {spec.name!r}: produced shape {arr.shape}, declared {spec.shape}"
            )
        yield arr
    else:
        yield from data


def _stream_tensor(f, spec: TensorSpec, path: Path) -> None:
    want = DTYPES[spec.dtype]
    written = 0
    for chunk in _chunks(spec):
        chunk = np.asarray(chunk)
        if chunk.dtype.newbyteorder("=") != want.newbyteorder("="):
            hint = " (BF16 data are uint16 bits: use float32_to_bf16_bits)" if spec.dtype == "BF16" else ""
            raise ValueError(
                f"tensor {spec.name!r}: produced numpy dtype {chunk.dtype}, "
                f"declared {spec.dtype} needs {want}{hint}"
            )
        chunk = np.ascontiguousarray(chunk, dtype=want)  # also fixes big-endian input
        if written + chunk.nbytes > spec.nbytes:
            raise ValueError(
                f"tensor {spec.name!r}: produced more than the declared {spec.nbytes} bytes "
                f"(dtype {spec.dtype}, shape {list(spec.shape)})"
            )
        if chunk.nbytes:
            _write(f, memoryview(chunk.reshape(-1)).cast("B"), path)
        written += chunk.nbytes
    if written != spec.nbytes:
        raise ValueError(
            f"tensor {spec.name!r}: produced {written} bytes, declared {spec.nbytes} "
            f"(dtype {spec.dtype}, shape {list(spec.shape)})"
        )


def _write(f, buf, path: Path) -> None:
    try:
        f.write(buf)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}") from e


def _open_temp_beside(path: Path):
    """Open a new temporary sibling of ``path`` for writing (default permissions, honours umask)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            return tmp, open(tmp, "xb", buffering=1 << 20)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create a file in {path.parent}: {e}") from e
    raise OutputError(f"cannot create a temporary file in {path.parent}")


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[TensorSpec] | Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write one safetensors file, streaming tensor by tensor. Returns the file size in bytes.

    ``tensors`` is an iterable of :class:`TensorSpec` (or a ``{name: array}`` mapping for small
    in-memory cases). The header is computed from the specs' dtypes and shapes first, then each
    producer is called in turn and its data streamed out, so only one tensor (or one chunk of
    one) is in memory at a time. The file is written to a temporary sibling and renamed into
    place when complete: an interrupted write never leaves a file that looks finished.
    A producer whose data do not match the declared dtype/shape/size raises ``ValueError``; an
    OS error while writing (disk full, permissions) raises
    :class:`~arrow_quant_v2.errors.OutputError` naming the file.
    """
    path = Path(path)
    header, specs = build_header(tensors, metadata)
    tmp, f = _open_temp_beside(path)
    try:
        with f:
            _write(f, len(header).to_bytes(8, "little"), path)
            _write(f, header, path)
            for spec in specs:
                _stream_tensor(f, spec, path)
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise OutputError(f"cannot write {path}: {e}") from e
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot move the finished file into place at {path}: {e}") from e
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return 8 + len(header) + sum(s.nbytes for s in specs)


def plan_shards(tensors: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in the given order, into shards of at most ``max_shard_bytes`` data bytes.

    Like Hugging Face's sharding: greedy in order, a new shard starts when the next tensor
    would overflow the current one; a tensor larger than the limit gets a shard of its own.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for s in tensors:
        if current and size + s.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_sharded(
    folder: str | os.PathLike,
    tensors: Iterable[TensorSpec] | Mapping[str, np.ndarray],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write tensors into ``folder`` as Hugging Face does; returns the written weight files.

    Everything that fits in one shard becomes a single ``model.safetensors`` (no index).
    Otherwise the tensors are split, in the order given, into
    ``model-00001-of-0000N.safetensors`` … and ``model.safetensors.index.json`` is written with
    ``{"metadata": {"total_size": <data bytes>}, "weight_map": {name: file}}``. ``metadata``
    goes into every file's ``__metadata__``. The folder is created if needed.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {folder}: {e}") from e
    specs = _as_specs(tensors)
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / SINGLE_FILE_NAME, shards[0], metadata)
        return [folder / SINGLE_FILE_NAME]
    n = len(shards)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(folder / name, shard, metadata)
        files.append(folder / name)
        for s in shard:
            weight_map[s.name] = name
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    index_path = folder / INDEX_FILE_NAME
    tmp, f = _open_temp_beside(index_path)
    try:
        with f:
            _write(f, text.encode("utf-8"), index_path)
        os.replace(tmp, index_path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise OutputError(f"cannot write {index_path}: {e}") from e
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return files
