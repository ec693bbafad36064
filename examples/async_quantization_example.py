"""Async quantization with ArrowQuant V2: every section of the async API document, runnable.

    python examples/async_quantization_example.py              # the tiny-dream sample model
    python examples/async_quantization_example.py --synthetic  # small generated models only (fastest)
    python examples/async_quantization_example.py --workdir out/  # keep the outputs

Sections: basic quantization, progress tracking, concurrent multi-model quantization,
async validation, deployment profiles, error handling (with fallback to a higher bit
width), quantization and validation together with ``asyncio.gather``, and cancellation
(of one job, and of one model among several).

Inputs: the ``tiny-dream`` sample (a synthetic ~30M-parameter Dream-layout BF16 model,
built into the sample cache on first use, offline) when ``arrow_quant_v2.samples`` is
available, plus a few small generated models. Everything is written under a temporary
folder unless ``--workdir`` is given.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import arrow_quant_v2  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrow_quant_v2 import (  # noqa: E402
    AsyncArrowQuantV2,
    ConfigurationError,
    DiffusionQuantConfig,
    MultiModelError,
    QuantizationError,
)


# -- inputs ------------------------------------------------------------------------------------


def make_demo_model(folder: Path, *, hidden: int, layers: int, seed: int) -> Path:
    """A small diffusion-LM-shaped safetensors model (F32): attention/MLP weights, norms, a time embedding."""
    from safetensors.numpy import save_file

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    tensors = {"model.embed_tokens.weight": w(4 * hidden, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        tensors[p + "self_attn.q_proj.weight"] = w(hidden, hidden)
        tensors[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        tensors[p + "mlp.up_proj.weight"] = w(2 * hidden, hidden)
        tensors[p + "mlp.down_proj.weight"] = w(hidden, 2 * hidden)
    tensors["time_embed.0.weight"] = w(hidden, hidden)
    tensors["model.norm.weight"] = np.ones(hidden, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "dream", "hidden_size": hidden,
                                                    "num_hidden_layers": layers}))
    return folder


def locate_inputs(work: Path, synthetic: bool) -> dict:
    """The example's input models: ``main`` (the sample if possible), three small ones, and a larger one to cancel."""
    inputs = {}
    if not synthetic:
        try:
            from arrow_quant_v2.samples import sample_path

            inputs["main"] = sample_path("tiny-dream")
            print(f"Using the tiny-dream sample model: {inputs['main']}")
        except Exception as e:  # noqa: BLE001 - the samples module is optional here
            print(f"(tiny-dream sample not available: {e}; using a generated model)")
    models = work / "models"
    if "main" not in inputs:
        inputs["main"] = make_demo_model(models / "dream-demo", hidden=512, layers=4, seed=0)
    inputs["small"] = [make_demo_model(models / f"model{i}", hidden=128 * (i + 1), layers=2, seed=i)
                       for i in range(1, 4)]
    inputs["big"] = make_demo_model(models / "big", hidden=768, layers=6, seed=7)  # ~24M params: worth cancelling
    return inputs


# -- the sections of the document ------------------------------------------------------------


async def basic(quantizer: AsyncArrowQuantV2, model: Path, out: Path) -> dict:
    print("\n== Basic async quantization ==")
    result = await quantizer.quantize_diffusion_model_async(
        model_path=str(model),
        output_path=str(out / "dream-int2"),
        config=DiffusionQuantConfig(bit_width=2),
    )
    print(f"Compression ratio: {result['compression_ratio']:.2f}")
    print(f"Cosine similarity: {result['cosine_similarity']:.4f}")
    print(f"Model size: {result['model_size_mb']:.1f} MB, modality: {result['modality']}, "
          f"took {result['quantization_time_s']:.2f} s")
    return result


async def progress_callback(message: str, progress: float):
    """Track quantization progress"""
    print(f"[{progress * 100:.1f}%] {message}")


async def with_progress(quantizer: AsyncArrowQuantV2, model: Path, out: Path) -> None:
    print("\n== With progress tracking ==")
    # Callbacks are throttled to quantizer.progress_interval (5 s by default, as documented);
    # this short job asks for a report every 0.2 s. The first and the final (100%) report
    # always arrive, and the callback runs on this event loop.
    await quantizer.quantize_diffusion_model_async(
        model_path=str(model),
        output_path=str(out / "dream-int4"),
        config=DiffusionQuantConfig(bit_width=4),
        progress_callback=progress_callback,
        progress_interval=0.2,
    )


