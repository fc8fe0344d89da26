"""Why OWL does or does not help on the bundled model: per decoder layer, OWL's outlier ratio and the sparsity
it allocates, next to the layer's measured sensitivity (held-out perplexity when only that layer is pruned
by Wanda at the target sparsity, all other layers dense). OWL's premise is that layers with more outliers
are the sensitive ones; the table shows whether that holds here.

Writes benchmarks/results/owl_analysis.json and owl_analysis.md.
Usage: python benchmarks/owl_analysis.py [--sparsity 0.7] [--max-tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.tasks import environment
from sparseforge.data import read_text
from sparseforge.methods import get_method
from sparseforge.methods.weights.owl import allocate, outlier_ratios
from sparseforge.recipe import Recipe, Stage

OUT = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=16384)
    args = ap.parse_args()
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig(samples=32, seq_len=512)
    owl = get_method("owl").Params()
    text = read_text("heldout")
    ppl = lambda m: perplexity(m, tokenizer, text, max_tokens=args.max_tokens)["perplexity"]
    dense_ppl = ppl(dense)
    ratios = outlier_ratios(dense, tokenizer, ("*",), (), cal, owl.outlier_threshold, progress=False)
    alloc = allocate(ratios, args.sparsity, owl.spread)
    wanda = get_method("wanda")
    rows = []
    for layer in sorted(ratios):
        recipe = Recipe(f"wanda-layer{layer}", [Stage("wanda", wanda.parse_params({"sparsity": args.sparsity}), targets=[f"*.layers.{layer}.*"])], cal)
        pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
        rows.append({"layer": layer, "outlier_ratio": ratios[layer], "owl_sparsity": alloc[layer],
                     "ppl_only_this_layer_pruned": ppl(pruned)})
        print(rows[-1], flush=True)
    # Rank agreement: does a higher outlier ratio go with a higher sensitivity?
    by_ratio = sorted(rows, key=lambda r: r["outlier_ratio"])
    by_sensitivity = sorted(rows, key=lambda r: r["ppl_only_this_layer_pruned"])
    env = environment()
    OUT.mkdir(exist_ok=True)
    (OUT / "owl_analysis.json").write_text(json.dumps({"environment": env, "sparsity": args.sparsity, "max_tokens": args.max_tokens,
                                                        "dense_perplexity": dense_ppl, "rows": rows}, indent=2) + "\n")
    lines = ["| layer | outlier ratio (M=5) | OWL sparsity | ppl, only this layer at "
             f"{args.sparsity:.0%} (Wanda) |", "|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['outlier_ratio']:.4f} | {r['owl_sparsity']:.3f} | {r['ppl_only_this_layer_pruned']:.2f} |" for r in rows]
    md = (f"# OWL on the bundled model\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), {env['device']}, torch {env['torch']}. "
          f"Produced by `benchmarks/owl_analysis.py`. Perplexity on the first {args.max_tokens} held-out tokens; dense {dense_ppl:.2f}.\n\n"
          + "\n".join(lines)
          + f"\n\nLayers by outlier ratio (low to high): {[r['layer'] for r in by_ratio]}; "
          f"by sensitivity (least to most): {[r['layer'] for r in by_sensitivity]}. OWL gives the lowest sparsity to the "
          "highest outlier ratio; it helps when that is also the most sensitive layer.\n")
    (OUT / "owl_analysis.md").write_text(md)
    print(md)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
