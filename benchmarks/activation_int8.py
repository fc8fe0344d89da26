"""Where the gains multiply: activation sparsity over int8 weight-only storage on CPU.

Part `kernel` (4096x11008, Llama-2-7B's down projection, batch 1, activation sparsity 0-90%), in one process,
alternating call by call after warm-up, medians, cold weights (each call the next of several copies whose total
exceeds twice the 260 MB L3):
- float32 dense and bfloat16 dense: `F.linear` (MKL);
- int8 dense: issue 11's kernel, `torch._weight_int8pack_mm` on bfloat16 activations (kernels/int_weight_only.py);
- int8 row skip: `row_skip_int8_product` on the input-major int8 copy, threshold fused, scales applied once;
- bfloat16 row skip: the existing kernel, for reference.
Bytes floor of int8 row skip: the int8 bytes it reads (active rows x 4096 x 1 byte) at the copy bandwidth (bytes
read + written per second by `dst.copy_(src)` on 1 GiB, the other speed benchmarks' convention); "% of cell floor":
half the time of copying exactly those bytes from the same cold copies, timed in the same alternation.

Part `e2e`: decode tokens/s through `generate` of a random Llama with 7B-shaped layers (2 layers, vocabulary 4096),
bfloat16: dense; rtn-w8 through the quant-kernel stage (int8 dense); teal-50 on the bfloat16 weights (bfloat16 row
skip); rtn-w8 + teal-50 (int8 row skip). RTN, not GPTQ: the same int8 codes layout, and it spares minutes of
11008x11008 Cholesky factorisations on this CPU. Calibration: the bundled text, 4 x 128 tokens, TEAL's uniform
allocation; speed gates at 1 token. Rounds alternate every variant; decode tokens/s = (N - 1) / (time of N tokens -
time of 1), which removes the prefill; median over rounds.

Writes benchmarks/results/activation_int8.json and .md (both parts; a part run alone keeps the other's rows).
Usage: python benchmarks/activation_int8.py [--parts kernel,e2e] [--threads 1] [--repeats 9] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

from sparseforge.core.quantizer import QuantScheme, quantize_rtn
from sparseforge.eval.tasks import environment
from timing_common import Rotation, interleaved  # benchmarks/ is on sys.path when run as a script
from sparseforge.kernels import activation_sparse as ak
from sparseforge.kernels.int_weight_only import Int8WeightOnly

OUT = pathlib.Path(__file__).resolve().parent / "results"
STEM = "activation_int8"
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)
L3_BYTES = 260 * 2**20
X_POOL = 7



def bandwidth() -> dict:
    src = torch.randn(2**28)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, 5, 1)
    del src, dst
    return {"copy_bytes_per_s": 2 * 2**28 * 4 / t["copy"]}


def kernel_part(out_f: int, in_f: int, sparsities, repeats: int, warmup: int, bw: dict) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    # Copies per representation so each exceeds twice the L3 in total (float32: 180 MB each; int8: 45 MB each).
    def n_copies(el):
        return max(2, math.ceil(2 * L3_BYTES / (out_f * in_f * el)))

    base = torch.randn(out_f, in_f, generator=g) * 0.02
    k8 = Int8WeightOnly()
    qws = [quantize_rtn(base + 1e-3 * torch.randn(out_f, in_f, generator=g), QuantScheme(8, True, 0)) for _ in range(n_copies(1))]
    rows8 = [ak.Int8Rows.from_quantized(q) for q in qws]
    packed8 = [k8.pack(q) for q in qws]
    w32 = [qws[i % len(qws)].dequantize() for i in range(n_copies(4))]
    w16 = [qws[i % len(qws)].dequantize().to(torch.bfloat16) for i in range(n_copies(2))]
    wt16 = [w.t().contiguous() for w in w16]
    out = []
    for s in sparsities:
        xs = [ak.random_sparse_input(1, in_f, s, g, shared=True) for _ in range(X_POOL)]
        xb = [x.to(torch.bfloat16) for x in xs]
        y, rows_read, _ = ak.row_skip_int8_product(xs[0], rows8[0], 0.0)
        assert torch.allclose(y, F.linear(xs[0], qws[0].dequantize()), atol=1e-3, rtol=1e-3)
        rot = {k: (Rotation(n), Rotation(X_POOL)) for k, n in
               (("f32", len(w32)), ("bf16", len(w16)), ("int8", len(qws)), ("int8_skip", len(qws)), ("bf16_skip", len(w16)), ("copy", len(qws)))}

        def nxt(k):
            return rot[k][0].next(), rot[k][1].next()

        n_read = rows_read * out_f
        dst = torch.empty(max(n_read, 1), dtype=torch.int8)

        def copy():
            i, _ = nxt("copy")
            dst[:n_read].copy_(rows8[i].codes_t.view(-1)[:n_read])

        fns = {"f32": lambda: (lambda i, j: F.linear(xs[j], w32[i]))(*nxt("f32")),
               "bf16": lambda: (lambda i, j: F.linear(xb[j], w16[i]))(*nxt("bf16")),
               "int8": lambda: (lambda i, j: k8.matmul(xb[j], packed8[i]))(*nxt("int8")),
               "int8_skip": lambda: (lambda i, j: ak.row_skip_int8_product(xb[j], rows8[i], 0.0))(*nxt("int8_skip")),
               "bf16_skip": lambda: (lambda i, j: ak.row_skip_product(xb[j], wt16[i], 0.0))(*nxt("bf16_skip")),
               "copy": copy}
        t = interleaved(fns, repeats, warmup)
        floor = n_read / bw["copy_bytes_per_s"]
        r = {"out": out_f, "in": in_f, "tokens": 1, "sparsity": s, "rows_read": rows_read, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
             "int8_skip_vs_int8": t["int8"] / t["int8_skip"], "int8_skip_vs_bf16": t["bf16"] / t["int8_skip"],
             "int8_skip_vs_f32": t["f32"] / t["int8_skip"], "bf16_skip_vs_bf16": t["bf16"] / t["bf16_skip"],
             "int8_skip_of_floor": floor / t["int8_skip"], "int8_skip_of_cell_floor": (t["copy"] / 2) / t["int8_skip"],
             "int8_bytes_read": n_read}
        out.append(r)
        print(f"s={s:.2f} f32 {r['f32_ms']:.2f}  bf16 {r['bf16_ms']:.2f}  int8 {r['int8_ms']:.2f}  int8-skip {r['int8_skip_ms']:.2f} ms "
              f"(x{r['int8_skip_vs_int8']:.2f} int8, x{r['int8_skip_vs_bf16']:.2f} bf16, {100 * r['int8_skip_of_floor']:.0f}% floor, "
              f"{100 * r['int8_skip_of_cell_floor']:.0f}% cell floor)  bf16-skip {r['bf16_skip_ms']:.2f}", flush=True)
    return out


def e2e_part(rounds: int, new_tokens: int) -> list[dict]:
    import transformers

    import sparseforge
    from sparseforge.core.calibration import CalibrationConfig
    from sparseforge.methods import get_method
    from sparseforge.methods.activations import ActivationSparseLinear
    from sparseforge.methods.base import RuntimeContext
    from sparseforge.recipe import Recipe, Stage

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=4096, max_position_embeddings=2048)
    torch.manual_seed(0)
    from sparseforge.formats.artifact import REFERENCE_MODEL_DIR

    tok = transformers.AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    cal = CalibrationConfig(samples=4, seq_len=128)
    teal_params = {"sparsity": 0.5, "allocation": "uniform", "gate_token_counts": [1], "gate_repeats": 5}
    dense = transformers.AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    q8, _ = sparseforge.compress(dense, Recipe("w8", [Stage("rtn", get_method("rtn").parse_params({"bits": 8, "group_size": 0}))], cal), tok,
                                 progress=False)
    variants = {"dense bf16": (dense, None), "rtn-w8 (int8 dense)": (q8, ("quant-kernel", {"token_counts": [1], "repeats": 5, "warmup": 1})),
                "teal-50 (bf16 row skip)": (dense, ("teal", teal_params)), "rtn-w8+teal-50 (int8 row skip)": (q8, ("teal", teal_params))}
    states = {}
    for name, (model, stage) in variants.items():
        if stage is None:
            continue
        method = get_method(stage[0])(get_method(stage[0]).parse_params(stage[1]))
        with torch.no_grad():
            states[name] = (method, method.calibrate(model, RuntimeContext(tokenizer=tok, calibration=cal, targets=("*",), ignore=())))
    prompt = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))

    def timed(model, n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    rates: dict[str, list[float]] = {k: [] for k in variants}
    share: dict[str, float] = {}
    for round_ in range(rounds + 1):
        for name, (model, stage) in variants.items():
            if stage is not None:
                method, state = states[name]
                method.attach(model, state)
            timed(model, 2)
            rate = (new_tokens - 1) / max(timed(model, new_tokens) - timed(model, 1), 1e-9)
            mods = [m for m in model.modules() if isinstance(m, ActivationSparseLinear)]
            if mods:
                share[name] = sum(m.decision(1) == "sparse" for m in mods) / len(mods)
            if stage is not None:
                states[name][0].detach(model)
            if round_ > 0:  # the first round warms up
                rates[name].append(rate)
            print(f"round {round_} {name}: {rate:.2f} tok/s", flush=True)
    # The machine's speed drifts between rounds (other processes): the ratio to dense is taken within each round.
    base = rates["dense bf16"]
    return [{"variant": k, "tokens_per_s": statistics.median(v), "rounds": v,
             "vs_dense_bf16": statistics.median(a / b for a, b in zip(v, base)), "kernel_share": share.get(k)} for k, v in rates.items()]


def markdown(doc) -> str:
    env = doc["environment"]
    lines = ["# Activation sparsity over int8 weight-only storage (CPU)", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {doc['threads']} thread(s); "
             f"load average {doc.get('load_before')} before, {doc.get('load_after')} after (shared machine: timings are noisy). "
             "Produced by `benchmarks/activation_int8.py`."]
    if doc.get("kernel"):
        bw = doc["bandwidth"]["copy_bytes_per_s"] / 1e9
        lines += ["", f"## Kernel: 4096x11008 (out x in), batch 1, ms per product (copy bandwidth {bw:.2f} GB/s)", "",
                  "floor = int8 bytes read by int8 row skip at the copy bandwidth; cell floor = half the time of copying those bytes, timed alongside.", "",
                  "| sparsity | f32 dense | bf16 dense | int8 dense | int8 row skip | bf16 row skip | int8 skip vs int8 | vs bf16 | vs f32 | % of floor | % of cell floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["kernel"]:
            lines.append(f"| {r['sparsity']:.2f} | {r['f32_ms']:.2f} | {r['bf16_ms']:.2f} | {r['int8_ms']:.2f} | {r['int8_skip_ms']:.2f} | {r['bf16_skip_ms']:.2f} | "
                         f"{r['int8_skip_vs_int8']:.2f}x | {r['int8_skip_vs_bf16']:.2f}x | {r['int8_skip_vs_f32']:.2f}x | "
                         f"{100 * r['int8_skip_of_floor']:.0f}% | {100 * r['int8_skip_of_cell_floor']:.0f}% |")
    if doc.get("e2e"):
        lines += ["", "## End to end: 2-layer Llama with 7B-shaped layers, bfloat16, decode through `generate`", "",
                  "| variant | decode tok/s (median) | vs dense bf16 (median of per-round ratios) | rounds (tok/s) | projections on the sparse path at 1 token |", "|---|---|---|---|---|"]
        for r in doc["e2e"]:
            share = "" if r["kernel_share"] is None else f"{100 * r['kernel_share']:.0f}%"
            lines.append(f"| {r['variant']} | {r['tokens_per_s']:.2f} | {r['vs_dense_bf16']:.2f}x | {', '.join(f'{v:.2f}' for v in r['rounds'])} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="kernel,e2e")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--sparsities", default=",".join(str(v) for v in SPARSITIES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ak.available():
        raise SystemExit("the row-skipping kernel could not be built here (see the warning); nothing to measure")
    path = OUT / f"{STEM}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"environment": environment(), "threads": args.threads, "load_before": [round(v, 2) for v in os.getloadavg()]})
    parts = args.parts.split(",")
    if "kernel" in parts:
        doc["bandwidth"] = bandwidth()
        doc["kernel"] = kernel_part(4096, 11008, [float(v) for v in args.sparsities.split(",")], args.repeats, args.warmup, doc["bandwidth"])
    if "e2e" in parts:
        doc["e2e"] = e2e_part(args.rounds, args.new_tokens)
    doc["load_after"] = [round(v, 2) for v in os.getloadavg()]
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    (OUT / f"{STEM}.md").write_text(markdown(doc))
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
