"""Jobs on a Dask cluster: a LocalCluster of 2 worker processes (1 thread each) on 127.0.0.1.

What a user relies on: the same stores as on this machine (bit for bit), the bounds kept per
worker, progress on the caller's loop with the local guarantees, cancel stopping the work on
every worker and removing partial output, and a typed error (not a hang) when the scheduler
goes away. No timing is asserted.
"""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")  # the 'cluster' extra; part of 'dev'

from arrow_quant_v2 import (  # noqa: E402
    ArrowQuantV2,
    AsyncArrowQuantV2,
    ClusterError,
    ConfigurationError,
    DiffusionQuantConfig,
    load_quantized,
)
from arrow_quant_v2 import cli  # noqa: E402
from arrow_quant_v2.aio import QUEUED, source_bytes  # noqa: E402
from arrow_quant_v2.cluster import runner  # noqa: E402
from arrow_quant_v2.engine import quantize_model  # noqa: E402

INT4 = DiffusionQuantConfig(bit_width=4)


def local_cluster(n_workers: int = 2, **kwargs):
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address="127.0.0.1:0", **kwargs)


@pytest.fixture(scope="module")
def client():
    with local_cluster() as cluster, distributed.Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Four distinct small models (different seeds and sizes)."""
    from conftest import model_tensors, write_model

    root = tmp_path_factory.mktemp("fleet")
    sizes = [(64, 128, 2, 256), (128, 256, 2, 512), (96, 192, 3, 384), (128, 256, 2, 256)]
    return [write_model(root / f"m{i}", model_tensors(*size, seed=i), {"model_type": "dream"})
            for i, size in enumerate(sizes)]


def store_fingerprint(path: Path) -> dict:
    """What makes two stores the same: every shard's bytes (their sha256) and every tensor."""
    manifest = json.loads((path / "manifest.json").read_text())
    store = load_quantized(path)
    return {"shards": [(s["file"], s["sha256"]) for s in manifest["shards"]],
            "tensors": {n: store.dequantize(n).tobytes() for n in store}}


def partials(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def workers_that_ran(stream) -> set:
    return {t["worker"] for t in stream.data}


# -- a cluster as the place jobs run --------------------------------------------------------------


async def test_four_models_as_a_fleet_equal_a_local_run_bit_for_bit(client, fleet, tmp_path):
    for i, model in enumerate(fleet):
        quantize_model(model, tmp_path / f"local{i}", INT4)
    with distributed.get_task_stream(client=client) as stream:
        async with AsyncArrowQuantV2(cluster=client) as quantizer:
            results = await quantizer.quantize_multiple_models_async(
                [(m, tmp_path / f"remote{i}", INT4) for i, m in enumerate(fleet)])
    assert [Path(r["quantized_path"]) for r in results] == [tmp_path / f"remote{i}" for i in range(4)]
    for i in range(4):
        assert store_fingerprint(tmp_path / f"remote{i}") == store_fingerprint(tmp_path / f"local{i}")
    assert len(workers_that_ran(stream)) == 2  # spread over both workers


def worker_settings(dask_worker) -> dict:
    import os

    import dask

    return {"trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"), "profiler": "profile" in dask_worker.periodic_callbacks,
            "monitor_s": dask.config.get("distributed.admin.system-monitor.interval")}


async def test_workers_started_with_worker_config_run_with_it_and_make_the_same_stores(fleet, tmp_path, monkeypatch):
    import dask

    from arrow_quant_v2.cluster import WORKER_CONFIG

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # what an earlier cluster's nanny left here (docs)
    quantize_model(fleet[1], tmp_path / "local", INT4)
    with dask.config.set(WORKER_CONFIG):
        cluster = local_cluster(n_workers=1)
    with cluster, distributed.Client(cluster, set_as_default=False) as c:
        assert list(c.run(worker_settings).values()) == [{"trim": None, "profiler": False, "monitor_s": "2s"}]
        async with AsyncArrowQuantV2(cluster=c) as quantizer:
            await quantizer.quantize_diffusion_model_async(fleet[1], tmp_path / "remote", INT4)
    assert store_fingerprint(tmp_path / "remote") == store_fingerprint(tmp_path / "local")


