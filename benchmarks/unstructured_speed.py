"""What unstructured sparsity buys in speed on CPU: CSR (kernels/sparse_csr.py) vs. the dense product.

Three parts, all timed in this one process, float32, dense and CSR alternating call by call so that drift in
machine load hits both alike; every time is a median over repeats after warm-up.

1. Projections of a Llama-2-7B decoder layer (4096x4096, 11008x4096, 4096x11008) with random weights pruned
   uniformly at random to 50, 60, 70, 80, 90 and 95%, at 1 (a decode step), 16, 128 and 512 tokens. For each:
   speedup (dense / CSR time), the choice of a SpeedGate built from these timings (CSR only where > 5%
   faster), and each product's share of its floor. The floor is the larger of bytes / (measured copy
   bandwidth) and FLOPs / (measured dense matmul rate), with bytes = weight (dense: 4 per entry; CSR: 4 value
   + 4 column per nonzero + 4 per row offset) + input + output once each and FLOPs = 2 x tokens x (dense:
   all entries; CSR: nonzeros). "% of floor" = floor time / measured time.
2. Per decoder layer: the seven projections added up (4 x q/k/v/o, 2 x gate/up, 1 x down), dense vs. gated.
3. End to end: a 2-layer random Llama with 7B-shaped layers (vocabulary 4096), magnitude-pruned per matrix
   to each sparsity, run with `core.dispatch.use_sparse_kernel(model, "csr", gate)`: prefill of 128 tokens and
   32 greedy decode steps (eval.efficiency.speed), dense vs. gated, alternating round by round after one
   warm-up round (5 rounds). And the bundled model, SparseGPT-pruned to 50, 70 and 90%: held-out perplexity
   (what that sparsity costs) and the same speed comparison with a gate measured on its own shapes (64 decode
   steps, 15 rounds: its products take microseconds, so timing noise is larger).

Writes benchmarks/results/unstructured_speed.json and .md (--quick: *_quick, a smoke test, not for reporting).
With --ablation it instead times the two design choices of kernels/sparse_csr.py against their alternatives
on a 4096x11008 weight (int32 vs. int64 indices; 32-token chunks vs. one call) and writes unstructured_ablation.*.
Usage: python benchmarks/unstructured_speed.py [--threads 1] [--repeats 7] [--warmup 2] [--quick | --ablation]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch
import torch.nn.functional as F

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.dispatch import use_sparse_kernel
from sparseforge.data import read_text
from sparseforge.eval.efficiency import speed
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.tasks import environment
from sparseforge.kernels.base import SparseLinear, SpeedGate, get_kernel
from sparseforge.kernels.sparse_csr import random_sparse_weight
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage
from timing_common import interleaved  # benchmarks/ is on sys.path when run as a script

OUT = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2), "down": ((4096, 11008), 1)}
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TOKENS = (1, 16, 128, 512)
CSR = get_kernel("csr")




def ceilings() -> dict:
    """This thread's copy bandwidth (bytes read + written per second) and float32 matmul rate."""
    src = torch.randn(2**26)  # 256 MiB
    dst = torch.empty_like(src)
    copy_s = interleaved({"copy": lambda: dst.copy_(src)}, 7, 2)["copy"]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_s = interleaved({"mm": lambda: a @ b}, 5, 1)["mm"]
    return {"copy_bytes_per_s": 2 * src.numel() * 4 / copy_s, "matmul_flops_per_s": 2 * 2048**3 / mm_s}


def floor_seconds(out_f: int, in_f: int, tokens: int, nnz: int | None, ceil: dict) -> float:
    """Lower bound on one product's time; nnz None means the dense product."""
    weight_bytes = out_f * in_f * 4 if nnz is None else nnz * 8 + (out_f + 1) * 4
    moved = weight_bytes + tokens * (in_f + out_f) * 4
    flops = 2 * tokens * (out_f * in_f if nnz is None else nnz)
    return max(moved / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])


