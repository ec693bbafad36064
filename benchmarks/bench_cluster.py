"""Benchmark of jobs on a Dask cluster (LocalCluster on this machine, bound to 127.0.0.1).

    python benchmarks/bench_cluster.py [--repeats 3] [--big-repeats 2] [--workdir DIR] [--parts fleet,big]

(a) fleet: 4 synthetic Dream-layout models (~136M params, ~270 MB BF16 each, different seeds),
    int4, quantized as one ``quantize_multiple_models_async`` call on 2 workers of 1 thread
    each, versus one after the other (``await`` each in turn) on a cluster of 1 worker of 1
    thread. Target: parallel / serial <= 0.6.
(b) one large model: the ``2gb`` preset of ``make_synthetic.py`` (~1.0B params, ~2.0 GB BF16,
    2 input shards), int4, output shards of 64 MiB, split across the workers
    (``split_across_workers=True``) of a cluster of 2 one-thread workers versus 1. Target <= 0.65.

Every run is a fresh ``AsyncArrowQuantV2(cluster=...)`` on a cluster started before the clock
starts. Every worker of both sides starts with ``arrow_quant_v2.cluster.WORKER_CONFIG``, the
configuration the docs tell users to start workers with (``--dask-defaults``: Dask's defaults,
for both sides; the JSON records which). Both sides get the same warm-up, outside the time: each cluster quantizes a small
model on every worker twice (the kernels' first load, the imports); the two warm-up times are
recorded (``warmup_s``: first, second), so the start-up cost a fresh worker pays is shown, not
hidden. Wall time is from the first call to the last result. Each worker process's RSS is
sampled every 50 ms (psutil) and its peak is recorded, next to its RSS before the run. Runs of
the two sides alternate; the statistic is the median of the repeats and the ratio is
median(parallel) / median(serial). ``os.getloadavg()`` is recorded before and after every run,
and the CPU time the rest of the machine used during the run (system-wide busy time minus this
process, the workers and their nannies): the machine is shared, so a figure measured while
others were busy shows it there.

Where the time goes, per run: ``cpu_s`` splits the CPU seconds by process (this process, which
holds the client and the LocalCluster's scheduler and nannies; each worker, by thread: the kernel thread,
the job's own thread that reads, writes and hashes, the event loop, the cancel watchers,
the rest; nanny processes, if the cluster has its own), and ``timeline`` lists every task (Dask's task stream: the worker,
and when its compute started and stopped, in seconds from the start of the run), with each
worker's busy time, its idle time before the first task, between tasks and after its last.

Writes ``benchmarks/results/cluster.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dask  # noqa: E402
import psutil  # noqa: E402
from distributed import Client, LocalCluster, get_task_stream  # noqa: E402

import arrow_quant_v2  # noqa: E402
from arrow_quant_v2 import AsyncArrowQuantV2, DiffusionQuantConfig  # noqa: E402
from arrow_quant_v2.cluster import WORKER_CONFIG  # noqa: E402
from arrow_quant_v2.samples import DREAM_PRESETS, generate_dream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLEET_SHAPE = dict(hidden=1024, intermediate=2816, layers=8, heads=8, kv_heads=2, vocab=16000,
                   max_shard_bytes=4 * 10**9)
INT4 = DiffusionQuantConfig(bit_width=4)
BIG = DiffusionQuantConfig(bit_width=4, max_shard_mb=64)


def cluster(workers: int) -> LocalCluster:
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0")


def _threads_cpu(process: psutil.Process) -> dict:
    """CPU seconds of each of ``process``'s threads (thread id -> seconds)."""
    try:
        return {t.id: t.user_time + t.system_time for t in process.threads()}
    except psutil.Error:
        return {}


#: What each of a worker's threads is, by a part of its name.
THREAD_KINDS = (("aq-kernel", "kernel"), ("Dask-Default-Threads", "job"), ("MainThread", "event_loop"),
                ("aq-cancel", "cancel_watchers"))


def thread_names() -> dict:
    """Run on a worker: its live threads, native id -> name."""
    return {t.native_id: t.name for t in threading.enumerate()}


def thread_kind(name: str) -> str:
    if name is None:
        return "exited"  # ended before the run's end (cancel watchers, mostly)
    return next((kind for part, kind in THREAD_KINDS if part in name), "other")


