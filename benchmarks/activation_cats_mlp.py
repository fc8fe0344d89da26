"""CATS's MLP on CPU with Llama-2-7B shapes (hidden 4096, 11008 channels): what skipping the up product adds.

Three ways to compute one gated MLP y = down(t(act(gate(x))) * up(x)), t zeroing a fraction s of the activations:
- dense: gate, up and down as `F.linear` (MKL), the activation thresholded (what CATS costs without a kernel);
- down-only: gate and up dense, the down product through the row-skipping kernel (CATS before this change);
- up+down: gate dense, then one C++ call (`gated_mlp_product`) that computes only the active rows of W_up (output-row
  gather) and skips the same rows of W_down's input-major copy, the threshold fused.
Batch 1, 2, 4 and 8 tokens (the same channels zeroed for every token at batch 1; independent random channels per
token above it, the worst case), float32 and bfloat16, in one process, alternating call by call after warm-up,
median of the repeats. Weights are cold: each call uses the next of two copies (each MLP is 541 MB in float32,
270 MB in bfloat16, against this machine's 260 MB L3). The ceiling at sparsity s: 3 / (1 + 2 (1 - s)) for up+down
(1.5x at 50%), 3 / (2 + (1 - s)) for down-only (1.2x); with independent channels per token a row is read when any
token keeps it, so the density is 1 - s^T instead of 1 - s.

Writes benchmarks/results/activation_cats_mlp.json and .md. Usage: python benchmarks/activation_cats_mlp.py [--threads 1]
[--repeats 9] [--sparsities 0.5] [--batches 1,2,4,8] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch
import torch.nn.functional as F

from sparseforge.eval.tasks import environment
from timing_common import Rotation, interleaved  # benchmarks/ is on sys.path when run as a script
from sparseforge.kernels import activation_sparse as ak

OUT = pathlib.Path(__file__).resolve().parent / "results"
X_POOL = 5



def ceilings(s: float, tokens: int) -> dict:
    """Bytes-read ratios: a row is read when any token keeps it (density 1 - s at batch 1, shared channels; 1 - s^T with
    independent channels per token)."""
    d = 1 - s if tokens == 1 else 1 - s ** tokens
    return {"ceiling_up_down": 3 / (1 + 2 * d), "ceiling_down_only": 3 / (2 + d)}


def run(hidden, inter, dtypes, sparsities, batches, repeats, warmup, copies=2) -> list[dict]:
    rows = []
    for dtype in dtypes:
        g = torch.Generator().manual_seed(0)
        mlps = [(torch.randn(inter, hidden, generator=g).to(dtype) * 0.02, torch.randn(inter, hidden, generator=g).to(dtype) * 0.02,
                 torch.randn(hidden, inter, generator=g).to(dtype) * 0.02) for _ in range(copies)]
        downs_t = [d.t().contiguous() for _, _, d in mlps]
        for tokens in batches:
            for s in sparsities:
                xs = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(X_POOL)]
                # The activation a = act(gate(x)), zeroed at a fraction s: shared channels at batch 1, per token above.
                acts = [ak.random_sparse_input(tokens, inter, s, g, shared=tokens == 1).to(dtype) for _ in range(X_POOL)]
                ref = ak.reference_gated_mlp(acts[0].float(), xs[0].float(), mlps[0][1].float(), mlps[0][2].float(), 0.0)
                y = ak.gated_mlp_product(acts[0], xs[0], mlps[0][1], downs_t[0], 0.0)[0]
                assert torch.allclose(y.float(), ref, atol=2e-2, rtol=2e-2)
                r = {k: Rotation(copies) for k in ("dense", "down", "updown")}
                xr = {k: Rotation(X_POOL) for k in ("dense", "down", "updown")}

                def dense():
                    i, j = r["dense"].next(), xr["dense"].next()
                    wg, wu, wd = mlps[i]
                    F.linear(xs[j], wg)
                    return F.linear(acts[j] * F.linear(xs[j], wu), wd)

                def down_only():
                    i, j = r["down"].next(), xr["down"].next()
                    wg, wu, _ = mlps[i]
                    F.linear(xs[j], wg)
                    return ak.row_skip_product(acts[j] * F.linear(xs[j], wu), downs_t[i], 0.0)

                def up_down():
                    i, j = r["updown"].next(), xr["updown"].next()
                    wg, wu, _ = mlps[i]
                    F.linear(xs[j], wg)
                    return ak.gated_mlp_product(acts[j], xs[j], wu, downs_t[i], 0.0)

                t = interleaved({"dense": dense, "down": down_only, "updown": up_down}, repeats, warmup)
                row = {"dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "sparsity": s, "dense_ms": t["dense"] * 1e3,
                       "down_only_ms": t["down"] * 1e3, "up_down_ms": t["updown"] * 1e3, "down_only_speedup": t["dense"] / t["down"],
                       "up_down_speedup": t["dense"] / t["updown"], "up_down_vs_down_only": t["down"] / t["updown"],
                       **ceilings(s, tokens)}
                rows.append(row)
                print(f"{row['dtype']:8s} T={tokens} s={s:.2f} dense {row['dense_ms']:.1f} ms  down-only {row['down_only_ms']:.1f} ms "
                      f"(x{row['down_only_speedup']:.2f})  up+down {row['up_down_ms']:.1f} ms (x{row['up_down_speedup']:.2f})", flush=True)
        del mlps, downs_t
    return rows


def markdown(doc) -> str:
    env = doc["environment"]
    lines = [
        "# CATS's MLP: skipping the up product too (Llama-2-7B MLP shapes)",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {doc['threads']} thread(s); load average "
        f"{doc['load_before']} before, {doc['load_after']} after (a shared machine: timings are noisy). Produced by "
        "`benchmarks/activation_cats_mlp.py`: one gated MLP (gate 11008x4096, up 11008x4096, down 4096x11008), times in ms "
        "(medians, alternating, cold weights); speedups against dense; ceiling = the bytes-read ratio of up+down at that sparsity and batch. "
        "Batch 1: the same zeroed channels for every token; batch > 1: independent per token (a row is read when any token needs it).",
        "",
        "| dtype | batch | sparsity | dense ms | down-only ms | up+down ms | down-only speedup | up+down speedup | up+down vs down-only | ceiling (up+down) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(f"| {r['dtype']} | {r['tokens']} | {r['sparsity']:.2f} | {r['dense_ms']:.1f} | {r['down_only_ms']:.1f} | {r['up_down_ms']:.1f} | "
                     f"{r['down_only_speedup']:.2f} | {r['up_down_speedup']:.2f} | {r['up_down_vs_down_only']:.2f} | {r['ceiling_up_down']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md (and the ceilings) from the saved JSON")
    args = ap.parse_args()
    if args.markdown_only:
        path = OUT / "activation_cats_mlp.json"
        doc = json.loads(path.read_text())
        for r in doc["rows"]:
            r.update(ceilings(r["sparsity"], r["tokens"]))
        path.write_text(json.dumps(doc, indent=1))
        (OUT / "activation_cats_mlp.md").write_text(markdown(doc))
        return
    torch.set_num_threads(args.threads)
    if not ak.available():
        raise SystemExit("the row-skipping kernel could not be built here (see the warning); nothing to measure")
    hidden, inter = (4096, 11008) if not args.quick else (512, 1376)
    load_before = os.getloadavg()
    rows = run(hidden, inter, [getattr(torch, d) for d in args.dtypes.split(",")], [float(v) for v in args.sparsities.split(",")],
               [int(v) for v in args.batches.split(",")], args.repeats, args.warmup)
    doc = {"environment": environment(), "threads": args.threads, "load_before": [round(v, 2) for v in load_before],
           "load_after": [round(v, 2) for v in os.getloadavg()], "hidden": hidden, "inter": inter, "rows": rows}
    stem = "activation_cats_mlp" + ("_quick" if args.quick else "")
    OUT.mkdir(exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (OUT / f"{stem}.md").write_text(markdown(doc))
    print(f"wrote {OUT / stem}.json and .md")


if __name__ == "__main__":
    main()
