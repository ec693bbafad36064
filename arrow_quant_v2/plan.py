"""Deciding what each tensor gets: bits, encoding, group size, and a reason a person can read.

The module-name lists below are the one place that says which tensors are sensitive.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from . import encodings
from .config import DiffusionQuantConfig
from .layout import RAW
from .policy import LOSSLESS, choose, plan_label  # noqa: F401 - LOSSLESS: TensorPlan's width of lossless tensors
from .source import ModelSource, TensorInfo

#: Timestep / noise-level conditioning: their outputs modulate every block at every
#: denoising step, so their error is amplified (TFMQ-DM; FLUX/Wan GGUF practice).
TIME_MODULES = (
    "time_embed", "time_embedding", "time_embedder", "t_embedder", "timestep_embedder", "timestep_embed",
    "time_proj", "time_emb", "adaLN_modulation", "adaln_modulation", "emb_layers", "label_emb",
    "time_text_embed", "noise_level_emb", "class_embedding", "add_embedding", "norm1_context.linear",
)
#: Token embeddings and output heads: few tensors, large effect on every token.
EMBEDDING_MODULES = (
    "embed_tokens", "word_embeddings", "wte", "tok_embeddings", "position_embeddings", "wpe",
    "token_type_embeddings", "lm_head", "embed_out", "output_layer",
)
#: The layers a denoiser's input and output pass through first and last: the input convolution
#: and first residual block see the noisy sample at full sigma scale, the output layers write the
#: prediction directly. On the terrain U-Net, int4 on the first block's conv alone drops the
#: output cosine at sigma 80 to 0.83; protecting these (18K of 10.4M parameters) lifts the
#: worst output cosine of the whole int4 model from 0.970 to 0.998 (Q-Diffusion and PTQ4DM keep
#: first and last layers at 8 bits for the same reason). Matched as name prefixes, after any
#: component and wrapper prefix (``unet/``, ``network.``, ``model.diffusion_model.``).
#: Kept as floors under ``calibration="graph"`` too, where each layer's output sensitivity (times its
#: downstream gain measured through the graph with ``downstream_gain=True``:
#: :mod:`arrow_quant_v2.sensitivity`) decides above them. With the gain, the measurement alone gives
#: these layers int8 or lossless on the terrain U-Net (the floors do not bind), but the allocation it
#: makes is not better on held-out inputs than the name list on the plain H estimate
#: (benchmarks/bench_sensitivity.py), so the gain is opt-in and the list is not retired; a gain
#: measured a group at a time can also miss a layer. ``protect_embeddings=False`` leaves them to the measurement.
BOUNDARY_PREFIXES = (
    "conv_in.", "conv_out.", "input_blocks.0.", "input_blocks.1.", "out.",
    "down_blocks.0.resnets.0.", "x_embedder.", "patch_embed.", "proj_out.", "final_layer.",
)
_WRAPPERS = ("network.", "model.diffusion_model.", "diffusion_model.", "model.", "net.")
NORM_RE = re.compile(r"(^|[._])(norm|ln|layernorm|layer_norm|rmsnorm|group_norm|gn)(\d*|_\w+)?([._]|$)", re.I)


@dataclass(frozen=True)
class TensorPlan:
    """The decision for one tensor. ``bits == 0`` means stored losslessly."""

    name: str
    bits: int
    group_size: int
    reason: str
    encoding: str = RAW
    #: Why this width class: "lossless", "rule" (bit_rules), "protected" (time conditioning,
    #: embeddings/heads, sensitive_layers) or "ordinary". A size budget moves only the last
    #: two (protected ones never below ``sensitive_bits``); see ``budget``.
    role: str = ""

    @property
    def lossless(self) -> bool:
        return self.bits == LOSSLESS


def _module_hit(name: str, modules: Tuple[str, ...]) -> Optional[str]:
    parts = name.replace("/", ".").split(".")
    for m in modules:
        if "." in m:
            if m in name:
                return m
        elif m in parts or m.lower() in (p.lower() for p in parts):
            return m
    return None


def _boundary_hit(name: str) -> Optional[str]:
    bare = name.split("/", 1)[-1]
    for wrapper in _WRAPPERS:
        if bare.startswith(wrapper):
            bare = bare[len(wrapper):]
            break
    return next((p.rstrip(".") for p in BOUNDARY_PREFIXES if bare.startswith(p)), None)


#: Group sizes ``enable_spatial`` chooses among, and the share of the accuracy slack it
#: keeps in reserve (the choice is measured on a row sample, not the whole tensor).
SPATIAL_GROUPS = (256, 128, 64, 32, 16, 8)
SPATIAL_RESERVE = 0.3
SPATIAL_SAMPLE_ELEMENTS = 1 << 18


def spatial_plan(plan: TensorPlan, source: ModelSource, config: DiffusionQuantConfig) -> TensorPlan:
    """``enable_spatial``: the largest group (fewest bits) that still reaches min_accuracy on this
    layer, measured on evenly spaced rows; layers differ a lot in how much grouping they need (Q-DiT)."""
    if plan.lossless or plan.role not in ("ordinary", "") or encodings.fixed_group(plan.encoding):
        return plan
    info = source.tensors[plan.name]
    rows, cols = info.matrix_shape
    step = max(1, rows * cols // SPATIAL_SAMPLE_ELEMENTS)
    sample = np.concatenate([source.read_rows(plan.name, r, r + 1) for r in range(0, rows, step)])
    need = config.min_accuracy_for(plan.bits)
    target = 1.0 - (1.0 - need) * (1.0 - SPATIAL_RESERVE)
    enc = encodings.choose_group_for_target(sample, plan.encoding, plan.bits, target, SPATIAL_GROUPS)
    g = enc.group_for(cols) if enc.group_size > 0 else 0
    return TensorPlan(plan.name, plan.bits, g, f"{plan_label(plan.bits, plan.encoding, g)}: spatial "
                      f"(largest group reaching cos {target:.4f} on a row sample)", plan.encoding, plan.role)


class Planner:
    """Turns a tensor's name, dtype and shape into a :class:`TensorPlan` for one config."""

    def __init__(self, config: DiffusionQuantConfig) -> None:
        self.config = config
        self.time_aware = config.enable_time_aware

    def plan(self, t: TensorInfo) -> TensorPlan:
        """The plan of one tensor under this config, by the first rule that applies.

        In order: non-float, empty and 0-d tensors are lossless; the first matching
        ``bit_rules`` pattern decides; 1-D tensors, norms, biases and tensors below
        ``lossless_below`` elements are lossless; time conditioning (when time-aware),
        embeddings, output heads and a denoiser's boundary layers (``protect_embeddings``)
        and ``sensitive_layers`` get
        ``max(sensitive_bits, bit_width)``; everything else gets ``bit_width``.

        Args:
            t: the tensor's name, dtype and shape (from :class:`~arrow_quant_v2.source.ModelSource`).

        Returns:
            Its :class:`TensorPlan`: bits (0 = lossless), group size, encoding, role and a readable reason.
        """
        c = self.config
        lossless = lambda why: TensorPlan(t.name, LOSSLESS, 0, f"lossless: {why}", role="lossless")  # noqa: E731
        if not t.is_float:
            return lossless(f"{t.dtype} tensor")
        if t.numel == 0:
            return lossless("empty tensor")
        if len(t.shape) == 0:
            return lossless("0-d scalar")
        for pattern, bits in c.bit_rules.items():
            if fnmatch.fnmatchcase(t.name, pattern):
                if bits == LOSSLESS:
                    return lossless(f"rule {pattern!r}")
                return self._quantized(t, bits, f"rule {pattern!r}", "rule")
        if len(t.shape) == 1:
            return lossless("1-D " + ("norm" if NORM_RE.search(t.name) else "bias" if t.name.endswith("bias") else "vector"))
        if NORM_RE.search(t.name) and not t.name.endswith("_proj.weight"):
            return lossless("norm")
        if t.name.endswith(".bias"):
            return lossless("bias")
        if t.numel < c.lossless_below:
            return lossless(f"tiny ({t.numel} < {c.lossless_below} elements)")
        protected_bits = max(c.sensitive_bits, c.bit_width)
        if self.time_aware and (m := _module_hit(t.name, TIME_MODULES)):
            return self._quantized(t, protected_bits, f"time conditioning ({m})", "protected")
        if c.protect_embeddings and (m := _module_hit(t.name, EMBEDDING_MODULES)):
            return self._quantized(t, protected_bits, f"{'output head' if 'head' in m or 'out' in m else 'embedding'} ({m})",
                                   "protected")
        if c.protect_embeddings and (m := _boundary_hit(t.name)):
            return self._quantized(t, protected_bits, f"boundary layer ({m})", "protected")
        for pattern in c.sensitive_layers:
            if fnmatch.fnmatchcase(t.name, pattern):
                return self._quantized(t, protected_bits, f"sensitive layer {pattern!r}", "protected")
        return self._quantized(t, c.bit_width, "", "ordinary")

    def _quantized(self, t: TensorInfo, bits: int, why: str, role: str = "") -> TensorPlan:
        c = choose(self.config, bits, t.matrix_shape[1])
        why = "; ".join(w for w in (why, c.note) if w)
        if c.encoding is None:
            return TensorPlan(t.name, LOSSLESS, 0, f"lossless: {why}", role="lossless")
        label = plan_label(c.bits, c.encoding, c.group)
        return TensorPlan(t.name, c.bits, c.group, f"{label}: {why}" if why else label, c.encoding, role)

    def plan_model(self, source: ModelSource) -> Dict[str, TensorPlan]:
        """Every tensor's plan by the rules alone. A size budget (``target_model_size_mb``) is
        not applied here: the engine asks :func:`arrow_quant_v2.budget.allocate` instead, which
        starts from these plans (see :func:`arrow_quant_v2.engine.plan_tensors`)."""
        return {name: self.plan(t) for name, t in source.tensors.items()}


