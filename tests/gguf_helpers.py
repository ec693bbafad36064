"""Reference ggml encodings for the GGUF tests: gguf-py's own Q8_0 / Q4_0 quantizer behind the
encoding interface that ggml block types use (``ggml_type``; ``codes`` = ggml's block bytes, rows
in order; no other blobs). They let the export and round-trip tests run on stores holding real
ggml blocks, written by the reference implementation, whatever encodings the library ships.
Also small synthetic Dream/Qwen2/Llama-layout model folders with a minimal tokenizer, which the
llama.cpp benchmark uses too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

import gguf
import numpy as np

from arrow_quant_v2 import encodings


def _stats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return np.array([(x64 * y64).sum(), (x64 * x64).sum(), (y64 * y64).sum(), ((x64 - y64) ** 2).sum()])


@dataclass(frozen=True)
class _GGMLReference(encodings.Encoding):
    ggml_type: ClassVar[str] = ""

    def quantize(self, x):
        qtype = gguf.GGMLQuantizationType[self.ggml_type]
        codes = gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)
        y = gguf.quants.dequantize(codes, qtype).reshape(x.shape)
        return {"codes": encodings.as_u8(codes)}, _stats(x, y)

    def dequantize(self, blobs, rows, cols):
        qtype = gguf.GGMLQuantizationType[self.ggml_type]
        return gguf.quants.dequantize(blobs["codes"].reshape(rows, -1), qtype).reshape(rows, cols)

    def nbytes(self, rows, cols):
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.ggml_type]]
        return rows * (cols // block) * size


@encodings.register
@dataclass(frozen=True)
class RefQ8_0(_GGMLReference):
    name: ClassVar[str] = "gguf_ref_q8_0"
    ggml_type: ClassVar[str] = "Q8_0"
    supported_bits: ClassVar[Tuple[int, ...]] = (8,)


@encodings.register
@dataclass(frozen=True)
class RefQ4_0(_GGMLReference):
    name: ClassVar[str] = "gguf_ref_q4_0"
    ggml_type: ClassVar[str] = "Q4_0"
    supported_bits: ClassVar[Tuple[int, ...]] = (4,)


def _byte_symbols():
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_byte_tokenizer(folder, vocab_size: int, specials) -> None:
    """A minimal byte-level BPE ``tokenizer.json`` (256 byte tokens, fillers, ``specials`` {id: text}).

    Enough for llama.cpp to load a synthetic model (a handful of merges: text tokenizes about byte by byte)."""
    import json
    from pathlib import Path

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges = [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"), ("Ġ", "t")]
    for a, b in merges:  # llama.cpp refuses a BPE vocabulary without merges
        vocab[a + b] = len(vocab)
    for i in range(len(vocab), vocab_size):
        if i not in specials:
            vocab[f"<unused{i}>"] = i
    added = [{"id": i, "content": text, "special": True, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False} for i, text in sorted(specials.items())]
    tok = {"version": "1.0", "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges],
                     "byte_fallback": False}}
    (Path(folder) / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def make_dream(folder, *, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=320,
               dtype="BF16", tokenizer=True, model_type=None):
    """A small synthetic Dream-layout model folder (optionally relabelled, e.g. ``llama`` / ``qwen2``)."""
    import json
    from pathlib import Path

    from arrow_quant_v2.samples import generate_dream

    folder = Path(folder)
    generate_dream(folder, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                   kv_heads=kv_heads, vocab=vocab, dtype=dtype)
    if model_type:
        config = json.loads((folder / "config.json").read_text())
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
        config.update(model_type=model_type, architectures=[arch])
        (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        write_byte_tokenizer(folder, vocab, {vocab - 4: "<|endoftext|>", vocab - 3: "<|beginoftext|>",
                                             vocab - 2: "<|mask|>"})
    return folder


def make_llada(folder, *, hidden=64, intermediate=128, layers=2, heads=4, vocab=320, tokenizer=True):
    """A small LLaDA-layout folder (LLaDA's own tensor names and config keys, no biases), F32."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"model.transformer.wte.weight": w(vocab, hidden), "model.transformer.ln_f.weight": 1 + w(hidden),
         "model.transformer.ff_out.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.transformer.blocks.{i}."
        t.update({p + "attn_norm.weight": 1 + w(hidden), p + "ff_norm.weight": 1 + w(hidden),
                  p + "q_proj.weight": w(hidden, hidden), p + "k_proj.weight": w(hidden, hidden),
                  p + "v_proj.weight": w(hidden, hidden), p + "attn_out.weight": w(hidden, hidden),
                  p + "ff_proj.weight": w(intermediate, hidden), p + "up_proj.weight": w(intermediate, hidden),
                  p + "ff_out.weight": w(hidden, intermediate)})
    save_file(t, str(folder / "model.safetensors"))
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": hidden, "n_heads": heads,
              "n_kv_heads": heads, "n_layers": layers, "mlp_hidden_size": intermediate, "max_sequence_length": 4096,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "vocab_size": vocab, "mask_token_id": vocab - 2,
              "eos_token_id": vocab - 4, "bos_token_id": vocab - 3}
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        write_byte_tokenizer(folder, vocab, {vocab - 4: "<|endoftext|>", vocab - 3: "<|startoftext|>",
                                             vocab - 2: "<|mdm_mask|>"})
    return folder