def projections(sparsities, token_counts, repeats, warmup, ceil) -> tuple[list[dict], SpeedGate]:
    rows, gate = [], SpeedGate(kernel="csr")
    for label, ((out_f, in_f), per_layer) in SHAPES.items():
        for s in sparsities:
            g = torch.Generator().manual_seed(0)
            w = random_sparse_weight(out_f, in_f, s, g)
            csr, nnz, key = CSR.compress(w), int(torch.count_nonzero(w)), CSR.key(w)
            gate.timings[key] = {}
            for tokens in token_counts:
                x = torch.randn(tokens, in_f, generator=g)
                assert torch.allclose(CSR.matmul(x, csr), F.linear(x, w), atol=1e-3, rtol=1e-3)
                t = interleaved({"dense": lambda: F.linear(x, w), "csr": lambda: CSR.matmul(x, csr)}, repeats, warmup)
                gate.timings[key][tokens] = {"dense_s": t["dense"], "sparse_s": t["csr"]}
                rows.append({"shape": label, "out": out_f, "in": in_f, "per_layer": per_layer, "sparsity": s, "tokens": tokens,
                             "key": key, "dense_ms": t["dense"] * 1e3, "csr_ms": t["csr"] * 1e3, "speedup": t["dense"] / t["csr"],
                             "dense_of_floor": floor_seconds(out_f, in_f, tokens, None, ceil) / t["dense"],
                             "csr_of_floor": floor_seconds(out_f, in_f, tokens, nnz, ceil) / t["csr"]})
                print(_proj_line(rows[-1], "?"), flush=True)
    for r in rows:
        r["choice"] = gate.choose(r["key"], r["tokens"])
    return rows, gate


def per_layer(rows) -> list[dict]:
    out = []
    for s in sorted({r["sparsity"] for r in rows}):
        for tokens in sorted({r["tokens"] for r in rows}):
            mine = [r for r in rows if r["sparsity"] == s and r["tokens"] == tokens]
            dense = sum(r["dense_ms"] * r["per_layer"] for r in mine)
            gated = sum((r["csr_ms"] if r["choice"] == "sparse" else r["dense_ms"]) * r["per_layer"] for r in mine)
            out.append({"sparsity": s, "tokens": tokens, "dense_ms": dense, "gated_ms": gated, "gated_speedup": dense / gated})
    return out


def set_gates(model, gate: SpeedGate) -> None:
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.gate = gate


def speed_pair(model, gate: SpeedGate, rounds: int, prompt_len: int, new_tokens: int) -> dict:
    """Prefill and decode tokens/s with every SparseLinear forced dense vs. gated, alternating round by round."""
    res = {"dense": [], "gated": []}
    never = SpeedGate(kernel="csr")
    for round_ in range(rounds + 1):  # the first round is warm-up
        for variant, g in (("dense", never), ("gated", gate)):
            set_gates(model, g)
            run = speed(model, prompt_len=prompt_len, new_tokens=new_tokens, repeats=1, warmup=0)
            if round_:
                res[variant].append(run)
    set_gates(model, gate)
    med = {v: {k: statistics.median(r[k] for r in runs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")} for v, runs in res.items()}
    return {"dense_prefill_tok_s": med["dense"]["prefill_tokens_per_s"], "gated_prefill_tok_s": med["gated"]["prefill_tokens_per_s"],
            "dense_decode_tok_s": med["dense"]["decode_tokens_per_s"], "gated_decode_tok_s": med["gated"]["decode_tokens_per_s"],
            "prefill_speedup": med["gated"]["prefill_tokens_per_s"] / med["dense"]["prefill_tokens_per_s"],
            "decode_speedup": med["gated"]["decode_tokens_per_s"] / med["dense"]["decode_tokens_per_s"]}


def llama_7b_layers(sparsities, gate, rounds, quick) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1 if quick else 2, vocab_size=4096, max_position_embeddings=1024)
    rows = []
    for s in sparsities:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        cls = get_method("magnitude")
        cls(cls.parse_params({"sparsity": s})).apply(model, progress=False)  # random weights: speed only
        report = use_sparse_kernel(model, "csr", gate)
        rows.append({"case": f"{config.num_hidden_layers}-layer 7B-shaped Llama", "sparsity": s, "perplexity": None,
                     "replaced": len(report["replaced"]), **speed_pair(model, gate, rounds, 128, 16 if quick else 32)})
        print(rows[-1], flush=True)
        del model
    return rows


def bundled_model(sparsities, rounds, quick, max_tokens) -> list[dict]:
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig(samples=4, seq_len=256) if quick else CalibrationConfig(samples=32, seq_len=512)
    rows = [{"case": "bundled model", "sparsity": 0.0, "perplexity": perplexity(dense, tokenizer, read_text("heldout"), max_tokens=max_tokens)["perplexity"]}]
    print(rows[-1], flush=True)
    cls = get_method("sparsegpt")
    for s in sparsities:
        recipe = Recipe(f"sparsegpt-{s:.0%}", [Stage("sparsegpt", cls.parse_params({"sparsity": s}))], cal)
        pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
        ppl = perplexity(pruned, tokenizer, read_text("heldout"), max_tokens=max_tokens)["perplexity"]
        report = use_sparse_kernel(pruned, "csr", token_counts=(1, 16, 128, 512), repeats=5 if quick else 15, warmup=2)
        rows.append({"case": "bundled model (SparseGPT)", "sparsity": s, "perplexity": ppl, "replaced": len(report["replaced"]),
                     "gate_sparse_choices": list(report["gate"].choices().values()).count("sparse"),
                     "gate_entries": len(report["gate"].choices()),
                     **speed_pair(pruned, report["gate"], 3 * rounds, 128, 16 if quick else 64)})
        print(rows[-1], flush=True)
    return rows


def _proj_line(r: dict, choice: str) -> str:
    return (f"| {r['shape']} {r['out']}x{r['in']} | {r['sparsity']:.0%} | {r['tokens']} | {r['dense_ms']:.2f} | {r['csr_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {r.get('choice', choice)} | {r['dense_of_floor']:.0%} | {r['csr_of_floor']:.0%} |")


def ablation(repeats: int, warmup: int) -> dict:
    """The shipped CSR product vs. int64 indices (torch's default) and vs. one call for all tokens."""
    out_f, in_f = SHAPES["down"][0]
    rows = []
    for s in (0.5, 0.9):
        w = random_sparse_weight(out_f, in_f, s, torch.Generator().manual_seed(0))
        csr32, csr64 = CSR.compress(w), w.to_sparse_csr()
        for tokens in (1, 128, 512):
            x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1))
            t = interleaved({"shipped": lambda: CSR.matmul(x, csr32),
                             "int64 indices": lambda: CSR.matmul(x, csr64),
                             "one call": lambda: torch.sparse.mm(csr32, x.t().contiguous()).t()}, repeats, warmup)
            rows.append({"sparsity": s, "tokens": tokens, **{k: v * 1e3 for k, v in t.items()}})
            print(rows[-1], flush=True)
    return {"shape": f"{out_f}x{in_f}", "rows": rows}