# -- modality -------------------------------------------------------------------------

_AUDIO = ("audio", "mel", "wav", "music", "sound", "speech", "unet1d", "dance")
_CODE = ("code", "coder", "starcoder", "diffucoder")
_IMAGE_CLASSES = ("unet", "dit", "transformer2d", "flux", "autoencoder", "vae", "controlnet", "pixart", "sd3", "wan", "uvit")
_TEXT = ("dream", "llada", "mdm", "qwen", "llama", "mistral", "gpt", "bert", "causallm", "maskedlm", "plaid", "sedd")
_IMAGE_TENSORS = ("conv_in", "input_blocks", "down_blocks", "x_embedder", "patch_embed", "pos_embed", "conv_out")
_TEXT_TENSORS = ("embed_tokens", "lm_head", "word_embeddings", "wte")


def detect_modality(source: ModelSource, forced: Optional[str] = None) -> Tuple[str, str]:
    """``(modality, reason)`` from the config, safetensors metadata and tensor names."""
    if forced:
        return forced, "set in config"
    cfg = source.config
    words = " ".join(
        str(v) for v in (cfg.get("architectures"), cfg.get("model_type"), cfg.get("_class_name"),
                         cfg.get("_name_or_path"), cfg.get("modality"), source.metadata.get("modality"))
        if v
    ).lower()
    if cfg.get("modality") in ("text", "code", "image", "audio"):
        return cfg["modality"], "config.json 'modality'"
    for modality, hints in (("audio", _AUDIO), ("code", _CODE), ("text", _TEXT), ("image", _IMAGE_CLASSES)):
        hit = next((h for h in hints if h in words), None)
        if hit:
            return modality, f"config.json mentions {hit!r}"
    names = " ".join(source.tensors)
    if any(h in names for h in _IMAGE_TENSORS):
        return "image", "tensor names look like an image U-Net/DiT"
    if any(h in names for h in _TEXT_TENSORS):
        return "text", "tensor names look like a language model"
    return "image", "no hint found; assumed an image diffusion model"
