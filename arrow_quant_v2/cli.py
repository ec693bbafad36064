"""arrow-quant: quantize, validate and inspect models from the shell, and serve the app.

Conventions every command follows (a new command gets them from :func:`add_command`):

* exit codes: :class:`ExitCode`, mapped from the error types by :func:`exit_code_for`, in this one
  place (``arrow-quant --help`` lists them);
* ``-v`` / ``-q`` set the log level through :mod:`logging` (``-q`` also hides progress bars);
* ``--json`` prints the command's results as JSON on stdout (messages and progress go to stderr);
* help texts are plain text (no reStructuredText markup): they are what ``--help`` shows.

Models may be given as paths or as sample names (``tiny-dream``, ``terrain-unet``;
``arrow-quant samples`` lists them), which are built on first use.
"""
from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ._version import __version__
from .config import BIT_WIDTHS, GROUP_SIZES, PROFILES, TARGET_RUNTIMES, DiffusionQuantConfig
from .export import FORMATS, SAFETENSORS_DTYPES
from .errors import (
    ArrowQuantError,
    ConfigurationError,
    ExportError,
    ModelFormatError,
    ModelNotFoundError,
    OutputError,
    ValidationError,
)

log = logging.getLogger("arrow_quant_v2.cli")


class ExitCode(enum.IntEnum):
    """What ``arrow-quant``'s exit status means (the same for every command)."""

    OK = 0
    VALIDATION_FAILED = 1
    USAGE = 2
    INPUT = 3
    OUTPUT = 4
    FAILED = 5
    CANCELLED = 130


#: One line per exit code, for ``--help`` and the docs.
EXIT_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.VALIDATION_FAILED: "validate: a tensor is below its accuracy threshold",
    ExitCode.USAGE: "bad arguments or config values",
    ExitCode.INPUT: "the model, store or GGUF file cannot be used: not found, damaged, not the source, or not exportable",
    ExitCode.OUTPUT: "the output cannot be written: it exists, lies inside the input, or the disk is full",
    ExitCode.FAILED: "quantizing failed for another reason (e.g. --fail-fast and an accuracy miss)",
    ExitCode.CANCELLED: "cancelled (Ctrl-C)",
}


class UsageError(ArrowQuantError):
    """The command line asks for something that cannot be done as given."""


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit status for an error a command raised."""
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.CANCELLED
    if isinstance(error, (UsageError, ConfigurationError)):
        return ExitCode.USAGE
    if isinstance(error, OutputError):
        return ExitCode.OUTPUT
    if isinstance(error, (ModelNotFoundError, ModelFormatError, ValidationError, ExportError)):
        return ExitCode.INPUT
    return ExitCode.FAILED


def resolve_model(spec: str, revision: Optional[str] = None, download: bool = False) -> Path:
    """A path, a sample name (built into the cache on first use), or a Hugging Face repo id
    (``org/name[@revision]``, from the local cache; fetched only with ``download``)."""
    path = Path(spec)
    if path.exists() and revision is None:
        return path
    from . import hub, samples

    if spec in samples.SAMPLE_NAMES and revision is None:
        return samples.sample_path(spec)
    return hub.resolve(spec, revision=revision, download=download)  # a path that does not exist comes back as is


def _add_model_source_options(p: argparse.ArgumentParser, *, download: bool, selection: bool) -> None:
    p.add_argument("--revision", metavar="REV",
                   help="branch, tag or commit of a Hugging Face repo id (same as MODEL@REV)")
    if download:
        p.add_argument("--download", action="store_true",
                       help="download a Hugging Face repo id that is not in the local cache (needs the hub extra)")
    if selection:
        p.add_argument("--components", metavar="NAMES", type=lambda v: [c for c in v.split(",") if c],
                       help="comma-separated components of a diffusers pipeline to quantize (default: its denoiser, "
                            "unet or transformer); the others are copied as they are")
        p.add_argument("--variant", metavar="NAME",
                       help="weight variant to read, e.g. fp16 for *.fp16.safetensors (default: the files without one)")


def _progress_bar(desc: str, enabled: bool):
    """A tqdm bar per stage and an engine progress sink that drives it: source bytes while they
    are read (quantizing, the per-layer check), percent of the stage otherwise (the end-to-end
    check); a new stage starts a new bar, so each one's rate and ETA are its own."""
    from tqdm import tqdm

    from .progress import STAGE_LABELS

    holder = {}  # the bar appears with the first event, so a bad path errors without one

    class Bar:
        def close(self):
            if "bar" in holder:
                holder["bar"].close()

    def sink(event) -> None:
        new_stage = event.stage != holder.get("stage")
        holder["stage"] = event.stage
        if new_stage:  # -v: one line per stage; -vv: every event
            log.info("%s: %s", event.stage, event.message)
        else:
            log.debug("%s: %s", event.stage, event.message)
        if event.stage == "done":
            return
        by_bytes = bool(event.bytes_total) and event.stage != "end-to-end"
        if new_stage or "bar" not in holder:
            Bar().close()
            label = f"{desc}: {STAGE_LABELS.get(event.stage, event.stage)}" if event.stage in ("validate", "end-to-end") \
                else desc
            holder["bar"] = tqdm(total=max(event.bytes_total, 1) if by_bytes else 100, unit="B" if by_bytes else "%",
                                 unit_scale=by_bytes, desc=label, disable=not enabled, leave=False, file=sys.stderr)
        bar = holder["bar"]
        if by_bytes and bar.total != event.bytes_total:
            bar.total = event.bytes_total
        bar.set_postfix_str(event.message[-60:], refresh=False)
        now = event.bytes_done if by_bytes else round(event.stage_progress * 100)
        bar.update(now - bar.n)  # redraws at most every mininterval

    return Bar(), sink


