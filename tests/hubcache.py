"""A fake Hugging Face hub cache in the layout huggingface_hub writes (checked with its own
``scan_cache_dir`` by the tests): ``models--org--name/{blobs,snapshots/<commit>,refs/<ref>}``,
snapshot files being relative symlinks to content-addressed blobs."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, Optional


def add_snapshot(cache: Path, repo_id: str, files: Dict[str, bytes], *, refs: Iterable[str] = ("main",),
                 commit: Optional[str] = None) -> Path:
    """Put ``files`` (relative path -> bytes) into ``cache`` as one revision of model ``repo_id``;
    return the snapshot folder. ``refs`` (branches or tags) are pointed at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repr(sorted(files.items())).encode() + repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        # LFS files are named by their sha256, git files by their git blob sha1: both just content hashes here
        etag = hashlib.sha256(data).hexdigest() if rel.endswith(".safetensors") else hashlib.sha1(
            b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
