"""MkDocs hooks: the parts of the docs that are generated from the code.

A page asks for a generated block with a line ``<!-- gen:NAME -->``; the hook replaces
that line with the markdown of generator ``NAME`` below, built from the code at build
time, so the docs cannot drift from it:

* ``config-fields``   every config field, from :func:`arrow_quant_v2.config.field_specs`
* ``profile-settings``  what each profile sets, from ``config.PROFILE_DEFAULTS``
* ``profiles-measured``  ``docs/generated/profiles.md``, written by ``scripts/profile_table.py``
  (measuring takes a while, so that one is a committed file; the build fails if it is missing)
* ``sensitivity-measured``  ``benchmarks/results/bench_sensitivity.json``, written by
  ``benchmarks/bench_sensitivity.py`` (committed; the build fails if it is missing)
* ``min-accuracy``, ``plan-modules``, ``default-encodings``: from ``config`` / ``plan`` / ``encodings``
* ``store-schema``    the Parquet columns, from ``store.SCHEMA`` and the comments beside it
* ``encodings``       each encoding's byte layout: its class docstring in ``encodings.py``
* ``cli-help``        ``arrow-quant <command> --help`` for every command
* ``cli-exit-codes``  the exit status table, from ``cli.EXIT_MEANINGS``

The calibration table is not generated here: it is the README's figure block
(``<!-- figures:calibration -->``), rendered into docs/calibration.md by ``scripts/render_figures.py``.

An unknown marker is an error, so a typo fails the (strict) build. The screenshots the UI
tests save in the repository's ``assets/`` folder are served as ``assets/*.png``.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import textwrap
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!-- gen:([a-z0-9-]+) -->[ \t]*$", re.M)
log = logging.getLogger("mkdocs.hooks.arrowquant")


# -- generators ---------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def _code(v) -> str:
    return f"`{v!r}`"


def _allowed(name: str, spec: dict) -> str:
    from arrow_quant_v2 import encodings

    if spec.get("choices") is not None:
        return ", ".join(_code(c) for c in spec["choices"])
    if spec.get("bounds") is not None:
        lo, hi = spec["bounds"]
        kind = "integer" if spec["type"] == "int" else "number"
        hi_s = "∞" if hi == float("inf") else f"{hi:,}"
        extra = ", or `None`" if str(spec["type"]).startswith("Optional") else ""
        return f"{kind} in [{lo:,}, {hi_s}]{extra}"
    kind = spec.get("kind")
    if kind == "encoding":
        return "`None` or " + ", ".join(_code(n) for n in encodings.encoding_names())
    if kind == "patterns":
        return "list of glob patterns (`fnmatch`, case-sensitive)"
    if kind == "rules":
        return "dict `{glob pattern: bits}`, bits one of `0` (lossless), `2`, `4`, `8`"
    if isinstance(spec["default"], bool):
        return "`True`, `False`"
    return "—"


def gen_config_fields() -> str:
    from arrow_quant_v2.config import field_specs

    rows = ["| field | type | default | allowed values | effect |", "|---|---|---|---|---|"]
    for name, spec in field_specs().items():
        doc = _cell(spec["doc"])
        allowed = _cell(_allowed(name, spec))
        rows.append(f"| `{name}` | `{spec['type']}` | {_code(spec['default'])} | {allowed} | {doc} |")
    return "\n".join(rows)


def gen_profile_settings() -> str:
    from arrow_quant_v2.config import PROFILE_DEFAULTS, field_specs

    specs = field_specs()
    fields = sorted({k for p in PROFILE_DEFAULTS.values() for k in p}, key=list(specs).index)
    rows = ["| profile | " + " | ".join(f"`{f}`" for f in fields) + " |",
            "|---|" + "---|" * len(fields)]
    for name, values in PROFILE_DEFAULTS.items():
        cells = [_code(values[f]) if f in values else f"{_code(specs[f]['default'])} (default)" for f in fields]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def gen_profiles_measured() -> str:
    """The measured table; refuses a table measured with profiles that have changed since."""
    import json

    from arrow_quant_v2 import DiffusionQuantConfig

    path = DOCS / "generated" / "profiles.md"
    rerun = "run `python scripts/profile_table.py` to measure the profiles"
    if not path.is_file():
        raise PluginError(f"{path} is missing: {rerun}")
    text = path.read_text(encoding="utf-8")
    m = re.search(r"<!-- measured-configs: (.*?) -->", text)
    if not m:
        raise PluginError(f"{path} does not say which configs it measured: {rerun}")
    stale = []
    for profile, measured in json.loads(m.group(1)).items():
        now = DiffusionQuantConfig.from_profile(profile).to_dict()
        changed = sorted(k for k in set(now) & set(measured) if now[k] != measured[k])
        if changed:
            stale.append(f"`{profile}` ({', '.join(f'{k}: {measured[k]!r} → {now[k]!r}' for k in changed)})")
    if stale:  # shown on the page (not a build failure, so a profile change does not block other work)
        log.info("%s is stale: %s; %s", path, "; ".join(stale), rerun)
        text = (f'!!! warning "These figures were measured with older profile definitions"\n'
                f"    Changed since: {'; '.join(stale)}. The maintainers rerun `scripts/profile_table.py` "
                f"to remeasure.\n\n" + text)
    return text


def gen_sensitivity_measured() -> str:
    """The H estimate (and times the measured downstream gain) against the direct measurement, and the
    budget allocations, from the benchmark's JSON."""
    import json

    f = ROOT / "benchmarks" / "results" / "bench_sensitivity.json"
    if not f.is_file():
        raise PluginError(f"{f.relative_to(ROOT)} is missing: run benchmarks/bench_sensitivity.py")
    data = json.loads(f.read_text(encoding="utf-8"))
    a = data["agreement"]
    cal = data.get("calibration_agreement") or data.get("calibration_budget") or data["calibration"]
    lines = [f"Each of {a['layers_measured']} layers of the terrain U-Net ({a.get('subset', 'a subset')}) quantized "
             f"alone at {a['width']}; Spearman rank correlation with the network's directly measured 1 − output "
             f"cosine (mean over {a['direct_levels']} noise levels, held-out inputs):", "",
             "| estimate | rank correlation |", "|---|---|"]
    lines += [f"| {k} | {v:+.3f} |" for k, v in a["spearman_vs_direct_mean_error"].items()]
    if "top_by_estimate_x_gain" in a:
        layers = a["layers"]
        lines += ["", "The layers the estimate times the gain ranks highest at int2 (rank by the estimate alone in "
                  "brackets, of " + str(a["layers_estimated"]) + "): " + ", ".join(
                      f"`{n.removeprefix('network.').removesuffix('.weight')}` ({a['rank_by_estimate'][n]}, "
                      f"gain ×{layers[n]['gain']:.3g})" for n in a["top_by_estimate_x_gain"][:8]) + "."]
    b = data.get("budget")
    if b:
        lines += ["", f"Size budget {b['target_mb']:.3f} MiB, halfway between all-int2 ({b['all_int2_mb']:.3f} MiB) and "
                  f"all-int4 ({b['all_int4_mb']:.3f} MiB); output cosine on the held-out inputs (10 noise levels, batch 3):",
                  "", "| allocation | codes | MiB | bits/weight | output cosine mean | worst level (σ) | worst sample | "
                  "first block's conv | load avg |", "|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            e = r["e2e"]
            conv = (r.get("widths") or {}).get("network.input_blocks.1.0.in_layers.2.weight")
            lines.append(f"| {r['allocation']} | {r['codes']} | {r['model_size_mb']:.3f} | {r['bits_per_weight']:.3f} | "
                         f"{e['mean_cosine']:.5f} | {e['worst_cosine']:.5f} ({e['worst_sigma']:.3g}) | "
                         f"{e['worst_sample_cosine']:.5f} | {'lossless' if conv == 0 else f'int{conv}' if conv else '?'} | "
                         f"{r['loadavg_before'][0]:.1f} |")
    gain = cal.get("downstream_gain")
    lines += ["", f"`{f.relative_to(ROOT)}`: commit {data['commit'][:10]}, {data['date']}, {data['cores']} cores; calibration "
              f"{cal['samples_per_level']} sample(s) per level at {len(cal['levels'])} levels, "
              f"{cal.get('collect_seconds', cal['seconds']):.0f} s"
              + (f", downstream gains {gain['seconds']:.0f} s ({gain['passes']} forward passes of {gain['inputs']} inputs)"
                 if gain else "")
              + f" (load average {cal['loadavg_before'][0]:.1f} before, "
              f"{cal.get('loadavg_after', cal['loadavg_before'])[0]:.1f} after); direct measurement "
              f"{a['direct_seconds']:.0f} s. Held out: {data['held_out']}."]
    return "\n".join(lines) + "\n"


def gen_min_accuracy() -> str:
    from arrow_quant_v2.config import BIT_WIDTHS, DEFAULT_MIN_ACCURACY

    rows = ["| bit width | default `min_accuracy` (cosine) |", "|---|---|"]
    rows += [f"| int{b} | `{DEFAULT_MIN_ACCURACY[b]}` |" for b in BIT_WIDTHS]
    return "\n".join(rows)


def gen_plan_modules() -> str:
    from arrow_quant_v2 import plan, policy

    def names(seq):
        return ", ".join(f"`{m}`" for m in seq)

    return "\n".join([
        f"- **Time conditioning** (`plan.TIME_MODULES`): {names(plan.TIME_MODULES)}.",
        f"- **Embeddings and output heads** (`plan.EMBEDDING_MODULES`): {names(plan.EMBEDDING_MODULES)}.",
        f"- **Boundary layers of a denoiser** (`plan.BOUNDARY_PREFIXES`, name prefixes after `network.`, "
        f"`model.diffusion_model.` or a component folder): {names(plan.BOUNDARY_PREFIXES)}.",
        f"- **Norms** (`plan.NORM_RE`, case-insensitive): `{plan.NORM_RE.pattern}`.",
        f"- **Fallback chain** (`policy.FALLBACK_ORDER`, each width trying `policy.ALTERNATE_ENCODING` "
        f"= `{policy.ALTERNATE_ENCODING}` after its own encoding, except under `target_runtime=\"gguf\"`): "
        + " → ".join(f"int{b}" for b in policy.FALLBACK_ORDER) + " → lossless.",
    ])


def gen_default_encodings() -> str:
    from arrow_quant_v2 import encodings

    rows = ["| bits | default encoding (`encodings.DEFAULT_ENCODING`) |", "|---|---|"]
    rows += [f"| {b} | `{n}` |" for b, n in encodings.DEFAULT_ENCODING.items()]
    return "\n".join(rows)


def _schema_comments() -> dict:
    """The ``# comment`` beside each column of ``store.SCHEMA`` in store.py."""
    from arrow_quant_v2 import store

    src = Path(inspect.getsourcefile(store)).read_text(encoding="utf-8")
    start = src.find("SCHEMA = pa.schema([")
    if start < 0:  # laid out differently: the table keeps the types and the fallback meanings
        log.warning("store.SCHEMA's source layout changed: column comments not found")
        return {}
    block = src[start:]
    block = block[:block.index("])")]
    out = {}
    for line in block.splitlines():
        m = re.match(r'\s*\("(\w+)",.*?\),?\s*(?:#\s*(.*))?$', line)
        if m:
            out[m.group(1)] = (m.group(2) or "").strip()
    return out


# Meanings for the columns store.py leaves without a comment of their own.
BLOB_DOC = {
    "rel_error": "tensor-level relative error ‖w − ŵ‖ / ‖w‖, measured while writing",
    "sqnr_db": "tensor-level signal-to-quantization-noise ratio in dB, measured while writing",
    "codes": "the encoding's first blob (packed codes; for `raw`, the source bytes)",
    "scales": "the encoding's second blob, or null",
    "zeros": "the encoding's third blob, or null",
    "aux": "the encoding's fourth blob, or null",
}


def gen_store_schema() -> str:
    from arrow_quant_v2 import store

    comments = _schema_comments()
    rows = ["| # | column | Arrow type | meaning |", "|---|---|---|---|"]
    for i, f in enumerate(store.SCHEMA):
        meaning = comments.get(f.name) or BLOB_DOC.get(f.name, "")
        rows.append(f"| {i} | `{f.name}` | `{f.type}` | {_cell(meaning)} |")
    return "\n".join(rows)


def _inline(text: str) -> str:
    text = text.replace("``", "`")
    return re.sub(r":(?:class|func|meth|data|attr|exc):`~?([\w.]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)


LABEL = re.compile(r"^[A-Z][^:`]{0,60}:(\s|$)")


def _rst_to_md(doc: str) -> str:
    """The encodings' docstrings are reStructuredText-ish: ````x```` code, ``*`` lists, ``Label:`` paragraphs."""
    body = textwrap.dedent(doc.split("\n", 1)[1] if "\n" in doc else "")
    out, list_indent = [], None
    for line in _inline(body).splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            out.append("")
            list_indent = None
            continue
        if stripped.startswith("* "):
            if list_indent is None and out and out[-1] != "":
                out.append("")
            if list_indent is None or indent <= list_indent:
                list_indent = indent
                out.append(stripped)
            else:
                out.append("    " + stripped)  # a nested list
            continue
        if list_indent is not None and indent > list_indent:
            out.append("    " + stripped)  # continuation of a list item
            continue
        if list_indent is not None or (LABEL.match(stripped) and out and out[-1] != ""):
            out.append("")  # the list ended, or a "Label: ..." line starts a paragraph
        list_indent = None
        out.append(stripped)
    return "\n".join(out).strip()


def gen_encodings() -> str:
    from arrow_quant_v2 import encodings

    parts = []
    for name, cls in encodings._REGISTRY.items():  # noqa: SLF001 - the registry is the list we document
        bits = ", ".join(str(b) for b in cls.supported_bits)
        summary = _inline(inspect.getdoc(cls).split("\n", 1)[0])
        # Upper-case class constants are part of the format (SCALE_BITS, SUPER, ...), except the
        # encoder's search effort (SEARCH), which the docstrings say is free to change.
        consts = [f"`{k} = {getattr(cls, k)!r}`" for k in sorted(dir(cls)) if k.isupper() and k != "SEARCH"]
        const_line = f"\n\nFormat constants of `{cls.__name__}`: {', '.join(consts)}." if consts else ""
        parts.append(f"### `{name}` {{#encoding-{name.replace('_', '-')}}}\n\n"
                     f"*{summary}* — class `{cls.__name__}`, bits {bits}.{const_line}\n\n"
                     f"{_rst_to_md(inspect.getdoc(cls))}\n")
    return "\n".join(parts)


def gen_cli_help() -> str:
    from arrow_quant_v2 import cli

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = cli.build_parser()
        parser.prog = "arrow-quant"
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        parts = [f"```text\n$ arrow-quant --help\n{parser.format_help().rstrip()}\n```"]
        for name, p in sub.choices.items():
            parts.append(f"### `arrow-quant {name}` {{#{name}}}\n\n```text\n$ arrow-quant {name} --help\n"
                         f"{p.format_help().rstrip()}\n```")
        return "\n\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def gen_cli_exit_codes() -> str:
    from arrow_quant_v2.cli import EXIT_MEANINGS

    rows = "\n".join(f"| {int(code)} | `{code.name}` | {meaning} |" for code, meaning in EXIT_MEANINGS.items())
    return "| status | name | meaning |\n|---|---|---|\n" + rows


GENERATORS = {
    "config-fields": gen_config_fields,
    "profile-settings": gen_profile_settings,
    "profiles-measured": gen_profiles_measured,
    "sensitivity-measured": gen_sensitivity_measured,
    "min-accuracy": gen_min_accuracy,
    "plan-modules": gen_plan_modules,
    "default-encodings": gen_default_encodings,
    "store-schema": gen_store_schema,
    "encodings": gen_encodings,
    "cli-help": gen_cli_help,
    "cli-exit-codes": gen_cli_exit_codes,
}


# -- hooks --------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_path}: unknown generated block {name!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def on_files(files, config):
    """Serve the screenshots in the repository's assets/ folder as ``assets/<name>``."""
    assets = ROOT / "assets"
    for png in sorted(assets.glob("*.png")):
        files.append(File(f"assets/{png.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files

