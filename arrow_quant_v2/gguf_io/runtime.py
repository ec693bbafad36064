"""What each runtime needs in a GGUF file: architecture, tensor names, hyper-parameters, tokenizer.

Two families of runtimes read GGUF:

* llama.cpp (``llama-diffusion-cli`` for Dream and LLaDA, ``llama-cli`` for Qwen2/Llama) finds
  tensors by its own names (``blk.3.attn_q.weight``; gguf-py's tensor name map is the one table of
  them) and reads every hyper-parameter from ``{arch}.*`` keys: a missing one silently takes a
  default (a missing rope base changes every logit), so each is taken from ``config.json`` here.
  The q/k rows of the Llama layout (Llama, LLaDA) are reordered the way llama.cpp's converter does
  (its rope rotates pairs of adjacent rows); whole rows move, so quantized rows move losslessly.
* ComfyUI-GGUF, diffusers (``from_single_file`` + ``GGUFQuantizationConfig``) and
  stable-diffusion.cpp read image/video diffusion transformers and U-Nets by their source
  checkpoint names and check ``general.architecture`` against the families they know.

:func:`describe` turns a model folder's ``config.json`` and tensor names into a :class:`Target`
holding all of that; the writer and the reader both ask it, so the names go out and come back the
same way.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import gguf
import numpy as np

#: ``general.architecture`` for a model family none of the runtimes knows.
GENERIC_ARCH = "generic"

#: Diffusion LMs and their plain-LM relatives: config.json ``model_type`` / ``architectures`` -> llama.cpp arch.
LLM_ARCHS: Dict[str, str] = {
    "dream": "dream", "dreammodel": "dream",
    "llada": "llada", "lladamodellm": "llada",
    "qwen2": "qwen2", "qwen2forcausallm": "qwen2",
    "llama": "llama", "llamaforcausallm": "llama",
}
#: Architectures whose q/k rows llama.cpp's converter reorders (rope on adjacent pairs).
PERMUTED_QK = {"llama", "llada"}
#: Architectures that attend bidirectionally (masked diffusion).
NON_CAUSAL = {"dream", "llada"}

#: diffusers ``_class_name`` -> the architecture ComfyUI-GGUF (and diffusers' GGUF loader) expects.
IMAGE_CLASSES: Dict[str, str] = {
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "WanTransformer3DModel": "wan",
    "AuraFlowTransformer2DModel": "aura",
    "LTXVideoTransformer3DModel": "ltxv",
    "HunyuanVideoTransformer3DModel": "hyvid",
    "HiDreamImageTransformer2DModel": "hidream",
    "CosmosTransformer3DModel": "cosmos",
    "Lumina2Transformer2DModel": "lumina2",
    "QwenImageTransformer2DModel": "qwen_image",
}
#: Single-file checkpoints without a diffusers config: a key that only that family has (as ComfyUI-GGUF detects).
IMAGE_KEYS: Tuple[Tuple[str, str], ...] = (
    ("double_blocks.0.img_attn.proj.weight", "flux"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
    ("head.modulation", "wan"),
    ("label_emb.0.0.weight", "sdxl"),
    ("input_blocks.9.0.op.weight", "sd1"),
)
#: Prefixes that ComfyUI strips from a full checkpoint's names.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "model.")

#: Hyper-parameters llama.cpp's loader reads, and the config.json names that hold them (first found wins).
HPARAMS: Tuple[Tuple[str, Tuple[str, ...], bool], ...] = (
    # (gguf key suffix, config.json names, required)
    ("context_length", ("max_position_embeddings", "max_sequence_length", "n_positions", "n_ctx"), True),
    ("embedding_length", ("hidden_size", "d_model", "n_embd"), True),
    ("block_count", ("num_hidden_layers", "n_layers", "n_layer"), True),
    ("feed_forward_length", ("intermediate_size", "mlp_hidden_size", "n_inner"), True),
    ("attention.head_count", ("num_attention_heads", "n_heads", "n_head"), True),
    ("attention.head_count_kv", ("num_key_value_heads", "n_kv_heads"), False),
    ("attention.layer_norm_rms_epsilon", ("rms_norm_eps", "layer_norm_eps"), True),
    ("rope.freq_base", ("rope_theta",), False),
    ("vocab_size", ("vocab_size", "embedding_size"), False),
)
#: What the Hugging Face config classes use when a field is absent (so the file states it, not llama.cpp's guess).
HF_DEFAULT_ROPE_THETA = 10000.0


@dataclass
class Target:
    """Everything a GGUF file for one runtime needs beyond the tensor bytes."""

    arch: str                                   # general.architecture
    family: str                                 # "llm", "image" or "generic"
    names: Dict[str, str]                       # source tensor name -> GGUF tensor name
    permute_heads: Dict[str, int] = field(default_factory=dict)  # source name -> heads its rows are grouped in
    metadata: List[Tuple[str, Any, Any]] = field(default_factory=list)  # (key, value, GGUFValueType or None)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    has_tokenizer: bool = False


def read_config(folder: Optional[Path]) -> dict:
    """``config.json`` of a model folder (or store), {} when absent or unreadable."""
    if folder is None:
        return {}
    try:
        value = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def llm_arch(config: dict) -> Optional[str]:
    """The llama.cpp architecture of a Hugging Face LM config, or None."""
    keys = [str(config.get("model_type", ""))] + [str(a) for a in config.get("architectures") or []]
    for k in keys:
        if k.lower() in LLM_ARCHS:
            return LLM_ARCHS[k.lower()]
    return None


def image_arch(config: dict, names: Iterable[str]) -> Optional[str]:
    """The ComfyUI-GGUF architecture of a diffusion transformer / U-Net, or None."""
    cls = str(config.get("_class_name", ""))
    if cls in IMAGE_CLASSES:
        return IMAGE_CLASSES[cls]
    if cls == "UNet2DConditionModel":  # SDXL adds text-time embeddings to SD1's U-Net
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd1"
    stripped = {strip_prefix(n) for n in names}
    for key, arch in IMAGE_KEYS:
        if key in stripped:
            return arch
    return None


def strip_prefix(name: str) -> str:
    for p in CHECKPOINT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def block_count(names: Iterable[str]) -> int:
    blocks = [int(m.group(1)) for n in names if (m := re.search(r"\.(?:layers|blocks|h)\.(\d+)\.", n))]
    return max(blocks) + 1 if blocks else 0


def llama_names(arch: str, names: List[str], n_blocks: int) -> Tuple[Dict[str, str], List[str]]:
    """Source name -> llama.cpp name through gguf-py's tensor name map; also the unmapped names."""
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tmap = gguf.get_tensor_name_map(arch_enum, n_blocks)
    out, unmapped = {}, []
    for n in names:
        mapped = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            unmapped.append(n)
        else:
            out[n] = mapped
    return out, unmapped


