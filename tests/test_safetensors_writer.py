"""The streaming safetensors writer, checked against the reference ``safetensors`` package."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from arrow_quant_v2 import safetensors_writer as sw
from arrow_quant_v2.errors import OutputError
from arrow_quant_v2.safetensors_writer import (
    DTYPES,
    INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
    TensorSpec,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    plan_shards,
    write_safetensors,
    write_sharded,
)


def _mixed_tensors():
    rng = np.random.default_rng(1)
    return {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.half": rng.standard_normal(7).astype(np.float16),
        "a.double": rng.standard_normal((2, 2)),
        "mask": np.array([True, False, True]),
        "u8": np.arange(5, dtype=np.uint8),
        "i8": np.arange(-2, 3, dtype=np.int8),
        "i16": np.arange(3, dtype=np.int16),
        "u16": np.arange(3, dtype=np.uint16),
        "i32": np.arange(3, dtype=np.int32),
        "u32": np.arange(3, dtype=np.uint32),
        "i64": np.arange(4, dtype=np.int64),
        "u64": np.arange(3, dtype=np.uint64),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "ünïcode.name": np.ones(2, np.float32),
    }


def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def _raw(path, name):
    n, hdr = _header(path)
    b, e = hdr[name]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + n + b)
        return f.read(e - b)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"z": "1", "a": "x y"}])
def test_bytes_identical_to_reference_writer(tmp_path, metadata):
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    size = write_safetensors(tmp_path / "mine.safetensors", tensors, metadata=metadata)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    mine = (tmp_path / "mine.safetensors").read_bytes()
    if metadata is None or len(metadata) == 1:  # multi-key metadata order is a Rust HashMap's
        assert mine == ref
    assert size == len(mine) == len(ref)
    n, _ = _header(tmp_path / "mine.safetensors")
    assert n % 8 == 0 and mine[8 + n - 1:8 + n] in (b"}", b" ")
    loaded = load_file(str(tmp_path / "mine.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k], v)
    with safe_open(str(tmp_path / "mine.safetensors"), framework="numpy") as f:
        assert f.metadata() == metadata


def test_specs_with_callables_and_chunks_stream_one_at_a_time(tmp_path):
    rng = np.random.default_rng(2)
    big = rng.standard_normal((10, 6)).astype(np.float32)
    half = rng.standard_normal((4, 4)).astype(np.float16)
    calls = []

    def chunks():
        calls.append("big")
        for i in range(0, 10, 3):  # uneven row chunks
            yield big[i:i + 3]

    def whole():
        calls.append("half")
        return half

    specs = [TensorSpec("big", "F32", (10, 6), chunks), TensorSpec("half", "F16", (4, 4), whole),
             TensorSpec("ids", "I64", [3], np.array([7, 8, 9]))]
    write_safetensors(tmp_path / "m.safetensors", specs, metadata={"format": "pt"})
    assert sorted(calls) == ["big", "half"]  # each producer called exactly once
    loaded = load_file(str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(loaded["big"], big)
    np.testing.assert_array_equal(loaded["half"], half)
    np.testing.assert_array_equal(loaded["ids"], [7, 8, 9])
    # data order is the reference's: I64 (widest enum rank) before F32 before F16
    _, hdr = _header(tmp_path / "m.safetensors")
    assert [k for k in hdr if k != "__metadata__"] == ["ids", "big", "half"]
    assert hdr["ids"]["data_offsets"] == [0, 24]


@pytest.mark.parametrize(
    "spec, match",
    [
        (TensorSpec("x", "F32", (2, 3), np.zeros((2, 3), np.float64)), "numpy dtype"),
        (TensorSpec("x", "F32", (2, 3), np.zeros((3, 2), np.float32)), "shape"),
        (TensorSpec("x", "F32", (2, 3), lambda: iter([np.zeros(5, np.float32)])), "produced 20 bytes"),
        (TensorSpec("x", "F32", (2, 3), lambda: iter([np.zeros(4, np.float32)] * 2)), "more than"),
        (TensorSpec("x", "BF16", (2,), np.zeros(2, np.float32)), "float32_to_bf16_bits"),
        (TensorSpec("x", "I32", (2,), np.zeros(2, np.float32)), "numpy dtype"),
    ],
)
def test_mismatched_data_is_rejected_and_leaves_no_file(tmp_path, spec, match):
    ok = TensorSpec("a", "F32", (1,), np.ones(1, np.float32))
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "bad.safetensors", [ok, spec])
    assert list(tmp_path.iterdir()) == []


def test_bad_specs():
    with pytest.raises(ValueError, match="unsupported safetensors dtype"):
        TensorSpec("x", "F4", (2,), np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="reserved"):
        TensorSpec("__metadata__", "F32", (1,), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="negative"):
        TensorSpec("x", "F32", (-1,), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        sw.build_header([TensorSpec("x", "F32", (1,), None), TensorSpec("x", "F32", (1,), None)])
    with pytest.raises(ValueError, match="str to str"):
        sw.build_header([], metadata={"a": 1})


def test_big_endian_input_is_written_little_endian(tmp_path):
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    write_safetensors(tmp_path / "m.safetensors", [TensorSpec("a", "F32", (2, 3), a)])
    np.testing.assert_array_equal(load_file(str(tmp_path / "m.safetensors"))["a"], a.astype("<f4"))


def test_existing_file_is_replaced_whole(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a": np.zeros(1000, np.float32)})
    write_safetensors(p, {"b": np.ones(2, np.float32)})
    assert list(load_file(str(p))) == ["b"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.safetensors"]


# ----------------------------------------------------------------------------- bfloat16


def test_bf16_round_to_nearest_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF,
                     0x7F800000, 0xFF800000, 0x00000001, 0x80000000, 0x7FC00000, 0xFFFFFFFF,
                     0x7F800001], dtype=np.uint32)
    want = np.array([0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0xFF80, 0x7F80, 0xFF80, 0x0000,
                     0x8000], dtype=np.uint16)
    got = float32_to_bf16_bits(bits.view(np.float32))
    np.testing.assert_array_equal(got[:10], want)
    back = bf16_bits_to_float32(got[10:])
    assert np.isnan(back).all()  # NaNs (incl. a signalling payload) stay NaN
    assert got[11] >> 15 == 1  # sign kept


def test_bf16_matches_ml_dtypes_and_roundtrips():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    with np.errstate(over="ignore"):
        scaled = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-40, 38, 200_000)).astype(np.float32)
    anybits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([scaled, anybits])
    x = x[~np.isnan(x)]
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16_bits(x), ref)
    # every bf16 bit pattern widens exactly and rounds back to itself
    allbits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    wide = bf16_bits_to_float32(allbits)
    np.testing.assert_array_equal(wide.view(np.uint32) >> 16, allbits)
    finite = ~np.isnan(wide)
    np.testing.assert_array_equal(float32_to_bf16_bits(wide)[finite], allbits[finite])
    assert float32_to_bf16_bits(np.zeros((2, 3), np.float64)).shape == (2, 3)
    with pytest.raises(ValueError):
        bf16_bits_to_float32(np.zeros(2, np.float32))


def test_bf16_file_header_and_raw_bytes(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    bits = float32_to_bf16_bits(w)
    p = tmp_path / "bf16.safetensors"
    write_safetensors(p, [TensorSpec("w", "BF16", (16, 8), lambda: bits),
                          TensorSpec("n", "F32", (8,), np.ones(8, np.float32))],
                      metadata={"format": "pt"})
    with safe_open(str(p), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == ["n", "w"]
        sl = f.get_slice("w")
        assert sl.get_dtype() == "BF16" and list(sl.get_shape()) == [16, 8]
        try:  # recent safetensors hands out ml_dtypes.bfloat16 arrays
            got = f.get_tensor("w")
        except Exception:  # pragma: no cover - older versions cannot
            got = None
    if got is not None:
        np.testing.assert_array_equal(got.view(np.uint16), bits)
    raw = np.frombuffer(_raw(p, "w"), dtype="<u2").reshape(16, 8)
    np.testing.assert_array_equal(raw, bits)
    assert np.abs(bf16_bits_to_float32(raw) - w).max() <= np.abs(w).max() * 2**-8


# ----------------------------------------------------------------------------- sharding


def _specs(sizes):
    rng = np.random.default_rng(5)
    return [TensorSpec.from_array(f"t{i:02d}", rng.standard_normal(n).astype(np.float32))
            for i, n in enumerate(sizes)]


def test_plan_shards_is_greedy_in_order():
    specs = _specs([10, 10, 10, 40, 5, 5])  # bytes: 40 40 40 160 20 20
    names = [[s.name for s in sh] for sh in plan_shards(specs, 100)]
    assert names == [["t00", "t01"], ["t02"], ["t03"], ["t04", "t05"]]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 10**6)] == [[s.name for s in specs]]
    assert plan_shards([], 10) == [[]]
    with pytest.raises(ValueError):
        plan_shards(specs, 0)


def test_write_sharded_single_file(tmp_path):
    specs = _specs([3, 4])
    files = write_sharded(tmp_path / "m", specs, 10**6, metadata={"format": "pt"})
    assert files == [tmp_path / "m" / SINGLE_FILE_NAME]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [SINGLE_FILE_NAME]
    loaded = load_file(str(files[0]))
    for s in specs:
        np.testing.assert_array_equal(loaded[s.name], s.produce)


def test_write_sharded_index(tmp_path):
    specs = _specs([10, 10, 10, 40, 5, 5, 1])
    folder = tmp_path / "m"
    files = write_sharded(folder, specs, 100, metadata={"format": "pt"})
    n = len(files)
    assert n == 4
    assert [f.name for f in files] == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((folder / INDEX_FILE_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert list(index["weight_map"]) == sorted(s.name for s in specs)
    seen = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                assert index["weight_map"][k] == f.name
                seen[k] = h.get_tensor(k)
    assert seen.keys() == {s.name for s in specs}
    for s in specs:
        np.testing.assert_array_equal(seen[s.name], s.produce)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f.name for f in files] + [INDEX_FILE_NAME])


def test_output_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        write_safetensors(blocker / "m.safetensors", {"a": np.zeros(1, np.float32)})
    with pytest.raises(OutputError):
        write_sharded(blocker / "sub", {"a": np.zeros(1, np.float32)}, 100)


def test_disk_full_mid_write_is_output_error_and_cleans_up(tmp_path, monkeypatch):
    real_open = sw._open_temp_beside

    class FullFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n > 3:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake(path):
        tmp, f = real_open(path)
        return tmp, FullFile(f)

    monkeypatch.setattr(sw, "_open_temp_beside", fake)
    with pytest.raises(OutputError, match="No space left"):
        write_safetensors(tmp_path / "m.safetensors", _specs([5, 5, 5]))
    assert list(tmp_path.iterdir()) == []


def test_dtype_table_matches_reference_sizes():
    assert DTYPES["BF16"].itemsize == DTYPES["F16"].itemsize == 2
    assert all(DTYPES[k].str[0] in "<|" for k in DTYPES)
