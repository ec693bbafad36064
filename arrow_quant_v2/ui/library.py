"""The model library: sample models, the Hugging Face cache, and model folders under the configured roots.

:class:`ModelLibrary` is plain ``param`` state (no Panel): it lists models with their
parameter count, dtype, size on disk, shard count and detected modality, and refuses any
path outside its roots (``..`` and symlinks are resolved first). Models in the local Hugging
Face cache are listed by repo id (with the revision when several are cached). A root is
searched at any depth (bounded by :data:`SCAN_LIMIT` folders), a root that is itself a model is
refused, and descriptions are cached per folder, so a rescan of a large cache reads only what
changed; :meth:`ModelLibrary.refresh_async` rescans off the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import param

from .. import hub, samples
from ..errors import ArrowQuantError, ModelNotFoundError
from ..plan import detect_modality
from ..source import INDEX_NAME, open_model
from ..store import MANIFEST
from .roots import MODEL_ROOTS_ENV, PathNotAllowed, confine, env_model_roots, roots_list, samples_root

#: At most this many folders are examined per root, at any depth (a root pointing at / stays cheap).
SCAN_LIMIT = 20000
#: Folders never searched for models: what holds no model folder (a hub cache's content-addressed
#: blobs, version control, Python environments).
SKIP_FOLDERS = frozenset({"blobs", ".git", "node_modules", "__pycache__", "site-packages"})


@dataclass(frozen=True)
class ModelEntry:
    """One model of the library."""

    name: str
    path: str
    kind: str  # "sample", "hub" (the Hugging Face cache) or "folder"
    available: bool = True  # False: a sample not built yet (it is built when first used)
    params: Optional[int] = None
    dtype: str = ""
    size_bytes: Optional[int] = None
    shards: Optional[int] = None
    modality: str = ""
    modality_reason: str = ""
    description: str = ""
    error: str = ""
    tensors: Optional[int] = None

    @property
    def label(self) -> str:
        tag = self.kind if self.kind in ("sample", "hub") else Path(self.path).parent.name or "model"
        return f"{self.name} ({tag})"

    @property
    def usable(self) -> bool:
        return not self.error

    def as_row(self) -> dict:
        return {
            "model": self.name, "source": self.kind,
            "params": self.params, "dtype": self.dtype or ("(built on first use)" if not self.available else ""),
            "size_mb": None if self.size_bytes is None else round(self.size_bytes / 2**20, 1),
            "shards": self.shards, "modality": self.modality, "path": self.path, "note": self.error or self.description,
        }


def folder_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size  # hub snapshots link to their blobs
            except OSError:
                pass
    return total


def describe_model(path, *, name: Optional[str] = None, kind: str = "folder", description: str = "") -> ModelEntry:
    """Read a model's headers (never its weights) and summarise it; errors go into ``entry.error``."""
    path = Path(path)
    name = name or path.name
    try:
        src = open_model(path)
        modality, why = detect_modality(src)
        dtypes: Dict[str, int] = {}
        for t in src.tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
        dtype = "+".join(sorted(dtypes, key=lambda d: -dtypes[d]))
        return ModelEntry(
            name=name, path=str(path), kind=kind, params=sum(t.numel for t in src.tensors.values()),
            dtype=dtype, size_bytes=folder_size(path) if path.is_dir() else path.stat().st_size,
            shards=len(src.files), modality=modality, modality_reason=why, description=description,
            tensors=len(src.tensors),
        )
    except ArrowQuantError as e:
        return ModelEntry(name=name, path=str(path), kind=kind, error=str(e), description=description)


