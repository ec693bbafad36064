"""``arrow-quant``: quantize, validate and inspect from the shell.

Models may be given as paths or as sample names (``tiny-dream``, ``terrain-unet``;
``arrow-quant samples`` lists them), which are built on first use.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__
from .config import BIT_WIDTHS, GROUP_SIZES, PROFILES, DiffusionQuantConfig
from .errors import ArrowQuantError


def resolve_model(spec: str) -> Path:
    """A path, or a sample name (built into the cache on first use)."""
    path = Path(spec)
    if path.exists():
        return path
    from . import samples

    names = [s.name for s in samples.list_samples()]
    if spec in names:
        return samples.sample_path(spec)
    return path  # let the engine raise ModelNotFoundError naming it


def _progress_bar(desc: str, enabled: bool):
    """A tqdm bar over source bytes and an engine progress sink that drives it."""
    from tqdm import tqdm

    holder = {}  # the bar appears with the first event, so a bad path errors without one

    class Bar:
        def close(self):
            if "bar" in holder:
                holder["bar"].close()

    def sink(event) -> None:
        if "bar" not in holder:
            holder["bar"] = tqdm(total=max(event.bytes_total, 1), unit="B", unit_scale=True, desc=desc,
                                 disable=not enabled, leave=False, file=sys.stderr)
        bar = holder["bar"]
        if event.bytes_total and bar.total != event.bytes_total:
            bar.total = event.bytes_total
        bar.set_postfix_str(event.message[-60:], refresh=False)
        bar.update(event.bytes_done - bar.n)  # redraws at most every mininterval

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


def _config_from(args) -> DiffusionQuantConfig:
    overrides = {}
    if args.bits is not None:
        overrides["bit_width"] = args.bits
    if args.group_size is not None:
        overrides["group_size"] = args.group_size
    if args.encoding is not None:
        overrides["encoding"] = args.encoding
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
    if args.profile:
        return DiffusionQuantConfig.from_profile(args.profile, **overrides)
    return DiffusionQuantConfig(**overrides)


def cmd_quantize(args) -> int:
    from .engine import quantize_model

    model = resolve_model(args.model)
    config = _config_from(args)
    bar, sink = _progress_bar(f"quantizing {model.name}", not args.json and not args.quiet)
    try:
        result = quantize_model(model, args.output, config, progress=sink, overwrite=args.overwrite,
                                resume=args.resume)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    print(f"quantized {model} -> {result['quantized_path']}  ({config!r})")
    rows = [(k, result[k]) for k in ("modality", "bit_width", "bits_per_weight", "model_size_mb", "source_size_mb",
                                     "compression_ratio", "cosine_similarity", "min_cosine", "worst_layer",
                                     "quantization_time_s")]
    rows.append(("tensors per width", ", ".join(f"{k}: {v['tensors']}" for k, v in sorted(result["per_bits"].items()))))
    rows.append(("fallbacks", len(result["fallbacks"])))
    print(_table(rows, ("figure", "value")))
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from .validation import validate_store

    report = validate_store(resolve_model(args.original), args.store, min_accuracy=args.min_accuracy,
                            end_to_end=False if args.no_end_to_end else None, num_time_groups=args.time_groups)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
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
    return 0 if report["passed"] else 1


def cmd_inspect(args) -> int:
    path = resolve_model(args.path)
    if (path / "manifest.json").is_file():
        from .store import load_quantized

        store = load_quantized(path)
        rows = [(e["name"], "x".join(map(str, e["shape"])), e["dtype"], e["encoding"], e["bits"],
                 round(e["bits_per_weight"], 3), e["cosine"], e["reason"]) for e in store.summary()]
        if args.json:
            print(json.dumps({"manifest": store.manifest, "tensors": store.summary()}, indent=1, default=str))
            return 0
        print(_table(rows, ("tensor", "shape", "dtype", "encoding", "bits", "bpw", "cosine", "reason")))
        t = store.manifest["totals"]
        print(f"\n{len(rows)} tensors, {t['model_size_mb']:.2f} MiB, compression {t['compression_ratio']:.2f}x, "
              f"cosine {t['cosine_similarity']:.6f}, made from {store.manifest['source']['path']}")
        return 0
    from .plan import Planner, detect_modality
    from .source import open_model

    source = open_model(path)
    config = _config_from(args)
    planner = Planner(config)
    modality, why = detect_modality(source, config.modality)
    plans = [(n, "x".join(map(str, t.shape)), t.dtype, planner.plan(t).reason) for n, t in source.tensors.items()]
    if args.json:
        print(json.dumps({"modality": modality, "modality_reason": why, "config": config.to_dict(),
                          "tensors": [dict(zip(("name", "shape", "dtype", "plan"), p)) for p in plans]}, indent=1))
        return 0
    print(_table(plans, ("tensor", "shape", "dtype", f"plan ({config!r})")))
    print(f"\n{len(plans)} tensors, {source.total_bytes / 2**20:.2f} MiB, modality {modality} ({why})")
    return 0


def cmd_samples(args) -> int:
    from . import samples

    if args.build:
        print(samples.sample_path(args.build))
        return 0
    rows = [(s.name, s.modality, "yes" if s.available else "no", s.description) for s in samples.list_samples()]
    print(_table(rows, ("name", "modality", "built", "description")))
    return 0


def cmd_serve(args) -> int:
    """``panel serve`` of the app module inside this package, with safe defaults (localhost only)."""
    import importlib.util

    if importlib.util.find_spec("panel") is None:
        raise ArrowQuantError("the app needs the [app] extra: pip install 'arrow-quant-v2[app]'")
    script = Path(__file__).resolve().parent / "ui" / "app.py"  # arrow_quant_v2.ui.app, run by panel as a script
    cmd = [sys.executable, "-m", "panel", "serve", str(script), "--address", args.address, "--port", str(args.port)]
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
    p.add_argument("--min-accuracy", type=float, help="cosine every tensor must reach (else fall back to more bits)")
    p.add_argument("--fail-fast", action="store_true", help="raise instead of falling back to more bits")
    p.add_argument("--no-time-aware", action="store_true", help="do not protect time-conditioning modules")
    p.add_argument("--target-mb", type=float, help="size budget in MiB: mixed precision spends bits where they buy most")
    p.add_argument("--spatial", action="store_true", help="per-layer group size (largest that reaches min_accuracy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arrow-quant", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"arrow-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model into an ArrowQuant store")
    q.add_argument("model", help="model folder, .safetensors file, or sample name")
    q.add_argument("output", help="output store folder (must not exist unless --overwrite)")
    _add_config_options(q)
    q.add_argument("--overwrite", action="store_true", help="replace an existing store at OUTPUT")
    q.add_argument("--resume", action="store_true", help="reuse what an interrupted run with the same inputs finished")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser("validate", help="compare a store with its source, tensor by tensor")
    v.add_argument("original")
    v.add_argument("store")
    v.add_argument("--min-accuracy", type=float)
    v.add_argument("--no-end-to-end", action="store_true", help="skip running the model's ONNX graph (model.onnx)")
    v.add_argument("--time-groups", type=int, help="noise levels for the end-to-end check (default: the store's config)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("inspect", help="list a store's or a model's tensors with their plan and figures")
    i.add_argument("path")
    _add_config_options(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("samples", help="list the sample models (or build one)")
    s.add_argument("--build", metavar="NAME")
    s.set_defaults(func=cmd_samples)

    sv = sub.add_parser("serve", help="serve the Panel app (localhost only by default)")
    sv.add_argument("--address", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=5006)
    sv.add_argument("--show", action="store_true")
    sv.set_defaults(func=cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ArrowQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `arrow-quant inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
