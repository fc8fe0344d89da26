"""Routing-aware calibration on an MoE model: does giving each expert the statistics of its own routed tokens
help, should the routing weight enter them, and what does the starved-expert fallback do?

Settings (each compresses a fresh copy of the model; every expert and attention projection is pruned):
  per-expert        the default: each expert's statistics from the tokens routed to it
  all-tokens        every expert calibrated on every token entering its block (min_expert_tokens above any
                    count: the "ignore the routing" baseline, which is also what the fallback does)
  routing-weighted  per-expert, each token's row scaled by its routing weight (calibration routing_weighted)
for SparseGPT and Wanda at 50%; then SparseGPT with a tiny calibration set (1 x 64 tokens, where experts do
starve) at min_expert_tokens 1 (only an expert with no token falls back), 16 (the default) and all-tokens.
Metrics: held-out perplexity and KL to the dense model (eval.tasks), compress seconds, experts that fell back,
and the routed-token counts per expert of the default run.

Writes benchmarks/results/moe_calibration.json and .md.
Usage: python benchmarks/moe_calibration.py --model DIR [--max-tokens N] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import pathlib
import time

import torch
from transformers import AutoTokenizer

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.masks import prune_count
from sparseforge.eval.tasks import EvalContext, environment, run_tasks
from sparseforge.recipe import Recipe, Stage
from sparseforge.methods import get_method

OUT = pathlib.Path(__file__).resolve().parent / "results"
ALL = 10**9  # min_expert_tokens above every count: every expert takes the block's whole input


def settings(quick: bool):
    full = CalibrationConfig(samples=8 if quick else 32, seq_len=512)
    tiny = CalibrationConfig(samples=1, seq_len=64)
    rows = []
    for method in ("sparsegpt", "wanda"):
        rows += [(method, "per-expert", full), (method, "all-tokens", dataclasses.replace(full, min_expert_tokens=ALL)),
                 (method, "routing-weighted", dataclasses.replace(full, routing_weighted=True))]
    rows += [("sparsegpt", "tiny calibration, min_expert_tokens 1", dataclasses.replace(tiny, min_expert_tokens=1)),
             ("sparsegpt", "tiny calibration, min_expert_tokens 16", tiny),
             ("sparsegpt", "tiny calibration, all-tokens", dataclasses.replace(tiny, min_expert_tokens=ALL))]
    return rows


def exact_half(model) -> bool:
    """Every projection (each expert's matrix of a stack on its own) has floor(numel / 2) zeros or more."""
    for proj in ModelAdapter(model).projections().values():
        w = proj.weight()
        for m in (list(w) if w.dim() == 3 else [w]):
            if (m == 0).sum().item() < prune_count(m.numel(), 0.5):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an MoE model directory")
    parser.add_argument("--max-tokens", type=int, default=20000, help="held-out tokens for perplexity and KL")
    parser.add_argument("--quick", action="store_true", help="8 calibration windows instead of 32 (writes moe_calibration_quick.*)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = sparseforge.load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eval_settings = {"max_tokens": args.max_tokens}
    base = run_tasks(EvalContext(dense, tokenizer, reference=dense, settings=eval_settings), ["perplexity"])
    rows = [{"method": "dense", "setting": "", "perplexity": base["perplexity"], "kl_to_reference": 0.0}]
    routing_counts = None
    for method, label, cal in settings(args.quick):
        cls = get_method(method)
        recipe = Recipe(f"{method}-50", [Stage(method, cls.parse_params({"sparsity": 0.5}))], cal)
        start = time.perf_counter()
        model, report = sparseforge.compress(copy.deepcopy(dense), recipe, tokenizer, progress=False)
        seconds = time.perf_counter() - start
        stage = report["stages"][0]
        routing = stage["routing"]
        metrics = run_tasks(EvalContext(model, tokenizer, reference=dense, settings=eval_settings), ["perplexity", "fidelity"])
        fallback = sum(len(b["fallback"]) for b in routing["blocks"].values())
        experts = sum(len(b["tokens"]) for b in routing["blocks"].values())
        rows.append({"method": method, "setting": label, "perplexity": metrics["perplexity"], "kl_to_reference": metrics["kl_to_reference"],
                     "compress_seconds": round(seconds, 2), "calibration": f"{cal.samples} x {cal.seq_len}",
                     "experts_fallback": f"{fallback}/{experts}", "every_projection_half_zero": exact_half(model),
                     "projections": len(stage["projections"])})
        if method == "sparsegpt" and label == "per-expert":
            routing_counts = {k: v["tokens"] for k, v in routing["blocks"].items()}
        print(json.dumps(rows[-1]), flush=True)
        del model

    load = os.getloadavg()[0]
    env = environment(dense) | {"load_average_1min": round(load, 2),
                                "machine": f"2-core Intel Xeon (AVX-512), torch {torch.__version__}, shared machine, load average {load:.1f}"}
    name = "moe_calibration_quick" if args.quick else "moe_calibration"
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model), "held_out_tokens": args.max_tokens, "environment": env, "rows": rows,
              "routed_tokens_per_expert": routing_counts}
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# MoE routing-aware calibration ({pathlib.Path(args.model).name})", "",
             f"Machine: {env['machine']}. Held-out tokens: {args.max_tokens}. Produced by `benchmarks/moe_calibration.py`.", "",
             "| method | setting | calibration | perplexity | KL to dense | experts on fallback | exact 50% everywhere | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r.get('calibration', '')} | {r['perplexity']:.3f} | {r['kl_to_reference']:.4f} | "
                     f"{r.get('experts_fallback', '')} | {r.get('every_projection_half_zero', '')} | {r.get('compress_seconds', '')} |")
    if routing_counts:
        lines += ["", "Routed (token, slot) pairs per expert in the default SparseGPT run's calibration (32 x 512 tokens, top-2):", ""]
        lines += [f"- {k}: {v}" for k, v in routing_counts.items()]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
