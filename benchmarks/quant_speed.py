"""What weight-only quantization buys in speed on CPU: int8 and int4 kernels (kernels/int_weight_only.py) against
float32 and bfloat16 dense products, all timed in this one process, the variants alternating call by call (medians
after warm-up), so that drift in machine load hits every variant alike.

1. Projections of a Llama-2-7B decoder layer (4096x4096, 11008x4096, 4096x11008; out x in) at 1, 16, 128, 512
   tokens: dense float32, dense bfloat16, int8 per channel, int4 g128 and int4 g32 (random weights rounded with
   RTN: the kernels' speed does not depend on which method chose the codes). Each with its share of the bytes
   floor: (weight bytes + input and output) / (copy bandwidth measured in this process) over the measured time.
2. End to end: a 2-layer random Llama with 7B-shaped layers (vocabulary 4096, so the projections dominate),
   its projections rounded (RTN) to gptq-w4g128's scheme (4-bit symmetric, groups of 128) and, separately, to
   gptq-w8's (8-bit per channel): GPTQ writes codes of the same format, so the same kernels run at the same
   speed, and RTN avoids GPTQ's minutes of Cholesky factorisations of 11008x11008 Hessians on this CPU; in bfloat16, with the quant-kernel stage (gate measured here at 1 and 128 tokens):
   decode tokens/s of 32 greedy steps after a 128-token prompt (eval.efficiency.speed), bfloat16 dense vs. the
   kernel stage attached, alternating round by round.
3. The bundled model through `generate`, bfloat16 dense vs. gptq-w4g128 + quant-kernel (its gate decides).
4. `--gptq-7b`: the 2-layer 7B-shaped Llama with real GPTQ codes (gptq-w4g128's scheme, calibrated on the
   bundled calibration text, 8 x 128 tokens; the compress time is reported), decoded through Hugging Face
   `generate` (greedy, a fixed number of new tokens) in bfloat16: dense (the dequantized weights) vs. the
   quant-kernel stage attached, alternating round by round. Written to quant_speed_gptq7b.json / .md.

Writes benchmarks/results/quant_speed.json and .md (--quick: *_quick, a smoke test, not for reporting).
Usage: python benchmarks/quant_speed.py [--threads 2] [--repeats 7] [--warmup 2] [--quick] [--skip-model]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.quantizer import QuantScheme, quantize_rtn
from sparseforge.eval.efficiency import speed
from sparseforge.eval.tasks import environment
from sparseforge.kernels.int_weight_only import kernel_for
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage
from unstructured_speed import ceilings, interleaved

OUT = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
TOKENS = (1, 16, 128, 512)
SCHEMES = {"int8": QuantScheme(8, True, 0), "int4 g128": QuantScheme(4, True, 128), "int4 g32": QuantScheme(4, True, 32)}


def weight_bytes(variant: str, out_f: int, in_f: int) -> int:
    if variant == "fp32":
        return 4 * out_f * in_f
    if variant == "bf16":
        return 2 * out_f * in_f
    s = SCHEMES[variant]
    return out_f * in_f * s.bits // 8 + out_f * s.groups(in_f) * 4  # codes + bf16 scale and zero per group


def projections(token_counts, repeats, warmup, ceil) -> list[dict]:
    rows = []
    for label, (out_f, in_f) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        wb = w.bfloat16()
        packed = {}
        for name, scheme in SCHEMES.items():
            qw = quantize_rtn(w, scheme)
            packed[name] = (kernel_for(qw), kernel_for(qw).pack(qw), qw.dequantize())
        for tokens in token_counts:
            x = torch.randn(tokens, in_f, generator=g)
            xb = x.bfloat16()
            fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}
            for name, (kernel, p, deq) in packed.items():
                ref = F.linear(xb.float(), deq)
                got = kernel.matmul(xb, p).float()
                assert ((got - ref).norm() / ref.norm()) < 2e-2, (name, label, tokens)
                fns[name] = (lambda k=kernel, p=p: k.matmul(xb, p))
            t = interleaved(fns, repeats, warmup)
            row = {"shape": label, "out": out_f, "in": in_f, "tokens": tokens, **{f"{k}_ms": v * 1e3 for k, v in t.items()}}
            for k, v in t.items():
                moved = weight_bytes(k, out_f, in_f) + tokens * (in_f + out_f) * (4 if k == "fp32" else 2)
                row[f"{k}_of_floor"] = moved / ceil["copy_bytes_per_s"] * 2 / v  # copy rate counts read + write
            for k in SCHEMES:
                row[f"{k}_vs_bf16"] = t["bf16"] / t[k]
                row[f"{k}_vs_fp32"] = t["fp32"] / t[k]
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def decode_pair(model, stage_params: dict, rounds: int, prompt_len: int, new_tokens: int) -> dict:
    """Decode (and prefill) tokens/s without and with the quant-kernel stage attached, alternating rounds."""
    sparseforge.attach_method(model, "quant-kernel", stage_params)
    stages = sparseforge.detach_runtime(model)
    routed = len(stages[0].method.replaced) if stages else 0
    res = {"dense": [], "kernel": []}
    for round_ in range(rounds + 1):  # the first round is warm-up
        for variant in ("dense", "kernel"):
            if variant == "kernel":
                sparseforge.attach_runtime(model, stages)
            run = speed(model, prompt_len=prompt_len, new_tokens=new_tokens, repeats=1, warmup=0)
            if variant == "kernel":
                routed = len(stages[0].method.replaced)
                sparseforge.detach_runtime(model)
            if round_:
                res[variant].append(run)
    med = {v: {k: statistics.median(r[k] for r in runs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")} for v, runs in res.items()}
    gate = stages[0].method.gate
    return {"routed_projections": routed, "gate_kernel_choices": list(gate.choices().values()).count("sparse"), "gate_entries": len(gate.choices()),
            "dense_decode_tok_s": med["dense"]["decode_tokens_per_s"], "kernel_decode_tok_s": med["kernel"]["decode_tokens_per_s"],
            "decode_speedup": med["kernel"]["decode_tokens_per_s"] / med["dense"]["decode_tokens_per_s"],
            "dense_prefill_tok_s": med["dense"]["prefill_tokens_per_s"], "kernel_prefill_tok_s": med["kernel"]["prefill_tokens_per_s"],
            "prefill_speedup": med["kernel"]["prefill_tokens_per_s"] / med["dense"]["prefill_tokens_per_s"]}


def llama_7b_layers(rounds, quick, tokenizer) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1 if quick else 2, vocab_size=4096, max_position_embeddings=1024)
    rows = []
    for label, params in (("w4 g128 (gptq-w4g128's scheme, RTN codes)", {"bits": 4, "group_size": 128}),
                          ("w8 per channel (gptq-w8's scheme, RTN codes)", {"bits": 8, "group_size": 0})):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        recipe = Recipe(label, [Stage("rtn", get_method("rtn").parse_params(params))], CalibrationConfig(samples=2, seq_len=64))
        start = time.perf_counter()
        model, _ = sparseforge.compress(model, recipe, tokenizer, progress=False, inplace=True)
        seconds = time.perf_counter() - start
        model.to(torch.bfloat16)
        pair = decode_pair(model, {"token_counts": [1, 128], "repeats": 3, "warmup": 1}, rounds, 128, 16 if quick else 32)
        rows.append({"case": f"{config.num_hidden_layers}-layer 7B-shaped Llama", "scheme": label, "compress_s": seconds, **pair})
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def generate_pair(model, stage_params: dict, rounds: int, prompt_len: int, new_tokens: int) -> dict:
    """Tokens/s of `model.generate` (greedy, exactly `new_tokens` new tokens, whole call timed) without and with
    the quant-kernel stage, alternating; the first round is warm-up (it also lets the gate measure)."""
    import os

    sparseforge.attach_method(model, "quant-kernel", stage_params)
    stages = sparseforge.detach_runtime(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times, loads = {"dense": [], "kernel": []}, []
    outputs = {}
    for round_ in range(rounds + 1):
        for variant in ("dense", "kernel"):
            if variant == "kernel":
                sparseforge.attach_runtime(model, stages)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            elapsed = time.perf_counter() - start
            if variant == "kernel":
                routed = len(stages[0].method.replaced)  # while attached (detach empties it)
                sparseforge.detach_runtime(model)
            outputs[variant] = out
            if round_:
                times[variant].append(elapsed)
                loads.append(os.getloadavg()[0])
    gate = stages[0].method.gate
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "routed_projections": routed,
            "gate_kernel_choices": list(gate.choices().values()).count("sparse"), "gate_entries": len(gate.choices()),
            "dense_generate_s": times["dense"], "kernel_generate_s": times["kernel"],
            "dense_tok_s": new_tokens / med["dense"], "kernel_tok_s": new_tokens / med["kernel"], "speedup": med["dense"] / med["kernel"],
            "per_round_speedup": [d / k for d, k in zip(times["dense"], times["kernel"])],
            "same_tokens": bool(torch.equal(outputs["dense"], outputs["kernel"])), "load_average": [round(x, 1) for x in loads]}


def gptq_7b(rounds, quick, tokenizer) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1 if quick else 2, vocab_size=4096, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    cal = CalibrationConfig(samples=2 if quick else 8, seq_len=128)
    recipe = Recipe("gptq-w4g128 scheme", [Stage("gptq", get_method("gptq").parse_params({"bits": 4, "group_size": 128}))], cal)
    start = time.perf_counter()
    model, _ = sparseforge.compress(model, recipe, tokenizer, progress=False, inplace=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"gptq_compress_s": round(seconds, 1)}), flush=True)
    model.to(torch.bfloat16)
    pair = generate_pair(model, {"token_counts": [1, 32], "repeats": 3, "warmup": 1}, rounds, 32, 8 if quick else 16)
    return {"case": f"{config.num_hidden_layers}-layer 7B-shaped Llama, GPTQ w4 g128 codes", "calibration": vars(cal), "compress_s": seconds, **pair}


def bundled(rounds, quick, tokenizer) -> list[dict]:
    dense = sparseforge.load()
    model, _ = sparseforge.compress(dense, "gptq-w4g128", tokenizer, progress=False)
    model.to(torch.bfloat16)
    pair = decode_pair(model, {"token_counts": [1, 16, 128]}, 3 * rounds, 128, 64)
    return [{"case": "bundled model", "scheme": "gptq-w4g128", **pair}]


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = ["# Weight-only quantized products on CPU", "",
             f"Machine: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, {doc['threads']} thread(s); the machine was shared "
             f"with other jobs (load average {doc['load_average']} at the start). Medians of {doc['repeats']} alternating calls after "
             f"{doc['warmup']} warm-up calls. Activations bfloat16 for bf16 and the integer kernels, float32 for fp32. Copy bandwidth "
             f"{doc['ceilings']['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), measured once at the start; shares above 100% mean that "
             "measurement, taken under the other jobs' load, understates the bandwidth available later: read those columns as relative. "
             "The bundled-model row decodes with eval.efficiency.speed's greedy loop over the KV cache (what `generate` does, without its "
             "overhead). Written by `benchmarks/quant_speed.py`.", "",
             "## Llama-2-7B projection shapes (random weights, RTN codes)", "",
             "| shape | tokens | fp32 ms | bf16 ms | int8 ms | int4 g128 ms | int4 g32 ms | int8 vs bf16 | int4 g128 vs bf16 | int4 g32 vs bf16 | int4 g128 vs fp32 | % of bytes floor (bf16 / int8 / int4 g128) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["projections"]:
        lines.append(f"| {r['shape']} {r['out']}x{r['in']} | {r['tokens']} | {r['fp32_ms']:.2f} | {r['bf16_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{r['int4 g128_ms']:.2f} | {r['int4 g32_ms']:.2f} | {r['int8_vs_bf16']:.2f}x | {r['int4 g128_vs_bf16']:.2f}x | "
                     f"{r['int4 g32_vs_bf16']:.2f}x | {r['int4 g128_vs_fp32']:.2f}x | {r['bf16_of_floor']:.0%} / {r['int8_of_floor']:.0%} / {r['int4 g128_of_floor']:.0%} |")
    if doc.get("models"):
        lines += ["", "## End to end (batch 1, bfloat16; kernel = quant-kernel stage attached)", "",
                  "| model | scheme | routed projections | gate picks kernel | decode tok/s dense | decode tok/s kernel | decode speedup | prefill tok/s dense | prefill tok/s kernel |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in doc["models"]:
            lines.append(f"| {r['case']} | {r['scheme']} | {r['routed_projections']} | {r['gate_kernel_choices']}/{r['gate_entries']} | "
                         f"{r['dense_decode_tok_s']:.2f} | {r['kernel_decode_tok_s']:.2f} | {r['decode_speedup']:.2f}x | "
                         f"{r['dense_prefill_tok_s']:.1f} | {r['kernel_prefill_tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


def gptq_markdown(doc: dict) -> str:
    env, r = doc["environment"], doc["gptq_7b"]
    return "\n".join([
        "# End-to-end decode with real GPTQ codes on a 7B-shaped model", "",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, {doc['threads']} thread(s), shared with other jobs "
        f"(load average {doc['load_average_start']} at the start; per timed round: {', '.join(map(str, r['load_average']))}). "
        f"Model: {r['case']}, vocabulary 4096, random weights; GPTQ (4-bit symmetric, groups of 128) calibrated on "
        f"{r['calibration']['samples']} x {r['calibration']['seq_len']} tokens of the bundled calibration text took {r['compress_s']:.0f} s. "
        f"Hugging Face `generate`, greedy, {r['prompt_len']}-token random prompt, {r['new_tokens']} new tokens, whole call timed, "
        f"bfloat16; dense = the dequantized weights through bfloat16 products, kernel = quant-kernel stage attached; "
        f"{r['rounds']} alternating rounds after one warm-up round, medians. Written by `benchmarks/quant_speed.py --gptq-7b`.", "",
        "| dense tok/s | kernel tok/s | speedup (medians) | per-round speedups | routed projections | gate picks kernel | same tokens |",
        "|---|---|---|---|---|---|---|",
        f"| {r['dense_tok_s']:.2f} | {r['kernel_tok_s']:.2f} | {r['speedup']:.2f}x | {', '.join(f'{x:.2f}' for x in r['per_round_speedup'])} | "
        f"{r['routed_projections']} | {r['gate_kernel_choices']}/{r['gate_entries']} | {r['same_tokens']} |"]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--gptq-7b", action="store_true", help="only part 4: real GPTQ codes on the 7B-shaped model through generate")
    ap.add_argument("--bundled-generate", action="store_true", help="only the bundled model with gptq-w4g128, timed through generate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import os

    load = os.getloadavg()[0]
    if args.gptq_7b:
        doc = {"threads": args.threads, "load_average_start": round(load, 1), "environment": environment(),
               "gptq_7b": gptq_7b(args.rounds, args.quick, sparseforge.load_tokenizer())}
        name = "quant_speed_gptq7b" + ("_quick" if args.quick else "")
        OUT.mkdir(exist_ok=True)
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (OUT / f"{name}.md").write_text(gptq_markdown(doc))
        print(gptq_markdown(doc))
        return
    if args.bundled_generate:
        dense = sparseforge.load()
        start = time.perf_counter()
        model, _ = sparseforge.compress(dense, "gptq-w4g128", sparseforge.load_tokenizer(), progress=False)
        compress_s = time.perf_counter() - start
        model.to(torch.bfloat16)
        pair = generate_pair(model, {"token_counts": [1, 16, 128], "repeats": 3, "warmup": 1}, 3 * args.rounds, 128, 64)
        doc = {"threads": args.threads, "load_average_start": round(load, 1), "environment": environment(),
               "gptq_7b": {"case": "bundled model (4 M parameters), gptq-w4g128 preset", "compress_s": compress_s,
                           "calibration": {"samples": "preset", "seq_len": "preset"}, **pair}}
        name = "quant_speed_bundled_generate"
        OUT.mkdir(exist_ok=True)
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        md = gptq_markdown(doc).replace("# End-to-end decode with real GPTQ codes on a 7B-shaped model", "# End-to-end decode of the bundled model with gptq-w4g128")
        md = md.replace("vocabulary 4096, random weights; GPTQ (4-bit symmetric, groups of 128) calibrated on preset x preset tokens of the bundled calibration text",
                        "the preset's calibration; compress")
        md = md.replace("`benchmarks/quant_speed.py --gptq-7b`", "`benchmarks/quant_speed.py --bundled-generate`")
        (OUT / f"{name}.md").write_text(md)
        print(md)
        return
    ceil = ceilings()
    tokens = (1, 16) if args.quick else TOKENS
    doc = {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "load_average": round(load, 1), "ceilings": ceil,
           "environment": environment(), "projections": projections(tokens, args.repeats, args.warmup, ceil)}
    if not args.skip_model:
        tokenizer = sparseforge.load_tokenizer()
        doc["models"] = llama_7b_layers(args.rounds, args.quick, tokenizer) + bundled(args.rounds, args.quick, tokenizer)
    name = "quant_speed" + ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads != 2 else "")
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (OUT / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
