"""DiffusionQuantConfig and the deployment profiles.

Each field is declared once below, with its type, default, bounds or choices and a
one-line doc, in its dataclass metadata. Validation (here) and the app's form
(``ui``) both read those declarations, so a new field needs no change elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .errors import ConfigurationError

#: Default minimum cosine similarity a quantized tensor must reach, per bit width.
DEFAULT_MIN_ACCURACY = {2: 0.90, 3: 0.95, 4: 0.99, 5: 0.995, 6: 0.998, 8: 0.999}

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
#: Where the quantized model will run: None = this library's own encodings (the most accurate),
#: "gguf" = only ggml block types, so that a GGUF export is lossless (see ``ggml_types``).
TARGET_RUNTIMES = (None, "gguf")
GROUP_SIZES = (None, 0, 8, 16, 32, 64, 128, 256)  # None = the encoding's own, 0 = one group per row
MODALITIES = (None, "text", "code", "image", "audio")
PROFILES = ("edge", "local", "cloud")
CALIBRATIONS = (None, "graph")


def spec(default, doc, *, choices=None, bounds=None, kind=None, default_factory=None):
    """Declare a config field: its default, doc, and what values are allowed."""
    meta = {"doc": doc, "choices": choices, "bounds": bounds, "kind": kind}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DiffusionQuantConfig:
    """How to quantize a diffusion model. Invalid values raise :class:`ConfigurationError`.

    >>> DiffusionQuantConfig(bit_width=2).bit_width
    2
    """

    bit_width: int = spec(4, "Bits per weight code of ordinary layers.", choices=BIT_WIDTHS)
    group_size: Optional[int] = spec(None, "Weights per quantization group along the input axis (None = the encoding's tuned size, e.g. 16 for int4; 0 = one group per row).", choices=GROUP_SIZES)
    encoding: Optional[str] = spec(None, "Encoding name (None = the best default for the bit width; see encodings).", kind="encoding")
    target_runtime: Optional[str] = spec(None, "Where the model will run: None = ArrowQuant's own encodings (most accurate); 'gguf' = only ggml block types (int8 Q8_0, int6 Q6_K, int5 Q5_K, int4 Q4_K, int3 Q3_K, int2 Q2_K) so the GGUF export is lossless.", choices=TARGET_RUNTIMES)
    symmetric: bool = spec(False, "Use a symmetric grid without offset (the 'symmetric' encoding) instead of the default.")
    modality: Optional[str] = spec(None, "The modality the result and manifest report (text, code, image, audio); None detects it. A label only: no tensor's plan depends on it.", choices=MODALITIES)
    enable_time_aware: bool = spec(True, "Give timestep/noise-conditioning modules (time_embed, adaLN_modulation, ...) more bits.")
    sensitive_bits: int = spec(8, "Bits for protected tensors: embeddings, output heads, time conditioning, sensitive_layers.", choices=(4, 5, 6, 8))
    protect_embeddings: bool = spec(True, "Give embeddings, output heads and a denoiser's boundary layers (input conv, first block, output layers) sensitive_bits (under calibration='graph' too, as floors under the measured sensitivity; False leaves them to the measurement).")
    sensitive_layers: Tuple[str, ...] = spec((), "Extra tensor-name glob patterns to protect with sensitive_bits.", kind="patterns", default_factory=tuple)
    bit_rules: Dict[str, int] = spec(None, "Ordered {glob pattern: bits} rules; the first match wins over every default (0 = keep lossless).", kind="rules", default_factory=dict)
    min_accuracy: Optional[float] = spec(None, "Cosine every quantized tensor must reach (None = 0.90/0.95/0.99/0.995/0.998/0.999 for int2/3/4/5/6/8).", bounds=(0.0, 1.0))
    fail_fast: bool = spec(False, "Raise on the first tensor below min_accuracy instead of falling back to more bits.")
    lossless_below: int = spec(4096, "Tensors with fewer elements than this are kept lossless.", bounds=(0, 1 << 30))
    num_threads: int = spec(0, "Worker threads for one model's kernels (0 = all cores).", bounds=(0, 256))
    enable_spatial: bool = spec(False, "Per-layer group size: the largest group that still reaches min_accuracy on that layer (ignored under a size budget).")
    target_model_size_mb: Optional[float] = spec(None, "Size budget in MiB for the quantized weights (mixed precision).", bounds=(0.001, math.inf))
    num_time_groups: int = spec(10, "Noise levels checked by end-to-end validation of models with a graph, and calibrated over.", bounds=(1, 1000))
    calibration: Optional[str] = spec(None, "'graph': run the model's own graph (model.onnx) across the noise levels and round every layer with error compensation on its inputs (GPTQ-class); None: data-free rounding.", choices=CALIBRATIONS)
    calibration_samples: int = spec(2, "Calibration inputs per noise level (each its own sample, noise and conditioning; never the validation inputs).", bounds=(1, 64))
    downstream_gain: bool = spec(False, "With calibration='graph': also measure each layer's downstream gain through the graph (about 1.5x the calibration time) and judge layers by their sensitivity times it. Off by default: on the terrain U-Net it ranks layers much closer to a direct measurement, but the size budget it drives kept less held-out output (docs/calibration.md).")
    calibration_inputs: Optional[str] = spec(None, "A .npz of graph inputs (arrays named like the graph's inputs, batch first) replacing the synthetic calibration inputs.", kind="path")
    max_shard_mb: int = spec(2048, "Largest Parquet shard of the output store, in MiB.", bounds=(1, 1 << 20))
    deployment_profile: Optional[str] = spec(None, "The profile this config came from, if any.", choices=(None,) + PROFILES)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numpy scalars (from arrays, UI widgets) -> plain Python numbers
            setattr(self, f.name, _plain(getattr(self, f.name)))
        if isinstance(self.sensitive_layers, str):
            self.sensitive_layers = (self.sensitive_layers,)
        try:
            self.sensitive_layers = tuple(self.sensitive_layers or ())
        except TypeError:
            raise ConfigurationError(f"sensitive_layers={self.sensitive_layers!r} is not allowed; "
                                     "allowed: a list of glob patterns (strings)") from None
        try:
            self.bit_rules = {k: _plain(v) for k, v in dict(self.bit_rules or {}).items()}
        except (TypeError, ValueError):
            raise ConfigurationError(f"bit_rules={self.bit_rules!r} is not allowed; "
                                     f"allowed: a dict of glob pattern -> one of {(0,) + BIT_WIDTHS}") from None
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        for pattern, bits in self.bit_rules.items():
            if not isinstance(pattern, str) or type(bits) is not int or bits not in (0,) + BIT_WIDTHS:
                raise ConfigurationError(
                    f"bit_rules[{pattern!r}]={bits!r} is not allowed; allowed: a glob pattern mapped to one of {(0,) + BIT_WIDTHS}"
                )
        if self.encoding is not None:
            from .encodings import get_encoding, preferred_group  # here: importing the config needs no numba

            group = preferred_group(self.encoding, self.bit_width) if self.group_size is None else self.group_size
            enc = get_encoding(self.encoding, self.bit_width, group)
            if self.target_runtime == "gguf" and not getattr(enc, "ggml_type", ""):
                raise ConfigurationError(
                    f"encoding={self.encoding!r} is not allowed with target_runtime='gguf'; allowed: None "
                    "(the ggml type of each width) or a ggml type name such as 'q4_k', 'iq4_nl', 'q8_0'")
        if self.target_runtime == "gguf" and self.symmetric:
            raise ConfigurationError("symmetric=True is not allowed with target_runtime='gguf'; allowed: False "
                                     "(the ggml type of each width decides; e.g. encoding='q4_0' for a symmetric int4)")

    # -- profiles and (de)serialisation ---------------------------------------------

    @classmethod
    def from_profile(cls, profile: str, **overrides) -> "DiffusionQuantConfig":
        """The config of a deployment profile: ``edge`` (int2), ``local`` (int4) or ``cloud`` (int8).

        Args:
            profile: ``"edge"``, ``"local"`` or ``"cloud"``; what each sets is :data:`PROFILE_DEFAULTS`.
            **overrides: config fields to set on top of the profile, e.g. ``min_accuracy=0.95`` or
                ``target_runtime="gguf"`` (edge -> Q2_K, local -> Q4_K, cloud -> Q8_0).

        Returns:
            The config, with ``deployment_profile`` set to ``profile``.

        Raises:
            ConfigurationError: for an unknown profile or an invalid override.
        """
        if profile not in PROFILES:
            raise ConfigurationError(f"deployment_profile={profile!r} is not allowed; allowed: {', '.join(PROFILES)}")
        base = dict(PROFILE_DEFAULTS[profile], deployment_profile=profile)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain JSON-ready data (``sensitive_layers`` as a list); what a store's manifest keeps."""
        d = dataclasses.asdict(self)
        d["sensitive_layers"] = list(self.sensitive_layers)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DiffusionQuantConfig":
        """Build a config from :meth:`to_dict`'s output (missing fields take their defaults).

        Raises:
            ConfigurationError: if ``data`` is not a dict, names an unknown field, or holds an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigurationError(f"config={data!r} is not allowed; allowed: a dict of config fields")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigurationError(f"unknown config field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes) -> "DiffusionQuantConfig":
        """A copy with ``changes`` applied (validated like a new config; raises :class:`ConfigurationError`)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        defaults = DiffusionQuantConfig.__new__(DiffusionQuantConfig)
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name == "bit_width" or value != default:
                shown.append(f"{f.name}={value!r}")
        del defaults
        return f"DiffusionQuantConfig({', '.join(shown)})"

    def min_accuracy_for(self, bits: int) -> float:
        """The cosine a tensor quantized at ``bits`` must reach: ``min_accuracy``, or the default of that width."""
        return self.min_accuracy if self.min_accuracy is not None else DEFAULT_MIN_ACCURACY[bits]


