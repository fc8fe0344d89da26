"""Prefill speed of dense vs. structured-25% (the `structured-25` preset: 25% of MLP channels removed) on
(a) the bundled reference model at 512 and 2048 tokens and (b) one Llama-2-7B-shaped decoder layer
(hidden 4096, intermediate 11008, 32 heads; random weights) at 128 and 512 tokens, on CPU and, when
available, CUDA.

Both variants are timed in the same run, alternating dense and structured repeat by repeat so that drift in
machine load hits both alike; each figure is the median over repeats after warm-up, and the speedup is the
ratio of the two medians. Which channels go does not change the speed, so the 7B-shaped layer (random
weights) is pruned with score 'magnitude'; the reference model goes through the preset as users run it.

Writes benchmarks/results/structured_speed.json and .md (with --quick: structured_speed_quick.*, a smoke
test with short inputs and few repeats, not for reporting).
Usage: python benchmarks/structured_speed.py [--devices cpu,cuda] [--threads N] [--dtype float32|bfloat16]
       [--repeats 7] [--warmup 2] [--quick] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import time

import torch

import sparseforge
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method
from sparseforge.recipe import load_recipe

OUT = pathlib.Path(__file__).resolve().parent / "results"
PRESET = "structured-25"
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns: dict, device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved call by call after `warmup` untimed rounds."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def row(case: str, device, dtype, tokens: int, times: dict, params: dict) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "case": case, "device": device.type, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
        "dense_tokens_per_s": tokens / med["dense"], "structured_tokens_per_s": tokens / med["structured"],
        "speedup": med["dense"] / med["structured"],
        "dense_seconds": times["dense"], "structured_seconds": times["structured"],
        "dense_params": params["dense"], "structured_params": params["structured"],
    }


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def reference_model(device, dtype, lengths, repeats, warmup, quick) -> list[dict]:
    dense = sparseforge.load(None)
    recipe = load_recipe(PRESET)
    if quick:
        recipe.calibration.samples, recipe.calibration.seq_len = 4, 128
    structured, _ = sparseforge.compress(dense, recipe, sparseforge.load_tokenizer(None), progress=False)
    models = {"dense": dense.to(device, dtype).eval(), "structured": structured.to(device, dtype).eval()}
    params = {k: count(m) for k, m in models.items()}
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        ids = torch.randint(0, dense.config.vocab_size, (1, n), generator=g).to(device)

        def call(m, ids=ids):
            with torch.inference_mode():
                m(input_ids=ids, use_cache=False)

        times = time_pair({k: (lambda m=m: call(m)) for k, m in models.items()}, device, repeats, warmup)
        rows.append(row("reference model", device, dtype, n, times, params))
        print(_line(rows[-1]), flush=True)
    return rows


def llama_7b_layer(device, dtype, lengths, repeats, warmup) -> list[dict]:
    """One Llama-2-7B-shaped decoder layer inside a one-layer model (tiny vocabulary), so the structured
    method sees an ordinary causal LM; only the decoder layer is timed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_7B, num_hidden_layers=1, vocab_size=128, max_position_embeddings=4096)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    structured = copy.deepcopy(dense)
    preset = load_recipe(PRESET).stages[0].params
    cls = get_method("structured")
    cls(cls.parse_params({"mlp_sparsity": preset.mlp_sparsity, "head_sparsity": preset.head_sparsity, "score": "magnitude"})).apply(structured, progress=False)
    models = {"dense": dense.to(device, dtype), "structured": structured.to(device, dtype)}
    layers = {k: m.model.layers[0] for k, m in models.items()}
    params = {k: count(layer) for k, layer in layers.items()}
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        hidden = (torch.randn(1, n, LLAMA_7B["hidden_size"], generator=g) * 0.5).to(device, dtype)
        position_embeddings = models["dense"].model.rotary_emb(hidden, torch.arange(n, device=device)[None])

        def call(layer, hidden=hidden, position_embeddings=position_embeddings):
            with torch.inference_mode():
                layer(hidden, attention_mask=None, position_embeddings=position_embeddings)  # no mask: causal

        times = time_pair({k: (lambda layer=layer: call(layer)) for k, layer in layers.items()}, device, repeats, warmup)
        rows.append(row("Llama-2-7B-shaped layer", device, dtype, n, times, params))
        print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"| {r['case']} | {r['device']} | {r['dtype']} | {r['tokens']} | {r['dense_tokens_per_s']:.0f} | "
            f"{r['structured_tokens_per_s']:.0f} | {r['speedup']:.2f}x | {r['structured_params'] / r['dense_params']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="smoke test: short inputs, few repeats, separate output files")
    ap.add_argument("--out-dir", default=str(OUT))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    ref_lengths, layer_lengths = ((128, 256), (16, 32)) if args.quick else ((512, 2048), (128, 512))

    rows = []
    print("| case | device | dtype | tokens | dense tok/s | structured tok/s | speedup | params kept |", flush=True)
    for name in args.devices.split(","):
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("cuda is not available; skipped", flush=True)
            continue
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        rows += reference_model(device, dtype, ref_lengths, repeats, warmup, args.quick)
        rows += llama_7b_layer(device, dtype, layer_lengths, repeats, warmup)

    env = environment()
    env["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    preset = load_recipe(PRESET).to_dict()
    doc = {"benchmark": "structured_speed", "quick": args.quick, "preset": preset, "repeats": repeats, "warmup": warmup,
           "environment": env, "rows": rows}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "structured_speed_quick" if args.quick else "structured_speed"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    header = ["| case | device | dtype | tokens | dense tok/s | structured tok/s | speedup | params kept |", "|---|---|---|---|---|---|---|---|"]
    md = (
        f"# Prefill speed: dense vs. {PRESET}{' (QUICK smoke test: not for reporting)' if args.quick else ''}\n\n"
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['platform']}, torch {env['torch']} with "
        f"{env['torch_threads']} CPU thread(s), transformers {env['transformers']}"
        f"{', GPU ' + env['cuda_device'] if 'cuda_device' in env else ''}. Produced by `benchmarks/structured_speed.py`.\n\n"
        + "\n".join(header + [_line(r) for r in rows])
        + f"\n\nPrefill of one sequence (batch 1, no KV cache). Tokens/s are medians over {repeats} repeats after {warmup} "
        "warm-up round(s), dense and structured alternating; speedup = dense median time / structured median time, "
        "both from this run. Params kept: structured / dense parameters of what is timed (the whole reference model "
        "including embeddings; the 7B-shaped decoder layer alone).\n"
    )
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
