"""Faults during a run: SIGKILL, the source changing or vanishing, progress callbacks that raise.

Whatever happens, nothing that looks like a finished store may appear at the output path
unless the run really finished, and a later run to the same output must succeed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from arrow_quant_v2 import (ArrowQuantV2, DiffusionQuantConfig, ModelFormatError, ModelNotFoundError,
                            OutputError, QuantizationError, load_quantized)
from arrow_quant_v2.engine import quantize_model
from arrow_quant_v2.validation import validate_store

from badfiles import hash_tree, leftovers, make_model, make_sharded, small_tensors, st_bytes, tensor, write

REPO = Path(__file__).resolve().parents[1]
OLD = 1_600_000_000  # an mtime well in the past, so any later write changes it


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """96 tensors of 256x256 in F32/F16/BF16 (about 16 MB): long enough to be killed mid-run."""
    dtypes = ("F32", "F16", "BF16")
    ts = [tensor(f"blocks.{i // 3}.{['attn.qkv', 'mlp.fc1', 'mlp.fc2'][i % 3]}.weight", dtypes[i % 3], (256, 256), seed=i)
          for i in range(96)]
    ts += [tensor(f"blocks.{i}.norm1.weight", "F32", (256,), np.ones(256)) for i in range(32)]
    root = tmp_path_factory.mktemp("big")
    # Compile (and write numba's on-disk cache for) the kernels here, so the children below load
    # them instead of each compiling, which under load can take longer than the whole run.
    quantize_model(make_model(root / "warm", ts[:3] + ts[-1:]), root / "warm-out")
    return make_model(root / "model", ts)


# -- SIGKILL ------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from arrow_quant_v2.engine import quantize_model
    model, out, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    seen = [0]
    def sink(event):
        seen[0] += 1
        print(json.dumps([seen[0], event.stage]), flush=True)
        if (mode == "event" and seen[0] == int(arg)) or (mode == "stage" and event.stage == arg):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.008)  # spread the run over ~1 s so that random kills land everywhere
    quantize_model(model, out, progress=sink)
    print("FINISHED", flush=True)
""")


def _run_and_kill(model: Path, out: Path, mode: str, arg: str, delay: float = 0.0):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(model), str(out), mode, arg], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if mode == "random":
            proc.stdout.readline()  # the first progress event: the job has started
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)  # our own child, by pid
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


_rng = random.Random(20240601)
KILLS = [("event", "1"), ("event", "40"), ("event", "90"), ("stage", "finalize"), ("stage", "done")] + [
    ("random", f"{_rng.uniform(0.0, 1.2):.3f}") for _ in range(3)]


@pytest.mark.parametrize("mode,arg", KILLS, ids=[f"{m}-{a}" for m, a in KILLS])
def test_sigkill_leaves_no_store_and_a_rerun_succeeds(big_model, tmp_path, mode, arg):
    before = hash_tree(big_model)
    out = tmp_path / "out"
    code, stdout, stderr = _run_and_kill(big_model, out, mode, arg, delay=float(arg) if mode == "random" else 0.0)
    finished = "FINISHED" in stdout
    assert code == (0 if finished else -signal.SIGKILL), stderr
    if mode != "random":
        assert not finished
    assert hash_tree(big_model) == before
    rest = leftovers(out)
    assert len(rest) <= 1 and all(".partial-" in n for n in rest), rest
    if out.exists():
        # Only a run killed after publishing (at the "done" event, or one that finished)
        # leaves a folder at the output path, and then it is a complete store.
        assert mode == "random" or arg == "done"
        assert validate_store(big_model, out)["passed"]
        overwrite = True
    else:
        assert mode == "random" or arg != "done"
        overwrite = False
    result = quantize_model(big_model, out, overwrite=overwrite)
    assert result["num_tensors"] == 128
    assert leftovers(out) == [], "the rerun did not clean the killed run's partial folder"
    assert validate_store(big_model, out)["passed"]
    assert hash_tree(big_model) == before


def test_killed_run_can_be_resumed(big_model, tmp_path):
    out = tmp_path / "out"
    code, _, _ = _run_and_kill(big_model, out, "event", "60")
    assert code == -signal.SIGKILL and not out.exists()
    result = quantize_model(big_model, out, resume=True)
    assert result["num_tensors"] == 128 and leftovers(out) == []
    assert validate_store(big_model, out)["passed"]


# -- the source changing or vanishing mid-run -------------------------------------------------------


def _model(tmp_path: Path, n: int = 12) -> Path:
    ts = [tensor(f"blocks.{i}.attn.proj.weight", ("F32", "F16", "BF16")[i % 3], (256, 256), seed=i) for i in range(n)]
    m = make_model(tmp_path / "model", ts)
    os.utime(m / "model.safetensors", (OLD, OLD))
    return m