class Watch:
    """Peak RSS of each worker process, the CPU each of our processes used and the CPU the
    rest of the machine used, over a run."""

    def __init__(self, client: Client) -> None:
        self.pids = client.run(os.getpid)  # address -> pid
        self.procs = {a: psutil.Process(p) for a, p in self.pids.items()}
        # a LocalCluster's nannies live in this process; only nanny processes of their own count apart
        parents = {p.ppid() for p in self.procs.values()} - {os.getpid()}
        self.nannies = [psutil.Process(pid) for pid in sorted(parents)]
        self.own = [psutil.Process()] + list(self.procs.values()) + self.nannies
        self.client = client

    def _cpu_ours(self) -> float:
        total = 0.0
        for p in self.own:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _cpu_split(self) -> dict:
        return {"this_process": _threads_cpu(psutil.Process()), "nannies": [_threads_cpu(p) for p in self.nannies],
                "workers": {a: _threads_cpu(p) for a, p in self.procs.items()}}

    def _cpu_used(self) -> dict:
        """CPU seconds per process over the run; a worker's busiest thread apart from the rest."""
        def used(before: dict, after: dict) -> list:
            return sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)

        a, b = self.split0, self._cpu_split()
        names = {addr: {**self.names0.get(addr, {}), **n} for addr, n in self.client.run(thread_names).items()}
        workers = {}
        for address in b["workers"]:
            before, after = a["workers"].get(address, {}), b["workers"][address]
            threads = used(before, after)
            kinds: dict = {}
            for tid in after:
                kind = thread_kind(names.get(address, {}).get(tid))
                kinds[kind] = round(kinds.get(kind, 0.0) + after[tid] - before.get(tid, 0.0), 2)
            workers[address] = {"total": round(sum(threads), 2), "busiest_thread": round(threads[0], 2) if threads else 0,
                                "second_thread": round(threads[1], 2) if len(threads) > 1 else 0,
                                "other_threads": round(sum(threads[2:]), 2), "by_thread_kind": kinds}
        return {"this_process": round(sum(used(a["this_process"], b["this_process"])), 2),
                "nannies": round(sum(sum(used(x, y)) for x, y in zip(a["nannies"], b["nannies"])), 2),
                "workers": workers}

    @staticmethod
    def _cpu_machine() -> float:
        t = psutil.cpu_times()
        return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))

    def __enter__(self):
        self.before = {a: p.memory_info().rss for a, p in self.procs.items()}
        self.peak = dict(self.before)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.load_before = os.getloadavg()
        self.names0 = self.client.run(thread_names)
        self.cpu0, self.machine0, self.split0 = self._cpu_ours(), self._cpu_machine(), self._cpu_split()
        self.t0 = time.perf_counter()
        self.clock0 = time.time()  # the task stream's clock
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            for a, p in self.procs.items():
                try:
                    self.peak[a] = max(self.peak[a], p.memory_info().rss)
                except psutil.Error:
                    pass

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu_s = self._cpu_used()
        ours = self._cpu_ours() - self.cpu0
        self.others_cpu_s = max(self._cpu_machine() - self.machine0 - ours, 0.0)
        self.ours_cpu_s = ours
        self.stop.set()
        self.thread.join()
        self.load_after = os.getloadavg()

    def record(self) -> dict:
        return {"wall_s": round(self.wall, 3), "cpu_ours_s": round(self.ours_cpu_s, 2),
                "cpu_others_s": round(self.others_cpu_s, 2),
                "loadavg_before": [round(x, 2) for x in self.load_before],
                "loadavg_after": [round(x, 2) for x in self.load_after], "cpu_s": self.cpu_s,
                "workers": {a: {"rss_before_mib": round(self.before[a] / 2**20, 1),
                                "peak_rss_mib": round(self.peak[a] / 2**20, 1)} for a in self.procs}}


async def warm(client: Client, model: Path, out: Path) -> list:
    """Start-up costs outside the clock, the same on both sides: a small model on every worker,
    twice (the first pays the imports and the kernels' first load); returns the two times."""
    times = []
    async with AsyncArrowQuantV2(cluster=client) as q:
        workers = len(client.scheduler_info()["workers"])
        for k in range(2):
            t0 = time.perf_counter()
            await q.quantize_multiple_models_async([(model, out / f"warm{k}-{i}", INT4) for i in range(workers)])
            times.append(round(time.perf_counter() - t0, 3))
    return times