def looks_like_model(path: Path) -> bool:
    """A folder with safetensors weights (top level, or diffusers components under a
    ``model_index.json``) that is not an ArrowQuant store."""
    if not path.is_dir() or (path / MANIFEST).is_file():
        return False
    try:
        if (path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")):
            return True
        # a diffusers pipeline: model_index.json and components in subfolders
        return (path / "model_index.json").is_file() and any(path.glob("*/*.safetensors"))
    except OSError:
        return False


#: Where models come from, and how a person adds a folder of them (the Models tab shows it).
WHERE_MODELS_COME_FROM = (
    "Models come from the sample models (built offline on first use) and from every folder with safetensors "
    "weights under the model roots, listed when the app starts or on Rescan. A folder inside a root can also "
    "be added by its path below.")
HOW_TO_ADD_A_ROOT = (f"To add a root, restart the app with ${MODEL_ROOTS_ENV} listing it (folders separated by "
                     f"'{os.pathsep}'), e.g. {MODEL_ROOTS_ENV}=/data/models arrow-quant serve")


class ModelLibrary(param.Parameterized):
    """Sample models, the Hugging Face cache's models and the model folders under ``roots``.

    ``roots`` defaults to ``$ARROW_QUANT_MODEL_ROOTS``; the sample cache and (with ``include_hub``)
    the Hugging Face cache are always allowed.
    """

    roots = param.List(default=[], item_type=Path, doc="Folders models may be read from.")
    include_samples = param.Boolean(default=True, doc="List the sample models.")
    include_hub = param.Boolean(default=True, doc="List (and allow) the models in the local Hugging Face cache.")
    models = param.List(default=[], item_type=ModelEntry, doc="The models, samples first.")
    message = param.String(default="", doc="The last refusal or error, for the view.")
    notice = param.String(default="", doc="The last thing added (or found listed already), for the view.")

    def __init__(self, roots: Optional[Iterable] = None, *, include_samples: bool = True, scan: bool = True, **params):
        roots = env_model_roots() if roots is None else [Path(os.path.expanduser(os.fspath(r))) for r in roots]
        super().__init__(roots=roots_list(roots), include_samples=include_samples, **params)
        self._lock = threading.Lock()
        self._hub_key: Optional[tuple] = None
        self._hub_models: List[hub.CachedModel] = []
        self._notes: List[str] = []  # what the last scan refused, for ``message``
        self._cache: Dict[str, tuple] = {}
        self._extra: List[ModelEntry] = []
        if scan:
            self.refresh()

    # -- roots ------------------------------------------------------------------------

    @property
    def allowed_roots(self) -> List[Path]:
        """Every folder a model may come from: the roots, the sample cache and the Hugging Face cache."""
        extra = ([samples_root()] if self.include_samples else []) + ([hub.cache_dir()] if self.include_hub else [])
        return roots_list(list(self.roots) + extra)

    def resolve(self, path) -> Path:
        """``path`` resolved, or :class:`PathNotAllowed` if it lies outside the roots."""
        return confine(path, self.allowed_roots, what="model")

    # -- listing ----------------------------------------------------------------------

    def _describe_cached(self, path: Path, **kw) -> ModelEntry:
        try:
            key_stat = max((f.stat().st_mtime_ns for f in path.iterdir()), default=0) if path.is_dir() else path.stat().st_mtime_ns
        except OSError:
            key_stat = None
        hit = self._cache.get(str(path))
        if hit and hit[0] == key_stat and key_stat is not None:
            return replace(hit[1], **{k: v for k, v in kw.items() if k in ("name", "kind", "description")})
        entry = describe_model(path, **kw)
        self._cache[str(path)] = (key_stat, entry)
        return entry

    def sample_entries(self) -> List[ModelEntry]:
        """The sample models, described if built, else with their catalogue figures."""
        out = []
        for s in samples.list_samples():
            if s.available:
                out.append(self._describe_cached(Path(s.path), name=s.name, kind="sample", description=s.description))
            else:
                out.append(ModelEntry(name=s.name, path=str(s.path), kind="sample", available=False, params=s.params,
                                      modality=s.modality, description=s.description))
        return out

    def scan_root(self, root: Path) -> List[ModelEntry]:
        """The model folders under ``root`` at any depth (breadth first, at most :data:`SCAN_LIMIT`
        folders), described. The root itself is refused as a model (the next ``message`` says so)."""
        found: List[ModelEntry] = []
        if not root.exists():
            return found
        if looks_like_model(root):
            self._notes.append(f"{root}: this model root is itself a model folder, so it is not listed; "
                               f"make its parent folder the root instead")
            return found
        frontier, seen = collections.deque([root]), 0
        while frontier and seen < SCAN_LIMIT:
            folder = frontier.popleft()
            seen += 1
            if folder != root and looks_like_model(folder):
                if is_inside_roots(folder, [root]):
                    found.append(self._describe_cached(folder, **hub_snapshot_name(folder)))
                continue
            if folder != root and (folder / MANIFEST).is_file():
                continue  # a store (it may hold a pipeline's copied components): not a model, nothing inside is
            try:
                children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
            except OSError:
                continue
            for child in children:
                if child.is_dir():
                    # a symlinked folder leading out of the root is not followed
                    if child.name not in SKIP_FOLDERS and is_inside_roots(child, [root]):
                        frontier.append(child)
                elif child.suffix == ".safetensors" and folder == root and is_inside_roots(child, [root]):
                    found.append(self._describe_cached(child, name=child.stem))
        return found

    def hub_entries(self) -> List[ModelEntry]:
        """The models in the local Hugging Face cache, by repo id (``org/name@revision`` when a repo
        has several snapshots). The cache is re-read only when one of its repos changed."""
        cache = hub.cache_dir()
        key = _hub_cache_key(cache)
        if key != self._hub_key:
            self._hub_models, self._hub_key = hub.cached_models(cache), key
        usable = [m for m in self._hub_models if looks_like_model(m.path)]
        per_repo = collections.Counter(m.repo_id for m in usable)
        out = []
        for m in usable:
            name = m.repo_id if per_repo[m.repo_id] == 1 else f"{m.repo_id}@{m.refs[0] if m.refs else m.revision[:12]}"
            out.append(self._describe_cached(m.path, name=name, kind="hub", description=f"Hugging Face cache, {m.revision}"))
        return out

    def scan(self) -> List[ModelEntry]:
        """List samples, the Hugging Face cache and the root folders (headers only), without publishing
        the list: safe in a worker thread (:meth:`refresh_async`)."""
        with self._lock:
            self._notes = []
            entries = self.sample_entries() if self.include_samples else []
            if self.include_hub:
                entries.extend(self.hub_entries())
            known = {e.path for e in entries}
            for root in self.roots:
                entries.extend(e for e in self.scan_root(root) if e.path not in known)
            known = {e.path for e in entries}
            entries.extend(e for e in self._extra if e.path not in known)
            names: Dict[str, int] = {}
            for e in entries:
                names[e.name] = names.get(e.name, 0) + 1
            # the same folder name under two roots: tell them apart by their parent folder
            return [e if names[e.name] == 1 or e.kind in ("sample", "hub") else
                    replace(e, name=f"{Path(e.path).parent.name}/{e.name}") for e in entries]

    def refresh(self) -> List[ModelEntry]:
        """Re-list samples, the Hugging Face cache and root folders (headers only, cached per folder)."""
        self._publish(self.scan())
        return self.models

    async def refresh_async(self) -> List[ModelEntry]:
        """:meth:`refresh` with the scanning in a worker thread, so the event loop stays free."""
        self._publish(await asyncio.to_thread(self.scan))
        return self.models

    def _publish(self, entries: List[ModelEntry]) -> None:
        self.models = entries
        if self._notes:
            self.message = "; ".join(self._notes)

    def add_path(self, path) -> ModelEntry:
        """Add a model folder or file a person typed, or a Hugging Face repo id in the local cache
        (``org/name[@revision]``, never downloaded). A path is refused (``message`` set, the error
        raised) when it lies outside the roots (:class:`PathNotAllowed`, saying how to add a root), is a
        root itself or holds no weights (:class:`ModelNotFoundError`); one already listed is returned
        with a ``notice``."""
        spec = os.fspath(path)
        if self.include_hub and hub.parse_repo_id(spec) and not any((r / spec).exists() for r in self.roots):
            try:
                entry = describe_model(hub.resolve(spec), name=spec, kind="hub")
            except ArrowQuantError as e:  # not cached: the message names the cache and the fetch command
                entry = ModelEntry(name=spec, path="", kind="hub", error=str(e))
        else:
            try:
                resolved = self.resolve(path)
            except PathNotAllowed as e:
                self.param.update(message=f"{e}. {HOW_TO_ADD_A_ROOT}", notice="")
                raise
            if any(resolved == Path(r).resolve() for r in self.allowed_roots):
                raise self._refuse(f"{path}: this is a model root, not a model: the model folders inside it are "
                                   "listed already (press Rescan after adding one)")
            listed = next((e for e in self.models if e.path and Path(e.path).resolve() == resolved), None)
            if listed is not None:
                self.param.update(message="", notice=f"{listed.name} is already listed ({resolved})")
                return listed
            if not (looks_like_model(resolved) or (resolved.is_file() and resolved.suffix == ".safetensors")):
                raise self._refuse(f"{path}: no model weights here: a model folder holds *.safetensors files (or "
                                   f"{INDEX_NAME}, or a diffusers model_index.json with its components)")
            entry = describe_model(resolved)
        if entry.error:
            self.param.update(message=entry.error, notice="")
        else:
            self.param.update(message="", notice=f"added {entry.name}")
            if all(e.path != entry.path for e in self._extra):
                self._extra.append(entry)
            self.refresh()
        return entry

    def _refuse(self, why: str) -> ModelNotFoundError:
        self.param.update(message=why, notice="")
        return ModelNotFoundError(why)

    def get(self, name_or_path: str) -> ModelEntry:
        """The listed model with this name or path (resolved first: :class:`PathNotAllowed` outside the roots).

        Raises ``KeyError`` if no listed model matches.
        """
        for e in self.models:
            if e.name == name_or_path or e.path == name_or_path:
                return e
        snapshot = hub.local_path(name_or_path) if self.include_hub and hub.parse_repo_id(name_or_path) else None
        for e in self.models if snapshot is not None else ():  # another spelling of a cached id (@commit, @tag)
            if e.path == str(snapshot):
                return e
        resolved = str(self.resolve(name_or_path))
        for e in self.models:
            if e.path == resolved:
                return e
        raise KeyError(f"no model {name_or_path!r} in the library")

    def materialize(self, entry: ModelEntry) -> Path:
        """The model's folder, building a sample first if needed (blocking; run it off the loop)."""
        if entry.kind == "sample":
            path = samples.sample_path(entry.name)
            if not entry.available:
                self._cache.pop(str(path), None)
            return path
        return self.resolve(entry.path)

    def prepare_samples(self, names: Optional[Sequence[str]] = None, *, refresh: bool = True) -> Dict[str, str]:
        """Build the samples not built yet (blocking). Returns ``{name: error}`` for those that failed."""
        failed = {}
        for s in samples.list_samples():
            if s.available or (names is not None and s.name not in names):
                continue
            try:
                samples.sample_path(s.name)
            except Exception as e:  # noqa: BLE001 - reported to the person, the rest still builds
                failed[s.name] = str(e)
        if refresh:
            self.refresh()
        return failed

    def rows(self) -> List[dict]:
        """One table row per model (what the Models tab shows)."""
        return [e.as_row() for e in self.models]


def hub_snapshot_name(folder: Path) -> dict:
    """``{"name": "org/name"}`` for a snapshot folder of a Hugging Face cache found under a
    root (``models--org--name/snapshots/<commit>``; the commit only when there are several), else ``{}``:
    it is named by its repo, not ``<commit>``."""
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--"):
        return {}
    name = repo[len("models--"):].replace("--", "/")
    try:
        several = sum(1 for _ in folder.parent.iterdir()) > 1
    except OSError:
        several = False
    return {"name": f"{name}@{folder.name[:12]}" if several else name}


def _hub_cache_key(cache: Path) -> Optional[tuple]:
    """What changes when a repo, a snapshot or a ref is added to the Hugging Face cache (a few stat calls per repo)."""
    def mtime(p: str) -> int:
        try:
            return os.stat(p).st_mtime_ns
        except OSError:
            return 0

    try:
        repos = [e.path for e in os.scandir(cache) if e.name.startswith("models--")]
    except OSError:
        return None
    return tuple(sorted((r, mtime(os.path.join(r, "snapshots")), mtime(os.path.join(r, "refs"))) for r in repos))


def is_inside_roots(path: Path, roots: Sequence[Path]) -> bool:
    try:
        confine(path, roots)
        return True
    except PathNotAllowed:
        return False
