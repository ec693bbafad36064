"""A corpus of damaged model folders, and helpers to build small valid ones by hand.

Used by ``tests/test_bad_inputs.py``, ``tests/test_faults.py`` and the hypothesis
fuzzing. Everything here writes safetensors bytes itself (8-byte little-endian header
length, JSON header, data) so that it can write files no well-behaved writer would.

``python -m tests.badfiles`` runs every case through ``quantize_model`` and prints
``case | error type: message`` as a table (for reports).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I8": "i1", "U8": "u1",
      "BOOL": "u1"}

Tensor = Tuple[str, str, Tuple[int, ...], bytes]  # name, dtype, shape, raw little-endian bytes


# -- building valid files -----------------------------------------------------------------------


def bf16_words(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tensor(name: str, dtype: str, shape: Sequence[int], values: Optional[np.ndarray] = None, seed: int = 0) -> Tensor:
    """A tensor entry; ``values`` default to seeded normals (BF16 from float32 bits)."""
    shape = tuple(shape)
    if values is None:
        values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    values = np.asarray(values).reshape(shape)
    if dtype == "BF16":
        raw = bf16_words(values.astype(np.float32))
    else:
        raw = values.astype(np.dtype(NP[dtype]))
    return name, dtype, shape, np.ascontiguousarray(raw).tobytes()


def header_dict(tensors: Sequence[Tensor], metadata: Optional[dict] = None) -> dict:
    h: dict = {}
    if metadata is not None:
        h["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape, raw in tensors:
        h[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    return h


def st_bytes(tensors: Sequence[Tensor], metadata: Optional[dict] = {"format": "pt"}, *,
             mutate: Optional[Callable[[dict], object]] = None, header_raw: Optional[bytes] = None,
             length: Optional[int] = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` in order.

    ``mutate(header)`` may edit the header dict in place (or return a replacement);
    ``header_raw`` replaces the JSON bytes; ``length`` replaces the 8-byte header length.
    """
    h = header_dict(tensors, metadata)
    if mutate is not None:
        r = mutate(h)
        h = h if r is None else r
    raw = header_raw if header_raw is not None else json.dumps(h, separators=(",", ":")).encode()
    if header_raw is None:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + b"".join(t[3] for t in tensors)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def small_tensors(seed: int = 0) -> List[Tensor]:
    """A little model: quantized F32/F16/BF16 matrices, a norm, a bias and an int tensor."""
    return [
        tensor("blocks.0.attn.qkv.weight", "F32", (96, 128), seed=seed),
        tensor("blocks.0.mlp.fc1.weight", "F16", (128, 64), seed=seed + 1),
        tensor("blocks.0.mlp.fc2.weight", "BF16", (64, 128), seed=seed + 2),
        tensor("blocks.0.norm1.weight", "F32", (128,), np.ones(128), seed=seed + 3),
        tensor("blocks.0.mlp.fc1.bias", "F32", (128,), seed=seed + 4),
        tensor("position_ids", "I64", (1, 16), np.arange(16)),
    ]


