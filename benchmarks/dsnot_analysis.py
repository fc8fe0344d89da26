"""Why DSnoT does or does not help Wanda on the bundled model: for each variant, held-out perplexity next to
the two errors of the projections it changes, on the dense model's calibration inputs:

* mean-output error ||(W - Ŵ) E[x]|| / ||W E[x]||: the quantity DSnoT's swaps reduce (its objective);
* reconstruction error ||(W - Ŵ) X|| / ||W X||: what the layer's output actually loses.

If DSnoT lowers its objective but raises the reconstruction error, the mean is a poor stand-in for the
inputs at that sparsity and the repair trades real error for a smaller mean shift.

Writes benchmarks/results/dsnot_analysis.json and dsnot_analysis.md.
Usage: python benchmarks/dsnot_analysis.py [--sparsities 0.6,0.7] [--max-tokens 16384]
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys

import torch

import sparseforge
from sparseforge.core.adapter import ATTENTION_HINTS, ModelAdapter
from sparseforge.core.calibration import CalibrationConfig, calibration_batches, run_layerwise
from sparseforge.data import read_text
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from weight_quality import reconstruction_errors  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results"
VARIANTS = [
    ("wanda", "wanda", {}),
    ("dsnot, attention (default)", "dsnot", {"repair": "attention"}),
    ("dsnot, attention, no variance term", "dsnot", {"repair": "attention", "variance_power": 0.0}),
    ("dsnot, all projections", "dsnot", {"repair": "all"}),
]


def dense_statistics(model, tokenizer, cal):
    hessians, means = {}, {}

    def grab(i, layer, projections, stats):
        for name, st in stats.items():
            hessians[name] = st.hessian.clone()
            means[name] = st.col_mean.clone()

    run_layerwise(copy.deepcopy(model), grab, batches=calibration_batches(tokenizer, cal), stats=("hessian",), config=cal, progress=False)
    return hessians, means


def mean_output_errors(dense, pruned, means) -> dict[str, float]:
    d_proj, p_proj = ModelAdapter(dense).projections(), ModelAdapter(pruned).projections()
    out = {}
    for name, mu in means.items():
        W = d_proj[name].weight().float()
        delta = W - p_proj[name].weight().float()
        out[name] = ((delta @ mu).norm() / (W @ mu).norm()).item()
    return out


def is_attention(name: str) -> bool:
    return any(part in ATTENTION_HINTS for part in name.split("."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.6,0.7")
    ap.add_argument("--max-tokens", type=int, default=16384)
    args = ap.parse_args()
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig(samples=32, seq_len=512)
    text = read_text("heldout")
    ppl = lambda m: perplexity(m, tokenizer, text, max_tokens=args.max_tokens)["perplexity"]  # noqa: E731
    hessians, means = dense_statistics(dense, tokenizer, cal)
    dense_ppl = ppl(dense)
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for label, method, params in VARIANTS:
            recipe = Recipe(label, [Stage(method, get_method(method).parse_params({"sparsity": sparsity, **params}))], cal)
            pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            recon = reconstruction_errors(dense, pruned, hessians)
            mean_err = mean_output_errors(dense, pruned, means)
            row = {"sparsity": sparsity, "variant": label, "perplexity": ppl(pruned)}
            for scope, keep in (("attention", is_attention), ("mlp", lambda n: not is_attention(n))):
                names = [n for n in recon if keep(n)]
                row[f"{scope}_reconstruction_error"] = statistics.mean(recon[n] for n in names)
                row[f"{scope}_mean_output_error"] = statistics.mean(mean_err[n] for n in names)
            rows.append(row)
            print(row, flush=True)
    env = environment()
    OUT.mkdir(exist_ok=True)
    (OUT / "dsnot_analysis.json").write_text(json.dumps({"environment": env, "dense_perplexity": dense_ppl, "max_tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")
    lines = ["| sparsity | variant | perplexity | attention: mean-output err | attention: reconstruction err | MLP: mean-output err | MLP: reconstruction err |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.0%} | {r['variant']} | {r['perplexity']:.2f} | {r['attention_mean_output_error']:.4f} | "
                     f"{r['attention_reconstruction_error']:.4f} | {r['mlp_mean_output_error']:.4f} | {r['mlp_reconstruction_error']:.4f} |")
    md = (f"# DSnoT over Wanda: perplexity and the errors it trades\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}. "
          f"Bundled model, held-out perplexity on the first {args.max_tokens} tokens (dense {dense_ppl:.2f}); errors are means over "
          "projections on the dense model's 32 x 512 calibration inputs. Produced by `benchmarks/dsnot_analysis.py`.\n\n" + "\n".join(lines) + "\n")
    (OUT / "dsnot_analysis.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
