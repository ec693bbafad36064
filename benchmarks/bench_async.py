"""Benchmark of the async API: parallelism, event-loop responsiveness, cancellation.

    python benchmarks/bench_async.py [--repeats 3] [--tensors 16] [--workdir DIR]

Prints, with how each number was measured:

(a) two models quantized concurrently (``asyncio.gather``) versus one after the other
    (``await`` each in turn), same instance, same configs, wall time; ratio = concurrent /
    sequential. Measured twice: with ``num_threads=1`` per job (each job's kernels sized
    for one core, so the sequential run leaves the second core to spare and the ratio
    shows what running jobs side by side buys) and with ``num_threads=0`` (each job
    already sized for every core: little to gain, and the point is that nothing is lost
    to oversubscription). Runs alternate sequential/concurrent; medians are compared.
    Each run also records the CPU that other processes used meanwhile (system-wide busy
    time minus ours, via psutil): on a shared machine only the pairs during which that
    stayed under 0.2 core show what the jobs themselves do ("undisturbed" ratio).
(b) the worst stall of a 10 ms asyncio heartbeat (how much later than due it woke) while
    three models quantize concurrently, next to the same heartbeat on an idle loop.
(c) cancellation of a job quantizing a model with one 10240 x 10240 F32 tensor (105M
    elements, 400 MiB), cancelled when its progress reaches 25% and 60%: time from
    ``task.cancel()`` to ``CancelledError`` in the awaiting coroutine, this process's CPU
    use while the job worked and in the second after the cancel, and how many of its
    threads still use CPU in the half second after that.

Inputs are synthetic safetensors models written to a temporary folder (deleted at the
end unless ``--workdir`` is given). The machine's load average is printed too: on a
shared machine other processes' CPU use shows up in every wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrow_quant_v2 import AsyncArrowQuantV2, DiffusionQuantConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds used by every process on the machine (0 if psutil is missing)."""
    if psutil is None:
        return 0.0
    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


class Meter:
    """Wall time, this process's CPU and the other processes' CPU over a stretch of code."""

    def __enter__(self):
        self.t, self.cpu, self.busy = time.perf_counter(), cpu_seconds(), machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.own = cpu_seconds() - self.cpu
        self.others = max(machine_busy_seconds() - self.busy - self.own, 0.0) if psutil else float("nan")