def permute_qk(x: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's q/k row order for rope on adjacent pairs (its converter's ``permute``), or back.

    Rows of each head ``[0..d/2) , [d/2..d)`` are interleaved; ``x`` is any array whose first axis
    is the rows (a weight, a bias, or the rows of a quantized blob).
    """
    rows = x.shape[0]
    shape = (n_head, 2, rows // n_head // 2) + x.shape[1:]
    if inverse:
        return x.reshape((n_head, rows // n_head // 2, 2) + x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    return x.reshape(shape).swapaxes(1, 2).reshape(x.shape)


def _hparam(config: dict, names: Tuple[str, ...]):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return None


def _llm_metadata(arch: str, config: dict, source_label: str) -> Tuple[List[Tuple[str, Any, Any]], List[str]]:
    """The ``{arch}.*`` keys from config.json; raises KeyError naming a required field that is missing."""
    V = gguf.GGUFValueType
    meta: List[Tuple[str, Any, Any]] = []
    notes: List[str] = []
    values = {}
    for key, names, required in HPARAMS:
        value = _hparam(config, names)
        if value is None and required:
            raise KeyError(f"{source_label}: config.json has no {' / '.join(names)} (llama.cpp needs {arch}.{key})")
        values[key] = value
    heads = int(values["attention.head_count"])
    values["attention.head_count_kv"] = int(values["attention.head_count_kv"] or heads)
    if values["rope.freq_base"] is None:
        values["rope.freq_base"] = HF_DEFAULT_ROPE_THETA
        notes.append(f"config.json has no rope_theta: wrote the Hugging Face default {HF_DEFAULT_ROPE_THETA:g}")
    head_dim = int(config.get("head_dim") or int(values["embedding_length"]) // heads)
    for key, value in values.items():
        if value is None:
            continue
        vtype = V.FLOAT32 if key in ("attention.layer_norm_rms_epsilon", "rope.freq_base") else V.UINT32
        meta.append((f"{arch}.{key}", float(value) if vtype == V.FLOAT32 else int(value), vtype))
    meta.append((f"{arch}.rope.dimension_count", head_dim, V.UINT32))
    if config.get("head_dim"):
        meta += [(f"{arch}.attention.key_length", head_dim, V.UINT32), (f"{arch}.attention.value_length", head_dim, V.UINT32)]
    if arch in NON_CAUSAL:
        meta.append((f"{arch}.attention.causal", False, V.BOOL))
    if arch == "llada":  # LLaDA predicts the masked position itself, Dream the next one
        meta.append(("diffusion.shift_logits", False, V.BOOL))
    return meta, notes


def _special_id(name: str, config: dict, extra: dict, vocab: Dict[str, int]) -> Optional[int]:
    """A special token id from config.json / generation_config.json, else by its string in tokenizer_config."""
    for src in (config, extra.get("generation_config.json", {})):
        if isinstance(src.get(f"{name}_token_id"), int):
            return src[f"{name}_token_id"]
    tok = extra.get("tokenizer_config.json", {}).get(f"{name}_token")
    if isinstance(tok, dict):
        tok = tok.get("content")
    return vocab.get(tok) if isinstance(tok, str) else None


def _tokenizer_metadata(folder: Path, arch: str, config: dict) -> Tuple[List[Tuple[str, Any, Any]], Optional[str]]:
    """``tokenizer.ggml.*`` from a byte-level BPE ``tokenizer.json``; (metadata, None) or ([], why not)."""
    V = gguf.GGUFValueType
    extra = {}
    for name in ("tokenizer_config.json", "generation_config.json"):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
            extra[name] = value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            extra[name] = {}
    path = folder / "tokenizer.json"
    if not path.is_file():
        return [], "the model folder has no tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
        if model.get("type") != "BPE":
            return [], f"tokenizer.json is a {model.get('type')} tokenizer; only byte-level BPE is exported"
        vocab: Dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [], f"tokenizer.json is not readable as a BPE tokenizer ({e})"
    for i, t in added.items():
        vocab.setdefault(str(t["content"]), i)
    size = max(int(config.get("vocab_size") or 0), max(vocab.values(), default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, i in vocab.items():
        if 0 <= i < size:
            tokens[i] = text
            types[i] = int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        if 0 <= i < size:
            types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    tcfg = extra["tokenizer_config.json"]
    pre = "qwen2" if arch in ("qwen2", "dream") or "Qwen2" in str(tcfg.get("tokenizer_class", "")) else "default"
    meta: List[Tuple[str, Any, Any]] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING), ("tokenizer.ggml.pre", pre, V.STRING),
        ("tokenizer.ggml.tokens", tokens, None), ("tokenizer.ggml.token_type", types, None),
        ("tokenizer.ggml.merges", merges, None),
    ]
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("mask", "mask_token_id")):
        tid = _special_id(name, config, extra, vocab)
        if tid is not None:
            meta.append((f"tokenizer.ggml.{key}", int(tid), V.UINT32))
    if isinstance(tcfg.get("add_bos_token"), bool):
        meta.append(("tokenizer.ggml.add_bos_token", tcfg["add_bos_token"], V.BOOL))
    if isinstance(tcfg.get("chat_template"), str):
        meta.append(("tokenizer.chat_template", tcfg["chat_template"], V.STRING))
    return meta, None


def describe(folder: Optional[Path], names: List[str], shapes: Dict[str, Tuple[int, ...]],
             source_label: str = "the model", arch: Optional[str] = None, with_metadata: bool = True) -> Target:
    """The :class:`Target` for a model whose folder (config.json, tokenizer files) is ``folder``.

    ``arch`` forces an architecture (a GGUF being read says its own); otherwise it is detected
    from config.json (and, for single-file image checkpoints, from tensor names).
    ``with_metadata=False`` gives the names and row orders only (what a reader needs).

    Raises:
        KeyError: a hyper-parameter llama.cpp needs is missing from config.json (message names it).
    """
    config = read_config(folder)
    arch = arch or llm_arch(config) or image_arch(config, names)
    if arch in set(LLM_ARCHS.values()):
        return _describe_llm(arch, folder if with_metadata else None, config, names, shapes, source_label)
    if arch is not None and arch != GENERIC_ARCH:
        return Target(arch=arch, family="image", names={n: n for n in names})
    return Target(arch=GENERIC_ARCH, family="generic", names={n: n for n in names}, warnings=[
        f"{source_label}: not a model family the GGUF runtimes know (config.json _class_name "
        f"{config.get('_class_name')!r}, model_type {config.get('model_type')!r}); wrote general.architecture="
        f"{GENERIC_ARCH!r} with the source tensor names. Known: dream, llada, qwen2, llama, "
        f"{', '.join(sorted(set(IMAGE_CLASSES.values()) | {'sd1', 'sdxl'}))}"])


def _describe_llm(arch, folder, config, names, shapes, source_label) -> Target:
    n_blocks = int(_hparam(config, ("num_hidden_layers", "n_layers", "n_layer")) or block_count(names))
    mapping, unmapped = llama_names(arch, names, n_blocks)
    target = Target(arch=arch, family="llm", names=mapping)
    if unmapped:  # kept under their own names: llama.cpp ignores what it does not look for
        target.names.update({n: n for n in unmapped})
        target.warnings.append(f"{len(unmapped)} tensors have no llama.cpp name for {arch} and keep their own "
                               f"(llama.cpp ignores them): {', '.join(unmapped[:5])}")
    if arch in PERMUTED_QK:
        heads = int(_hparam(config, ("num_attention_heads", "n_heads")) or 0)
        kv = int(_hparam(config, ("num_key_value_heads", "n_kv_heads")) or heads)
        for n in names:
            if n.endswith(("q_proj.weight", "q_proj.bias")):
                target.permute_heads[n] = heads
            elif n.endswith(("k_proj.weight", "k_proj.bias")):
                target.permute_heads[n] = kv
    if folder is not None:
        target.metadata, target.notes = _llm_metadata(arch, config, source_label)
        tok_meta, why_not = _tokenizer_metadata(Path(folder), arch, config)
        target.metadata += tok_meta
        target.has_tokenizer = not why_not
        if why_not:
            target.notes.append(f"no tokenizer in the file ({why_not}): llama.cpp needs one to run it; "
                                "add tokenizer.json to the model folder and export again")
        if arch == "dream" and not any(k == "tokenizer.ggml.mask_token_id" for k, _, _ in target.metadata) \
                and isinstance(config.get("mask_token_id"), int):
            target.metadata.append(("tokenizer.ggml.mask_token_id", config["mask_token_id"], gguf.GGUFValueType.UINT32))
    return target


def reorder(target: Target, name: str) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The row reordering the runtime needs for source tensor ``name`` (None = as stored)."""
    heads = target.permute_heads.get(name)
    return None if not heads else (lambda rows: permute_qk(rows, heads))
