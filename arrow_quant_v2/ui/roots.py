"""Where the app may read models from and write stores to.

The app never touches a path a person typed until it has been resolved (``..`` and
symlinks followed) and found inside one of the configured roots:

* model roots: ``$ARROW_QUANT_MODEL_ROOTS`` (``os.pathsep``-separated) and/or the
  ``model_roots`` argument, plus the sample cache (``<cache>/samples``);
* the output root: the ``output_root`` argument, else :func:`arrow_quant_v2.paths.output_root`
  (``$ARROW_QUANT_OUTPUT_ROOT``, else ``outputs`` in the platform's user data folder).

No Panel here: this module is used by the state classes and tested without a server.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

from ..errors import ArrowQuantError
from ..paths import cache_dir
from ..paths import output_root as default_output_root  # noqa: F401 - the app's name for it

MODEL_ROOTS_ENV = "ARROW_QUANT_MODEL_ROOTS"

PathLike = Union[str, "os.PathLike[str]"]


class PathNotAllowed(ArrowQuantError, PermissionError):
    """A path lies outside the configured roots (after resolving ``..`` and symlinks)."""


def env_model_roots() -> List[Path]:
    """The roots named in ``$ARROW_QUANT_MODEL_ROOTS`` (empty entries ignored)."""
    raw = os.environ.get(MODEL_ROOTS_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def samples_root() -> Path:
    """Where :mod:`arrow_quant_v2.samples` builds the sample models."""
    return cache_dir() / "samples"


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def is_within(path: PathLike, root: PathLike) -> bool:
    """True if ``path`` (resolved) is ``root`` (resolved) or lies under it."""
    p, r = _real(path), _real(root)
    return p == r or r in p.parents


def confine(path: PathLike, roots: Sequence[PathLike], *, what: str = "path") -> Path:
    """``path`` resolved, if it lies inside one of ``roots``; else :class:`PathNotAllowed`.

    A relative path is taken relative to the first root. ``..`` components and symlinks
    are resolved before the check, so neither can lead out of the roots.
    """
    if not roots:
        raise PathNotAllowed(f"{path}: no {what} roots are configured (set ${MODEL_ROOTS_ENV})")
    raw = Path(os.path.expanduser(os.fspath(path)))
    if not raw.is_absolute():
        raw = Path(roots[0]) / raw
    resolved = _real(raw)
    for root in roots:
        if is_within(resolved, root):
            return resolved
    shown = ", ".join(str(r) for r in roots)
    raise PathNotAllowed(f"{path}: outside the allowed {what} folders ({shown}); "
                         f"add its folder to ${MODEL_ROOTS_ENV} to use it")


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, default: str = "model") -> str:
    """A file-name-safe stem: letters, digits, ``._-`` only, no leading dots."""
    name = _SAFE.sub("-", text).strip("-.")
    return name[:80] or default


def unique_path(parent: PathLike, stem: str, reserved: Iterable[PathLike] = ()) -> Path:
    """``parent/stem``, or ``parent/stem-2``, ``-3``... : the first that neither exists nor is reserved.

    Never returns an existing folder, so a finished store is never clobbered silently.
    """
    parent = Path(parent)
    taken = {_real(p) for p in reserved}
    stem = safe_name(stem)
    for i in range(1, 10_000):
        candidate = parent / (stem if i == 1 else f"{stem}-{i}")
        if not candidate.exists() and _real(candidate) not in taken:
            return candidate
    raise ArrowQuantError(f"{parent}: no free output name for {stem!r}")


def roots_list(roots: Optional[Iterable[PathLike]]) -> List[Path]:
    out: List[Path] = []
    for r in roots or ():
        p = _real(r)
        if p not in out:
            out.append(p)
    return out
