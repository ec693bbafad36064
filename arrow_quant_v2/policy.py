"""The acceptance policy: the one place that says what a tensor tries, in which order, when a try
is good enough, and how the reason a person reads is worded.

* The candidate chain: at a width, :func:`choose`'s encoding and group (under
  ``target_runtime="gguf"`` the width's ggml type, or llama.cpp's fallback type for the row), then
  :func:`alternate_encoding` at its own group; then the next wider width (:data:`FALLBACK_ORDER`),
  the same way; lossless last (:func:`fallback`). A size budget also weighs finer ggml types
  between the widths (:func:`steps`).
* The acceptance test (:func:`accepts`): a candidate is kept when its cosine reaches
  ``min_accuracy`` for its width; a cosine measured on a row sample must clear it by
  :data:`SAMPLE_MARGIN` standard errors. Which cosine (:func:`measure_for`): the weights', or
  with a graph (``calibration="graph"``) the layer output's on the calibration inputs.
* The reason texts: labels, misses, fallbacks.

The planner takes a width's first candidate, the budget walks each width's candidates on a row
sample (:func:`at_width`), and the engine walks the chain on the whole tensor while writing: the
same rules, so on a tensor the budget measured whole its prediction is what the engine writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import encodings
from .config import BIT_WIDTHS, DiffusionQuantConfig

#: The widths a tensor falls back through when it misses ``min_accuracy``; lossless after the last.
FALLBACK_ORDER = BIT_WIDTHS
LOSSLESS = 0
#: Tried at the same width, with its own group size, when a tensor misses min_accuracy
#: with the default encoding, before any wider width: the two-level scales of the
#: k-quant-style encodings lose on matrices with outlier input columns, where plain
#: per-group scale and offset (least-squares clipped) keep the width.
ALTERNATE_ENCODING = "affine_opt"


def encoding_for(config: DiffusionQuantConfig, bits: int) -> str:
    """The encoding name used at ``bits``: the configured one if it supports them, else the default."""
    if config.symmetric:
        return "symmetric"
    if config.encoding is not None and encodings.supports(config.encoding, bits):
        return config.encoding
    return encodings.DEFAULT_ENCODING.get(bits, "affine")


def group_for(config: DiffusionQuantConfig, encoding: str, bits: int) -> int:
    """The configured group size, or (``None``) the one ``encoding`` is tuned for at ``bits``;
    always the block of an encoding whose grouping is its format (ggml types)."""
    fixed = encodings.fixed_group(encoding)
    if fixed:
        return fixed
    return encodings.preferred_group(encoding, bits) if config.group_size is None else config.group_size


@dataclass(frozen=True)
class Choice:
    """What a tensor quantized at some width gets: ``encoding`` None means keep it lossless
    (under ``target_runtime="gguf"``, no ggml block fits its rows)."""

    encoding: Optional[str]
    bits: int
    group: int
    #: why this differs from the width's plain choice ("" when it doesn't)
    note: str = ""


def choose(config: DiffusionQuantConfig, bits: int, cols: int) -> Choice:
    """The encoding, width and group for a tensor quantized at ``bits`` with rows of ``cols`` elements.

    Under ``target_runtime="gguf"``: the width's ggml type (``ggml_types.GGUF_TYPE_FOR_BITS``,
    or ``config.encoding`` when it names a ggml type of that width that fits), and where its
    block does not divide the row, llama.cpp's fallback type (``ggml_types.ROW_FALLBACK``, which
    may be wider, e.g. Q2_K -> IQ4_NL), or lossless when no block fits. Otherwise
    :func:`encoding_for` with :func:`group_for`.
    """
    if config.target_runtime == "gguf":
        from .ggml_types import gguf_type_for

        chosen = config.encoding
        if chosen is not None and encodings.supports(chosen, bits) and cols % encodings.fixed_group(chosen) == 0:
            return Choice(chosen, bits, encodings.fixed_group(chosen))
        name, note = gguf_type_for(bits, cols)
        if name is None:
            return Choice(None, LOSSLESS, 0, note)
        width = encodings.width_of(name, bits)
        if width != bits:
            note = f"int{bits} wanted; {note}"
        return Choice(name, width, encodings.fixed_group(name), note)
    name = encoding_for(config, bits)
    return Choice(name, bits, group_for(config, name, bits))


def alternate_encoding(config: DiffusionQuantConfig) -> Optional[str]:
    """The same-width encoding tried before a wider one (:data:`ALTERNATE_ENCODING`); none under
    ``target_runtime="gguf"``, where the width fixes the ggml type."""
    return None if config.target_runtime == "gguf" else ALTERNATE_ENCODING


def plan_label(bits: int, encoding: str, group: int) -> str:
    return f"int{bits} {encoding} g{group if group else 'row'}"


def next_bits(bits: int) -> int:
    """The next wider width in the fallback chain 2 -> 3 -> 4 -> 5 -> 6 -> 8 -> lossless."""
    wider = [b for b in FALLBACK_ORDER if b > bits]
    return wider[0] if wider else LOSSLESS


#: A cosine measured on a row sample must clear min_accuracy by this many standard errors of
#: its estimate, or the engine (which measures the whole tensor) might fall back after all.
SAMPLE_MARGIN = 3.0


def at_width(config: DiffusionQuantConfig, bits: int, cols: int) -> List[Choice]:
    """Every candidate tried at ``bits`` (for rows of ``cols`` elements) before a wider width, in order."""
    first = choose(config, bits, cols)
    if first.encoding is None:
        return []
    other = _alternate(config, first)
    return [first] + ([other] if other else [])


def steps(config: DiffusionQuantConfig, widths, cols: int) -> List[List[Choice]]:
    """What a size budget measures for rows of ``cols`` elements, one list of candidates (in the
    engine's order, the first accepted one kept) per step: each of ``widths`` (:func:`at_width`),
    and under ``target_runtime="gguf"`` after a width its finer ggml types that fit the row
    (``ggml_types.FINER_STEPS``: IQ4_XS at 4.25 bpw beside Q4_K's 4.5)."""
    out = []
    for bits in widths:
        out.append(at_width(config, bits, cols))
        if config.target_runtime == "gguf":
            from .ggml_types import FINER_STEPS

            own = out[-1][0].encoding if out[-1] else None
            out += [[Choice(name, bits, encodings.fixed_group(name))] for name in FINER_STEPS.get(bits, ())
                    if name != own and cols % encodings.fixed_group(name) == 0]
    return out


def _alternate(config: DiffusionQuantConfig, tried: Choice) -> Optional[Choice]:
    name = alternate_encoding(config)
    if tried.encoding is None or name is None or tried.encoding == name or not encodings.supports(name, tried.bits):
        return None
    return Choice(name, tried.bits, group_for(config, name, tried.bits))


def required(config: DiffusionQuantConfig, bits: int) -> float:
    """The cosine a tensor quantized at ``bits`` must reach."""
    return config.min_accuracy_for(bits)


def accepts(config: DiffusionQuantConfig, bits: int, cosine: float, stderr: float = 0.0) -> bool:
    """Whether a candidate at ``bits`` with this cosine is kept; ``stderr`` is the standard error of
    a cosine estimated on a row sample (0 when the whole tensor was measured)."""
    return cosine >= required(config, bits) + SAMPLE_MARGIN * stderr


#: What the acceptance test reads: the weights' cosine, or with a graph (``calibration="graph"``) the
#: layer output's cosine on the calibration inputs (:mod:`arrow_quant_v2.sensitivity`).
WEIGHT_COSINE = "cos"
OUTPUT_COSINE = "output cos"


def measure_for(config: DiffusionQuantConfig) -> str:
    """The figure a tensor's width is judged by under ``config`` (one of the two above)."""
    return OUTPUT_COSINE if config.calibration == "graph" else WEIGHT_COSINE


def felt_measure(gain: float) -> str:
    """:data:`OUTPUT_COSINE` as the network feels it: the layer's error times its downstream gain
    (relative to the median layer's, measured through the graph; ``sensitivity.felt_cosine``)."""
    return f"{OUTPUT_COSINE} x{gain:.3g} downstream gain"


def miss(encoding: str, cosine: float, need: float, measure: str = WEIGHT_COSINE) -> str:
    return f"{encoding} {measure} {cosine:.4f} < {need}"


def sampled_miss(bits: int, cosine: float, measure: str = WEIGHT_COSINE) -> str:
    return f"int{bits} misses min_accuracy (sampled {measure} {cosine:.4f})"


def fallback(config: DiffusionQuantConfig, tried: Choice, cosine: float, cols: int,
             measure: str = WEIGHT_COSINE) -> Tuple[Choice, str, bool]:
    """What follows ``tried`` after it missed with ``cosine`` (of ``measure``): ``(candidate, reason, wider)``.
    ``wider`` says the width grows (``fail_fast`` refuses that; the result lists it as a
    fallback); a candidate with ``encoding`` None is lossless."""
    why = miss(tried.encoding, cosine, required(config, tried.bits), measure)
    if measure.startswith(OUTPUT_COSINE):
        why += (" (output sensitivity on the calibration inputs" + (", times the layer's downstream gain measured "
                "through the graph)" if measure != OUTPUT_COSINE else ")"))
    other = _alternate(config, tried)
    if other is not None:
        return other, f"{plan_label(other.bits, other.encoding, other.group)}: {why}", False
    wider = next_bits(tried.bits)
    why = f"fallback from int{tried.bits}, {why}"
    c = choose(config, wider, cols) if wider != LOSSLESS else None  # under "gguf": its ggml type or llama.cpp's fallback
    if c is not None and c.note:
        why = f"{why}; {c.note}"
    if c is None or c.encoding is None:
        return Choice(None, LOSSLESS, 0), f"lossless: {why}", True
    return c, f"{plan_label(c.bits, c.encoding, c.group)}: {why}", True