def _at(stage_or_count, action):
    """A progress sink running ``action()`` once, at the first event of a stage or the n-th event."""
    seen = []

    def sink(event):
        seen.append(event)
        hit = event.stage == stage_or_count if isinstance(stage_or_count, str) else len(seen) == stage_or_count
        if hit and not getattr(sink, "done", False):
            sink.done = True
            action()
    return sink


def _assert_nothing_published(tmp_path: Path, out: Path):
    assert not out.exists()
    assert leftovers(out) == []


def test_source_truncated_mid_run(tmp_path):
    m = _model(tmp_path)
    f = m / "model.safetensors"
    out = tmp_path / "out"
    with pytest.raises(QuantizationError) as info:
        quantize_model(m, out, progress=_at(1, lambda: os.truncate(f, f.stat().st_size // 2)))
    assert isinstance(info.value, ModelFormatError) and str(f) in str(info.value), info.value
    _assert_nothing_published(tmp_path, out)


def test_source_rewritten_in_place_mid_run(tmp_path):
    """Same size, different bytes: caught by the size+mtime check before publishing."""
    m = _model(tmp_path)
    f = m / "model.safetensors"
    out = tmp_path / "out"

    def scribble():
        with open(f, "r+b") as fh:
            fh.seek(f.stat().st_size - 4096)
            fh.write(os.urandom(4096))

    with pytest.raises(QuantizationError, match="changed while being quantized"):
        quantize_model(m, out, progress=_at(1, scribble))
    _assert_nothing_published(tmp_path, out)


def test_source_replaced_by_rename_mid_run(tmp_path):
    m = _model(tmp_path)
    f = m / "model.safetensors"
    other = write(tmp_path / "other.safetensors", st_bytes(
        [tensor(f"blocks.{i}.attn.proj.weight", ("F32", "F16", "BF16")[i % 3], (256, 256), seed=100 + i) for i in range(12)]))
    out = tmp_path / "out"
    with pytest.raises(QuantizationError) as info:
        quantize_model(m, out, progress=_at(1, lambda: os.replace(other, f)))
    assert str(m) in str(info.value)
    _assert_nothing_published(tmp_path, out)


@pytest.mark.parametrize("when", [1, "finalize"], ids=["after-first-event", "after-all-reads"])
def test_source_file_vanishes_mid_run(tmp_path, when):
    m = _model(tmp_path)
    f = m / "model.safetensors"
    out = tmp_path / "out"
    with pytest.raises(QuantizationError) as info:
        quantize_model(m, out, progress=_at(when, f.unlink))
    assert str(m) in str(info.value)
    if when == 1:
        assert isinstance(info.value, ModelNotFoundError) and "vanished" in str(info.value)
    _assert_nothing_published(tmp_path, out)


def test_shard_vanishes_mid_run(tmp_path):
    ts = [tensor(f"blocks.{i}.attn.proj.weight", "F32", (256, 256), seed=i) for i in range(8)]
    m = make_sharded(tmp_path / "model", {"model-00001-of-00002.safetensors": ts[:4],
                                          "model-00002-of-00002.safetensors": ts[4:]})
    out = tmp_path / "out"
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors"):
        quantize_model(m, out, progress=_at(1, (m / "model-00002-of-00002.safetensors").unlink))
    _assert_nothing_published(tmp_path, out)


def test_non_weight_file_vanishes_mid_run(tmp_path):
    """tokenizer.json removed before the copy list is taken: the store lists only what it copied."""
    m = _model(tmp_path)
    out = tmp_path / "out"
    quantize_model(m, out, progress=_at(1, (m / "tokenizer.json").unlink))
    store = load_quantized(out)
    assert store.manifest["extra_files"] == ["config.json"] and not (out / "tokenizer.json").exists()
    assert validate_store(m, out)["passed"] and leftovers(out) == []


# -- progress callbacks that raise ----------------------------------------------------------------


class _Boom(Exception):
    pass


def _raise(*_):
    raise _Boom("listener bug")


@pytest.mark.parametrize("when", [1, 5, "finalize"])
def test_engine_sink_that_raises_aborts_cleanly(tmp_path, when):
    """The engine hands events straight to its sink: a raising sink aborts the job (nothing published).
    User callbacks never reach the engine unwrapped; see the two tests below."""
    m = _model(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(_Boom):
        quantize_model(m, out, progress=_at(when, _raise))
    _assert_nothing_published(tmp_path, out)
    assert quantize_model(m, out)["num_tensors"] == 12


def test_sync_api_callback_that_raises_does_not_kill_the_job(tmp_path, caplog):
    m = _model(tmp_path)
    out = tmp_path / "out"
    calls = []

    def callback(message, progress):
        calls.append(progress)
        raise _Boom("listener bug")

    with caplog.at_level(logging.WARNING):
        result = ArrowQuantV2(progress_interval=0).quantize_diffusion_model(str(m), str(out), progress_callback=callback)
    assert result["num_tensors"] == 12 and len(calls) > 2 and calls[-1] == 1.0
    assert any("listener bug" in r.getMessage() or "raised" in r.getMessage() for r in caplog.records)
    assert validate_store(m, out)["passed"] and leftovers(out) == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_async_api_callback_that_raises_does_not_kill_the_job(tmp_path, caplog, kind):
    from arrow_quant_v2 import AsyncArrowQuantV2

    m = _model(tmp_path)
    out = tmp_path / "out"
    calls = []

    def callback(message, progress):
        calls.append(progress)
        raise _Boom("listener bug")

    async def acallback(message, progress):
        calls.append(progress)
        raise _Boom("listener bug")

    async def main():
        q = AsyncArrowQuantV2()
        try:
            return await q.quantize_diffusion_model_async(str(m), str(out), progress_callback=(
                callback if kind == "sync" else acallback), progress_interval=0)
        finally:
            q.close()

    with caplog.at_level(logging.WARNING):
        result = asyncio.run(main())
    assert result["num_tensors"] == 12 and calls and calls[-1] == 1.0
    assert validate_store(m, out)["passed"] and leftovers(out) == []


# -- the output path changing under a run ---------------------------------------------------------


def test_folder_appearing_at_the_output_mid_run_is_not_clobbered(tmp_path):
    m = _model(tmp_path)
    out = tmp_path / "out"

    def squat():
        out.mkdir()
        (out / "precious.txt").write_text("someone else's")

    with pytest.raises(QuantizationError, match="appeared while this run was writing"):
        quantize_model(m, out, progress=_at("finalize", squat))
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and leftovers(out) == []


def test_store_replaced_by_other_data_mid_overwrite_is_not_clobbered(tmp_path):
    m = _model(tmp_path)
    out = tmp_path / "out"
    quantize_model(m, out)

    def swap():
        import shutil

        shutil.rmtree(out)
        out.mkdir()
        (out / "precious.txt").write_text("someone else's")

    with pytest.raises(QuantizationError, match="appeared while this run was writing"):
        quantize_model(m, out, DiffusionQuantConfig(bit_width=8), overwrite=True, progress=_at("finalize", swap))
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and leftovers(out) == []


_KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from arrow_quant_v2 import DiffusionQuantConfig, store
    from arrow_quant_v2.engine import quantize_model
    model, out = sys.argv[1], Path(sys.argv[2])
    real = os.rename
    def rename(a, b):
        real(a, b)
        if Path(a) == out:   # the old store was just moved aside: die before the new one moves in
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    store._exchange = lambda a, b: False  # as on a system without renameat2
    quantize_model(model, out, DiffusionQuantConfig(bit_width=8), overwrite=True)
""")

_KILL_AFTER_EXCHANGE = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from arrow_quant_v2 import DiffusionQuantConfig, store
    from arrow_quant_v2.engine import quantize_model
    model, out = sys.argv[1], Path(sys.argv[2])
    def rmtree(path, *a, **k):   # the old store is about to be deleted: die first
        os.kill(os.getpid(), signal.SIGKILL)
    store.shutil.rmtree = rmtree
    quantize_model(model, out, DiffusionQuantConfig(bit_width=8), overwrite=True)
""")


def test_kill_between_the_two_renames_of_an_overwrite(tmp_path, monkeypatch):
    """Where the atomic exchange is unavailable, an overwrite is two renames; a kill between them
    leaves the old store as .old-*, and the next run puts it back before doing anything else."""
    m = _model(tmp_path)
    out = tmp_path / "out"
    quantize_model(m, out)
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(m), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and list(tmp_path.glob(".out.old-*"))
    with pytest.raises(OutputError, match="already exists"):
        quantize_model(m, out)  # the next run restores the old store first, then refuses to clobber it
    assert validate_store(m, out)["passed"] and not list(tmp_path.glob(".out.old-*"))


def test_overwrite_exchanges_atomically(tmp_path):
    """With renameat2(RENAME_EXCHANGE) the output path always holds a complete store."""
    m = _model(tmp_path)
    out = tmp_path / "out"
    quantize_model(m, out)
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_EXCHANGE, str(m), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["config"]["bit_width"] == 8, "the new store is in place"
    assert out.is_dir() and validate_store(m, out)["passed"], f"no store at the output; left: {leftovers(out)}"


def test_two_jobs_of_one_process_never_share_an_output(tmp_path):
    """The async API and the app run several jobs in one process: a second job to the same output
    must be refused while the first writes, whatever the pid lock says."""
    import threading

    m = _model(tmp_path)
    out = tmp_path / "out"
    started, release = threading.Event(), threading.Event()
    results = {}

    def sink(event):
        started.set()
        release.wait(60)

    def first():
        results["first"] = quantize_model(m, out, progress=sink)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(60)
    try:
        with pytest.raises(OutputError, match="another job of this process is writing it"):
            quantize_model(m, out)
        other = quantize_model(m, tmp_path / "other", DiffusionQuantConfig(bit_width=8))  # other outputs are fine
    finally:
        release.set()
        t.join(120)
    assert validate_store(m, out)["passed"] and results["first"]["quantized_path"] == str(out)
    assert other["bit_width"] == 8
