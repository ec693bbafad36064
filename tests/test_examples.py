"""The async example runs as a user runs it (a subprocess) and prints what the document shows."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

EXAMPLE = "examples/async_quantization_example.py"


def run_example(repo_root, tmp_path, *args):
    env = dict(os.environ, ARROW_QUANT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(repo_root))
    proc = subprocess.run([sys.executable, EXAMPLE, "--workdir", str(tmp_path / "work"), *args], cwd=repo_root,
                          env=env, capture_output=True, text=True, timeout=570)  # a cold numba cache compiles every kernel first
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def sections(out: str) -> dict:
    parts = re.split(r"^== (.+) ==$", out, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.parametrize("mode", ["sample", "synthetic"])
def test_async_example_covers_every_section(repo_root, tmp_path, mode):
    out = run_example(repo_root, tmp_path, *(["--synthetic"] if mode == "synthetic" else []))
    s = sections(out)
    assert list(s) == ["Basic async quantization", "With progress tracking", "Concurrent multi-model quantization",
                       "Async validation", "Deployment profiles", "Error handling",
                       "Quantize and validate concurrently (asyncio.gather)", "Task cancellation"]
    if mode == "sample":
        assert "Using the tiny-dream sample model" in out

    ratio = float(re.search(r"^Compression ratio: ([\d.]+)$", s["Basic async quantization"], re.M).group(1))
    cosine = float(re.search(r"^Cosine similarity: ([\d.]+)$", s["Basic async quantization"], re.M).group(1))
    assert ratio > 1 and 0.9 <= cosine <= 1

    progress = [float(p) for p in re.findall(r"^\[([\d.]+)%\] ", s["With progress tracking"], re.M)]
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] == 100.0

    models = re.findall(r"^Model (\d): ([\d.]+)x compression \(int(\d)\)$", s["Concurrent multi-model quantization"], re.M)
    assert [(m[0], m[2]) for m in models] == [("0", "2"), ("1", "4"), ("2", "4")]

    assert "Validation passed: True" in s["Async validation"]
    val_cos = float(re.search(r"^Cosine similarity: ([\d.]+)$", s["Async validation"], re.M).group(1))
    assert val_cos == pytest.approx(cosine, abs=1e-4)  # the same store, measured again

    for name, bits in (("edge", 2), ("local", 4), ("cloud", 8)):
        assert re.search(rf"^{name}: int{bits}, [\d.]+ MB measured", s["Deployment profiles"], re.M)

    errors = s["Error handling"]
    assert "Quantization failed: " in errors and "invalid/path" in errors
    assert "Invalid configuration: bit_width=7" in errors
    assert re.search(r"Quantization failed: \S+: cosine [\d.]+ at int2 is below min_accuracy", errors)
    assert "Fallback result: int4" in errors
    assert "1 of 2 models failed: [1]" in errors and "Kept the finished stores: ['batch-ok']" in errors

    gathered = s["Quantize and validate concurrently (asyncio.gather)"]
    assert "Quantized: model2-int8" in gathered and "Validated: passed=True" in gathered

    cancel = s["Task cancellation"]
    assert "Quantization cancelled" in cancel and "output left behind: False" in cancel
    assert re.search(r"big: cancelled\n\s+model1: done.*\n\s+model2: done", cancel)
    assert out.rstrip().endswith("All examples finished.")
    outputs = tmp_path / "work" / "outputs"
    assert not (outputs / "big-int4").exists() and not (outputs / "big-again").exists()
    assert not [p for p in outputs.iterdir() if ".partial-" in p.name]
