"""What every benchmark records beside its printout: ``benchmarks/results/<name>.json``.

The README's and the docs' figures are rendered from these files (``scripts/render_figures.py``),
never typed, so each file says exactly what was measured and on what: the commit (and whether the
package had uncommitted changes), the machine, the library versions, the raw numbers, how many
times each was repeated and which statistic the figures use, and the load average before and
after the run. The machine is shared: a high load average marks a figure as noisy.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:  # the installed distribution's version: some packages (gguf) have no __version__
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def load() -> list:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def environment() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "uncommitted_changes": bool(_git("status", "--porcelain", "--", "arrow_quant_v2")),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "usable_cores": usable, "system": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
                    if hasattr(os, "sysconf") else None},
        "versions": {"python": platform.python_version(), **{m: _version(m) for m in
                     ("arrow_quant_v2", "numpy", "numba", "pyarrow", "gguf")}},
    }


class Record:
    """Collects one benchmark run: ``Record(name, argv)``, then :meth:`write` with the numbers.

    The load average is taken when the record is made and again when it is written.
    """

    def __init__(self, name: str, argv=None, script: str = "") -> None:
        self.name = name
        self.script = script or f"benchmarks/{name}.py"
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.load_before = load()

    def write(self, results, *, repeats, statistic: str, notes: str = "", out_dir=None) -> Path:
        data = {
            "benchmark": self.name,
            "command": " ".join(["python", self.script, *self.argv]),
            "started": self.started,
            **environment(),
            "load_average": {"before": self.load_before, "after": load()},
            "repeats": repeats,
            "statistic": statistic,
            "notes": notes,
            "results": results,
        }
        out = Path(out_dir or RESULTS) / f"{self.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"results written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
        return out
