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
    lines = ["| method | s / layer | peak memory GB | est. 7B (32 layers) min | est. 70B (80 layers) min |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds_per_layer']} | {r['peak_memory_bytes'] / 1e9:.2f} | {r['estimate_7b_minutes']} | {r['estimate_70b_minutes']} |")
    md = (f"# One Llama-2-7B-shaped layer, 50% unstructured\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), device {env['device']}, "
          f"torch {env['torch']} with {threads} thread(s), {dtype}; {args.tokens} synthetic calibration tokens. Produced by `benchmarks/prune_7b_layer.py`.\n\n"
          + "\n".join(lines) + "\n\nPeak memory on CPU is the process's resident peak (weights, activations and Hessians included); "
          "on GPU, torch.cuda.max_memory_allocated. Whole-model figures are extrapolations from one layer, not measurements.\n")
    (OUT / f"prune_7b_layer_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
