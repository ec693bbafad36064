"""Building a sample safely: in a temporary sibling folder renamed into place, so a folder that
exists is complete and concurrent builders (processes or threads) never see half a model; the
temporary folders of builders that died are removed by the next one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_builds(parent: Path, name: str) -> None:
    """Remove temporary build folders left by processes that died mid-build."""
    for p in parent.glob(f".{name}.building-*"):
        try:
            pid = int(p.name.split("building-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)



def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """``final``, made by ``build(tmp)`` in a temporary sibling and renamed into place (a lost race is fine)."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(parent, final.name)
    tmp = parent / f".{final.name}.building-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
