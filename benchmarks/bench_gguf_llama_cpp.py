"""llama.cpp itself on exported GGUF files: its logits on the int8 / int4 files vs the float model's.

    LLAMA_CPP_PATH=/work/vendor-site python benchmarks/bench_gguf_llama_cpp.py

For a Dream-layout (``dream``: bidirectional, no KV cache), a Qwen2-layout (``qwen2``, causal) and
a LLaDA-layout (``llada``: its own tensor names, q/k rows reordered for llama.cpp's rope) synthetic model with a minimal byte-level BPE tokenizer, quantize into stores whose tensors are ggml
block types, export each with ``QuantizedModel.to_gguf``, load the files in llama.cpp
(llama-cpp-python, found through ``LLAMA_CPP_PATH`` or installed) and decode one batch of tokens.

Reported per file: relative Frobenius error of llama.cpp's logits against llama.cpp's logits on the
lossless float export (``||L_q - L_f|| / ||L_f||`` over every position), the cosine, and how often the
arg-max token agrees. ``vs_numpy_forward_of_store`` compares the same logits with a numpy forward
pass on the store's dequantized weights, and ``numpy_store_vs_numpy_float`` the two numpy passes: the
first is what llama.cpp's own arithmetic adds (it quantizes activations to 8 bits for Q8_0/Q4_0 dot
products), the second what the weights alone cost. The float export's own logits are also compared with an independent numpy
forward pass of the architecture computed from the source safetensors: that checks the exported
hyper-parameters (rope base, RMS epsilon, heads, causal or not) and names, not just that the file loads.

Types: ``target_runtime="gguf"`` at int8 and int4 (the library's ggml block types: Q8_0, Q4_K with
llama.cpp-style fallbacks) when the config has it, and always gguf-py's own reference Q8_0 / Q4_0
quantizer behind the same interface (tests/gguf_helpers.py).
Writes benchmarks/results/gguf_llama_cpp.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gguf_helpers  # noqa: E402  (registers the reference encodings gguf_ref_q8_0 / gguf_ref_q4_0)
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig, __version__, load_quantized  # noqa: E402
from arrow_quant_v2.source import open_model  # noqa: E402

LAYOUTS = ("dream", "qwen2", "llada")
DIMS = dict(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, vocab=1024)


def import_llama_cpp():
    extra = os.environ.get("LLAMA_CPP_PATH")
    if extra and extra not in sys.path:
        sys.path.insert(0, extra)
    try:
        import llama_cpp
    except ImportError as e:
        sys.exit(f"llama.cpp (llama-cpp-python) is not importable ({e}); set LLAMA_CPP_PATH to a folder holding "
                 "the llama_cpp package (e.g. /work/vendor-site) or pip install llama-cpp-python")
    return llama_cpp


def llama_logits(llama_cpp, path: Path, tokens) -> np.ndarray:
    """Logits of every position of one batch, decoded by llama.cpp (works without a KV cache, as dream needs)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens),
                          logits_all=True, verbose=False, n_threads=2)
    llm._batch.set_batch(tokens, n_past=0, logits_all=True)
    llm._ctx.decode(llm._batch)
    n_vocab = llm.n_vocab()
    ptr = llm._ctx.get_logits()
    out = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(tokens) * n_vocab,))
    logits = out.reshape(len(tokens), n_vocab).copy()
    llm.close()
    return logits


#: Source tensor names of each layout: embedding, final norm, head, and per block (``{i}``) the
#: attention norm, q, k, v, o, ffn norm, gate, up, down.
NAMES = {
    "qwen2": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.{i}.input_layernorm.weight", "model.layers.{i}.self_attn.q_proj",
              "model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj",
              "model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.post_attention_layernorm.weight",
              "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight",
              "model.layers.{i}.mlp.down_proj.weight"),
    "llada": ("model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
              "model.transformer.blocks.{i}.attn_norm.weight", "model.transformer.blocks.{i}.q_proj",
              "model.transformer.blocks.{i}.k_proj", "model.transformer.blocks.{i}.v_proj",
              "model.transformer.blocks.{i}.attn_out.weight", "model.transformer.blocks.{i}.ff_norm.weight",
              "model.transformer.blocks.{i}.ff_proj.weight", "model.transformer.blocks.{i}.up_proj.weight",
              "model.transformer.blocks.{i}.ff_out.weight"),
}


