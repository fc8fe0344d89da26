"""Quality of activation sparsity on the bundled model: TEAL, CATS, WINA and R-Sparse at 25, 40, 50 and 65%, each
alone and (at 50%) after SparseGPT-50 in one recipe, against the dense model and SparseGPT-50 alone.

Per row, through sparseforge's own eval tasks (`eval.tasks.run_tasks`) with the stage attached: held-out
perplexity, KL(dense || model) and top-1 agreement on held-out windows (`fidelity`, the dense bundled model as
reference), passkey and multi-key retrieval accuracy through the cache. Also the run-time sparsity actually
reached on the held-out text (`measure_sparsity`: parameter-weighted over routed projections, and the plain mean).
Calibration: the bundled calibration split, 16 samples of 512 tokens (the presets' settings); every projection
routed; prefill thresholded (prefill: sparse), so perplexity measures the thresholds themselves.

Writes benchmarks/results/activation_quality.json and .md after every row (rows present are skipped; --redo).
`--methods teal_uniform --name activation_quality_allocation --no-composed` gives TEAL with uniform allocation, the
control that separates TEAL's greedy allocation from its magnitude criterion when comparing with WINA.
Usage: python benchmarks/activation_quality.py [--sparsities 0.25,0.4,0.5,0.65] [--lengths 1024] [--per-depth 2]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.data import read_text
from sparseforge.eval.tasks import EvalContext, environment, run_tasks
from sparseforge.methods import get_method
from sparseforge.methods.activations import measure_sparsity
from sparseforge.recipe import Recipe, Stage, load_recipe

OUT = pathlib.Path(__file__).resolve().parent / "results"
NAME = "activation_quality"
METHODS = ("teal", "cats", "wina", "rsparse")
TASKS = ("perplexity", "fidelity", "passkey", "multikey")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def stage(method: str, sparsity: float) -> Stage:
    params = {"sparsity": sparsity}
    if method == "teal_uniform":  # TEAL with one sparsity for every site: separates allocation from the criterion
        method, params["allocation"] = "teal", "uniform"
    cls = get_method(method)
    if cls.lifetime == "runtime":
        params.update(gate_token_counts=[1], gate_repeats=3)
    return Stage(method, cls.parse_params(params))


def measure(model, dense, tok, args) -> dict:
    settings = {"retrieval_lengths": args.lengths, "retrieval_depths": DEPTHS, "retrieval_per_cell": args.per_depth, "retrieval_seed": 0,
                "max_tokens": args.max_tokens}
    t0 = time.perf_counter()
    m = run_tasks(EvalContext(model, tok, reference=dense, settings=settings), list(TASKS))
    ids = torch.tensor([tok(read_text("heldout"), add_special_tokens=False)["input_ids"][:2048]])
    with torch.no_grad(), measure_sparsity(model) as sp:
        model(ids)
    return {"perplexity": m.get("perplexity"), "kl": m.get("kl_to_reference"), "top1": m.get("top1_agreement"),
            "passkey": m.get("passkey_accuracy"), "multikey": m.get("multikey_accuracy"),
            "measured_sparsity": sp.get("weighted") if sp.get("projections") else 0.0, "measured_mean": sp.get("mean") if sp.get("projections") else 0.0,
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(doc) -> str:
    env = doc["environment"]
    lines = ["# Activation sparsity: quality on the bundled model", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}. Produced by `benchmarks/activation_quality.py`: "
             f"perplexity on the held-out text (first {doc['max_tokens']} tokens), KL(dense || model) and top-1 agreement, passkey and "
             f"multi-key accuracy at {doc['lengths']} tokens ({doc['per_depth']} episodes x {len(DEPTHS)} depths), run-time sparsity reached "
             "on 2048 held-out tokens (parameter-weighted over routed projections). Calibration: 16 x 512 tokens of the calibration split.",
             "", "| recipe | target | measured sparsity | perplexity | KL | top-1 | passkey | multikey |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        f = lambda v, d=3: "" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r['recipe']} | {r['target']} | {f(r['measured_sparsity'])} | {f(r['perplexity'], 2)} | {f(r['kl'], 4)} | "
                     f"{f(r['top1'])} | {f(r['passkey'], 2)} | {f(r['multikey'], 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--per-depth", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--name", default=NAME, help="results file stem")
    ap.add_argument("--no-composed", action="store_true")
    ap.add_argument("--presets", default="", help="comma-separated presets added as rows with their own recipes, e.g. gptq-w8,gptq-w8+teal-50")
    args = ap.parse_args()
    args.lengths = [int(v) for v in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    tok = sparseforge.load_tokenizer(None)
    dense = sparseforge.load()
    path = OUT / f"{args.name}.json"
    doc = json.loads(path.read_text()) if path.exists() and not args.redo else {"rows": []}
    doc.update(environment=environment(), lengths=args.lengths, per_depth=args.per_depth, max_tokens=args.max_tokens)
    done = {r["recipe"] for r in doc["rows"]}
    cal = CalibrationConfig(samples=16, seq_len=512)
    plan = [("dense", None, [])]
    for method in args.methods.split(","):
        for s in (float(v) for v in args.sparsities.split(",")):
            plan.append((f"{method}-{round(s * 100)}", s, [stage(method, s)]))
    plan.append(("sparsegpt-50", 0.5, [stage("sparsegpt", 0.5)]))
    for method in [] if args.no_composed else args.methods.split(","):
        plan.append((f"sparsegpt-50+{method}-50", 0.5, [stage("sparsegpt", 0.5), stage(method, 0.5)]))
    presets = [p for p in args.presets.split(",") if p]
    for preset in presets:
        plan.append((preset, None, load_recipe(preset)))
    for name, target, stages in plan:
        if name in done:
            continue
        recipe = stages if isinstance(stages, Recipe) else Recipe(name, stages, cal)
        model = dense if not recipe.stages else sparseforge.compress(dense, recipe, tok, progress=False)[0]
        row = {"recipe": name, "target": target, **measure(model, dense, tok, args)}
        doc["rows"].append(row)
        doc["load_average"] = [round(v, 2) for v in os.getloadavg()]
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        (OUT / f"{args.name}.md").write_text(markdown(doc))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
