"""Hugging Face repo ids as model paths: ``org/name``, ``org/name@revision``.

Wherever a model path is accepted, a string that is not an existing file or folder but looks like
a repo id is looked up in the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``~/.cache/huggingface/hub``) and resolves to its snapshot folder. Nothing is downloaded
unless asked (``download=True``, ``arrow-quant ... --download``); then only the safetensors
weights and the small text files beside them are fetched, with huggingface_hub's progress bars.
``huggingface_hub`` is the optional ``hub`` extra, imported only here and only for an id.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .errors import ConfigurationError, ModelNotFoundError

#: ``org/name`` as the Hub allows it, optionally ``@revision`` (a branch, tag or commit).
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
                     r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{0,199}))?$")
#: What a download fetches: the weights this project reads and the small files stored beside them
#: (configs, tokenizers, model cards); never pickled checkpoints or other serialisations.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.md",
                     "*.tiktoken", "LICENSE*"]
OFFLINE_ENV = "HF_HUB_OFFLINE"

log = logging.getLogger(__name__)


def parse_repo_id(spec: str) -> Optional[Tuple[str, Optional[str]]]:
    """``(repo_id, revision)`` if ``spec`` has the form of a repo id (``org/name[@revision]``), else None."""
    m = REPO_ID.match(spec)
    if not m or "--" in m["repo"] or ".." in m["repo"] or (m["revision"] and ".." in m["revision"]):
        return None
    return m["repo"], m["revision"]


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _fetch_hint(repo_id: str, revision: Optional[str]) -> str:
    at = f"@{revision}" if revision else ""
    rev = f" --revision {revision}" if revision else ""
    return (f"to fetch it, run `arrow-quant quantize {repo_id}{at} OUTPUT --download` "
            f"(or `hf download {repo_id}{rev}`, or download=True in Python)")


def _hub(spec: str = "a repo id"):
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"{spec}: no such file or folder; to use it as a Hugging Face repo id, install the optional "
            "huggingface_hub package: pip install 'arrow-quant-v2[hub]'"
        ) from None
    return huggingface_hub


def resolve(model: Union[str, "os.PathLike[str]"], *, revision: Optional[str] = None,
            download: bool = False) -> Path:
    """The folder or file ``model`` names: an existing path as it is, a repo id as its cached snapshot.

    A ``str`` that is not an existing path but has the form ``org/name`` (optionally ``@revision``;
    the ``revision`` argument wins) is a Hugging Face repo id: it resolves from the local cache,
    and is downloaded only when ``download`` is true. Anything else comes back as a path, for the
    reader to report as missing. Raises :class:`ModelNotFoundError` naming the cache folder and the
    command that would fetch the model when it is neither cached nor downloadable.
    """
    if not isinstance(model, str):
        if revision is not None:
            raise ConfigurationError(f"revision={revision!r} applies to a Hugging Face repo id, not to the path {model!r}")
        return Path(model)
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    parsed = None if exists else parse_repo_id(model)
    if parsed is None:
        if revision is not None:
            raise ConfigurationError(f"revision={revision!r} applies to a Hugging Face repo id (org/name), "
                                     f"but {model!r} is {'a path' if exists else 'not one'}")
        return path
    repo_id, revision = parsed[0], revision or parsed[1]
    return snapshot(repo_id, revision, download=download, original=model)


def snapshot(repo_id: str, revision: Optional[str] = None, *, download: bool = False,
             original: Optional[str] = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default: the ``main`` branch)."""
    hf = _hub(original or repo_id)
    cache = cache_dir()
    what = f"{original or repo_id}: no such file or folder, and Hugging Face repo {repo_id!r}" + (
        f" at revision {revision!r}" if revision else "")
    try:
        found = Path(hf.snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        log.info("%s%s: the cached snapshot %s", repo_id, f"@{revision}" if revision else "", found)
        return found
    except Exception as e:  # noqa: BLE001 - every "not in the cache" flavour of every huggingface_hub version
        if not download:
            raise ModelNotFoundError(f"{what} is not in the local cache {cache}; {_fetch_hint(repo_id, revision)}") from e
    if _offline():
        raise ModelNotFoundError(f"{what} is not in the local cache {cache}, and ${OFFLINE_ENV} forbids downloading; "
                                 f"unset it where the Hub is reachable and run again")
    log.info("%s is not cached: downloading its safetensors weights and small files into %s", repo_id, cache)
    try:
        return Path(hf.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                         allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, authentication, unknown repo or revision
        raise ModelNotFoundError(f"{what} is not in the local cache {cache} and could not be downloaded: "
                                 f"{type(e).__name__}: {e}") from e


def local_path(model) -> Optional[Path]:
    """What :func:`resolve` gives without downloading, or None when that fails (never raises)."""
    try:
        return resolve(model)
    except Exception:  # noqa: BLE001 - callers only estimate with it
        return None


@dataclass(frozen=True)
class CachedModel:
    """One cached snapshot of a model repo."""

    repo_id: str
    revision: str  # the commit hash
    refs: Tuple[str, ...]  # branches and tags pointing at it, e.g. ("main",)
    path: Path  # the snapshot folder

    @property
    def spec(self) -> str:
        """What to type to use it: ``org/name``, or ``org/name@ref`` / ``@commit`` when it is not ``main``."""
        if "main" in self.refs:
            return self.repo_id
        return f"{self.repo_id}@{self.refs[0] if self.refs else self.revision}"


def cached_models(cache: Optional[Path] = None) -> List[CachedModel]:
    """Every cached snapshot of a model repo, newest first per repo (empty without huggingface_hub or a cache).

    A repo with a broken cache entry is skipped, not an error: the cache is shared with other tools.
    """
    cache = cache or cache_dir()
    if not cache.is_dir():
        return []
    try:
        hf = _hub()
    except ModelNotFoundError:
        return []
    info = hf.scan_cache_dir(cache)
    out: List[CachedModel] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: -r.last_modified):
            out.append(CachedModel(repo.repo_id, rev.commit_hash, tuple(sorted(rev.refs)), Path(rev.snapshot_path)))
    return out
