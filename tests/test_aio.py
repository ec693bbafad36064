"""AsyncArrowQuantV2: coroutines, progress delivery, bounds, cancellation, errors.

Assertions are about behaviour users rely on (what is delivered, where, in which order,
what is left on disk), not about timings.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import logging
import threading
from pathlib import Path

import pytest

import arrow_quant_v2
from arrow_quant_v2 import (
    ArrowQuantV2,
    AsyncArrowQuantV2,
    ConfigurationError,
    DiffusionQuantConfig,
    ModelNotFoundError,
    MultiModelError,
    QuantizationError,
    ValidationError,
)
from arrow_quant_v2 import aio, engine, layout
from arrow_quant_v2.progress import ProgressEvent

RESULT_KEYS = {"quantized_path", "compression_ratio", "cosine_similarity", "model_size_mb", "modality",
               "bit_width", "quantization_time_s"}
VALIDATION_KEYS = {"cosine_similarity", "compression_ratio", "per_layer_accuracy", "passed"}
INT4 = DiffusionQuantConfig(bit_width=4)


@pytest.fixture
def small(make_model) -> Path:
    return make_model("small")


@pytest.fixture
def active_chunks(monkeypatch):
    """Count kernel chunk tasks of every job that are running right now."""
    state = {"active": 0, "ran": 0}
    lock = threading.Lock()
    original = engine.QuantizeJob._encode

    def counting(self, *args, **kwargs):
        with lock:
            state["active"] += 1
            state["ran"] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(engine.QuantizeJob, "_encode", counting)
    return state


def partials(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def kernel_pool_idle() -> bool:
    pool = engine.kernel_pool()
    return pool._work_queue.empty()  # noqa: SLF001 - no public view of queued tasks


def started(events: list, flag: asyncio.Event):
    """An on_event hook that records events and sets ``flag`` once the worker is quantizing."""

    def hook(e: ProgressEvent):
        events.append(e)
        if e.stage == "quantize" and e.bytes_done > 0:
            flag.set()

    return hook


# -- shape of the API ------------------------------------------------------------------------


def test_methods_are_coroutine_functions():
    assert arrow_quant_v2.AsyncArrowQuantV2 is aio.AsyncArrowQuantV2
    q = AsyncArrowQuantV2()
    for name in ("quantize_diffusion_model_async", "quantize_multiple_models_async", "validate_quality_async"):
        assert inspect.iscoroutinefunction(getattr(q, name)), name
    params = inspect.signature(q.quantize_diffusion_model_async).parameters
    assert list(params)[:4] == ["model_path", "output_path", "config", "progress_callback"]
    assert {"overwrite", "progress_interval", "on_event"} <= set(params)
    assert list(inspect.signature(q.quantize_multiple_models_async).parameters)[:2] == ["models", "progress_callback"]
    assert list(inspect.signature(q.validate_quality_async).parameters)[:3] == ["original_path", "quantized_path",
                                                                              "min_accuracy"]
    assert q.progress_interval == 5.0


async def test_quantize_returns_documented_keys_and_a_store(small, tmp_path):
    q = AsyncArrowQuantV2()
    coro = q.quantize_diffusion_model_async(model_path=str(small), output_path=str(tmp_path / "out"),
                                            config=DiffusionQuantConfig(bit_width=2))
    assert inspect.iscoroutine(coro)
    result = await coro
    assert RESULT_KEYS <= set(result)
    assert result["bit_width"] == 2 and result["compression_ratio"] > 1 and 0 < result["cosine_similarity"] <= 1
    assert Path(result["quantized_path"]) == tmp_path / "out"
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert partials(tmp_path) == []
    report = await q.validate_quality_async(original_path=str(small), quantized_path=str(tmp_path / "out"))
    assert VALIDATION_KEYS <= set(report) and report["passed"] is True
    assert report["cosine_similarity"] == pytest.approx(result["cosine_similarity"], abs=1e-9)


async def test_gather_two_jobs_and_the_sync_api_shares_the_engine(make_model, small, tmp_path):
    other = make_model("tiny")
    q = AsyncArrowQuantV2()
    r1, r2 = await asyncio.gather(
        q.quantize_diffusion_model_async(small, tmp_path / "a", INT4),
        q.quantize_diffusion_model_async(other, tmp_path / "b", DiffusionQuantConfig(bit_width=8)),
    )
    assert (r1["bit_width"], r2["bit_width"]) == (4, 8)
    assert (tmp_path / "a" / "manifest.json").is_file() and (tmp_path / "b" / "manifest.json").is_file()
    sync = ArrowQuantV2(mode="diffusion").quantize_diffusion_model(small, tmp_path / "c", INT4)
    assert sync["cosine_similarity"] == pytest.approx(r1["cosine_similarity"], abs=1e-12)
    assert tree_digest(tmp_path / "a")["weights-00001.parquet"] == tree_digest(tmp_path / "c")["weights-00001.parquet"]


# -- progress ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_callbacks_run_on_the_loop_thread_in_order(small, tmp_path, kind):
    loop_thread = threading.get_ident()
    calls = []
    if kind == "sync":
        def callback(message, progress):
            calls.append((message, progress, threading.get_ident()))
    else:
        async def callback(message, progress):
            await asyncio.sleep(0)
            calls.append((message, progress, threading.get_ident()))

    q = AsyncArrowQuantV2(progress_interval=0)
    await q.quantize_diffusion_model_async(small, tmp_path / "out", INT4, callback)
    assert len(calls) >= 3
    assert {t for *_, t in calls} == {loop_thread}
    fractions = [p for _, p, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 1.0
    assert all(isinstance(m, str) and m for m, _, _ in calls)
    assert "done" in calls[-1][0]


async def test_throttle_interval_zero_versus_large(small, tmp_path):
    seen = {}
    for interval in (0, 3600):
        events = []
        q = AsyncArrowQuantV2(progress_interval=interval)
        await q.quantize_diffusion_model_async(small, tmp_path / f"out{interval}", INT4,
                                               lambda m, p, ev=events: ev.append(p))
        seen[interval] = events
    everything, throttled = seen[0], seen[3600]
    assert len(everything) > len(throttled)
    assert throttled == [everything[0], 1.0]  # first and final, whatever the interval
    for events in seen.values():
        assert events == sorted(events) and events[-1] == 1.0


async def test_per_call_interval_overrides_the_instance(small, tmp_path):
    q = AsyncArrowQuantV2(progress_interval=3600)  # the instance's: first and final only
    default, per_call = [], []
    await q.quantize_diffusion_model_async(small, tmp_path / "a", INT4, lambda m, p: default.append(p))
    await q.quantize_diffusion_model_async(small, tmp_path / "b", INT4, lambda m, p: per_call.append(p),
                                           progress_interval=0)
    assert len(default) == 2 and default[-1] == 1.0
    assert len(per_call) > 2 and per_call[-1] == 1.0


async def test_on_event_gets_raw_events_with_stage_and_counts(small, tmp_path):
    events = []
    q = AsyncArrowQuantV2(progress_interval=0)
    await q.quantize_diffusion_model_async(small, tmp_path / "out", INT4, on_event=events.append)
    assert all(isinstance(e, ProgressEvent) for e in events)
    assert events[-1].stage == "done" and events[-1].fraction == 1.0
    assert events[-1].tensors_done == events[-1].tensors_total > 0
    assert any(e.tensor.startswith("model.layers.") for e in events)
    assert {e.model_index for e in events} == {None}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_raising_callback_does_not_kill_the_job(small, tmp_path, caplog, kind):
    calls = []
    if kind == "sync":
        def callback(message, progress):
            calls.append(progress)
            raise RuntimeError("listener bug")
    else:
        async def callback(message, progress):
            calls.append(progress)
            raise RuntimeError("listener bug")

    q = AsyncArrowQuantV2(progress_interval=0)
    with caplog.at_level(logging.WARNING, logger="arrow_quant_v2.aio"):
        result = await q.quantize_diffusion_model_async(small, tmp_path / "out", INT4, callback)
    assert (tmp_path / "out" / "manifest.json").is_file() and RESULT_KEYS <= set(result)
    assert calls[-1] == 1.0 and len(calls) > 2  # kept being called after raising
    assert any("listener bug" in r.getMessage() or (r.exc_info and "listener bug" in str(r.exc_info[1]))
               for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_slow_callback_never_stalls_the_worker(make_model, tmp_path, monkeypatch):
    gate = asyncio.Event()
    delivered, emitted = [], []

    async def slow(message, progress):
        delivered.append(progress)
        if len(delivered) == 1:
            await gate.wait()  # stuck on the first event until the worker has emitted its last

    real_sink = aio._ProgressChannel.sink

    def spy(self, event):  # the worker side: sees every event the engine emits
        emitted.append(event.fraction)
        real_sink(self, event)
        if event.stage == "done":
            self.loop.call_soon_threadsafe(gate.set)

    monkeypatch.setattr(aio._ProgressChannel, "sink", spy)
    q = AsyncArrowQuantV2(progress_interval=0)
    result = await asyncio.wait_for(
        q.quantize_diffusion_model_async(make_model("medium"), tmp_path / "out", INT4, slow), 60)
    assert result["bit_width"] == 4
    # The worker emitted everything while the callback was stuck on the first event; the
    # callback then saw at most the newest intermediate event and always the final one.
    assert delivered[0] == emitted[0] and delivered[-1] == 1.0
    assert len(delivered) <= 3 < len(emitted)


# -- multiple models ---------------------------------------------------------------------------


async def test_multiple_models_progress_by_index(make_model, tmp_path):
    models = [(make_model("small"), tmp_path / "m0", DiffusionQuantConfig(bit_width=2)),
              (make_model("tiny"), tmp_path / "m1", DiffusionQuantConfig(bit_width=4)),
              (make_model("small", dtype="float16"), tmp_path / "m2", None)]
    calls = []

    async def progress(model_idx, message, progress):
        calls.append((model_idx, message, progress))

    q = AsyncArrowQuantV2(progress_interval=0)
    results = await q.quantize_multiple_models_async(models, progress)
    assert [r["bit_width"] for r in results] == [2, 4, 4]
    assert all(RESULT_KEYS <= set(r) for r in results)
    for i in range(3):
        mine = [p for idx, _, p in calls if idx == i]
        assert mine and mine == sorted(mine) and mine[-1] == 1.0


async def test_one_failure_keeps_the_others_work(make_model, tmp_path):
    good = make_model("small")
    models = [(good, tmp_path / "ok0", INT4),
              (tmp_path / "does-not-exist", tmp_path / "bad1", None),
              (good, tmp_path / "ok2", DiffusionQuantConfig(bit_width=8))]
    q = AsyncArrowQuantV2()
    with pytest.raises(MultiModelError) as info:
        await q.quantize_multiple_models_async(models)
    err = info.value
    assert isinstance(err, QuantizationError)
    assert len(err.results) == 3
    assert err.results[0]["bit_width"] == 4 and err.results[2]["bit_width"] == 8
    assert isinstance(err.results[1], ModelNotFoundError)
    assert [(i, Path(p)) for i, p, _ in err.failures] == [(1, tmp_path / "does-not-exist")]
    assert "[1]" in str(err) and "does-not-exist" in str(err) and "1 of 3" in str(err)
    assert (tmp_path / "ok0" / "manifest.json").is_file() and (tmp_path / "ok2" / "manifest.json").is_file()
    assert not (tmp_path / "bad1").exists()

    results = await q.quantize_multiple_models_async(
        [(good, tmp_path / "ok3", None), (tmp_path / "nope", tmp_path / "bad4", None)], return_exceptions=True)
    assert results[0]["bit_width"] == 4 and isinstance(results[1], ModelNotFoundError)


@pytest.mark.parametrize("models", [
    "model/",
    [("only-one-path",)],
    [("a", "b", "int4")],
    [("a", "b", None, "extra")],
    [(1, "b", None)],
    [("a", "same", None), ("c", "same", None)],
])
async def test_models_list_is_checked_before_anything_starts(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    q = AsyncArrowQuantV2()
    with pytest.raises(ConfigurationError) as info:
        await q.quantize_multiple_models_async(models)
    assert "models" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# -- bounds ------------------------------------------------------------------------------------


async def test_one_slot_runs_jobs_one_at_a_time(make_model, tmp_path):
    events = []
    q = AsyncArrowQuantV2(max_concurrent_jobs=1, progress_interval=0)
    models = [(make_model("medium"), tmp_path / f"o{i}", INT4) for i in range(3)]
    await q.quantize_multiple_models_async(models, on_event=events.append)
    by_model = {i: [e for e in events if e.model_index == i] for i in range(3)}
    assert [e.stage for e in by_model[0]].count("queued") == 0
    for i in (1, 2):
        assert by_model[i][0].stage == "queued" and "job slot" in by_model[i][0].message
    # Engine events carry the worker's clock: each job starts after the previous one is done.
    for i in (1, 2):
        previous_done = next(e.time for e in by_model[i - 1] if e.stage == "done")
        first_work = min(e.time for e in by_model[i] if e.stage != "queued")
        assert first_work >= previous_done


async def test_byte_budget_serialises_jobs_bigger_than_what_is_left(make_model, small, tmp_path):
    events = []
    size = aio.source_bytes(small)
    q = AsyncArrowQuantV2(max_concurrent_jobs=4, max_bytes_in_flight=size + size // 2, progress_interval=0)
    await asyncio.gather(*(q.quantize_diffusion_model_async(small, tmp_path / f"o{i}", INT4,
                                                            on_event=lambda e, i=i: events.append((i, e)))
                           for i in range(2)))
    queued = [e for i, e in events if e.stage == "queued"]
    assert [i for i, e in events if e.stage == "queued"] == [1]
    assert "memory" in queued[0].message
    done0 = next(e.time for i, e in events if i == 0 and e.stage == "done")
    assert min(e.time for i, e in events if i == 1 and e.stage != "queued") >= done0


def test_one_instance_serves_several_event_loops(small, tmp_path):
    q = AsyncArrowQuantV2(max_concurrent_jobs=1)  # forces waiting, i.e. loop-bound futures

    async def two(tag):
        return await asyncio.gather(*(q.quantize_diffusion_model_async(small, tmp_path / f"{tag}{i}", INT4)
                                      for i in range(2)))

    assert len(asyncio.run(two("a"))) == 2
    assert len(asyncio.run(two("b"))) == 2
    q.close()


async def test_a_passed_executor_runs_the_jobs(small, tmp_path, monkeypatch):
    names = []
    real = aio.quantize_model

    def spy(*args, **kwargs):
        names.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(aio, "quantize_model", spy)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="mine") as pool:
        q = AsyncArrowQuantV2(executor=pool)
        await q.quantize_diffusion_model_async(small, tmp_path / "out", INT4)
        q.close()  # not ours: must stay usable
        await q.quantize_diffusion_model_async(small, tmp_path / "out2", INT4)
    assert len(names) == 2 and all(n.startswith("mine") for n in names)


async def test_the_loop_keeps_running_while_a_job_works(make_model, tmp_path):
    ticks = 0
    running = True

    async def heartbeat():
        nonlocal ticks
        while running:
            await asyncio.sleep(0.005)
            ticks += 1

    hb = asyncio.create_task(heartbeat())
    events = []
    q = AsyncArrowQuantV2(progress_interval=0)
    await q.quantize_diffusion_model_async(make_model("large"), tmp_path / "out", INT4,
                                           on_event=lambda e: events.append(ticks))
    running = False
    await hb
    # events were delivered at different heartbeat counts: the loop ran during the job
    assert len(set(events)) > 1


# -- cancellation ------------------------------------------------------------------------------


async def test_cancel_stops_the_worker_and_removes_the_partial_output(big_model, tmp_path, active_chunks):
    events, running = [], asyncio.Event()
    q = AsyncArrowQuantV2(progress_interval=0)
    out = tmp_path / "out"
    task = asyncio.create_task(q.quantize_diffusion_model_async(big_model, out, INT4,
                                                                on_event=started(events, running)))
    await asyncio.wait_for(running.wait(), 60)
    assert partials(tmp_path)  # the worker is writing its temporary store
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    # the worker has stopped by the time CancelledError arrives: nothing runs, nothing is left
    assert active_chunks["active"] == 0 and kernel_pool_idle()
    assert not out.exists() and partials(tmp_path) == []
    assert events[-1].stage != "done"


async def test_cancel_leaves_an_existing_store_untouched(big_model, small, tmp_path, active_chunks):
    q = AsyncArrowQuantV2(progress_interval=0)
    out = tmp_path / "out"
    await q.quantize_diffusion_model_async(small, out, INT4)
    before = tree_digest(out)
    events, running = [], asyncio.Event()
    task = asyncio.create_task(q.quantize_diffusion_model_async(big_model, out, INT4, overwrite=True,
                                                                on_event=started(events, running)))
    await asyncio.wait_for(running.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tree_digest(out) == before
    assert partials(tmp_path) == [] and active_chunks["active"] == 0


async def test_cancel_one_task_of_several_leaves_the_others_running(big_model, make_model, tmp_path, active_chunks):
    q = AsyncArrowQuantV2(max_concurrent_jobs=2, progress_interval=0)
    events, running = [], asyncio.Event()
    big = asyncio.create_task(q.quantize_diffusion_model_async(big_model, tmp_path / "big", INT4,
                                                               on_event=started(events, running)))
    await asyncio.wait_for(running.wait(), 60)
    small = asyncio.create_task(q.quantize_diffusion_model_async(make_model("medium"), tmp_path / "small", INT4))
    queued = asyncio.create_task(q.quantize_diffusion_model_async(make_model("small"), tmp_path / "queued", INT4))
    await asyncio.sleep(0)
    big.cancel()
    results = await asyncio.gather(big, small, queued, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1]["bit_width"] == 4 and results[2]["bit_width"] == 4
    assert not (tmp_path / "big").exists() and (tmp_path / "small" / "manifest.json").is_file()
    assert partials(tmp_path) == [] and active_chunks["active"] == 0


async def test_cancel_while_queued_never_starts_the_job(big_model, small, tmp_path, active_chunks):
    q = AsyncArrowQuantV2(max_concurrent_jobs=1, progress_interval=0)
    events, running, waiting = [], asyncio.Event(), []
    first = asyncio.create_task(q.quantize_diffusion_model_async(big_model, tmp_path / "big", INT4,
                                                                 on_event=started(events, running)))
    await asyncio.wait_for(running.wait(), 60)
    second = asyncio.create_task(q.quantize_diffusion_model_async(small, tmp_path / "second", INT4,
                                                                  on_event=waiting.append))
    while not waiting:
        await asyncio.sleep(0.01)
    assert waiting[0].stage == "queued" and q.stats()["jobs_waiting"] == 1
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert q.stats()["jobs_waiting"] == 0 and not (tmp_path / "second").exists()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert q.stats() == {"jobs_running": 0, "jobs_waiting": 0, "bytes_in_flight": 0, "bytes_waiting": 0}
    assert active_chunks["active"] == 0 and partials(tmp_path) == []


async def test_cancelling_a_multi_model_call_stops_every_worker(big_model, small, tmp_path, active_chunks):
    q = AsyncArrowQuantV2(progress_interval=0)
    running = asyncio.Event()

    def hook(e):
        if e.model_index == 0 and e.stage == "quantize" and e.bytes_done > 0:
            running.set()

    task = asyncio.create_task(q.quantize_multiple_models_async(
        [(big_model, tmp_path / "big", None), (small, tmp_path / "small", None)], on_event=hook))
    await asyncio.wait_for(running.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert active_chunks["active"] == 0 and kernel_pool_idle()
    assert not (tmp_path / "big").exists() and partials(tmp_path) == []


# -- errors ------------------------------------------------------------------------------------


async def test_errors_are_typed_and_name_what_is_wrong(small, tmp_path):
    q = AsyncArrowQuantV2()
    with pytest.raises(QuantizationError, match="no-such-model"):
        await q.quantize_diffusion_model_async(tmp_path / "no-such-model", tmp_path / "out")
    with pytest.raises(ConfigurationError, match="config"):
        await q.quantize_diffusion_model_async(small, tmp_path / "out", config={"bit_width": 4})
    with pytest.raises(ConfigurationError, match="bit_width"):
        await q.quantize_diffusion_model_async(small, tmp_path / "out", DiffusionQuantConfig(bit_width=7))
    with pytest.raises(ConfigurationError, match="progress_interval"):
        await q.quantize_diffusion_model_async(small, tmp_path / "out", progress_interval=-1)
    await q.quantize_diffusion_model_async(small, tmp_path / "out", INT4)
    with pytest.raises(QuantizationError, match="exists"):
        await q.quantize_diffusion_model_async(small, tmp_path / "out", INT4)
    with pytest.raises(ValidationError, match="missing-store"):
        await q.validate_quality_async(small, tmp_path / "missing-store")
    with pytest.raises(ConfigurationError, match="min_accuracy"):
        await q.validate_quality_async(small, tmp_path / "out", min_accuracy=2.0)
    assert (await q.validate_quality_async(small, tmp_path / "out", min_accuracy=0.5))["passed"] is True


@pytest.mark.parametrize("kwargs", [dict(max_concurrent_jobs=0), dict(max_bytes_in_flight=-5),
                                    dict(progress_interval=float("nan")), dict(executor="threads")])
def test_constructor_arguments_are_checked(kwargs):
    with pytest.raises(ConfigurationError):
        AsyncArrowQuantV2(**kwargs)


async def test_validation_reports_progress_and_passes(small, tmp_path):
    q = AsyncArrowQuantV2(progress_interval=0)
    await q.quantize_diffusion_model_async(small, tmp_path / "out", DiffusionQuantConfig(bit_width=8))
    seen = []
    report = await q.validate_quality_async(small, tmp_path / "out", progress_callback=lambda m, p: seen.append(p))
    assert VALIDATION_KEYS <= set(report) and report["passed"]
    assert seen[-1] == 1.0 and seen == sorted(seen)


async def test_cancel_during_a_fallback_re_encode_stops_every_chunk(big_model, tmp_path, active_chunks):
    # int2 cannot reach cosine 0.9999: once the whole tensor is encoded at int2, the engine
    # re-encodes it at a wider width, and that is when we cancel.
    config = DiffusionQuantConfig(bit_width=2, min_accuracy=0.9999)
    fallback = asyncio.Event()

    def hook(e):
        if e.stage == "quantize" and e.bytes_done >= e.bytes_total:
            fallback.set()

    q = AsyncArrowQuantV2(progress_interval=0)
    task = asyncio.create_task(q.quantize_diffusion_model_async(big_model, tmp_path / "out", config, on_event=hook))
    await asyncio.wait_for(fallback.wait(), 60)
    await asyncio.sleep(0.05)  # let the re-encode start
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (info,) = engine.open_model(big_model).tensors.values()
    first_pass = len(layout.chunk_ranges(*info.matrix_shape))
    assert active_chunks["ran"] > first_pass  # the re-encode had started
    assert active_chunks["active"] == 0 and kernel_pool_idle()
    assert partials(tmp_path) == [] and not (tmp_path / "out").exists()


async def test_num_threads_caps_the_chunks_a_job_runs_at_once(make_model, tmp_path, monkeypatch):
    # What makes "N jobs x num_threads" a real bound on the cores in use.
    state = {"active": 0, "max": 0}
    lock = threading.Lock()
    original = engine.QuantizeJob._encode

    def counting(self, *args):
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
        try:
            return original(self, *args)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(engine.QuantizeJob, "_encode", counting)
    q = AsyncArrowQuantV2()
    await q.quantize_diffusion_model_async(make_model("large"), tmp_path / "one", DiffusionQuantConfig(num_threads=1))
    assert state["max"] == 1
