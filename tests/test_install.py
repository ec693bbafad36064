"""A real install: the built wheel holds the app, ``py.typed`` and declares every import; installed
into a fresh virtual environment (not editable, no source checkout on the path), ``arrow-quant
serve`` answers with the page. The portable fallbacks for the Linux-only calls work.

To stay fast and offline the wheel is built without build isolation (setuptools comes from the
``dev`` extra) and installed with ``--no-deps``; the fresh environment sees the test
environment's site-packages for the dependencies only, through a ``.pth`` file placed after its
own site-packages, so ``arrow_quant_v2`` itself can only come from the wheel.
"""
from __future__ import annotations

import ast
import email
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "arrow_quant_v2"
#: Imported only inside a ``try`` that falls back when missing (notebook detection).
UNDECLARED_OK = {"IPython"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the project files (the checkout gets no build/ folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("arrow_quant_v2-*.whl")
    return whl


def wheel_metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_wheel_holds_the_app_and_py_typed(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"arrow_quant_v2/py.typed", "arrow_quant_v2/ui/app.py", "arrow_quant_v2/ui/serving.py"} <= names
    meta = wheel_metadata(wheel)
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert any("Operating System :: MacOS" == c for c in meta.get_all("Classifier"))


def third_party_imports() -> dict:
    """Top-level module -> a file importing it, for every non-stdlib import in the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top != PACKAGE.name:
                    found.setdefault(top, path.relative_to(ROOT))
    return found


def test_every_runtime_import_is_declared(wheel):
    declared = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in wheel_metadata(wheel).get_all("Requires-Dist")}
    dists = metadata.packages_distributions()
    missing = {}
    for module, where in third_party_imports().items():
        if module in UNDECLARED_OK:
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = str(where)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wheel_installed_in_a_fresh_venv_serves_the_app(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    own_site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())
    # the dependencies only: a .pth adds the test environment's site-packages after the venv's own
    (own_site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ARROW_QUANT_CACHE=str(tmp_path / "cache"), ARROW_QUANT_OUTPUT_ROOT=str(tmp_path / "out"),
               ARROW_QUANT_PREPARE_SAMPLES="0", ARROW_QUANT_OFFLINE="1")
    where = subprocess.check_output([str(py), "-c", "import arrow_quant_v2; print(arrow_quant_v2.__file__)"],
                                    cwd=tmp_path, env=env, text=True).strip()
    assert Path(where).is_relative_to(own_site), f"arrow_quant_v2 came from {where}, not the installed wheel"

    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(env_dir / "bin" / "arrow-quant"), "serve", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        html = None
        deadline = time.monotonic() + 120
        while html is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"arrow-quant serve exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/app", timeout=30) as r:
                    html = r.read().decode()
            except OSError:
                time.sleep(0.3)
        assert html is not None, f"no page:\n{log.read_text()}"
        assert "<title>ArrowQuant V2</title>" in html
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- portable fallbacks


def test_reads_without_preadv(make_model, monkeypatch):
    """Where os.preadv is missing (older macOS, other systems), weights are read the portable way."""
    from arrow_quant_v2.source import open_model

    model = make_model(size="tiny")
    src = open_model(model)
    name = next(n for n, t in src.tensors.items() if len(t.shape) == 2)
    expected = src.read_float32(name)
    monkeypatch.delattr(os, "preadv")
    np.testing.assert_array_equal(open_model(model).read_float32(name), expected)
    assert open_model(model).read_rows(name, 1, 3).tolist() == expected[1:3].tolist()


def test_overwrite_without_renameat2(make_model, tmp_path, monkeypatch):
    """Off Linux the atomic exchange is not tried; an overwrite still replaces the store."""
    from arrow_quant_v2.engine import quantize_model
    from arrow_quant_v2.store import load_quantized

    model = make_model(size="tiny")
    out = tmp_path / "store"
    quantize_model(model, out)
    monkeypatch.setattr(sys, "platform", "darwin")
    from arrow_quant_v2.config import DiffusionQuantConfig

    quantize_model(model, out, DiffusionQuantConfig(bit_width=8), overwrite=True)
    assert load_quantized(out).manifest["config"]["bit_width"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