async def fleet_serial(client: Client, models, out: Path) -> None:
    async with AsyncArrowQuantV2(cluster=client) as q:
        for i, m in enumerate(models):
            await q.quantize_diffusion_model_async(m, out / f"s{i}", INT4, split_across_workers=False)


async def fleet_parallel(client: Client, models, out: Path) -> None:
    async with AsyncArrowQuantV2(cluster=client) as q:
        await q.quantize_multiple_models_async([(m, out / f"p{i}", INT4) for i, m in enumerate(models)])


async def big_split(client: Client, model: Path, out: Path) -> dict:
    async with AsyncArrowQuantV2(cluster=client) as q:
        result = await q.quantize_diffusion_model_async(model, out, BIG, split_across_workers=True)
    return result["cluster"]


def timeline(tasks: list, clock0: float, wall: float) -> dict:
    """Every task's compute span on its worker (seconds from the start of the run), and per
    worker: busy, idle before the first task, between tasks, after the last."""
    spans = []
    for task in tasks:
        for s in task.get("startstops", []):
            if s["action"] == "compute":
                spans.append({"task": task["key"].rsplit("-", 1)[0], "worker": task["worker"],
                              "start_s": round(s["start"] - clock0, 3), "stop_s": round(s["stop"] - clock0, 3)})
    spans.sort(key=lambda s: s["start_s"])
    workers = {}
    for w in sorted({s["worker"] for s in spans}):
        mine = [s for s in spans if s["worker"] == w]
        busy = sum(s["stop_s"] - s["start_s"] for s in mine)
        between = sum(max(b["start_s"] - a["stop_s"], 0.0) for a, b in zip(mine, mine[1:]))
        workers[w] = {"tasks": len(mine), "busy_s": round(busy, 3), "idle_before_first_s": mine[0]["start_s"],
                      "idle_between_s": round(between, 3), "idle_after_last_s": round(wall - mine[-1]["stop_s"], 3)}
    return {"tasks": spans, "workers": workers}


def run(client: Client, coroutine_function, *args) -> dict:
    with get_task_stream(client=client) as stream:
        with Watch(client) as watch:
            extra = asyncio.run(coroutine_function(client, *args))
    record = watch.record()
    record["timeline"] = timeline(stream.data, watch.clock0, watch.wall)
    if isinstance(extra, dict):
        record["split"] = extra
    return record


def side(name: str, runs: list) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {"runs": runs, "median_wall_s": statistics.median(walls), "min_wall_s": min(walls),
            "peak_rss_mib_per_worker_max": max(w["peak_rss_mib"] for r in runs for w in r["workers"].values())}


def summary(serial_name: str, serial: list, parallel_name: str, parallel: list, target: float) -> dict:
    out: dict = {"target": target, "complete_pairs": min(len(serial), len(parallel))}
    if serial:
        out[serial_name] = side(serial_name, serial)
    if parallel:
        out[parallel_name] = side(parallel_name, parallel)
    if serial and parallel:
        ratio = out[parallel_name]["median_wall_s"] / out[serial_name]["median_wall_s"]
        out.update(ratio_median=round(ratio, 3), met=ratio <= target)
    return out