def test_closing_a_cluster_right_after_a_job_logs_no_error(fleet, tmp_path):
    """The job's cancel watcher leaves nothing pending on the scheduler, whose close would log it as an
    ERROR with a traceback (a user closing their cluster after a job saw one per job)."""
    import logging

    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("distributed")  # its own handlers; a test's caplog does not see it
    logger.addHandler(handler)
    try:
        cluster = local_cluster(n_workers=1)
        with cluster, distributed.Client(cluster, set_as_default=False) as c:
            quantizer = AsyncArrowQuantV2(cluster=c)  # as a script uses it: one asyncio.run per job
            asyncio.run(quantizer.quantize_diffusion_model_async(fleet[0], tmp_path / "out", INT4))
    finally:
        logger.removeHandler(handler)
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert not records, [f"{r.name}: {r.getMessage()} {r.exc_info}" for r in records]


async def test_one_job_slot_per_worker_runs_one_job_per_worker_at_a_time(client, fleet, tmp_path):
    queued = []
    with distributed.get_task_stream(client=client) as stream:
        async with AsyncArrowQuantV2(cluster=client, max_concurrent_jobs=1, progress_interval=60) as quantizer:
            await quantizer.quantize_multiple_models_async(
                [(m, tmp_path / f"o{i}", INT4) for i, m in enumerate(fleet)],
                on_event=lambda e: queued.append(e.model_index) if e.stage == QUEUED else None)
    spans = {}
    for task in stream.data:
        compute = [s for s in task["startstops"] if s["action"] == "compute"]
        spans.setdefault(task["worker"], []).extend((s["start"], s["stop"]) for s in compute)
    assert len(spans) == 2
    for worker_spans in spans.values():
        worker_spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(worker_spans, worker_spans[1:])), "two jobs overlapped on a worker"
    # two slots for four jobs, the largest started first: it never waited, the two smallest did and
    # said so (if a worker had not registered yet, the third largest waited too)
    by_size = sorted(range(len(fleet)), key=lambda i: source_bytes(fleet[i]))
    assert by_size[-1] not in queued and set(by_size[:2]) <= set(queued)


def test_worker_slots_are_first_come_first_served_per_worker():
    async def scenario():
        slots = runner.WorkerSlots(jobs_per_worker=2, bytes_per_worker=100)
        slots.update({"a": {"nthreads": 1, "memory_limit": 0}, "b": {"nthreads": 1, "memory_limit": 0}})

        async def never():
            pass

        first = await slots.acquire(80, never)
        second = await slots.acquire(80, never)
        assert {first.address, second.address} == {"a", "b"}  # the byte budget sends the second job elsewhere
        big = asyncio.ensure_future(slots.acquire(500, never))  # capped at a worker's budget: runs alone
        small = asyncio.ensure_future(slots.acquire(10, never))  # fits now, but waits behind the big one
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        slots.release(first)
        assert ((await big).address, big.result().units) == (first.address, 100)
        await asyncio.sleep(0)
        assert small.done() and small.result().address == second.address
        slots.update({"a": {"nthreads": 1, "memory_limit": 0}})  # worker b left: nothing new goes there
        slots.release(small.result())
        slots.release(second)
        assert "b" not in slots.workers

    asyncio.run(scenario())


def test_a_job_rerun_after_its_worker_died_counts_where_it_runs_not_against_the_dead_worker():
    async def scenario():
        slots = runner.WorkerSlots(jobs_per_worker=1, bytes_per_worker=100)
        two = {"a": {"nthreads": 1, "memory_limit": 0}, "b": {"nthreads": 1, "memory_limit": 0}}
        slots.update(two)
        job = await slots.acquire(60, None)
        dead = job.address
        alive = "b" if dead == "a" else "a"
        slots.update({alive: two[alive]})  # its worker died ...
        slots.update(two)  # ... and a new one came back at the same address (a fixed port): it is free
        assert (slots.workers[dead].jobs_used, slots.workers[dead].bytes_used) == (0, 0)
        slots.moved(job, alive)  # the scheduler reran the job on the other worker
        assert (slots.workers[alive].jobs_used, slots.workers[alive].bytes_used) == (1, 60)
        other = await slots.acquire(60, None)
        assert other.address == dead  # the new worker takes the next job; the busy one does not
        slots.release(job)
        slots.release(other)
        slots.moved(job, dead)  # a report of where it started that arrives after the job ended
        slots.release(job)
        assert all((w.jobs_used, w.bytes_used) == (0, 0) for w in slots.workers.values())

    asyncio.run(scenario())