def numpy_forward(folder: Path, tokens, causal: bool, store=None) -> np.ndarray:
    """The Qwen2 / Dream / LLaDA forward pass in float64 from config.json and the source safetensors
    (or, given ``store``, the store's dequantized weights), with Hugging Face's rope (rotate halves)
    on the source q/k rows: llama.cpp matches it only if the export reordered LLaDA's q/k rows right."""
    cfg = json.loads((folder / "config.json").read_text())
    src = store if store is not None else open_model(folder)
    read = src.dequantize if store is not None else src.read_float32
    w = {n: read(n).astype(np.float64) for n in src.tensors}
    layout = "llada" if "model.transformer.wte.weight" in w else "qwen2"
    emb, final, head, n_attn, n_q, n_k, n_v, n_o, n_ffn, n_gate, n_up, n_down = NAMES[layout]
    H = cfg.get("num_attention_heads") or cfg["n_heads"]
    KV = cfg.get("num_key_value_heads") or cfg.get("n_kv_heads") or H
    D = (cfg.get("hidden_size") or cfg["d_model"]) // H
    eps, base = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(tokens)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def linear(h, name):
        y = h @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    inv = base ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # rotate the two halves of each head
        a, b = x[..., : D // 2], x[..., D // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    x = w[emb][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1) if causal else np.zeros((T, T))
    for i in range(cfg.get("num_hidden_layers") or cfg["n_layers"]):
        h = norm(x, w[n_attn.format(i=i)])
        q = linear(h, n_q.format(i=i)).reshape(T, H, D).transpose(1, 0, 2)
        k = linear(h, n_k.format(i=i)).reshape(T, KV, D).transpose(1, 0, 2)
        v = linear(h, n_v.format(i=i)).reshape(T, KV, D).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(T, H * D) @ w[n_o.format(i=i)].T
        h = norm(x, w[n_ffn.format(i=i)])
        g = h @ w[n_gate.format(i=i)].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[n_up.format(i=i)].T)) @ w[n_down.format(i=i)].T
    return norm(x, w[final]) @ w[head].T


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return {"rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "cosine": float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got))),
            "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def variants() -> list:
    """(label, config kwargs) of the quantized files: ``target_runtime="gguf"`` int8 / int4 (the library's
    ggml types) when the config has it, and gguf-py's reference Q8_0 / Q4_0 behind the same interface."""
    out = []
    if "target_runtime" in DiffusionQuantConfig.__dataclass_fields__:
        out += [(f"int{b} target_runtime=gguf", dict(bit_width=b, target_runtime="gguf")) for b in (8, 4)]
    for label, enc, bits in (("int8 Q8_0 (gguf-py reference)", "gguf_ref_q8_0", 8),
                             ("int4 Q4_0 (gguf-py reference)", "gguf_ref_q4_0", 4)):
        out.append((label, dict(bit_width=bits, encoding=enc, min_accuracy=0.5, sensitive_bits=bits)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_llama_cpp.json"))
    args = ap.parse_args()
    llama_cpp = import_llama_cpp()
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, DIMS["vocab"] - 8, args.tokens)]
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-llama-"))
    results = []
    try:
        for arch in LAYOUTS:
            if arch == "llada":
                dims = {k: v for k, v in DIMS.items() if k != "kv_heads"}
                folder = gguf_helpers.make_llada(work / arch, **dims)
            else:
                folder = gguf_helpers.make_dream(work / arch, dtype="F32", model_type=None if arch == "dream" else arch,
                                                 **DIMS)
            q = ArrowQuantV2()
            q.quantize_diffusion_model(folder, work / f"{arch}-f32", DiffusionQuantConfig(bit_rules={"*": 0}))
            exported = load_quantized(work / f"{arch}-f32").to_gguf(work / f"{arch}-f32.gguf")
            float_logits = llama_logits(llama_cpp, work / f"{arch}-f32.gguf", tokens)
            reference = numpy_forward(folder, tokens, causal=arch == "qwen2")
            row = {"architecture": exported["architecture"], "dims": DIMS, "tokens": len(tokens),
                   "float_file_vs_numpy_forward": compare(reference, float_logits), "quantized": []}
            for label, cfg in variants():
                store = work / f"{arch}-{len(row['quantized'])}"
                t0 = time.perf_counter()
                res = q.quantize_diffusion_model(folder, store, DiffusionQuantConfig(**cfg))
                gguf_path = work / f"{arch}-{len(row['quantized'])}.gguf"
                info = load_quantized(store).to_gguf(gguf_path)
                logits = llama_logits(llama_cpp, gguf_path, tokens)
                dequantized = numpy_forward(folder, tokens, causal=arch == "qwen2", store=load_quantized(store))
                row["quantized"].append(dict(compare(float_logits, logits), label=label, ggml_types=info["ggml_types"],
                                             vs_numpy_forward_of_store=compare(dequantized, logits),
                                             numpy_store_vs_numpy_float=compare(reference, dequantized),
                                             file_bytes=info["bytes"], weight_cosine=res["cosine_similarity"],
                                             bits_per_weight=res["bits_per_weight"],
                                             quantize_and_export_s=time.perf_counter() - t0))
            results.append(row)
            print(json.dumps(row, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"benchmark": "bench_gguf_llama_cpp", "commit": commit, "machine": platform.machine(),
              "python": platform.python_version(), "arrow_quant": __version__,
              "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "loadavg": os.getloadavg(),
              "statistic": "one decode of one fixed batch (deterministic: no repeats needed); "
                           "rel_error = ||L - L_ref||_F / ||L_ref||_F over all positions and the vocabulary",
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
