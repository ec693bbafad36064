"""Where ArrowQuant keeps files of its own, per platform (through ``platformdirs``).

* the cache (sample models, the wheels they are built from): ``$ARROW_QUANT_CACHE``, else the
  user cache folder — ``$XDG_CACHE_HOME/arrow_quant_v2`` or ``~/.cache/arrow_quant_v2`` on Linux,
  ``~/Library/Caches/arrow_quant_v2`` on macOS;
* the app's output root (the stores it writes): ``$ARROW_QUANT_OUTPUT_ROOT``, else ``outputs`` in
  the user data folder — ``$XDG_DATA_HOME/arrow_quant_v2`` or ``~/.local/share/arrow_quant_v2`` on
  Linux, ``~/Library/Application Support/arrow_quant_v2`` on macOS. Stores are results, not a
  cache: nothing that clears caches should take them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List

import platformdirs

APP_NAME = "arrow_quant_v2"
CACHE_ENV = "ARROW_QUANT_CACHE"
OUTPUT_ROOT_ENV = "ARROW_QUANT_OUTPUT_ROOT"


def cache_dir() -> Path:
    """The cache folder: ``$ARROW_QUANT_CACHE`` if set, else the platform's user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return platformdirs.user_cache_path(APP_NAME, appauthor=False)


def output_root() -> Path:
    """Where the app writes stores: ``$ARROW_QUANT_OUTPUT_ROOT`` if set, else the user data folder's ``outputs``."""
    env = os.environ.get(OUTPUT_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return platformdirs.user_data_path(APP_NAME, appauthor=False) / "outputs"


def export_temporary(out: Path) -> Path:
    """A fresh hidden name beside ``out`` for an export being written (a file or a folder):
    ``.<out>.<pid>.<8 hex>.tmp``, renamed to ``out`` only when complete."""
    return out.parent / f".{out.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def stale_export_temporaries(out: Path) -> List[Path]:
    """Temporaries of earlier exports to ``out`` (named by :func:`export_temporary`) whose process is gone."""
    stale = []
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(out.name) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(tmp)
        except (ValueError, PermissionError, OSError):
            continue
    return stale


def remove_stale_export_temporaries(out: Path) -> None:
    """Remove what :func:`stale_export_temporaries` finds (a killed export's file or folder)."""
    for tmp in stale_export_temporaries(out):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
