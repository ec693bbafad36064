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
from pathlib import Path

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
