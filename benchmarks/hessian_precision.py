"""How much SparseGPT's perplexity on the bundled model moves when only the rounding of the Hessian changes.

Context: llm-compressor's SparseGPT lands 0.01-0.12 perplexity below sparseforge's at 2:4 on every one of five
calibration seeds (benchmarks/results/llmcompressor_seeds.md), although the two run the same algorithm on the
same tokens. The one computation they do differently is accumulating H = XᵀX over the calibration tokens. This
script reruns sparseforge's SparseGPT (50% unstructured and 2:4, 32 x 512 calibration tokens, seeds 0-2) with
three accumulations of the same H and reports held-out perplexity:
  - float32-sum: sparseforge's default, H += XᵀX per 512-token sample in float32;
  - float64-sum: the same sums in float64, rounded to float32 once at the end (the most exact of the three);
  - float32-mean: llm-compressor's scheme, per sample H *= n/(n+1); H += (sqrt(2/(n+1)) X)ᵀ(...) in float32.
The scale differences (sum vs. 2 x mean) do not matter mathematically (dampening is relative to the mean
diagonal); only rounding differs.

Writes benchmarks/results/hessian_precision.json and .md.
Usage: python benchmarks/hessian_precision.py [--seeds 0,1,2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig, InputStats
from sparseforge.data import read_text
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage

OUT = pathlib.Path(__file__).resolve().parent / "results"
SEQ_LEN = 512
ORIGINAL_ADD = InputStats.add_batch


def _without_hessian(stats: InputStats, x: torch.Tensor) -> None:
    """The default update of every statistic except H."""
    h, stats.hessian = stats.hessian, None
    ORIGINAL_ADD(stats, x)
    stats.hessian = h


def add_float64_sum(stats: InputStats, x: torch.Tensor) -> None:
    _without_hessian(stats, x)
    if stats.hessian is None:
        return
    if not hasattr(stats, "hessian64"):
        stats.hessian64 = torch.zeros(stats.hessian.shape, dtype=torch.float64)
    xd = x.reshape(-1, x.shape[-1]).double()
    stats.hessian64 += xd.t() @ xd
    stats.hessian.copy_(stats.hessian64)


def add_float32_mean(stats: InputStats, x: torch.Tensor) -> None:
    seen = stats.n_tokens // SEQ_LEN
    _without_hessian(stats, x)
    if stats.hessian is None:
        return
    for sample in x.reshape(-1, x.shape[-1]).float().split(SEQ_LEN):
        stats.hessian *= seen / (seen + 1)
        scaled = math.sqrt(2 / (seen + 1)) * sample
        stats.hessian += scaled.t() @ scaled
        seen += 1


VARIANTS = {"float32-sum": ORIGINAL_ADD, "float64-sum": add_float64_sum, "float32-mean": add_float32_mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    tokenizer, dense, text = sparseforge.load_tokenizer(), sparseforge.load(), read_text("heldout")
    cls = get_method("sparsegpt")
    rows = []
    try:
        for variant, add in VARIANTS.items():
            InputStats.add_batch = add
            for seed in seeds:
                for label, raw in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
                    cal = CalibrationConfig(samples=32, seq_len=SEQ_LEN, seed=seed)
                    pruned, _ = sparseforge.compress(dense, Recipe("sparsegpt", [Stage("sparsegpt", cls.parse_params(raw))], cal), tokenizer, progress=False)
                    rows.append({"variant": variant, "seed": seed, "pattern": label, "perplexity": perplexity(pruned, tokenizer, text)["perplexity"]})
                    print(rows[-1], flush=True)
    finally:
        InputStats.add_batch = ORIGINAL_ADD
    env = environment()
    env["torch_threads"] = torch.get_num_threads()
    OUT.mkdir(exist_ok=True)
    (OUT / "hessian_precision.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    ppl = {(r["variant"], r["seed"], r["pattern"]): r["perplexity"] for r in rows}
    lines = ["| pattern | seed | " + " | ".join(VARIANTS) + " | spread |", "|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for label in ("50%", "2:4"):
        for seed in seeds:
            vals = [ppl[(v, seed, label)] for v in VARIANTS]
            lines.append(f"| {label} | {seed} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {max(vals) - min(vals):.3f} |")
    md = (f"# SparseGPT perplexity vs. rounding of the Hessian accumulation\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), "
          f"{env['device']}, torch {env['torch']}, {env['torch_threads']} thread(s). Produced by `benchmarks/hessian_precision.py`. "
          "Bundled model, 32 x 512 calibration tokens per seed, perplexity on the held-out plays; the three columns accumulate "
          "the same H = XᵀX with different rounding (see the script's docstring).\n\n" + "\n".join(lines) + "\n")
    (OUT / "hessian_precision.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
