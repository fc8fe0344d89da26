"""Recovery fine-tuning after pruning on the bundled reference model.

After each pruning recipe (wanda-50, sparsegpt-2of4, structured-25), each recovery method trains for the same
number of tokens drawn from the bundled calibration text (never the held-out text), with the pruning masks
attached. Reported per (recipe, method): held-out perplexity before and after (first 16384 held-out tokens), the
share of the perplexity gap to dense that is recovered, the sparsity of the pruned projections after the merge,
the positions the mask checker found changed, whether the weights still satisfy the artifact's declared pattern,
trainable parameters, wall time; for LoRA also the sparsity a plain (dense) PEFT merge of the same adapters would
have left. A second table measures what keeping the masks costs per training step: no masks vs. the gradient hook +
re-zeroing used here vs. a `torch.nn.utils.parametrize` mask (weight = original * mask on every forward).

    python benchmarks/training_recovery.py --recipes wanda-50        # then sparsegpt-2of4, structured-25; results merge
    python benchmarks/training_recovery.py                       # everything (one recipe per call keeps each run near 10 minutes)
    python benchmarks/training_recovery.py --recipes wanda-50 --methods lora --steps 20   # a quick look

Writes benchmarks/results/training_recovery.{json,md} and the loss curves training_recovery_<recipe>.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

import sparseforge
from sparseforge.core.sparsity_masks import attach_masks, check_declared_patterns, check_masks, masks_from_model
from sparseforge.data import read_text
from sparseforge.eval.perplexity import perplexity
from sparseforge.methods import get_method
from sparseforge.methods.training.lora import Lora
from sparseforge.methods.training.trainer import train

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RECIPES = ("wanda-50", "sparsegpt-2of4", "structured-25")
METHODS = ("perp", "masked-finetune", "lora", "spiel")
EVAL_TOKENS = 16384
# Learning rates: the methods' usual ranges for a small model (no search on the held-out text, which would tune
# on the measurement); the same token budget for every method.
SETTINGS = {
    "perp": {"lr": 5e-3},
    "masked-finetune": {"lr": 1e-4},
    "lora": {"lr": 1e-3, "rank": 8, "alpha": 16},
    "spiel": {"lr": 5e-3, "density": 0.02, "update_every": 20, "swap": 0.2},
}


class LoraWithDenseCount(Lora):
    """LoRA that also counts, before its masked merge, what PEFT's dense merge of the same adapters would leave."""

    @torch.no_grad()
    def finish(self, model, work):
        from peft.tuners.lora import LoraLayer

        from sparseforge.core.sparsity_masks import masks_of

        handle = masks_of(model)
        zeros = total = 0
        for module in work.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                keep = handle.mask_for(weight)
                if keep is None:
                    continue
                merged = weight + sum(module.get_delta_weight(a).to(weight.dtype) for a in module.active_adapters)
                zeros += int((merged == 0).sum())
                total += merged.numel()
        self.dense_merge_sparsity = zeros / total if total else None
        return super().finish(model, work)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, torch {torch.__version__}, shared machine, load average {os.getloadavg()[0]:.2f} at start"


def heldout_ppl(model, tokenizer, text) -> float:
    return perplexity(model, tokenizer, text, max_tokens=EVAL_TOKENS)["perplexity"]


def pruned_sparsity(model, masks) -> float:
    params = dict(model.named_parameters())
    found = [params[k] for k in masks if k in params]
    total = sum(p.numel() for p in found)
    return sum(int((p == 0).sum()) for p in found) / total if total else 0.0


def run_method(name, pruned, tokenizer, steps, batch_size, seq_len, heldout, extra=None):
    cls = get_method(name)
    params = cls.parse_params({"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "warmup_steps": max(1, steps // 20),
                               **SETTINGS[name], **(extra or {})})
    method = LoraWithDenseCount(params) if name == "lora" else cls(params)
    model = copy.deepcopy(pruned)
    masks = masks_from_model(model)
    start = time.perf_counter()
    result = train(method, model, tokenizer, progress=False)
    seconds = time.perf_counter() - start
    model.eval()
    row = {"method": name, "params": {k: v for k, v in vars(params).items() if k in ("lr", "rank", "density", "steps")},
           "trainable_params": result.trainable_params, "trainable_share": result.trainable_share,
           "tokens": result.tokens, "seconds": round(seconds, 1), "loss_first": result.loss_first, "loss_last": result.loss_last,
           "perplexity_after": heldout_ppl(model, tokenizer, heldout), "sparsity_after": pruned_sparsity(model, masks),
           "mask_changed": check_masks(model, masks).changed, "declared_pattern": check_declared_patterns(model),
           "losses": [e["loss"] for e in result.log.steps]}
    if name == "lora":
        row["dense_merge_sparsity"] = method.dense_merge_sparsity
    return row