def write_model(folder: Path, tensors: int, rows: int, cols: int, seed: int) -> Path:
    """``tensors`` F32 matrices streamed to one safetensors file (never all in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    if path.exists():
        return folder
    per = rows * cols * 4
    header = {f"model.layers.{i}.mlp.up_proj.weight": {"dtype": "F32", "shape": [rows, cols],
                                                        "data_offsets": [i * per, (i + 1) * per]}
              for i in range(tensors)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _ in range(tensors):
            for r in range(0, rows, 1024):
                block = rng.standard_t(5, size=(min(1024, rows - r), cols)).astype(np.float32)
                block *= 0.02
                f.write(block.tobytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "dream"}))
    return folder


def clean(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


# -- (a) parallelism ---------------------------------------------------------------------------


async def parallel(models, work: Path, repeats: int) -> dict:
    out = {}
    q = AsyncArrowQuantV2(max_concurrent_jobs=2)
    outs = [work / f"out-a{i}" for i in range(2)]
    for threads in (1, 0):
        cfg = DiffusionQuantConfig(bit_width=4, num_threads=threads)
        clean(*outs)
        await q.quantize_diffusion_model_async(models[0], outs[0], cfg)  # warm: numba cache, page cache
        clean(*outs)
        seq, conc = [], []
        for _ in range(repeats):
            with Meter() as m:
                for model, o in zip(models, outs):
                    await q.quantize_diffusion_model_async(model, o, cfg)
            seq.append(m)
            clean(*outs)
            with Meter() as m:
                await asyncio.gather(*(q.quantize_diffusion_model_async(model, o, cfg) for model, o in zip(models, outs)))
            conc.append(m)
            clean(*outs)
        # Runs during which other processes kept less than 0.2 core busy are the undisturbed ones.
        quiet = [(s_, c_) for s_, c_ in zip(seq, conc) if s_.others / s_.wall < 0.2 and c_.others / c_.wall < 0.2]
        out[threads] = dict(seq=seq, conc=conc,
                            ratio=statistics.median(m.wall for m in conc) / statistics.median(m.wall for m in seq),
                            ratio_best=min(m.wall for m in conc) / min(m.wall for m in seq),
                            ratio_quiet=(statistics.median(c_.wall / s_.wall for s_, c_ in quiet) if quiet else None),
                            quiet=len(quiet))
    q.close()
    return out


# -- (b) heartbeat -----------------------------------------------------------------------------


async def heartbeat_while(coro_factory, period: float = 0.010):
    """Run a 10 ms heartbeat while ``coro_factory()`` runs; return (lateness list, result)."""
    late = []
    stop = asyncio.Event()

    async def beat():
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due = loop.time() + period
            await asyncio.sleep(period)
            late.append(loop.time() - due)

    hb = asyncio.create_task(beat())
    await asyncio.sleep(0.05)
    try:
        result = await coro_factory()
    finally:
        stop.set()
        await hb
    return late, result


async def responsiveness(models, work: Path) -> dict:
    outs = [work / f"out-b{i}" for i in range(3)]
    clean(*outs)
    idle, _ = await heartbeat_while(lambda: asyncio.sleep(2.0))
    q = AsyncArrowQuantV2(max_concurrent_jobs=3, progress_interval=0.1)
    events = []
    busy, _ = await heartbeat_while(lambda: q.quantize_multiple_models_async(
        [(m, o, DiffusionQuantConfig(bit_width=4)) for m, o in zip(models, outs)],
        lambda i, msg, p: events.append(p)))
    q.close()
    clean(*outs)

    def summary(late):
        s = sorted(late)
        return dict(beats=len(s), worst_ms=1000 * s[-1], p99_ms=1000 * s[int(0.99 * (len(s) - 1))],
                    median_ms=1000 * statistics.median(s))

    return dict(idle=summary(idle), busy=summary(busy), callbacks=len(events))


# -- (c) cancellation --------------------------------------------------------------------------


async def cancellation(big: Path, work: Path, at_fractions) -> list:
    rows = []
    proc = psutil.Process() if psutil else None
    q = AsyncArrowQuantV2(progress_interval=0)
    for at in at_fractions:
        out = work / "out-c"
        clean(out)
        reached = asyncio.Event()
        began = {}

        def hook(e):
            if e.stage == "quantize" and e.bytes_done > 0 and not began:
                began.update(t=time.perf_counter(), cpu=cpu_seconds())
            if e.fraction >= at:
                reached.set()

        task = asyncio.create_task(q.quantize_diffusion_model_async(big, out, DiffusionQuantConfig(bit_width=4),
                                                                    on_event=hook))
        await reached.wait()
        t0 = time.perf_counter()
        before = 100 * (cpu_seconds() - began["cpu"]) / max(t0 - began["t"], 1e-9)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            latency = time.perf_counter() - t0
        else:  # pragma: no cover - the job finished first
            latency = float("nan")
        c0 = cpu_seconds()
        await asyncio.sleep(1.0)
        after = 100 * (cpu_seconds() - c0)
        busy_threads = []
        if proc is not None:
            t1 = {t.id: t.user_time + t.system_time for t in proc.threads()}
            await asyncio.sleep(0.5)
            t2 = {t.id: t.user_time + t.system_time for t in proc.threads()}
            busy_threads = [tid for tid in t2 if t2[tid] - t1.get(tid, 0.0) > 0.05]
        leftovers = [p.name for p in work.iterdir() if ".partial-" in p.name or p.name == "out-c"]
        rows.append(dict(at=at, ran=t0 - began["t"], latency_ms=1000 * latency, cpu_before=before, cpu_after=after,
                         busy_threads=len(busy_threads), leftovers=leftovers))
    q.close()
    return rows


# -- main --------------------------------------------------------------------------------------


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


async def main(args) -> None:
    record = Record("bench_async")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-async-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        models = [write_model(work / f"model{i}", args.tensors, 2048, 2048, seed=i) for i in range(3)]
        big = write_model(work / "big", 1, 10240, 10240, seed=9)
        n = args.tensors * 2048 * 2048
        print(f"cores: {os.cpu_count()}   load average at start: {load()}")
        print(f"inputs: 3 models x {args.tensors} F32 2048x2048 tensors ({n / 1e6:.0f}M params, {n * 4 / 2**20:.0f} MiB each);"
              f" 1 model with one 10240x10240 F32 tensor ({10240 * 10240 / 1e6:.0f}M elements); "
              f"written in {time.perf_counter() - t0:.1f} s")
        print()

        res = await parallel(models[:2], work, args.repeats)
        print("(a) 2 models (int4) concurrently via asyncio.gather vs one after the other (await each), "
              f"{args.repeats} alternating runs each")
        for threads, r in res.items():
            label = "num_threads=1 (one core's worth of kernels per job)" if threads == 1 else \
                "num_threads=0 (every job sized for all cores)"
            print(f"    {label}")
            for key, name in (("seq", "sequential"), ("conc", "concurrent")):
                runs = r[key]
                print(f"      {name} wall s: {' '.join(f'{m.wall:.2f}' for m in runs)}   cores used by this process: "
                      f"{' '.join(f'{m.own / m.wall:.2f}' for m in runs)}; by other processes: "
                      f"{' '.join(f'{m.others / m.wall:.2f}' for m in runs)}")
            quiet = (f"{r['ratio_quiet']:.2f} over the {r['quiet']} pair(s) run while other processes used < 0.2 core"
                     if r["ratio_quiet"] is not None else "n/a (other processes were busy during every pair)")
            print(f"      ratio concurrent/sequential: median {r['ratio']:.2f}, best-of {r['ratio_best']:.2f}, "
                  f"undisturbed {quiet}")
        print(f"    load average now: {load()}")
        print()

        hb = await responsiveness(models, work)
        print("(b) 10 ms asyncio heartbeat: lateness of each wake-up")
        for key, label in (("idle", "idle loop, 2 s          "), ("busy", "3 models quantizing    ")):
            h = hb[key]
            print(f"    {label}: {h['beats']} beats, worst {h['worst_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, "
                  f"median {h['median_ms']:.2f} ms")
        print(f"    ({hb['callbacks']} progress callbacks delivered on the loop meanwhile, interval 0.1 s)")
        print(f"    load average now: {load()}")
        print()

        rows = await cancellation(big, work, args.cancel_at)
        print("(c) cancel a job quantizing a 105M-element tensor: cancel() -> CancelledError, CPU around it")
        for r in rows:
            print(f"    at {100 * r['at']:.0f}% ({r['ran']:.2f} s of work): latency {r['latency_ms']:.0f} ms; process CPU "
                  f"{r['cpu_before']:.0f}% while it worked, {r['cpu_after']:.0f}% in the second after; "
                  f"threads still using CPU: {r['busy_threads']}; partial/output folders left: {r['leftovers'] or 'none'}")
        print(f"    load average now: {load()}")
        runs = {str(threads): dict({k: v for k, v in r.items() if k not in ("seq", "conc")},
                                   **{name: [{"wall_s": m.wall, "own_cores": m.own / m.wall, "other_cores": m.others / m.wall}
                                             for m in r[key]] for key, name in (("seq", "sequential"), ("conc", "concurrent"))})
                for threads, r in res.items()}
        record.write({"inputs": {"models": 3, "tensors_per_model": args.tensors, "tensor_shape": [2048, 2048],
                                 "cancel_tensor_shape": [10240, 10240]},
                      "concurrent_vs_sequential": runs, "heartbeat": hb, "cancellation": rows},
                     repeats=args.repeats,
                     statistic="(a) `repeats` alternating sequential/concurrent pairs; ratio = median concurrent / "
                               "median sequential (also best-of and the pairs run while other processes used < 0.2 "
                               "core); (b) one run, worst and p99 lateness; (c) one cancel per fraction")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tensors", type=int, default=16, help="2048x2048 F32 tensors per model (default 16: 67M params)")
    ap.add_argument("--cancel-at", type=float, nargs="+", default=[0.25, 0.6],
                    help="progress fractions at which to cancel the big job")
    ap.add_argument("--workdir", help="keep inputs here (reused across runs) instead of a temporary folder")
    asyncio.run(main(ap.parse_args()))
