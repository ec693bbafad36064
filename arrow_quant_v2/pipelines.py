"""Which weight files of a model folder to read: weight variants and diffusers pipeline components.

Hugging Face repositories keep several *variants* of the same weights side by side:
``model.safetensors`` and ``model.fp16.safetensors``, or diffusers'
``diffusion_pytorch_model.safetensors`` and ``diffusion_pytorch_model.fp16.safetensors``; sharded
ones have ``<stem>.safetensors.index.json`` / ``<stem>.safetensors.index.fp16.json`` naming their
shards. One variant is read at a time: the default (no variant in the name) unless another is asked
for. Two files of the *same* variant that hold the same tensor still conflict (the reader refuses
them).

A diffusers *pipeline* is a folder with ``model_index.json`` naming its components (``unet`` or
``transformer``, ``vae``, ``text_encoder``...), one per subfolder. By default only the denoiser is
quantized; the other components are copied into the output as they are, so it keeps the pipeline's
layout.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import ConfigurationError, ModelFormatError, ModelNotFoundError

#: File stems Hugging Face libraries add a variant to (``<stem>.<variant>.safetensors``).
VARIANT_STEMS = ("model", "diffusion_pytorch_model")
#: The denoiser of a pipeline, in the order looked for: what is quantized by default.
DENOISERS = ("unet", "transformer", "prior", "decoder")
PIPELINE_INDEX = "model_index.json"

_STEMS = "|".join(re.escape(s) for s in VARIANT_STEMS)
_SHARD = r"-\d{5}-of-\d{5}"
#: model.safetensors, model.fp16.safetensors, model-00001-of-00002.safetensors,
#: model.fp16-00001-of-00002.safetensors, model-00001-of-00002.fp16.safetensors
_WEIGHT_NAME = re.compile(rf"^(?:{_STEMS})(?:\.(?P<v1>\w+))?(?:{_SHARD})?(?:\.(?P<v2>\w+))?\.safetensors$")
#: model.safetensors.index.json, model.safetensors.index.fp16.json
_INDEX_NAME = re.compile(rf"^(?:{_STEMS})\.safetensors\.index(?:\.(?P<v>\w+))?\.json$")


def file_variant(name: str) -> Optional[str]:
    """The variant a weight file's name carries (``"fp16"``), or None for the default weights."""
    m = _WEIGHT_NAME.match(name)
    return (m["v1"] or m["v2"]) if m else None


def index_variant(name: str) -> Optional[str]:
    """The variant of a shard index file name (None for the default index; see :func:`is_index`)."""
    m = _INDEX_NAME.match(name)
    return m["v"] if m else None


def is_index(name: str) -> bool:
    """Whether ``name`` is a safetensors shard index (of any variant)."""
    return bool(_INDEX_NAME.match(name))


@dataclass
class WeightSet:
    """One variant's weights in one folder: an index naming shards, or the files themselves."""

    variant: Optional[str]
    index: Optional[Path] = None
    files: List[Path] = field(default_factory=list)

    @property
    def paths(self) -> List[Path]:
        """Every file of the set as it lies on disk (the index and its files, or the files)."""
        return ([self.index] if self.index else []) + sorted(self.files)


def weight_sets(folder: Path) -> Dict[Optional[str], WeightSet]:
    """The folder's ``*.safetensors`` weights grouped by variant (None = the default weights).

    An index claims its variant; the shards it names are read by the reader from its weight map.
    """
    sets: Dict[Optional[str], WeightSet] = {}
    for p in sorted(folder.glob("*.safetensors.index*.json")):
        if is_index(p.name):
            variant = index_variant(p.name)
            if variant in sets and sets[variant].index is not None:
                raise ModelFormatError(f"{folder}: two shard indexes for the same weights: "
                                       f"{sets[variant].index.name} and {p.name}")
            sets.setdefault(variant, WeightSet(variant)).index = p
    for p in sorted(folder.glob("*.safetensors")):
        variant = file_variant(p.name)
        sets.setdefault(variant, WeightSet(variant)).files.append(p)
    return sets


def _name(variant: Optional[str]) -> str:
    return "default" if variant is None else repr(variant)


def choose(folder: Path, sets: Dict[Optional[str], WeightSet], variant: Optional[str]) -> WeightSet:
    """The set to read: ``variant``'s, else the default one, else the only one there is."""
    available = ", ".join(_name(v) for v in sorted(sets, key=lambda v: (v is not None, v or "")))
    if variant is not None:
        if variant not in sets:
            raise ModelNotFoundError(f"{folder}: no weights of variant {variant!r}; the weights here: {available}")
        return sets[variant]
    if None in sets:
        return sets[None]
    if len(sets) == 1:
        return next(iter(sets.values()))
    raise ModelNotFoundError(f"{folder}: only variant weights ({available}) and no default ones; "
                             f"choose one with variant=... (--variant)")


def pipeline_components(root: Path) -> Optional[Dict[str, Path]]:
    """``{component: subfolder}`` of the diffusers pipeline at ``root`` (None if it is not one).

    Components are the ``model_index.json`` entries ``name: [library, class]`` whose subfolder
    exists; entries such as ``"safety_checker": [null, null]`` and ``_class_name`` are not.
    """
    index = root / PIPELINE_INDEX
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{index}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{index}: not a JSON object")
    out = {}
    for name, value in data.items():
        if (not name.startswith("_") and isinstance(value, list) and len(value) == 2 and all(value)
                and "/" not in name and name not in (".", "..") and (root / name).is_dir()):
            out[name] = root / name
    return out


def select_components(root: Path, available: Sequence[str], requested: Optional[Sequence[str]]) -> List[str]:
    """The components to quantize: ``requested`` (checked), else the denoiser."""
    if requested is not None:
        if isinstance(requested, str) or not requested:
            raise ConfigurationError(f"components={requested!r} is not allowed; allowed: a non-empty list of "
                                     f"component names from {', '.join(available)}")
        unknown = [c for c in requested if c not in available]
        if unknown:
            raise ConfigurationError(f"components={list(requested)!r}: {', '.join(map(repr, unknown))} not in the "
                                     f"pipeline at {root}; its components with weights: {', '.join(available)}")
        return list(dict.fromkeys(requested))
    for name in DENOISERS:
        if name in available:
            return [name]
    raise ModelNotFoundError(f"{root}: a pipeline without a denoiser ({' or '.join(DENOISERS)}) with safetensors "
                             f"weights; choose components=... from {', '.join(available) or '(none)'}")
