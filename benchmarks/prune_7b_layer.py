"""Prune one Llama-2-7B-shaped decoder layer (hidden 4096, intermediate 11008, 32 heads; random weights,
synthetic calibration inputs) with each method: time and peak memory, and from them an estimate for whole
7B and 70B models pruned layer by layer.

Writes benchmarks/results/prune_7b_layer_{device}.json and .md.
Usage: python benchmarks/prune_7b_layer.py [--device cpu|cuda] [--tokens 8192] [--methods magnitude,wanda,sparsegpt]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from sparseforge.core.calibration import InputStats
from sparseforge.eval.efficiency import measure_peak_memory
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method

OUT = pathlib.Path(__file__).resolve().parent / "results"
# Per-layer FLOP scale of 70B relative to 7B (hidden 8192 vs 4096, intermediate 28672 vs 11008): the
# projection work grows with in·out and SparseGPT's with out·in² (dominated by the MLP down projection).
SHAPES = {"7b": (4096, 11008, 32), "70b": (8192, 28672, 80)}
# Whole-model shapes for the memory estimate: hidden, intermediate, layers, query heads, key-value heads, vocabulary.
MODELS = {"Llama-2-7B": (4096, 11008, 32, 32, 32, 32000), "Llama-2-70B": (8192, 28672, 80, 64, 8, 32000)}


def layerwise_peak_estimate(method: str, model: str, calib_tokens: int = 128 * 2048, seq_len: int = 2048, weight_bytes: int = 2) -> dict:
    """Bytes on the compute device while `run_layerwise` prunes one layer of `model` (the largest moment):
    the layer's weights, the embedding and LM head (they stay on the device for the walk), the captured inputs
    and the outputs being produced for the next layer (calib_tokens x hidden each, in the weight dtype), the
    per-projection float32 statistics (one XᵀX per projection for SparseGPT, column norms otherwise),
    SparseGPT's working copies of the largest Hessian (inverse and Cholesky factor), and one sequence's MLP
    activations during the forward pass. An estimate from shapes, not a measurement."""
    h, i, _layers, q_heads, kv_heads, vocab = MODELS[model]
    kv = h * kv_heads // q_heads
    layer_weights = (h * h * 2 + h * kv * 2 + 3 * h * i) * weight_bytes
    inputs = {"q": h, "k": h, "v": h, "o": h, "gate": h, "up": h, "down": i}
    stats = sum(n * n * 4 for n in inputs.values()) if method == "sparsegpt" else sum(n * 8 for n in inputs.values())
    work = 2 * i * i * 4 if method == "sparsegpt" else 0
    calibrated = method != "magnitude"  # magnitude runs no forward pass and keeps no statistics
    parts = {
        "layer_weights": layer_weights,
        "embedding_and_head": 2 * vocab * h * weight_bytes,
        "calibration_activations": 2 * calib_tokens * h * weight_bytes if calibrated else 0,
        "statistics": stats if calibrated else 0,
        "solver_workspace": work,
        "forward_temporaries": 3 * seq_len * i * weight_bytes if calibrated else 0,
    }
    return parts | {"total": sum(parts.values())}


def prune_layer(method: str, layer, hidden: torch.Tensor, position_embeddings, device) -> float:
    cls = get_method(method)
    pruner = cls(cls.parse_params({"sparsity": 0.5}))
    projections = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats: dict[str, InputStats] = {}
    start = time.perf_counter()
    if pruner.needs_stats:
        hooks = []
        for name, mod in projections.items():
            st = stats[name] = InputStats(mod.in_features, device, hessian="hessian" in pruner.needs_stats)
            hooks.append(mod.register_forward_hook(lambda m, a, o, st=st: st.add_batch(a[0])))
        with torch.inference_mode():
            for chunk in hidden.split(1):
                layer(chunk, position_embeddings=position_embeddings, attention_mask=None)
        for h in hooks:
            h.remove()
    for name, mod in projections.items():
        w = mod.weight.data
        mod.weight.data = pruner.prune_weight(w.float(), stats.get(name), pruner.pattern).to(w.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _estimate_table(estimates: dict) -> str:
    models = list(MODELS)
    lines = ["\n## Estimated device memory of layer-by-layer pruning (float16 weights, 128 x 2048 calibration tokens)\n",
             "| method | " + " | ".join(f"{m} (GiB)" for m in models) + " |", "|---|" + "---|" * len(models)]
    for method, per_model in estimates.items():
        lines.append(f"| {method} | " + " | ".join(f"{per_model[m]['total'] / 2**30:.1f}" for m in models) + " |")
    sgpt = estimates.get("sparsegpt", next(iter(estimates.values())))["Llama-2-7B"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f}" for k, v in sgpt.items() if k != "total")
    return ("\n".join(lines) + f"\n\nComputed from shapes by `layerwise_peak_estimate` (not measured; no GPU was used). "
            f"SparseGPT on Llama-2-7B, GiB: {parts}. Only one decoder layer is on the device at a time, so a 7B model "
            "fits a 24 GB GPU with room to spare; the rest of the model waits in CPU memory, or on disk with "
            "`--offload-dir`. Fewer calibration tokens shrink the activation term linearly.\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens (sequences of 512)")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hidden_size, inter, _ = SHAPES["7b"]
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=inter, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    rotary = LlamaRotaryEmbedding(config).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(args.tokens // 512, 512, hidden_size, generator=g) * 0.5).to(device, dtype)
    pos = torch.arange(512, device=device).unsqueeze(0)
    position_embeddings = rotary(hidden[:1], pos)
    rows = []
    for method in args.methods.split(","):
        torch.manual_seed(0)
        layer = LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()
        params = sum(p.numel() for p in layer.parameters())
        seconds, peak = measure_peak_memory(lambda: prune_layer(method, layer, hidden, position_embeddings, device), device=device)
        zeros = sum((m.weight == 0).sum().item() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        row = {"method": method, "seconds_per_layer": round(seconds, 2), "peak_memory_bytes": peak, "layer_params": params,
               "sparsity": zeros / sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)),
               "estimate_7b_minutes": round(seconds * 32 / 60, 1),
               # 70B: per-layer work scales ~ (8192/4096)·(28672/11008)² for SparseGPT, (8192·28672)/(4096·11008) otherwise
               "estimate_70b_minutes": round(seconds * 80 / 60 * ((2 * (28672 / 11008) ** 2) if method == "sparsegpt" else (8192 * 28672) / (4096 * 11008)), 1)}
        rows.append(row)
        print(row, flush=True)
    env = environment()
    OUT.mkdir(exist_ok=True)
    tag = device.type
    threads = torch.get_num_threads()
    (OUT / f"prune_7b_layer_{tag}.json").write_text(json.dumps({"environment": env, "torch_threads": threads, "tokens": args.tokens, "dtype": str(dtype), "rows": rows}, indent=2) + "\n")
    estimates = {m: {model: layerwise_peak_estimate(m, model) for model in MODELS} for m in args.methods.split(",")}
    doc = json.loads((OUT / f"prune_7b_layer_{tag}.json").read_text())
    doc["layerwise_peak_estimate_fp16_262144_tokens"] = estimates
    (OUT / f"prune_7b_layer_{tag}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["| method | s / layer | peak memory GB | est. 7B (32 layers) min | est. 70B (80 layers) min |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds_per_layer']} | {r['peak_memory_bytes'] / 1e9:.2f} | {r['estimate_7b_minutes']} | {r['estimate_70b_minutes']} |")
    md = (f"# One Llama-2-7B-shaped layer, 50% unstructured\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), device {env['device']}, "
          f"torch {env['torch']} with {threads} thread(s), {dtype}; {args.tokens} synthetic calibration tokens. Produced by `benchmarks/prune_7b_layer.py`.\n\n"
          + "\n".join(lines) + "\n\nPeak memory on CPU is the process's resident peak (weights, activations and Hessians included); "
          "on GPU, torch.cuda.max_memory_allocated. Whole-model figures are extrapolations from one layer, not measurements.\n"
          + _estimate_table(estimates))
    (OUT / f"prune_7b_layer_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
