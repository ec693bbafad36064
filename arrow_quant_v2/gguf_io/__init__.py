"""GGUF files out (to llama.cpp, ComfyUI-GGUF, diffusers) and in (any GGUF against its source).

* :func:`export_gguf` (``QuantizedModel.to_gguf``): a store's tensors, byte for byte, under the
  names, architecture, hyper-parameters and tokenizer the model family's runtime expects
  (:mod:`.writer`, :mod:`.runtime`).
* :class:`GGUFFile` and :func:`validate_gguf`: read any GGUF file and compare it tensor by tensor
  with the safetensors it was made from (:mod:`.reader`).

gguf-py (the optional extra ``gguf``) is imported only here, on first use, so the rest of the
library works without it.
"""
from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "GGUF support needs the gguf package: pip install 'arrow-quant-v2[gguf]'"


def is_gguf_file(path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic (whatever its name)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def looks_like_gguf(path) -> bool:
    """A GGUF file by its magic, or a path named ``*.gguf`` (so a missing one gets GGUF's error)."""
    return is_gguf_file(path) or Path(path).suffix.lower() == ".gguf"


def _require():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def export_gguf(model, path, **kwargs) -> dict:
    """See :func:`arrow_quant_v2.gguf_io.writer.export_gguf`."""
    _require()
    from .writer import export_gguf as run

    return run(model, path, **kwargs)


def validate_gguf(original_path, gguf_path, **kwargs) -> dict:
    """See :func:`arrow_quant_v2.gguf_io.reader.validate_gguf`."""
    _require()
    from .reader import validate_gguf as run

    return run(original_path, gguf_path, **kwargs)


def open_gguf(path):
    """A :class:`~arrow_quant_v2.gguf_io.reader.GGUFFile` for reading any GGUF file."""
    _require()
    from .reader import GGUFFile

    return GGUFFile(path)