#: What each profile sets; everything else keeps the field default.
PROFILE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "edge": {"bit_width": 2, "sensitive_bits": 4},   # kquant_nl g8: 2.625 bpw
    "local": {"bit_width": 4},                       # kquant_nl g16: 4.5 bpw
    "cloud": {"bit_width": 8},                       # affine_opt g64: 8.5 bpw
}


def field_specs() -> Dict[str, Dict[str, Any]]:
    """Each field's declaration: default, doc, choices, bounds, kind and Python type."""
    out = {}
    for f in dataclasses.fields(DiffusionQuantConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = dict(f.metadata, default=default, type=f.type)
    return out


def _plain(value: Any) -> Any:
    """numpy integers/floats as int/float (they compare equal to the choices but break JSON and kernels)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value


def check_field(f: dataclasses.Field, value: Any) -> None:
    """Raise ConfigurationError naming the field, the value and what is allowed."""
    meta = f.metadata
    choices, bounds = meta.get("choices"), meta.get("bounds")
    default = f.default if f.default is not dataclasses.MISSING else None

    def bad(allowed: str):
        raise ConfigurationError(f"{f.name}={value!r} is not allowed; allowed: {allowed}")

    if isinstance(default, bool) or f.type in ("bool",):
        if not isinstance(value, bool):
            bad("True or False")
        return
    if choices is not None:
        if isinstance(value, (bool, float)) or value not in choices:  # 4.0 == 4 but is not an allowed bit width
            bad(", ".join(repr(c) for c in choices))
        return
    if bounds is not None:
        if value is None and f.type.startswith("Optional"):
            return
        integral = f.type == "int"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
            bad(f"{'an integer' if integral else 'a number'} in [{bounds[0]}, {bounds[1]}]")
        if isinstance(value, float) and math.isnan(value):
            bad(f"a number in [{bounds[0]}, {bounds[1]}]")
        if not bounds[0] <= value <= bounds[1]:
            bad(f"{'an integer' if integral else 'a number'} in [{bounds[0]}, {bounds[1]}]")
        return
    if meta.get("kind") == "patterns" and not all(isinstance(p, str) for p in value):
        bad("a list of glob patterns (strings)")
    if meta.get("kind") == "path" and value is not None and not isinstance(value, str):
        bad("a file path (string) or None")
    if meta.get("kind") == "encoding" and value is not None and not isinstance(value, str):
        bad("an encoding name or None")