# -- progress --------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [0, 60])
async def test_progress_reaches_the_callers_loop_first_and_final_monotonic(client, fleet, tmp_path, interval):
    seen = []
    loop_thread = threading.get_ident()

    async def callback(message, fraction):
        seen.append((threading.get_ident(), message, fraction))

    async with AsyncArrowQuantV2(cluster=client, progress_interval=interval) as quantizer:
        await quantizer.quantize_diffusion_model_async(fleet[1], tmp_path / "out", INT4, callback)
    assert {t for t, _, _ in seen} == {loop_thread}
    fractions = [f for _, _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and seen[-1][1].startswith("done")
    assert seen[0][1].startswith("loading kernels")  # the worker's very first event
    if interval == 60:
        assert len(seen) == 2  # throttled exactly like a local job: first and final only
    else:
        assert len(seen) > 5


async def test_a_fleets_events_carry_their_model_index(client, fleet, tmp_path):
    by_model = {}
    async with AsyncArrowQuantV2(cluster=client, progress_interval=0) as quantizer:
        await quantizer.quantize_multiple_models_async(
            [(m, tmp_path / f"o{i}", INT4) for i, m in enumerate(fleet)],
            lambda i, message, fraction: by_model.setdefault(i, []).append(fraction))
    assert sorted(by_model) == [0, 1, 2, 3]
    for fractions in by_model.values():
        assert fractions == sorted(fractions) and fractions[-1] == 1.0


# -- cancellation and faults -----------------------------------------------------------------------


def quantizing(flag: asyncio.Event):
    def hook(event):
        if event.stage == "quantize" and event.bytes_done > 0:
            flag.set()
    return hook


async def test_cancel_stops_the_work_on_the_worker_and_removes_partial_output(client, big_model, tmp_path):
    flag = asyncio.Event()
    async with AsyncArrowQuantV2(cluster=client, progress_interval=0) as quantizer:
        task = asyncio.ensure_future(quantizer.quantize_diffusion_model_async(
            big_model, tmp_path / "out", INT4, on_event=quantizing(flag)))
        await flag.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not any(client.processing().values())  # the worker has stopped, not just the caller
    assert not (tmp_path / "out").exists() and partials(tmp_path) == []


async def test_cancelling_a_fleet_stops_every_worker(client, big_model, tmp_path):
    flags = [asyncio.Event(), asyncio.Event()]

    def hook(event):
        quantizing(flags[event.model_index])(event)

    async with AsyncArrowQuantV2(cluster=client, progress_interval=0) as quantizer:
        task = asyncio.ensure_future(quantizer.quantize_multiple_models_async(
            [(big_model, tmp_path / "a", INT4), (big_model, tmp_path / "b", INT4)], on_event=hook))
        await asyncio.gather(*(f.wait() for f in flags))  # both running, one per worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not any(client.processing().values())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and partials(tmp_path) == []


async def test_a_scheduler_that_disappears_gives_a_typed_error(big_model, tmp_path):
    flag = asyncio.Event()
    with local_cluster() as cluster, distributed.Client(cluster, set_as_default=False) as c:
        async with AsyncArrowQuantV2(cluster=c, progress_interval=0) as quantizer:
            task = asyncio.ensure_future(quantizer.quantize_diffusion_model_async(
                big_model, tmp_path / "out", INT4, on_event=quantizing(flag)))
            await flag.wait()
            await asyncio.to_thread(cluster.sync, cluster.scheduler.close)
            with pytest.raises(ClusterError, match="went away"):
                await task
    assert not (tmp_path / "out").exists()


async def test_no_scheduler_at_the_address_gives_a_typed_error(fleet, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "CONNECT_TIMEOUT_S", 1)
    async with AsyncArrowQuantV2(cluster="tcp://127.0.0.1:9") as quantizer:
        with pytest.raises(ClusterError, match="no Dask scheduler answered"):
            await quantizer.quantize_diffusion_model_async(fleet[0], tmp_path / "out")


@pytest.mark.parametrize("cluster", [42, "not an address", b"tcp://127.0.0.1:8786"])
def test_cluster_argument_is_checked(cluster):
    with pytest.raises(ConfigurationError, match="cluster="):
        AsyncArrowQuantV2(cluster=cluster)


async def test_an_asynchronous_client_is_refused_with_a_typed_error(client):
    async with distributed.Client(client.scheduler.address, asynchronous=True, set_as_default=False) as aclient:
        with pytest.raises(ConfigurationError, match="asynchronous=True"):
            AsyncArrowQuantV2(cluster=aclient)
        with pytest.raises(ConfigurationError, match="asynchronous=True"):  # off its loop too
            await asyncio.to_thread(runner.connect_client, aclient)


def test_executor_and_cluster_are_exclusive():
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        with pytest.raises(ConfigurationError, match="both"):
            AsyncArrowQuantV2(executor=executor, cluster="tcp://127.0.0.1:8786")


# -- the blocking API and the CLI ------------------------------------------------------------------


def test_blocking_api_and_cli_take_a_scheduler_address(client, fleet, tmp_path, capsys):
    address = client.scheduler.address
    quantizer = ArrowQuantV2(cluster=address)
    try:
        result = quantizer.quantize_diffusion_model(fleet[0], tmp_path / "api", INT4)
        assert quantizer.validate_quality(fleet[0], tmp_path / "api")["passed"]
    finally:
        quantizer.close()
    assert cli.main(["quantize", str(fleet[0]), str(tmp_path / "cli"), "--bits", "4", "--quiet", "--json",
                     "--cluster", address]) == 0
    assert json.loads(capsys.readouterr().out)["cosine_similarity"] == result["cosine_similarity"]
    assert store_fingerprint(tmp_path / "cli") == store_fingerprint(tmp_path / "api")


# -- one model across workers ----------------------------------------------------------------------

SHARDED = DiffusionQuantConfig(bit_width=4, max_shard_mb=1)  # a store of several shards


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~4M parameters in 19 tensors: a few MB of shards at int4, split into many parts."""
    from conftest import model_tensors, write_model

    return write_model(tmp_path_factory.mktemp("medium") / "m", model_tensors(256, 768, 4, 2048, seed=7),
                       {"model_type": "dream"})


@pytest.fixture
def small_parts(monkeypatch):
    from arrow_quant_v2.cluster import split

    monkeypatch.setattr(split, "MIN_PART_BYTES", 1)  # parts of a few tensors, so both workers share the model


async def test_one_model_split_across_workers_equals_a_local_run(client, medium, tmp_path, small_parts):
    local = quantize_model(medium, tmp_path / "local", SHARDED)
    seen = []
    with distributed.get_task_stream(client=client) as stream:
        async with AsyncArrowQuantV2(cluster=client, progress_interval=0) as quantizer:
            result = await quantizer.quantize_diffusion_model_async(
                medium, tmp_path / "split", SHARDED, lambda m, f: seen.append(f), split_across_workers=True)
    assert len(json.loads((tmp_path / "local" / "manifest.json").read_text())["shards"]) >= 2
    assert store_fingerprint(tmp_path / "split") == store_fingerprint(tmp_path / "local")
    for key in ("cosine_similarity", "model_size_mb", "compression_ratio", "per_bits", "fallbacks"):
        assert result[key] == local[key]
    tasks = {t["key"].rsplit("-", 1)[0] for t in stream.data}
    assert {"quantize-part", "write-shard"} <= tasks and len(workers_that_ran(stream)) == 2
    assert result["cluster"]["parts"] >= 4 and result["cluster"]["shards_written"] >= 2
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "split"]  # no partial folder left


async def test_cancelling_a_split_model_stops_every_worker_and_removes_partial_output(client, medium, tmp_path,
                                                                                       small_parts):
    started = asyncio.Event()
    async with AsyncArrowQuantV2(cluster=client, progress_interval=0) as quantizer:
        task = asyncio.ensure_future(quantizer.quantize_diffusion_model_async(
            medium, tmp_path / "out", SHARDED, on_event=quantizing(started), split_across_workers=True))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not any(client.processing().values())
    assert list(tmp_path.iterdir()) == []  # neither the store nor its partial folder (parts, shards)


async def test_a_worker_killed_mid_model_is_retried_elsewhere_and_the_store_is_identical(medium, tmp_path,
                                                                                          small_parts, monkeypatch):
    """SIGKILL one worker while it quantizes a part, once at least one part is written; the
    rerun counts against the bounds of the worker it runs on, and every bound is given back."""
    moves = []
    moved = runner.WorkerSlots.moved
    monkeypatch.setattr(runner.WorkerSlots, "moved",
                        lambda self, lease, address: (moves.append((lease.address, address)), moved(self, lease, address)))
    quantize_model(medium, tmp_path / "local", SHARDED)
    marker = tmp_path / "kill-once"
    marker.touch()

    def arm(marker):  # runs in each worker process: die on the 2nd tensor of a part, once
        import os
        import signal
        from pathlib import Path

        from arrow_quant_v2 import engine

        write = engine.QuantizeJob._write

        def write_then_maybe_die(self, *args, **kwargs):
            write(self, *args, **kwargs)
            parts = Path(self.writer.output).parent.parent
            if len(self.final) == 2 and any(parts.glob("*/done.json")):
                try:
                    os.unlink(marker)
                except FileNotFoundError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)

        engine.QuantizeJob._write = write_then_maybe_die

    with local_cluster() as cluster, distributed.Client(cluster, set_as_default=False) as c:
        before = c.run(lambda: __import__("os").getpid())
        c.run(arm, str(marker))
        async with AsyncArrowQuantV2(cluster=c, progress_interval=0) as quantizer:
            result = await quantizer.quantize_diffusion_model_async(medium, tmp_path / "split", SHARDED,
                                                                    on_event=lambda e: None, split_across_workers=True)
            slots = quantizer.cluster.slots()
            assert all((w.jobs_used, w.bytes_used) == (0, 0) for w in slots.workers.values())
        after = c.run(lambda: __import__("os").getpid())
    dead = set(before) - set(after)
    assert not marker.exists() and len(dead) == 1  # one worker died (and was replaced)
    assert dead.isdisjoint(slots.workers) and any(src in dead and dst not in dead for src, dst in moves)
    assert result["cluster"]["part_runs"] == result["cluster"]["parts"] + 1  # only its part ran again
    assert store_fingerprint(tmp_path / "split") == store_fingerprint(tmp_path / "local")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "split"]


# -- the app's state: "this machine" / "Dask cluster at …" -----------------------------------------


async def test_the_app_runs_new_jobs_on_the_chosen_cluster_and_lists_its_workers(client, fleet, tmp_path,
                                                                                   monkeypatch):
    from arrow_quant_v2.ui.compute import DASK, THIS_MACHINE
    from arrow_quant_v2.ui.jobs import JobManager
    from arrow_quant_v2.ui.library import ModelLibrary

    def clients_of_the_scheduler() -> set:
        return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients)))

    manager = JobManager(ModelLibrary([fleet[0].parent], include_samples=False), output_root=tmp_path / "out",
                         progress_interval=0.01, scan_outputs=False)
    place = manager.compute
    place.param.update(where=DASK, address=client.scheduler.address)
    assert await place.apply()
    assert sorted(w["address"] for w in place.workers) == sorted(client.scheduler_info()["workers"])
    assert place.active == f"{DASK} at {client.scheduler.address}" and "2 workers" in place.status
    apps_client = manager.quantizer.cluster.client().id
    assert apps_client in clients_of_the_scheduler()
    with distributed.get_task_stream(client=client) as stream:
        job = manager.submit("m1", INT4)
        while not job.stage and not job._task.done():  # its first event: it runs on the cluster
            await asyncio.sleep(0.01)

        monkeypatch.setattr(runner, "CONNECT_TIMEOUT_S", 1)
        place.address = "tcp://127.0.0.1:9"  # nobody there: the last good choice stays
        assert not await place.apply()
        assert place.status.startswith("cannot use tcp://127.0.0.1:9") and place.active.startswith(DASK)
        place.where = THIS_MACHINE  # while the job may still run: it finishes on the cluster
        assert await place.apply() and place.workers == [] and manager.quantizer.cluster is None
        await manager.wait(job)
    assert job.status == "done", job.error
    assert {t["key"].rsplit("-", 1)[0] for t in stream.data} >= {"quantize_model", "validate_store"}
    assert store_fingerprint(Path(job.output_path)) == store_fingerprint(
        Path(quantize_model(fleet[1], tmp_path / "local", INT4)["quantized_path"]))
    for _ in range(100):  # the cluster's connection is closed once its job ended (off the loop)
        if apps_client not in clients_of_the_scheduler():
            break
        await asyncio.sleep(0.05)
    assert apps_client not in clients_of_the_scheduler()
    manager.quantizer.close()


def test_the_compute_choice_view_shows_the_workers():
    pn = pytest.importorskip("panel")
    from arrow_quant_v2.ui.compute import ComputePlace
    from arrow_quant_v2.ui.views import ComputeChoice

    place = ComputePlace(lambda quantizer: None)
    view = ComputeChoice(place=place)
    assert isinstance(view.__panel__(), pn.Column)
    place.workers = [{"address": "tcp://127.0.0.1:1234", "name": "0", "nthreads": 1, "memory_limit": 2**30}]
    assert "tcp://127.0.0.1:1234" in view._workers.object and "1.0 GiB" in view._workers.object