def _table(rows: List[Sequence], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.6f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def print_json(obj) -> None:
    """A command's ``--json`` output."""
    print(json.dumps(obj, indent=1, default=str))


def _config_from(args) -> DiffusionQuantConfig:
    overrides = {}
    if args.bits is not None:
        overrides["bit_width"] = args.bits
    if args.group_size is not None:
        overrides["group_size"] = args.group_size
    if args.encoding is not None:
        overrides["encoding"] = args.encoding
    if args.target_runtime is not None:
        overrides["target_runtime"] = args.target_runtime
    if args.min_accuracy is not None:
        overrides["min_accuracy"] = args.min_accuracy
    if args.fail_fast:
        overrides["fail_fast"] = True
    if args.no_time_aware:
        overrides["enable_time_aware"] = False
    if args.target_mb is not None:
        overrides["target_model_size_mb"] = args.target_mb
    if args.spatial:
        overrides["enable_spatial"] = True
    if args.calibrate:
        overrides["calibration"] = "graph"
    if args.calibration_samples is not None:
        overrides["calibration_samples"] = args.calibration_samples
    if args.calibration_inputs is not None:
        overrides["calibration_inputs"] = args.calibration_inputs
    if args.profile:
        return DiffusionQuantConfig.from_profile(args.profile, **overrides)
    return DiffusionQuantConfig(**overrides)


def _on_cluster(address: str, method: str, *args, **kwargs):
    """Run one coroutine of the async API on the Dask scheduler at ``address``."""
    import asyncio

    from .aio import AsyncArrowQuantV2

    async def run():
        async with AsyncArrowQuantV2(cluster=address, progress_interval=0.2) as quantizer:
            return await getattr(quantizer, method)(*args, **kwargs)

    return asyncio.run(run())


def cmd_quantize(args) -> int:
    from .engine import quantize_model

    if args.quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    model = resolve_model(args.model, args.revision, args.download)
    config = _config_from(args)
    log.info("quantizing %s into %s with %r", model, args.output, config)
    bar, sink = _progress_bar(f"quantizing {model.name}", not args.json and args.quiet == 0)
    try:
        if args.cluster:
            result = _on_cluster(args.cluster, "quantize_diffusion_model_async", model, args.output, config,
                                 on_event=sink, overwrite=args.overwrite, resume=args.resume,
                                 components=args.components, variant=args.variant)
        else:
            result = quantize_model(model, args.output, config, progress=sink, overwrite=args.overwrite,
                                    resume=args.resume, components=args.components, variant=args.variant)
    finally:
        bar.close()
    if args.json:
        print_json(result)
        return ExitCode.OK
    print(f"quantized {model} -> {result['quantized_path']}  ({config!r})")
    rows = [(k, result[k]) for k in ("modality", "bit_width", "bits_per_weight", "model_size_mb", "source_size_mb",
                                     "compression_ratio", "cosine_similarity", "min_cosine", "worst_layer",
                                     "quantization_time_s")]
    rows.append(("tensors per width", ", ".join(f"{k}: {v['tensors']}" for k, v in sorted(result["per_bits"].items()))))
    rows.append(("fallbacks", len(result["fallbacks"])))
    print(_table(rows, ("figure", "value")))
    for w in result["warnings"]:
        log.warning("%s", w)
    return ExitCode.OK


def cmd_validate(args) -> int:
    from .validation import validate_store

    options = dict(min_accuracy=args.min_accuracy, end_to_end=False if args.no_end_to_end else None,
                   num_time_groups=args.time_groups)
    if args.cluster:
        report = _on_cluster(args.cluster, "validate_quality_async", resolve_model(args.original, args.revision), args.store, **options)
    else:
        bar, sink = _progress_bar("validating", not args.json and args.quiet == 0)
        try:
            report = validate_store(resolve_model(args.original, args.revision), args.store, progress=sink, **options)
        finally:
            bar.close()
    if args.json:
        print_json(report)
    else:
        rows = [(k, report[k]) for k in ("passed", "cosine_similarity", "min_cosine", "compression_ratio",
                                         "model_size_mb", "bits_per_weight", "num_quantized", "num_lossless")]
        e2e = report.get("end_to_end") or {}
        if e2e.get("available"):
            rows += [("end-to-end mean output cosine", e2e["mean_cosine"]),
                     ("end-to-end worst output cosine", f"{e2e['worst_cosine']:.6f} at sigma {e2e['worst_sigma']:g}"),
                     ("end-to-end mean PSNR dB", e2e["mean_psnr_db"])]
        elif e2e:
            rows.append(("end-to-end", e2e.get("reason", "not run")))
        print(_table(rows, ("figure", "value")))
        print("\nworst layers:")
        print(_table([(n, c, report["per_layer"][n]["bits"]) for n, c in report["worst_layers"]],
                     ("tensor", "cosine", "bits")))
    return ExitCode.OK if report["passed"] else ExitCode.VALIDATION_FAILED


def cmd_export(args) -> int:
    from .export import export_store

    bar, sink = _progress_bar(f"exporting {Path(args.output).name}", not args.json and args.quiet == 0)
    try:
        result = export_store(args.store, args.output, format=args.format, dtype=args.dtype,
                              overwrite=args.overwrite, progress=sink)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return ExitCode.OK
    print(f"exported {args.store} -> {result['path']} ({result['format']}, {result['bytes'] / 2**20:.2f} MiB)")
    if result["format"] == "gguf":
        print(f"architecture {result['architecture']}, tensors: "
              + ", ".join(f"{k} {v}" for k, v in sorted(result["ggml_types"].items())))
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for n in result["notes"]:
        print(f"note: {n}")
    return ExitCode.OK


def _inspect_gguf(path: Path, as_json: bool) -> int:
    from .gguf_io import open_gguf

    gf = open_gguf(path)
    rows = gf.summary()
    if as_json:
        print(json.dumps({"format": "gguf", "architecture": gf.architecture, "tensors": rows}, indent=1, default=str))
        return ExitCode.OK
    print(_table([(r["name"], r["source"] or "", "x".join(map(str, r["shape"])), r["ggml_type"],
                   round(r["bits_per_weight"], 3), "" if r["cosine"] is None else r["cosine"]) for r in rows],
                 ("tensor", "source name", "shape", "type", "bpw", "cosine")))
    print(f"\n{len(rows)} tensors, {path.stat().st_size / 2**20:.2f} MiB, architecture {gf.architecture}"
          f"{'' if gf.provenance else ' (not written by ArrowQuant: compare it with its source via validate)'}")
    return ExitCode.OK


def cmd_inspect(args) -> int:
    path = resolve_model(args.path, args.revision)
    from .gguf_io import is_gguf_file

    if is_gguf_file(path):
        return _inspect_gguf(path, args.json)
    if (path / "manifest.json").is_file():
        from .store import load_quantized

        store = load_quantized(path)
        rows = [(e["name"], "x".join(map(str, e["shape"])), e["dtype"], e["encoding"], e["bits"],
                 round(e["bits_per_weight"], 3), e["cosine"], e["reason"]) for e in store.summary()]
        if args.json:
            print_json({"manifest": store.manifest, "tensors": store.summary()})
            return ExitCode.OK
        print(_table(rows, ("tensor", "shape", "dtype", "encoding", "bits", "bpw", "cosine", "reason")))
        t = store.manifest.get("totals", {})
        figure = {k: t.get(k) if isinstance(t.get(k), (int, float)) else math.nan
                  for k in ("model_size_mb", "compression_ratio", "cosine_similarity")}
        print(f"\n{len(rows)} tensors, {figure['model_size_mb']:.2f} MiB, compression {figure['compression_ratio']:.2f}x, "
              f"cosine {figure['cosine_similarity']:.6f}, made from {store.manifest.get('source', {}).get('path', '?')}")
        return ExitCode.OK
    from .plan import Planner, detect_modality
    from .source import open_model

    source = open_model(path, components=args.components, variant=args.variant)
    config = _config_from(args)
    planner = Planner(config)
    modality, why = detect_modality(source, config.modality)
    plans = [(n, "x".join(map(str, t.shape)), t.dtype, planner.plan(t).reason) for n, t in source.tensors.items()]
    if args.json:
        print_json({"modality": modality, "modality_reason": why, "config": config.to_dict(),
                    "tensors": [dict(zip(("name", "shape", "dtype", "plan"), p)) for p in plans]})
        return ExitCode.OK
    print(_table(plans, ("tensor", "shape", "dtype", f"plan ({config!r})")))
    print(f"\n{len(plans)} tensors, {source.total_bytes / 2**20:.2f} MiB, modality {modality} ({why})")
    return ExitCode.OK


def cmd_samples(args) -> int:
    from . import samples

    if args.build:
        path = samples.sample_path(args.build)
        if args.json:
            print_json({"name": args.build, "path": str(path)})
        else:
            print(path)
        return ExitCode.OK
    infos = samples.list_samples()
    if args.json:
        print_json([{"name": s.name, "modality": s.modality, "built": s.available, "path": str(s.path),
                     "params": s.params, "source": s.source, "license": s.license, "description": s.description}
                    for s in infos])
        return ExitCode.OK
    rows = [(s.name, s.modality, "yes" if s.available else "no", s.description) for s in infos]
    print(_table(rows, ("name", "modality", "built", "description")))
    return ExitCode.OK


def cmd_serve(args) -> int:
    """``panel serve`` of the app module inside this package, with safe defaults (localhost only)."""
    import importlib.util

    if importlib.util.find_spec("panel") is None:
        raise UsageError("the app needs the [app] extra: pip install 'arrow-quant-v2[app]'")
    script = Path(__file__).resolve().parent / "ui" / "app.py"  # arrow_quant_v2.ui.app, run by panel as a script
    setup = Path(__file__).resolve().parent / "ui" / "serve_setup.py"  # security headers, /components guard
    cmd = [sys.executable, "-m", "panel", "serve", str(script), "--address", args.address, "--port", str(args.port),
           "--setup", str(setup)]
    if args.address in ("127.0.0.1", "localhost"):
        cmd += ["--allow-websocket-origin", f"localhost:{args.port}", "--allow-websocket-origin", f"127.0.0.1:{args.port}"]
    if args.show:
        cmd.append("--show")
    os.execv(sys.executable, cmd)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=PROFILES, help="deployment profile: edge (int2), local (int4), cloud (int8)")
    p.add_argument("--bits", type=int, choices=BIT_WIDTHS, help="bit width of ordinary layers")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help="group size (0 = per row)")
    p.add_argument("--encoding", help="encoding name (default: the best for the bit width)")
    p.add_argument("--target-runtime", choices=[r for r in TARGET_RUNTIMES if r],
                   help="gguf: store only ggml block types (Q8_0/Q6_K/Q5_K/Q4_K/Q3_K/Q2_K) so a GGUF export is lossless")
    p.add_argument("--min-accuracy", type=float, help="cosine every tensor must reach (else fall back to more bits)")
    p.add_argument("--fail-fast", action="store_true", help="raise instead of falling back to more bits")
    p.add_argument("--no-time-aware", action="store_true", help="do not protect time-conditioning modules")
    p.add_argument("--target-mb", type=float, help="size budget in MiB: mixed precision spends bits where they buy most")
    p.add_argument("--spatial", action="store_true", help="per-layer group size (largest that reaches min_accuracy)")
    p.add_argument("--calibrate", action="store_true",
                   help="run the model's graph (model.onnx) across the noise levels and round with error compensation")
    p.add_argument("--calibration-samples", type=int, help="calibration inputs per noise level (default "
                   f"{DiffusionQuantConfig.calibration_samples})")
    p.add_argument("--calibration-inputs", metavar="NPZ", help=".npz of graph inputs replacing the synthetic ones")