def compare(name: str, serial_name: str, parallel_name: str, measure, repeats: int, target: float,
            save) -> dict:
    """Alternate the two sides ``repeats`` times; ``save(summary)`` after every run, so a run
    cut short still leaves what it measured."""
    with cluster(1) as c1, Client(c1, set_as_default=False) as one, \
            cluster(2) as c2, Client(c2, set_as_default=False) as two:
        warmup = {serial_name: measure("warm", one), parallel_name: measure("warm", two)}
        serial, parallel = [], []
        for i in range(repeats):  # alternate the sides so that a noisy stretch hits both
            serial.append(measure(serial_name, one))
            save(dict(summary(serial_name, serial, parallel_name, parallel, target), warmup_s=warmup))
            parallel.append(measure(parallel_name, two))
            save(dict(summary(serial_name, serial, parallel_name, parallel, target), warmup_s=warmup))
            print(f"{name} repeat {i + 1}: {serial_name} {serial[-1]['wall_s']:.1f} s, "
                  f"{parallel_name} {parallel[-1]['wall_s']:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    return dict(summary(serial_name, serial, parallel_name, parallel, target), warmup_s=warmup)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster.json",
                    help="the JSON written (a try-out elsewhere leaves the committed figures alone)")
    ap.add_argument("--tiny", action="store_true", help="tiny fleet models: checks the script, measures nothing useful")
    ap.add_argument("--dask-defaults", action="store_true", help="workers with Dask's default configuration "
                    "instead of arrow_quant_v2.cluster.WORKER_CONFIG (both sides either way)")
    ap.add_argument("--parts", default="fleet,big", help="which comparisons to run (fleet, big); the others "
                    "keep their last results in the JSON")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    worker_config = {} if args.dask_defaults else WORKER_CONFIG
    dask.config.set(worker_config)  # before any cluster starts: every worker of both sides runs with it
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    out_file = args.out
    previous = json.loads(out_file.read_text()) if out_file.is_file() else {}
    run_info = { "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                         capture_output=True, text=True).stdout.strip(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "ram_gib": round(psutil.virtual_memory().total / 2**30, 1)},
        "versions": {"python": platform.python_version(), "arrow_quant_v2": arrow_quant_v2.__version__,
                     "distributed": __import__("distributed").__version__, "numpy": __import__("numpy").__version__,
                     "pyarrow": __import__("pyarrow").__version__},
        "loadavg_start": list(os.getloadavg()),
        "worker_config": worker_config or "Dask's defaults",
    }
    results = {"benchmark": "cluster",
               "statistic": "median wall time of the repeats; ratio = median(parallel) / median(serial)",
               **{k: previous[k] for k in ("fleet", "big_model") if k in previous}}

    def save(key: str, extra: dict):
        def write(summary_: dict) -> None:
            results[key] = {**extra, **summary_, "run": dict(run_info, loadavg_now=list(os.getloadavg()))}
            out_file.write_text(json.dumps(results, indent=1) + "\n")
        return write

    try:
        models = []
        for i in range(4):
            m = work / f"fleet{i}"
            if not m.exists():
                generate_dream(m, seed=i, **(DREAM_PRESETS["tiny"] if args.tiny else FLEET_SHAPE))
            models.append(m)
        warm_model = work / "warm-model"
        if not warm_model.exists():
            generate_dream(warm_model, seed=9, **DREAM_PRESETS["tiny"])
        counter = iter(range(10**6))

        def fleet_measure(kind: str, client: Client) -> dict:
            out = work / f"out-{next(counter)}"
            try:
                if kind == "warm":
                    return asyncio.run(warm(client, warm_model, out))
                return run(client, fleet_serial if kind == "one_worker_one_after_the_other" else fleet_parallel,
                           models, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)

        if "fleet" in parts:
            print("fleet: 4 models", flush=True)
            extra = {"models": 4, "config": "int4", "source_mib_per_model": round(
                sum(f.stat().st_size for f in models[0].glob("*.safetensors")) / 2**20, 1)}
            compare("fleet", "one_worker_one_after_the_other", "two_workers_fleet", fleet_measure, args.repeats,
                    0.6, save("fleet", extra))
        if "big" in parts:
            big = work / "big-2gb"
            if not big.exists():
                generate_dream(big, seed=0, **DREAM_PRESETS["2gb"])

            def big_measure(kind: str, client: Client) -> dict:
                out = work / f"out-{next(counter)}"
                try:
                    if kind == "warm":
                        return asyncio.run(warm(client, warm_model, out))
                    return run(client, big_split, big, out / "store")
                finally:
                    shutil.rmtree(out, ignore_errors=True)

            print("one large model split across workers", flush=True)
            extra = {"source_mib": round(sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**20, 1),
                     "config": "int4, max_shard_mb=64"}
            compare("big", "one_worker", "two_workers", big_measure, args.big_repeats, 0.65, save("big_model", extra))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for key in ("fleet", "big_model"):
        if key in results:
            print(f"{key}: ratio {results[key].get('ratio_median')} (target {results[key]['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
