"""The synchronous API: :class:`ArrowQuantV2`."""
from __future__ import annotations

from typing import Callable, List, Optional

from .config import DiffusionQuantConfig
from .engine import quantize_model
from .errors import ConfigurationError
from .progress import ProgressEvent, Throttle
from .validation import validate_store


def plain_progress(callback: Optional[Callable[[str, float], None]], interval: float):
    """Adapt a ``callback(message, progress)`` to the engine's event sink, throttled."""
    if callback is None:
        return None
    throttle = Throttle(interval)

    def sink(event: ProgressEvent) -> None:
        if throttle.admit(event):
            try:
                callback(event.message, event.fraction)
            except Exception as e:  # noqa: BLE001 - a listener's bug must not kill the job
                import logging

                logging.getLogger(__name__).warning("progress callback raised %r (ignored)", e)

    return sink


class ArrowQuantV2:
    """Blocking quantizer.

    ``mode`` is kept for the seed API's ``ArrowQuantV2(mode="diffusion")`` and checked; it
    selects nothing (what protects time conditioning is ``config.enable_time_aware``).
    ``progress_interval`` is the minimum seconds between two progress callbacks
    (the first and the final one are always delivered).

    Args:
        mode: must be ``"diffusion"`` (the one value; any other is refused).
        progress_interval: seconds between two progress callbacks (default 5.0).
        cluster: run on a Dask cluster (a ``distributed.Client`` or a scheduler address such
            as ``"tcp://127.0.0.1:8786"``) instead of this machine; calls still block.

    Raises:
        ConfigurationError: for another ``mode`` or a ``cluster`` that is neither.
    """

    def __init__(self, mode: str = "diffusion", progress_interval: float = 5.0, *, cluster=None) -> None:
        if mode != "diffusion":
            raise ConfigurationError(f"mode={mode!r} is not allowed; allowed: 'diffusion'")
        self.mode = mode
        self.progress_interval = progress_interval
        self._remote = None
        if cluster is not None:
            from .aio import AsyncArrowQuantV2

            self._remote = AsyncArrowQuantV2(cluster=cluster, progress_interval=progress_interval)

    def _blocking(self, coroutine_function, *args, **kwargs):
        """Run one of the async API's coroutines to the end on a private loop (in a helper
        thread, so this works inside a running loop too, e.g. a notebook)."""
        import asyncio
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aq-cluster-call") as pool:
            return pool.submit(asyncio.run, coroutine_function(*args, **kwargs)).result()

    def close(self) -> None:
        """Close the cluster connection this instance opened from an address (if any)."""
        if self._remote is not None:
            self._remote.close()

    def quantize_diffusion_model(self, model_path, output_path, config: Optional[DiffusionQuantConfig] = None,
                                 progress_callback: Optional[Callable[[str, float], None]] = None,
                                 overwrite: bool = False, resume: bool = False, *,
                                 revision: Optional[str] = None, download: bool = False,
                                 components: Optional[List[str]] = None, variant: Optional[str] = None) -> dict:
        """Quantize ``model_path`` into a new store at ``output_path``.

        ``overwrite`` replaces an existing store; ``resume`` reuses what a killed run
        with the same source and config had finished. Returns a dict with
        ``quantized_path, compression_ratio, cosine_similarity, model_size_mb, modality,
        bit_width, quantization_time_s`` and more (see README).
        Raises :class:`ConfigurationError` or :class:`QuantizationError`.

        Args:
            model_path: a model folder (Hugging Face or diffusers layout), a ``.safetensors`` file, or a
                Hugging Face repo id (``org/name`` or ``org/name@revision``) found in the local cache.
            output_path: the store folder to create (it must not exist unless ``overwrite``).
            config: a :class:`DiffusionQuantConfig`; ``None`` uses the defaults (int4).
            progress_callback: ``callback(message, fraction)``, called on this thread, throttled
                to ``progress_interval``; an exception it raises is logged and ignored.
            overwrite: replace an existing store at ``output_path`` (only once the new one is complete).
            resume: reuse the verified shards of an interrupted run with the same source and config.
            revision: the branch, tag or commit of a repo id (instead of ``@revision``).
            download: fetch a repo id that is not in the local cache (with progress bars); without it,
                nothing is downloaded and a missing id raises :class:`ModelNotFoundError` saying how to fetch it.
            components: the components of a diffusers pipeline to quantize (default: its denoiser, ``unet``
                or ``transformer``); the others are copied into the store as they are.
            variant: the weight variant to read (``"fp16"`` for ``*.fp16.safetensors``; default: the
                files without a variant).

        Returns:
            The result dict; every key is explained in the docs' Quickstart ("What the result says").

        Raises:
            ConfigurationError: an invalid config or argument.
            QuantizationError: quantizing failed; subclasses :class:`ModelNotFoundError`,
                :class:`ModelFormatError` and :class:`OutputError` say why.
        """
        if self._remote is not None:
            return self._blocking(self._remote.quantize_diffusion_model_async, model_path, output_path, config,
                                  progress_callback, overwrite=overwrite, resume=resume,
                                  revision=revision, download=download, components=components, variant=variant)
        return quantize_model(model_path, output_path, config, overwrite=overwrite, resume=resume,
                              revision=revision, download=download, components=components, variant=variant,
                              progress=plain_progress(progress_callback, self.progress_interval))

    def validate_quality(self, original_path, quantized_path, min_accuracy: Optional[float] = None, *,
                         end_to_end: Optional[bool] = None, num_time_groups: Optional[int] = None) -> dict:
        """Re-read source and store and compare every tensor.

        Returns ``cosine_similarity, compression_ratio, per_layer_accuracy, passed`` and
        more (min_cosine, worst_layers, per_layer details). When the model folder keeps an
        executable graph (``model.onnx``) the original and dequantized networks are also run
        at ``num_time_groups`` noise levels (default: the store's config); the per-level output
        cosine / relative error / PSNR are under ``end_to_end`` (``end_to_end=False`` skips it).
        Raises :class:`ValidationError`.

        Args:
            original_path: the model the store was made from (a path or a cached repo id).
            quantized_path: the store.
            min_accuracy: one cosine threshold for every tensor; ``None`` uses 0.90 / 0.99 / 0.999
                for int2 / int4 / int8.
            end_to_end: ``None`` runs the model's graph when there is one, ``False`` never.
            num_time_groups: noise levels of the end-to-end check (``None``: the store's config).

        Returns:
            The report dict; ``passed`` is True when every quantized tensor reaches its threshold.

        Raises:
            ValidationError: the store is missing or corrupt, or was made from another model.
        """
        if self._remote is not None:
            return self._blocking(self._remote.validate_quality_async, original_path, quantized_path, min_accuracy,
                                  end_to_end=end_to_end, num_time_groups=num_time_groups)
        return validate_store(original_path, quantized_path, min_accuracy=min_accuracy,
                              end_to_end=end_to_end, num_time_groups=num_time_groups)