def make_model(folder: Path, tensors: Optional[Sequence[Tensor]] = None, *, extra: bool = True, **kw) -> Path:
    """A Hugging Face style folder: ``model.safetensors`` (+ config.json, tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "model.safetensors", st_bytes(small_tensors() if tensors is None else tensors, **kw))
    if extra:
        (folder / "config.json").write_text(json.dumps({"model_type": "dit", "hidden_size": 128}))
        (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def make_sharded(folder: Path, shards: Dict[str, Sequence[Tensor]], weight_map: Optional[dict] = None) -> Path:
    """Shards named by ``shards`` keys and an index (``weight_map`` defaults to the truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for fname, ts in shards.items():
        write(folder / fname, st_bytes(ts))
        truth.update({t[0]: fname for t in ts})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": truth if weight_map is None else weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "dit"}))
    return folder


# -- checking that nothing was lost ---------------------------------------------------------------


def hash_tree(root: Path) -> Dict[str, str]:
    """relative path -> sha256 of every file (and 'dir' for folders, 'link->x' for links) under root."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link->" + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest() + f":{os.stat(p).st_mode & 0o7777:o}"
    return out


def exists(path: Path) -> bool:
    """``path.exists()`` that answers False for names the OS refuses (NUL byte, too long, loops)."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def leftovers(out: Path) -> List[str]:
    """Temporary siblings a store write can leave beside ``out`` (``.name.partial-*``, ``.name.old-*``)."""
    parent = Path(out).parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{Path(out).name}."))


# -- the corpus -----------------------------------------------------------------------------------


@dataclass
class Case:
    """A bad input: ``build(tmp)`` makes it and returns (model path, output path, kwargs for quantize_model)."""

    id: str
    build: Callable[[Path], Tuple[Path, Path, dict]]
    error: str  # class name in arrow_quant_v2
    mentions: Callable[[Path, Path], List[str]] = field(default=lambda model, out: [str(model)])


def _model_with(**kw):
    def build(tmp):
        return make_model(tmp / "model", **kw), tmp / "out", {}
    return build


def _file_mentions(model, out):
    return [str(model / "model.safetensors")]


def _tensor_mentions(*names):
    return lambda model, out: [str(model / "model.safetensors")] + [repr(n) for n in names]


def valid_bytes() -> bytes:
    return st_bytes(small_tensors())


def _data_start() -> int:
    return 8 + struct.unpack("<Q", valid_bytes()[:8])[0]


def truncation_points() -> List[int]:
    """Offsets to cut the valid file at: in the length, the header and the data."""
    size, ds = len(valid_bytes()), _data_start()
    return sorted({0, 1, 4, 7, 8, 9, 20, ds // 2, ds - 2, ds - 1, ds, ds + 1, ds + 4, (ds + size) // 2,
                   size - 8, size - 2, size - 1})


def _truncated(at):
    def build(tmp):
        m = make_model(tmp / "model")
        write(m / "model.safetensors", valid_bytes()[:at])
        return m, tmp / "out", {}
    return build


def _raw_header(raw: bytes, **kw):
    def build(tmp):
        m = make_model(tmp / "model")
        write(m / "model.safetensors", st_bytes(small_tensors(), header_raw=raw, **kw))
        return m, tmp / "out", {}
    return build


def _mutated(fn):
    return _model_with(mutate=fn)


def _set(name, key, value):
    def fn(h):
        h[name][key] = value
    return fn


Q, F16, BF, NORM = "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.norm1.weight"


def _drop(name, key):
    def fn(h):
        del h[name][key]
    return fn


def _overlap(h):
    a, b = h[F16]["data_offsets"]
    h[F16]["data_offsets"] = [a - 16, b - 16]


def _swap_offsets(h):
    h[Q]["data_offsets"] = h[Q]["data_offsets"][::-1]


def _past_end(h):
    a, b = h["position_ids"]["data_offsets"]
    h["position_ids"]["data_offsets"] = [a + 64, b + 64]


def _huge_offsets(h):
    h["position_ids"]["data_offsets"] = [2**62, 2**62 + 128]


def _two_shards(tmp):
    m = tmp / "model"
    ts = small_tensors()
    m.mkdir(parents=True)
    write(m / "model-00001-of-00002.safetensors", st_bytes(ts[:3]))
    write(m / "model-00002-of-00002.safetensors", st_bytes(ts[2:]))  # fc2 in both
    return m, tmp / "out", {}


def _index_missing_shard(tmp):
    ts = small_tensors()
    m = make_sharded(tmp / "model", {"a.safetensors": ts[:3], "b.safetensors": ts[3:]})
    wm = {t[0]: "a.safetensors" for t in ts[:3]} | {t[0]: "c.safetensors" for t in ts[3:]}
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return m, tmp / "out", {}


def _index_ghost_tensor(tmp):
    ts = small_tensors()
    m = make_sharded(tmp / "model", {"a.safetensors": ts[:3], "b.safetensors": ts[3:]})
    idx = json.loads((m / "model.safetensors.index.json").read_text())
    idx["weight_map"]["blocks.9.ghost.weight"] = "b.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    return m, tmp / "out", {}


def _index_escapes(tmp):
    ts = small_tensors()
    write(tmp / "outside.safetensors", st_bytes(ts[3:]))
    m = make_sharded(tmp / "model", {"a.safetensors": ts[:3]},
                     weight_map={t[0]: "a.safetensors" for t in ts[:3]} | {t[0]: "../outside.safetensors" for t in ts[3:]})
    return m, tmp / "out", {}


def _index_corrupt(tmp):
    ts = small_tensors()
    m = make_sharded(tmp / "model", {"a.safetensors": ts})
    (m / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return m, tmp / "out", {}


def _config_corrupt(tmp):
    m = make_model(tmp / "model")
    (m / "config.json").write_text("{not json")
    return m, tmp / "out", {}


def _no_safetensors(tmp):
    m = tmp / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return m, tmp / "out", {}


def _not_safetensors_file(tmp):
    f = write(tmp / "model.bin", b"\x80\x02}q\x00.")
    return f, tmp / "out", {}


def _dir_named_safetensors(tmp):
    m = tmp / "model"
    (m / "model.safetensors").mkdir(parents=True)
    return m, tmp / "out", {}


def _broken_symlink(tmp):
    m = tmp / "model"
    m.mkdir()
    os.symlink(tmp / "nowhere.safetensors", m / "model.safetensors")
    return m, tmp / "out", {}


def _existing_folder(overwrite):
    """An output folder that exists and is not a store (someone's precious notes)."""
    def build(tmp):
        m = make_model(tmp / "model")
        out = tmp / "out"
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        return m, out, {"overwrite": overwrite}
    return build


def _existing_file_output(overwrite):
    def build(tmp):
        m = make_model(tmp / "model")
        out = write(tmp / "out", b"precious")
        return m, out, {"overwrite": overwrite}
    return build


def _under_regular_file(tmp):
    m = make_model(tmp / "model")
    blocker = write(tmp / "blocker", b"a regular file, so nothing can be created under it")
    return m, blocker / "out", {}


def _diffusers_truncated(tmp):
    m = tmp / "model"
    write(m / "model_index.json", b'{"_class_name": "DiTPipeline"}')
    write(m / "transformer" / "diffusion_pytorch_model.safetensors", valid_bytes()[:600])
    write(m / "vae" / "diffusion_pytorch_model.safetensors", valid_bytes())
    return m, tmp / "out", {}


def _symlink_loop_weights(tmp):
    m = tmp / "model"
    m.mkdir()
    os.symlink(m / "model.safetensors", m / "model.safetensors")
    return m, tmp / "out", {}


def _output_symlink_to_input(tmp):
    m = make_model(tmp / "model")
    os.symlink(m, tmp / "out")
    return m, tmp / "out", {"overwrite": True}


def _output_symlink_loop(tmp):
    m = make_model(tmp / "model")
    os.symlink(tmp / "loop", tmp / "loop")
    return m, tmp / "loop" / "out", {}


def _under_proc(tmp):
    m = make_model(tmp / "model")
    return m, Path("/proc/version/arrowquant-out"), {}


CASES: List[Case] = [
    Case("missing path", lambda tmp: (tmp / "no-such-model", tmp / "out", {}), "ModelNotFoundError"),
    Case("folder without safetensors", _no_safetensors, "ModelNotFoundError"),
    Case("file that is not .safetensors", _not_safetensors_file, "ModelNotFoundError"),
    Case("model.safetensors is a folder", _dir_named_safetensors, "ModelFormatError", _file_mentions),
    Case("model.safetensors is a broken symlink", _broken_symlink, "ModelNotFoundError", _file_mentions),
    Case("model.safetensors is a symlink loop", _symlink_loop_weights, "ModelFormatError", _file_mentions),
    Case("diffusers component truncated", _diffusers_truncated, "ModelFormatError",
         lambda m, o: [str(m / "transformer" / "diffusion_pytorch_model.safetensors")]),
    *[Case(f"truncated at byte {at}", _truncated(at), "ModelFormatError", _file_mentions) for at in truncation_points()],
    Case("header length runs into the data", _model_with(length=10_000), "ModelFormatError", _file_mentions),
    Case("header length > file size", _model_with(length=10**6), "ModelFormatError", _file_mentions),
    Case("header length > 100 MB limit", _model_with(length=100 * 2**20 + 1), "ModelFormatError", _file_mentions),
    Case("header length 2^60", _model_with(length=2**60), "ModelFormatError", _file_mentions),
    Case("header length 2^64-1", _model_with(length=2**64 - 1), "ModelFormatError", _file_mentions),
    Case("header length short by the padding", lambda tmp: _raw_header(
        json.dumps(header_dict(small_tensors(), {"format": "pt"})).encode() + b"        ",
        length=len(json.dumps(header_dict(small_tensors(), {"format": "pt"})).encode()))(tmp),
         "ModelFormatError", _file_mentions),
    Case("header length short (cuts JSON)", lambda tmp: _raw_header(
        json.dumps(header_dict(small_tensors())).encode(),
        length=len(json.dumps(header_dict(small_tensors())).encode()) - 1)(tmp), "ModelFormatError", _file_mentions),
    Case("header JSON corrupt", _raw_header(b'{"a": {"dtype": "F32", "shape": [2'), "ModelFormatError", _file_mentions),
    Case("header not UTF-8", _raw_header(b'{"\xff\xfe": 1}'), "ModelFormatError", _file_mentions),
    Case("header is a JSON array", _raw_header(b"[1, 2, 3]"), "ModelFormatError", _file_mentions),
    Case("header is a JSON string", _raw_header(b'"weights"'), "ModelFormatError", _file_mentions),
    Case("header is null", _raw_header(b"null"), "ModelFormatError", _file_mentions),
    Case("header nested 100000 deep", _raw_header(b"[" * 100000 + b"]" * 100000), "ModelFormatError", _file_mentions),
    Case("header integer of 5000 digits", _raw_header(b'{"a": ' + b"7" * 5000 + b"}"), "ModelFormatError", _file_mentions),
    Case("header duplicate tensor name", _raw_header(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'),
         "ModelFormatError", _file_mentions),
    Case("entry missing data_offsets", _mutated(_drop(Q, "data_offsets")), "ModelFormatError", _tensor_mentions(Q)),
    Case("entry missing dtype", _mutated(_drop(F16, "dtype")), "ModelFormatError", _tensor_mentions(F16)),
    Case("entry is a number", _mutated(lambda h: h.__setitem__(NORM, 5)), "ModelFormatError", _tensor_mentions(NORM)),
    Case("__metadata__ is a list", _mutated(lambda h: h.__setitem__("__metadata__", ["pt"])), "ModelFormatError",
         _file_mentions),
    Case("overlapping offsets", _mutated(_overlap), "ModelFormatError", _tensor_mentions(F16)),
    Case("offsets begin > end", _mutated(_swap_offsets), "ModelFormatError", _tensor_mentions(Q)),
    Case("offsets past the end", _mutated(_past_end), "ModelFormatError", _tensor_mentions("position_ids")),
    Case("offsets near 2^62", _mutated(_huge_offsets), "ModelFormatError", _tensor_mentions("position_ids")),
    Case("negative offset", _mutated(_set(Q, "data_offsets", [-4, 49148])), "ModelFormatError", _tensor_mentions(Q)),
    Case("offsets are floats", _mutated(_set(Q, "data_offsets", [0.0, 49152.0])), "ModelFormatError", _tensor_mentions(Q)),
    Case("shape disagrees with bytes", _mutated(_set(Q, "shape", [96, 127])), "ModelFormatError", _tensor_mentions(Q)),
    Case("dtype disagrees with bytes", _mutated(_set(F16, "dtype", "F32")), "ModelFormatError", _tensor_mentions(F16)),
    Case("negative dimension", _mutated(_set(Q, "shape", [-96, -128])), "ModelFormatError", _tensor_mentions(Q)),
    Case("dimension 2^70 times 0", _mutated(_set("position_ids", "shape", [2**70, 0])), "ModelFormatError",
         _tensor_mentions("position_ids")),
    Case("shape is a string", _mutated(_set(Q, "shape", "96x128")), "ModelFormatError", _tensor_mentions(Q)),
    Case("unsupported dtype F128", _mutated(_set(Q, "dtype", "F128")), "ModelFormatError", _tensor_mentions(Q)),
    Case("unsupported dtype 'float32'", _mutated(_set(Q, "dtype", "float32")), "ModelFormatError", _tensor_mentions(Q)),
    Case("dtype is a list", _mutated(_set(Q, "dtype", ["F32"])), "ModelFormatError", _tensor_mentions(Q)),
    Case("dtype is a number", _mutated(_set(Q, "dtype", 32)), "ModelFormatError", _tensor_mentions(Q)),
    Case("trailing bytes after the data", lambda tmp: (
        write((m := make_model(tmp / "model")) / "model.safetensors", valid_bytes() + b"\0" * 16) and m, tmp / "out", {}),
        "ModelFormatError", _file_mentions),
    Case("duplicate tensor across shards", _two_shards, "ModelFormatError",
         lambda m, o: [str(m / "model-00002-of-00002.safetensors"), repr(BF)]),
    Case("index names a missing shard", _index_missing_shard, "ModelFormatError",
         lambda m, o: [str(m / "model.safetensors.index.json"), "c.safetensors"]),
    Case("index names a tensor no shard has", _index_ghost_tensor, "ModelFormatError",
         lambda m, o: [str(m / "model.safetensors.index.json"), "'blocks.9.ghost.weight'"]),
    Case("index points outside the folder", _index_escapes, "ModelFormatError",
         lambda m, o: [str(m / "model.safetensors.index.json"), "../outside.safetensors"]),
    Case("index JSON corrupt", _index_corrupt, "ModelFormatError", lambda m, o: [str(m / "model.safetensors.index.json")]),
    Case("config.json corrupt", _config_corrupt, "ModelFormatError", lambda m, o: [str(m / "config.json")]),
    # -- output problems
    Case("output inside the input folder", lambda tmp: (make_model(tmp / "model"), tmp / "model" / "q", {}),
         "OutputError", lambda m, o: [str(o), "inside"]),
    Case("output is the input folder", lambda tmp: (make_model(tmp / "model"), tmp / "model", {"overwrite": True}),
         "OutputError", lambda m, o: [str(o)]),
    Case("output contains the input", lambda tmp: (make_model(tmp / "a" / "model"), tmp / "a", {"overwrite": True}),
         "OutputError", lambda m, o: [str(o), "contains"]),
    Case("output exists (no overwrite)", _existing_folder(False), "OutputError", lambda m, o: [str(o), "already exists"]),
    Case("output is a non-store folder (overwrite)", _existing_folder(True), "OutputError",
         lambda m, o: [str(o), "not an ArrowQuant store"]),
    Case("output is a file (no overwrite)", _existing_file_output(False), "OutputError", lambda m, o: [str(o)]),
    Case("output is a file (overwrite)", _existing_file_output(True), "OutputError", lambda m, o: [str(o)]),
    Case("output under a regular file", _under_regular_file, "OutputError", lambda m, o: [str(o.parent)]),
    Case("output under /proc", _under_proc, "OutputError", lambda m, o: [str(o.parent)]),
    Case("output name with a NUL byte", lambda tmp: (make_model(tmp / "model"), tmp / "o\0ut", {}), "OutputError",
         lambda m, o: [repr(str(o))]),
    Case("output name too long", lambda tmp: (make_model(tmp / "model"), tmp / ("o" * 300), {}), "OutputError",
         lambda m, o: [str(o)]),
    Case("output under a symlink loop", _output_symlink_loop, "OutputError", lambda m, o: [str(o)]),
    Case("output is a symlink to the input", _output_symlink_to_input, "OutputError", lambda m, o: [str(o), "inside"]),
]


def run_case(case: Case, tmp: Path):
    """Build and run one case; returns (model, out, exception or None)."""
    from arrow_quant_v2.engine import quantize_model

    model, out, kw = case.build(tmp)
    try:
        quantize_model(model, out, **kw)
    except Exception as e:  # noqa: BLE001 - we report whatever comes out
        return model, out, e
    return model, out, None


def main() -> None:  # pragma: no cover - report helper
    import tempfile

    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            model, out, e = run_case(case, Path(d))
            msg = "no error" if e is None else f"{type(e).__name__}: {e}"
            rows.append((case.id, msg.replace(d, "$TMP")))
    print("| case | error |\n|---|---|")
    for cid, msg in rows:
        print(f"| {cid} | `{msg}` |")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