def ablation_markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = ["| sparsity | tokens | shipped ms (int32, 32-token chunks) | int64 indices ms | one call ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['tokens']} | {r['shipped']:.2f} | {r['int64 indices']:.2f} | {r['one call']:.2f} |" for r in doc["rows"]]
    return (f"# CSR kernel design checks ({doc['shape']} weight, random positions)\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), "
            f"torch {env['torch']} (MKL {env['mkl']}), {env['torch_threads']} thread(s), float32. Produced by "
            f"`benchmarks/unstructured_speed.py --ablation`; medians of {doc['repeats']} after {doc['warmup']} warm-up calls, the "
            "three variants alternating. int64 indices: the same product on torch's default CSR index type (chunked too); "
            "one call: int32 indices, all tokens in one `torch.sparse.mm`.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per product (default 7; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="smoke test: fewer settings and repeats, separate output files")
    ap.add_argument("--ablation", action="store_true", help="time the CSR kernel's design choices instead (unstructured_ablation.*)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.ablation:
        env = environment()
        env["torch_threads"], env["mkl"] = torch.get_num_threads(), torch.backends.mkl.is_available()
        doc = {"benchmark": "unstructured_ablation", "repeats": repeats, "warmup": warmup, "environment": env, **ablation(repeats, warmup)}
        OUT.mkdir(exist_ok=True)
        (OUT / "unstructured_ablation.json").write_text(json.dumps(doc, indent=2) + "\n")
        (OUT / "unstructured_ablation.md").write_text(ablation_markdown(doc))
        print(ablation_markdown(doc))
        return
    sparsities, token_counts = ((0.5, 0.9), (1, 16)) if args.quick else (SPARSITIES, TOKENS)
    rounds = 2 if args.quick else 5
    max_tokens = 4096 if args.quick else None

    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {ceil['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    rows, gate = projections(sparsities, token_counts, repeats, warmup, ceil)
    layer = per_layer(rows)
    model_sparsities = (0.5, 0.9) if args.quick else (0.5, 0.7, 0.9)
    models = llama_7b_layers(model_sparsities, gate, rounds, args.quick) + bundled_model(model_sparsities, rounds, args.quick, max_tokens)

    env = environment()
    env["torch_threads"] = torch.get_num_threads()
    env["mkl"] = torch.backends.mkl.is_available()
    doc = {"benchmark": "unstructured_speed", "quick": args.quick, "repeats": repeats, "warmup": warmup, "rounds": rounds,
           "environment": env, "ceilings": ceil, "gate": gate.to_dict(), "projections": rows, "layer": layer, "models": models}
    OUT.mkdir(exist_ok=True)
    stem = "unstructured_speed_quick" if args.quick else "unstructured_speed"
    (OUT / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (OUT / f"{stem}.md").write_text(markdown(doc, args.quick))
    print(f"wrote {OUT / stem}.json and .md", flush=True)


def markdown(doc: dict, quick: bool) -> str:
    env, ceil = doc["environment"], doc["ceilings"]
    proj = ["| projection | sparsity | tokens | dense ms | CSR ms | speedup | gate | dense % of floor | CSR % of floor |",
            "|---|---|---|---|---|---|---|---|---|"] + [_proj_line(r, r["choice"]) for r in doc["projections"]]
    lay = ["| sparsity | tokens | dense ms | gated ms | gated speedup |", "|---|---|---|---|---|"]
    lay += [f"| {r['sparsity']:.0%} | {r['tokens']} | {r['dense_ms']:.1f} | {r['gated_ms']:.1f} | {r['gated_speedup']:.2f}x |" for r in doc["layer"]]
    mod = ["| model | sparsity | perplexity | dense prefill tok/s | gated prefill tok/s | prefill speedup | dense decode tok/s | gated decode tok/s | decode speedup |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["models"]:
        ppl = "-" if r.get("perplexity") is None else f"{r['perplexity']:.2f}"
        if "dense_prefill_tok_s" not in r:
            mod.append(f"| {r['case']} (dense) | 0% | {ppl} | - | - | - | - | - | - |")
            continue
        mod.append(f"| {r['case']} | {r['sparsity']:.0%} | {ppl} | {r['dense_prefill_tok_s']:.1f} | {r['gated_prefill_tok_s']:.1f} | {r['prefill_speedup']:.2f}x | "
                   f"{r['dense_decode_tok_s']:.2f} | {r['gated_decode_tok_s']:.2f} | {r['decode_speedup']:.2f}x |")
    return (
        f"# Unstructured sparsity on CPU: CSR vs. dense{' (QUICK smoke test: not for reporting)' if quick else ''}\n\n"
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['platform']}, torch {env['torch']} (MKL {env['mkl']}) with "
        f"{env['torch_threads']} thread(s), float32. Measured ceilings on this thread: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s "
        f"(read + written), dense matmul {ceil['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s. Produced by `benchmarks/unstructured_speed.py`; "
        f"medians of {doc['repeats']} after {doc['warmup']} warm-up calls, dense and CSR alternating.\n\n"
        "## Llama-2-7B projection shapes, random weights pruned uniformly at random\n\n" + "\n".join(proj)
        + "\n\ngate: what a SpeedGate built from these timings picks (CSR only where more than 5% faster). % of floor: the time "
        "the product would take at the measured copy bandwidth or matmul rate, whichever binds, over the measured time. Above "
        "100%: the product ran faster than that ceiling allows (the matmul ceiling is one 2048x2048x2048 product; larger ones "
        "run a little faster), so the ceiling is an underestimate there, not a measurement error.\n\n"
        "## One Llama-2-7B decoder layer's projections (4 x q/k/v/o + 2 x gate/up + 1 x down; attention itself not included)\n\n"
        + "\n".join(lay)
        + "\n\n## Whole models, dense vs. gated CSR (`use_sparse_kernel(model, \"csr\", gate)`)\n\n" + "\n".join(mod)
        + f"\n\nPrefill: 128 tokens; decode: greedy steps with the KV cache (eval.efficiency.speed; 32 steps on the 7B-shaped model, "
        f"64 on the bundled one), medians of {doc['rounds']} rounds (bundled model: {3 * doc['rounds']}) after a warm-up round, dense "
        "(every SparseLinear forced dense) and gated alternating. The 7B-shaped model has random weights, magnitude-pruned (speed only; no perplexity). The "
        "bundled model is SparseGPT-pruned (32 x 512 calibration tokens) with a gate measured on its own shapes; its perplexity is "
        "on the held-out plays.\n"
    )


if __name__ == "__main__":
    main()