async def multi_model(quantizer: AsyncArrowQuantV2, small: list, out: Path) -> None:
    print("\n== Concurrent multi-model quantization ==")
    models = [
        (str(small[0]), str(out / "model1-int2"), DiffusionQuantConfig(bit_width=2)),
        (str(small[1]), str(out / "model2-int4"), DiffusionQuantConfig(bit_width=4)),
        (str(small[2]), str(out / "model3-int8"), None),  # Use default config
    ]
    done = []

    async def per_model(model_idx: int, message: str, progress: float):
        if progress >= 1.0:
            done.append(model_idx)

    results = await quantizer.quantize_multiple_models_async(models, per_model)
    for i, result in enumerate(results):
        print(f"Model {i}: {result['compression_ratio']:.2f}x compression (int{result['bit_width']})")
    print(f"Models finished in this order: {done}")


async def validation(quantizer: AsyncArrowQuantV2, model: Path, out: Path) -> None:
    print("\n== Async validation ==")
    report = await quantizer.validate_quality_async(
        original_path=str(model),
        quantized_path=str(out / "dream-int2"),
    )
    print(f"Validation passed: {report['passed']}")
    print(f"Cosine similarity: {report['cosine_similarity']:.4f}")
    worst, cos = report["worst_layers"][0]
    print(f"Layers checked: {len(report['per_layer_accuracy'])}, worst: {worst} ({cos:.4f})")


async def profiles(quantizer: AsyncArrowQuantV2, model: Path, out: Path) -> None:
    print("\n== Deployment profiles ==")
    names = ("edge", "local", "cloud")
    results = await asyncio.gather(*(
        quantizer.quantize_diffusion_model_async(str(model), str(out / f"dream-{name}"),
                                                 config=DiffusionQuantConfig.from_profile(name))
        for name in names))
    for name, result in zip(names, results):
        print(f"{name}: int{result['bit_width']}, {result['model_size_mb']:.1f} MB measured, "
              f"{result['compression_ratio']:.2f}x compression, cosine {result['cosine_similarity']:.4f}")


async def error_handling(quantizer: AsyncArrowQuantV2, model: Path, small: list, out: Path) -> None:
    print("\n== Error handling ==")
    try:
        await quantizer.quantize_diffusion_model_async(
            model_path=str(out / "invalid" / "path"),
            output_path=str(out / "invalid-output"),
        )
    except QuantizationError as e:
        print(f"Quantization failed: {e}")

    try:
        await quantizer.quantize_diffusion_model_async(str(model), str(out / "never"),
                                                       config=DiffusionQuantConfig(bit_width=7))
    except ConfigurationError as e:
        print(f"Invalid configuration: {e}")

    # Fallback to a higher bit width: int2 with a strict accuracy floor and fail_fast
    # raises (naming the tensor and its cosine) instead of falling back layer by layer.
    strict = DiffusionQuantConfig(bit_width=2, min_accuracy=0.97, fail_fast=True)
    try:
        result = await quantizer.quantize_diffusion_model_async(str(model), str(out / "dream-strict"), config=strict)
    except QuantizationError as e:
        print(f"Quantization failed: {e}")
        result = await quantizer.quantize_diffusion_model_async(
            str(model), str(out / "dream-strict"),
            config=DiffusionQuantConfig(bit_width=4),
        )
    print(f"Fallback result: int{result['bit_width']}, cosine {result['cosine_similarity']:.4f}")

    # Several models: the ones that work are kept, the error names every one that failed.
    try:
        await quantizer.quantize_multiple_models_async([
            (str(small[0]), str(out / "batch-ok"), None),
            (str(out / "missing-model"), str(out / "batch-bad"), None),
        ])
    except MultiModelError as e:
        print(f"Quantization failed: {e}")
        kept = [r["quantized_path"] for r in e.results if isinstance(r, dict)]
        print(f"Kept the finished stores: {[Path(p).name for p in kept]}")


