"""Score or comparison group? At high sparsity on the bundled model, magnitude pruning (which compares weights
across the whole matrix by default) beats Wanda (which compares within each output row). This script prunes
with both scores under both comparison groups, so the two effects can be told apart.

Writes benchmarks/results/comparison_group.json and .md.
Usage: python benchmarks/comparison_group.py [--sparsities 0.5,0.6,0.7] [--max-tokens 16384]
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.data import read_text
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method

OUT = pathlib.Path(__file__).resolve().parent / "results"


def pruner(score: str, group: str, sparsity: float):
    cls = get_method(score)
    return cls(cls.parse_params({"sparsity": sparsity, "compare": group}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", default="0.5,0.6,0.7")
    ap.add_argument("--max-tokens", type=int, default=16384)
    args = ap.parse_args()
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig(samples=32, seq_len=512)
    text = read_text("heldout")
    ppl = lambda m: perplexity(m, tokenizer, text, max_tokens=args.max_tokens)["perplexity"]  # noqa: E731
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for score in ("magnitude", "wanda"):
            for group in ("row", "matrix"):
                model = copy.deepcopy(dense)
                pruner(score, group, sparsity).apply(model, tokenizer, calibration=cal, progress=False)
                rows.append({"sparsity": sparsity, "score": score, "group": group, "perplexity": ppl(model)})
                print(rows[-1], flush=True)
    env = environment()
    OUT.mkdir(exist_ok=True)
    dense_ppl = ppl(dense)
    (OUT / "comparison_group.json").write_text(json.dumps({"environment": env, "dense_perplexity": dense_ppl, "max_tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")
    get = {(r["sparsity"], r["score"], r["group"]): r["perplexity"] for r in rows}
    sparsities = sorted({r["sparsity"] for r in rows})
    lines = ["| score | comparison group | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|---|" + "---|" * len(sparsities)]
    for score in ("magnitude", "wanda"):
        for group in ("row", "matrix"):
            default = " (default)" if (score, group) in (("magnitude", "matrix"), ("wanda", "row")) else ""
            lines.append(f"| {score} | {group}{default} | " + " | ".join(f"{get[(s, score, group)]:.2f}" for s in sparsities) + " |")
    md = (f"# Pruning score vs. comparison group\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}. Bundled model, "
          f"held-out perplexity on the first {args.max_tokens} tokens (dense {dense_ppl:.2f}); calibration 32 x 512 tokens. "
          "Produced by `benchmarks/comparison_group.py`.\n\n" + "\n".join(lines) + "\n")
    (OUT / "comparison_group.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
