"""End-to-end decode speed of activation sparsity through `generate`: dense vs. TEAL, CATS, WINA and R-Sparse at 40 and
50%, on (a) a random-weight Llama with Llama-2-7B-shaped decoder layers (hidden 4096, MLP 11008, 32 heads; 2 layers;
vocabulary 4096, the bundled tokenizer's, so the output head does not dominate) and (b) the bundled model.

Each method is calibrated once (bundled calibration text, 4 x 128 tokens on the random model, 16 x 512 on the
bundled one; on the random model TEAL's allocation is uniform: its greedy search multiplies every 7B projection
per step and adds nothing to a speed measurement) with its speed gate measured at 1 token per product, then
detached. Rounds alternate dense and every method (attached, one warm-up `generate`, timed, detached), after one
warm-up round; per variant the median over rounds. A `generate` call: a 32-token random prompt, `max_new_tokens`
greedy tokens (min_new_tokens the same, so every call decodes as many); decode tokens/s = (N - 1) / (time of
N tokens - time of 1 token), which removes the prefill. The load average is recorded.

Writes benchmarks/results/activation_e2e.json and .md (--out: another stem). Usage: python benchmarks/activation_e2e.py
[--threads 1] [--rounds 3] [--new-tokens 16] [--models random7b,bundled] [--methods teal,cats,cats@down,...]
("cats@down": CATS with its up product dense, only the down product skipping rows)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import torch
import transformers

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method
from sparseforge.methods.activations import ActivationSparseLinear
from sparseforge.methods.base import AttachedStage, RuntimeContext

OUT = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("teal", "cats", "wina", "rsparse")
SPARSITIES = (0.4, 0.5)


def random_7b(layers: int):
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=4096, max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def timed_generate(model, prompt, n: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def decode_rate(model, prompt, n: int) -> float:
    one, full = timed_generate(model, prompt, 1), timed_generate(model, prompt, n)
    return (n - 1) / max(full - one, 1e-9)


def calibrated(model, tok, method: str, sparsity: float, cal: CalibrationConfig, uniform: bool) -> AttachedStage:
    # "cats@down": CATS with only the down product skipping rows (its up product dense), for comparison.
    method, down_only = method.removesuffix("@down"), method.endswith("@down")
    cls = get_method(method)
    params = {"sparsity": sparsity, "gate_token_counts": [1], "gate_repeats": 5}
    if down_only:
        params["sparse_up"] = False
    if method == "teal" and uniform:
        params["allocation"] = "uniform"
    m = cls(cls.parse_params(params))
    state = m.calibrate(model, RuntimeContext(tok, cal, False))
    return AttachedStage({"method": method, "params": params}, m, state)


def bench(label, model, tok, cal, uniform, args) -> list[dict]:
    prompt = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    stages = {"dense": None}
    for method in args.methods.split(","):
        for s in SPARSITIES:
            t0 = time.perf_counter()
            stages[f"{method}-{round(s * 100)}"] = calibrated(model, tok, method, s, cal, uniform)
            print(f"{label}: calibrated {method}-{round(s * 100)} in {time.perf_counter() - t0:.1f} s", flush=True)
    rates = {k: [] for k in stages}
    kernel_share, mlp_share = {}, {}
    for round_ in range(args.rounds + 1):
        for name, st in stages.items():
            if st is not None:
                sparseforge.attach_runtime(model, [st])
                mods = [m for m in model.modules() if isinstance(m, ActivationSparseLinear)]
                kernel_share[name] = sum(m.uses_kernel(1) for m in mods) / max(len(mods), 1)
                fused = [m for m in mods if m.mlp_fused]  # CATS: down projections whose MLP may take the fused up+down path
                if fused:
                    mlp_share[name] = sum(m.decision(1, "mlp") == "sparse" for m in fused) / len(fused)
                timed_generate(model, prompt, 2)  # warm-up: builds the input-major weights
            r = decode_rate(model, prompt, args.new_tokens)
            if st is not None:
                sparseforge.detach_runtime(model)
            if round_:
                rates[name].append(r)
            print(f"{label} round {round_} {name}: {r:.3f} tok/s", flush=True)
    dense = statistics.median(rates["dense"])
    return [{"model": label, "recipe": name, "decode_tok_s": statistics.median(v), "speedup": statistics.median(v) / dense,
             "rounds": v, "kernel_share": kernel_share.get(name, 0.0), "mlp_fused_share": mlp_share.get(name),
             "target": stages[name].state.data["target_sparsity"] if stages[name] else 0.0} for name, v in rates.items()]


def fused_note(r: dict) -> str:
    share = r.get("mlp_fused_share")
    return "" if share is None else f" (fused MLP {share:.2f})"


def markdown(doc) -> str:
    env = doc["environment"]
    lines = ["# Activation sparsity: end-to-end decode through `generate`", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {doc['threads']} thread(s); load average "
             f"{doc['load_before']} before, {doc['load_after']} after (shared machine: noisy). Produced by `benchmarks/activation_e2e.py`: "
             f"32-token prompt, {doc['new_tokens']} greedy tokens, decode tokens/s with the prefill removed, median of {doc['rounds']} "
             "alternating rounds. `kernel share` = fraction of routed projections whose gate chose the row-skipping kernel at 1 token. "
             "The machine's speed drifted by 2-3x between rounds (other processes), so `speedup` is the median over rounds of the ratio to "
             "dense *in the same round*; a ratio above the ceiling 1/(1-s) of the routed products is noise, and shows its size.",
             "", "| model | recipe | decode tok/s (median) | speedup vs dense (median of per-round ratios) | per-round ratios | kernel share | rounds (tok/s) |",
             "|---|---|---|---|---|---|---|"]
    dense = {r["model"]: r["rounds"] for r in doc["rows"] if r["recipe"] == "dense"}
    for r in doc["rows"]:
        ratios = [v / d for v, d in zip(r["rounds"], dense[r["model"]])]
        r["speedup_per_round"] = ratios
        r["speedup_median_ratio"] = statistics.median(ratios)
        lines.append(f"| {r['model']} | {r['recipe']} | {r['decode_tok_s']:.3f} | {r['speedup_median_ratio']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in ratios)} | {r['kernel_share']:.2f}"
                     f"{fused_note(r)} | {', '.join(f'{v:.3f}' for v in r['rounds'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--models", default="random7b,bundled")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md (and derived JSON fields) from the saved JSON")
    ap.add_argument("--out", default="activation_e2e", help="results file stem (e.g. activation_e2e_cats for a partial run)")
    args = ap.parse_args()
    if args.markdown_only:
        path = OUT / f"{args.out}.json"
        doc = json.loads(path.read_text())
        md = markdown(doc)
        path.write_text(json.dumps(doc, indent=1))
        (OUT / f"{args.out}.md").write_text(md)
        return
    torch.set_num_threads(args.threads)
    tok = sparseforge.load_tokenizer(None)
    load_before = os.getloadavg()
    rows = []
    path = OUT / f"{args.out}.json"
    for label in args.models.split(","):
        if label == "random7b":
            rows += bench(f"random 7B-shaped, {args.layers} layers", random_7b(args.layers), tok, CalibrationConfig(samples=4, seq_len=128), True, args)
        else:
            rows += bench("bundled (4M)", sparseforge.load(), tok, CalibrationConfig(samples=16, seq_len=512), False, args)
        doc = {"environment": environment(), "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
               "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()], "rows": rows}
        OUT.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        (OUT / f"{args.out}.md").write_text(markdown(doc))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