async def quantize_and_validate(quantizer: AsyncArrowQuantV2, model: Path, small: list, out: Path) -> None:
    print("\n== Quantize and validate concurrently (asyncio.gather) ==")
    # Run quantization and validation concurrently
    quant_task = quantizer.quantize_diffusion_model_async(str(small[1]), str(out / "model2-int8"),
                                                          DiffusionQuantConfig(bit_width=8))
    val_task = quantizer.validate_quality_async(str(model), str(out / "dream-int4"))

    quant_result, val_result = await asyncio.gather(quant_task, val_task)
    print(f"Quantized: {Path(quant_result['quantized_path']).name}, cosine {quant_result['cosine_similarity']:.4f}")
    print(f"Validated: passed={val_result['passed']}, cosine {val_result['cosine_similarity']:.4f}")


async def cancellation(quantizer: AsyncArrowQuantV2, big: Path, small: list, out: Path) -> None:
    print("\n== Task cancellation ==")
    running = asyncio.Event()

    def on_event(event):  # raw events: stage, tensor, counts, bytes
        if event.stage == "quantize" and event.bytes_done > 0:
            running.set()

    task = asyncio.create_task(
        quantizer.quantize_diffusion_model_async(str(big), str(out / "big-int4"), on_event=on_event,
                                                 progress_interval=0)
    )

    # Cancel once it is under way (the document waits 60 s; this model is smaller)
    await running.wait()
    started = time.perf_counter()
    task.cancel()

    try:
        await task
    except asyncio.CancelledError:
        print("Quantization cancelled")
    print(f"  stopped {1000 * (time.perf_counter() - started):.0f} ms after cancel(); "
          f"output left behind: {(out / 'big-int4').exists()}")

    # Cancelling the task of quantize_multiple_models_async cancels all its models. To be
    # able to cancel one model and keep the others, run one task per model and gather them.
    print("Cancel one model of several:")
    running.clear()
    tasks = {
        "big": asyncio.create_task(quantizer.quantize_diffusion_model_async(
            str(big), str(out / "big-again"), on_event=on_event, progress_interval=0)),
        "model1": asyncio.create_task(quantizer.quantize_diffusion_model_async(str(small[0]), str(out / "model1-int4"))),
        "model2": asyncio.create_task(quantizer.quantize_diffusion_model_async(str(small[1]), str(out / "model2-int2"),
                                                                               DiffusionQuantConfig(bit_width=2))),
    }
    await running.wait()
    tasks["big"].cancel()
    outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
    for name, outcome in zip(tasks, outcomes):
        if isinstance(outcome, asyncio.CancelledError):
            print(f"  {name}: cancelled")
        elif isinstance(outcome, BaseException):
            print(f"  {name}: failed: {outcome}")
        else:
            print(f"  {name}: done, {outcome['compression_ratio']:.2f}x compression")


async def main(work: Path, synthetic: bool) -> None:
    inputs = locate_inputs(work, synthetic)
    out = work / "outputs"
    out.mkdir(parents=True, exist_ok=True)
    quantizer = AsyncArrowQuantV2()
    try:
        await basic(quantizer, inputs["main"], out)
        await with_progress(quantizer, inputs["main"], out)
        await multi_model(quantizer, inputs["small"], out)
        await validation(quantizer, inputs["main"], out)
        await profiles(quantizer, inputs["main"], out)
        await error_handling(quantizer, inputs["main"], inputs["small"], out)
        await quantize_and_validate(quantizer, inputs["main"], inputs["small"], out)
        await cancellation(quantizer, inputs["big"], inputs["small"], out)
    finally:
        quantizer.close()
    print("\nAll examples finished.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the async API examples.")
    parser.add_argument("--synthetic", action="store_true", help="use small generated models only (no sample cache)")
    parser.add_argument("--workdir", help="write models and outputs here (kept) instead of a temporary folder")
    args = parser.parse_args()
    if args.workdir:
        asyncio.run(main(Path(args.workdir), args.synthetic))
    else:
        with tempfile.TemporaryDirectory(prefix="arrow-quant-async-") as tmp:
            asyncio.run(main(Path(tmp), args.synthetic))