def mask_cost(pruned, tokenizer, repeats: int, batch_size: int, seq_len: int) -> dict:
    """Seconds per training step (forward, backward, AdamW) without masks, with this module's hooks, and with a
    parametrization; alternating, medians after one warm-up round."""
    from torch.nn.utils import parametrize

    ids = torch.tensor(tokenizer(read_text("calibration"), add_special_tokens=False, verbose=False)["input_ids"][: batch_size * seq_len]).view(batch_size, seq_len)

    class Masked(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.register_buffer("keep", keep)

        def forward(self, w):
            return w * self.keep

    def make(variant):
        model = copy.deepcopy(pruned).train()
        masks = masks_from_model(model)
        handle = None
        if variant == "hooks":
            handle = attach_masks(model, masks)
        elif variant == "parametrize":
            params = dict(model.named_parameters())
            for name, keep in masks.items():
                owner = model.get_submodule(name.rsplit(".", 1)[0])
                parametrize.register_parametrization(owner, "weight", Masked(keep.to(params[name].dtype)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=False)
        return model, opt, handle

    variants = {v: make(v) for v in ("none", "hooks", "parametrize")}
    times = {v: [] for v in variants}
    for r in range(repeats + 1):
        for v, (model, opt, handle) in variants.items():
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if handle is not None:
                handle.enforce()
            if r:
                times[v].append(time.perf_counter() - start)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"seconds_per_step": med, "hooks_vs_none": med["hooks"] / med["none"], "parametrize_vs_none": med["parametrize"] / med["none"],
            "repeats": repeats, "tokens_per_step": batch_size * seq_len}


def plot(rows, recipe, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for row in rows:
        ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["method"], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (calibration text)")
    ax.set_title(f"recovery after {recipe}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(doc) -> str:
    lines = [f"# Recovery fine-tuning after pruning\n", f"Machine: {doc['machine']}. Model: the bundled reference model (4 M parameters, "
             f"Llama). Dense held-out perplexity: {doc['dense_perplexity']:.3f} (first {EVAL_TOKENS} held-out tokens). Every method trains "
             f"{doc['steps']} steps of {doc['batch_size']} x {doc['seq_len']} tokens ({doc['steps'] * doc['batch_size'] * doc['seq_len']} "
             "tokens) of the bundled calibration text, AdamW, linear warm-up then cosine; pruning masks attached. "
             "Gap recovered = (ppl pruned - ppl after) / (ppl pruned - ppl dense). Sparsity: exact zeros in the pruned projections after "
             "the merge. Pattern: the artifact's declared pattern still holds (N:M / unstructured).\n",
             "Generated by `python benchmarks/training_recovery.py --recipes R` for R in wanda-50, sparsegpt-2of4, structured-25 (one "
             "process each; results merge into one JSON), `--recipes '' --dense-finetune` and `--mask-cost-only`; "
             f"`--report-only` rewrites this page. Last call: `{doc['argv'].strip() or '(defaults)'}`.\n"]
    if doc.get("dense_finetuned"):
        parts = ", ".join(f"{name} {row['perplexity_after']:.3f}" for name, row in doc["dense_finetuned"].items())
        lines.append(f"The same training applied to the dense model gives held-out perplexity {parts} (dense {doc['dense_perplexity']:.3f}): "
                     "the calibration text is close to the held-out text, so training on it improves even the dense model, and a "
                     "recovered share above 100% is that improvement, not a pruned model better than its trained dense twin.\n")
    for recipe, block in doc["recipes"].items():
        lines.append(f"\n## After {recipe}\n\nPruned perplexity {block['perplexity_pruned']:.3f}, sparsity of the pruned projections "
                     f"{block['sparsity_pruned']:.4f}, pruning {block['prune_seconds']:.1f} s. Run on: {block['machine']}.\n")
        lines.append("| method | trainable params | ppl after | gap recovered | sparsity after | changed positions | pattern holds | time (s) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in block["methods"]:
            gap = row.get("gap_recovered")
            pattern = row["declared_pattern"]
            holds = "n/a (structured)" if not pattern["checked"] else ("yes" if not pattern["failed"] else f"no ({len(pattern['failed'])})")
            sparsity = f"{row['sparsity_after']:.4f}" if block["sparsity_pruned"] else "n/a (smaller dense model)"
            lines.append(f"| {row['method']} | {row['trainable_params']} ({100 * row['trainable_share']:.2f}%) | {row['perplexity_after']:.3f} | "
                         f"{'-' if gap is None else f'{100 * gap:.1f}%'} | {sparsity} | {row['mask_changed']} | {holds} | {row['seconds']:.0f} |")
        for row in block["methods"]:
            if row.get("dense_merge_sparsity") is not None:
                lines.append(f"\nLoRA: a plain (dense) PEFT merge of the same adapters would leave sparsity {row['dense_merge_sparsity']:.4f} "
                             f"instead of {row['sparsity_after']:.4f}.")
    cost = doc.get("mask_cost")
    if cost:
        s = cost["seconds_per_step"]
        lines.append(f"\n## What keeping the masks costs\n\n{('Run on: ' + cost['machine'] + '. ') if cost.get('machine') else ''}Seconds per training step ({cost['tokens_per_step']} tokens, forward + backward + "
                     f"AdamW) after wanda-50, medians of {cost['repeats']} alternating repeats after one warm-up: no masks {s['none']:.3f}, "
                     f"gradient hook + re-zeroing (what sparseforge uses) {s['hooks']:.3f} ({cost['hooks_vs_none']:.2f}x), parametrization "
                     f"(weight = original * mask each forward) {s['parametrize']:.3f} ({cost['parametrize_vs_none']:.2f}x).\n")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mask-cost-repeats", type=int, default=8, help="0: skip the mask-cost table")
    parser.add_argument("--dense-finetune", action="store_true",
                        help="also train the dense model with perp and masked-finetune on the same tokens: how much of a 'recovery' is the "
                             "fine-tuning text itself improving the model")
    parser.add_argument("--name", default="training_recovery")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON, run nothing")
    parser.add_argument("--mask-cost-only", action="store_true", help="only the mask-cost table (after wanda-50); the rest of the JSON stays")
    args = parser.parse_args(argv)
    if args.report_only:
        doc = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(doc))
        return 0
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    doc = {"machine": machine(), "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
           "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_tokens": EVAL_TOKENS, "recipes": {}}
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    heldout = read_text("heldout")
    doc["dense_perplexity"] = heldout_ppl(dense, tokenizer, heldout)
    print(f"dense perplexity {doc['dense_perplexity']:.3f}", flush=True)
    if args.dense_finetune:
        doc["dense_finetuned"] = {}
        for name in ("perp", "masked-finetune"):
            row = run_method(name, dense, tokenizer, args.steps, args.batch_size, args.seq_len, heldout)
            doc["dense_finetuned"][name] = {"perplexity_after": row["perplexity_after"], "seconds": row["seconds"]}
            print(f"dense + {name}: perplexity {row['perplexity_after']:.3f}", flush=True)
    if args.mask_cost_only:
        pruned, _ = sparseforge.compress(dense, "wanda-50", tokenizer, progress=False)
        doc["mask_cost"] = mask_cost(pruned, tokenizer, args.mask_cost_repeats, args.batch_size, args.seq_len)
        doc["mask_cost"]["machine"] = machine()
        print(f"mask cost {doc['mask_cost']}", flush=True)
        args.recipes = ""
    for recipe in [r for r in args.recipes.split(",") if r]:
        start = time.perf_counter()
        pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
        prune_seconds = time.perf_counter() - start
        pruned.eval()
        masks = masks_from_model(pruned)
        before = heldout_ppl(pruned, tokenizer, heldout)
        block = {"perplexity_pruned": before, "sparsity_pruned": pruned_sparsity(pruned, masks), "prune_seconds": prune_seconds, "methods": []}
        print(f"{recipe}: perplexity {before:.3f}", flush=True)
        for name in args.methods.split(","):
            row = run_method(name, pruned, tokenizer, args.steps, args.batch_size, args.seq_len, heldout)
            gap = before - doc["dense_perplexity"]
            row["gap_recovered"] = (before - row["perplexity_after"]) / gap if gap > 0 else None
            print(f"  {name}: perplexity {row['perplexity_after']:.3f}, gap recovered {row['gap_recovered']}, sparsity {row['sparsity_after']:.4f}, "
                  f"changed {row['mask_changed']}, {row['seconds']:.0f} s", flush=True)
            block["methods"].append(row)
        plot(block["methods"], recipe, RESULTS / f"{args.name}_{recipe}.png")
        doc["recipes"][recipe] = block
        if recipe == "wanda-50" and args.mask_cost_repeats:
            doc["mask_cost"] = mask_cost(pruned, tokenizer, args.mask_cost_repeats, args.batch_size, args.seq_len)
            print(f"mask cost {doc['mask_cost']}", flush=True)
    doc["machine"] += f", {os.getloadavg()[0]:.2f} at the end"
    # One recipe per invocation keeps each run short on a shared machine; their results merge into one document
    # (the earlier recipes' machine line is kept beside theirs).
    path = RESULTS / f"{args.name}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if (old["steps"], old["batch_size"], old["seq_len"]) == (args.steps, args.batch_size, args.seq_len):
            for recipe, block in old["recipes"].items():
                block.setdefault("machine", old["machine"])
                doc["recipes"].setdefault(recipe, block)
            doc["recipes"] = {r: doc["recipes"][r] for r in RECIPES if r in doc["recipes"]}
            for key in ("mask_cost", "dense_finetuned"):
                if key in old and key not in doc:
                    doc[key] = old[key]
    for block in doc["recipes"].values():
        block.setdefault("machine", doc["machine"])
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