def _common_options() -> argparse.ArgumentParser:
    """The options every command takes: log level (and, through it, progress bars)."""
    common = argparse.ArgumentParser(add_help=False)
    level = common.add_argument_group("output")
    level.add_argument("-v", "--verbose", action="count", default=0,
                       help="log more: -v for progress messages, -vv for debugging detail")
    level.add_argument("-q", "--quiet", action="count", default=0,
                       help="log errors only and show no progress bar")
    return common


def add_command(sub, name: str, func: Callable, *, help: str, description: Optional[str] = None,
                json_output: bool = True) -> argparse.ArgumentParser:
    """A subcommand with the shared conventions: -v/-q, and --json when it prints results."""
    p = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                       parents=[_common_options()])
    if json_output:
        p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.set_defaults(func=func)
    return p


def _exit_codes_text() -> str:
    return "exit status:\n" + "\n".join(f"  {int(c):<4} {EXIT_MEANINGS[c]}" for c in ExitCode)


MODEL_HELP = "model folder, .safetensors file, sample name, or Hugging Face repo id (org/name[@REV])"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrow-quant", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize, validate and inspect diffusion models from the shell, and serve the app.",
        epilog=_exit_codes_text())
    parser.add_argument("--version", action="version", version=f"arrow-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = add_command(sub, "quantize", cmd_quantize, help="quantize a model into an ArrowQuant store")
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("output", help="output store folder (must not exist unless --overwrite)")
    _add_config_options(q)
    _add_model_source_options(q, download=True, selection=True)
    q.add_argument("--overwrite", action="store_true", help="replace an existing store at OUTPUT")
    q.add_argument("--resume", action="store_true", help="reuse what an interrupted run with the same inputs finished")
    q.add_argument("--cluster", metavar="ADDRESS", help="run on the Dask scheduler at ADDRESS (e.g. tcp://host:8786); "
                   "paths must be shared with its workers")

    v = add_command(sub, "validate", cmd_validate, help="compare a store or any GGUF file with its source, tensor by tensor")
    v.add_argument("original", help="the model the store was made from: " + MODEL_HELP)
    v.add_argument("store", help="the store folder or GGUF file to check")
    v.add_argument("--min-accuracy", type=float,
                   help="one cosine threshold for every tensor (default: 0.90 / 0.99 / 0.999 for int2 / int4 / int8)")
    _add_model_source_options(v, download=False, selection=False)
    v.add_argument("--no-end-to-end", action="store_true", help="skip running the model's ONNX graph (model.onnx)")
    v.add_argument("--time-groups", type=int, help="noise levels for the end-to-end check (default: the store's config)")
    v.add_argument("--cluster", metavar="ADDRESS", help="run on the Dask scheduler at ADDRESS")

    i = add_command(sub, "inspect", cmd_inspect,
                    help="list a store's, a GGUF file's or a model's tensors with their plan and figures")
    i.add_argument("path", help="a store folder, a GGUF file, or a model to show the plan for: " + MODEL_HELP)
    _add_config_options(i)
    _add_model_source_options(i, download=False, selection=True)

    x = add_command(sub, "export", cmd_export,
                    help="export a store to GGUF (llama.cpp, ComfyUI-GGUF, diffusers) or dequantized safetensors")
    x.add_argument("store", help="an ArrowQuant store folder")
    x.add_argument("output", help="a .gguf file, or a folder for safetensors")
    x.add_argument("--format", choices=FORMATS, help="default: gguf for a .gguf path, else safetensors")
    x.add_argument("--dtype", choices=SAFETENSORS_DTYPES,
                   help="float type of dequantized tensors (safetensors only; default float16)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file")

    s = add_command(sub, "samples", cmd_samples, help="list the sample models (or build one)")
    s.add_argument("--build", metavar="NAME", help="build sample NAME into the cache (if missing) and print its folder")

    sv = add_command(sub, "serve", cmd_serve, json_output=False,
                     help="serve the Panel app (localhost only by default)")
    sv.add_argument("--address", default="127.0.0.1",
                    help="interface to listen on (default 127.0.0.1; other machines are refused unless "
                         "ARROW_QUANT_ALLOW_REMOTE=1)")
    sv.add_argument("--port", type=int, default=5006, help="port to listen on (default 5006)")
    sv.add_argument("--show", action="store_true", help="open the page in a browser")
    return parser


def configure_logging(verbose: int, quiet: int) -> None:
    """WARNING by default; -v INFO, -vv DEBUG; -q ERROR. Messages go to stderr."""
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr)  # no-op if the host set logging up
    logging.getLogger().setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its :class:`ExitCode` (argparse itself exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return int(ExitCode.CANCELLED)
    except ArrowQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(exit_code_for(e))
    except BrokenPipeError:  # e.g. `arrow-quant inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
