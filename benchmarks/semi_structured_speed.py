"""2:4 sparse vs. dense matrix products for the projections of a Llama-2-7B decoder layer on a CUDA GPU, at
1, 16, 128, 2048 and 8192 tokens, with the speed gate's choice and each kernel's distance from its floor.

For each (shape, tokens): dense and 2:4 `F.linear` in float16 on random inputs (the weight has a random 2:4
mask), medians over repeats after warm-up, both timed in the same process. The floor of each product is the
larger of FLOPs / (measured dense matmul rate; doubled for 2:4, the tensor cores' sparse rate) and bytes /
(measured device-to-device copy bandwidth), bytes being the weight (2:4: half the values plus 2-bit
positions), the input and the output once each. The gate (kernels.base.SpeedGate) picks sparse only
where it was measured faster by more than 5%; the "layer" rows add up the seven projections per choice.

Writes benchmarks/results/semi_structured_speed.json and .md. Needs a CUDA GPU of compute capability >= 8.0.
Usage: python benchmarks/semi_structured_speed.py [--tokens 1,16,128,2048,8192] [--repeats 50]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from sparseforge.eval.tasks import environment
from sparseforge.kernels.base import SpeedGate, median_seconds
from sparseforge.kernels.semi_structured import semi_structured_supported

OUT = pathlib.Path(__file__).resolve().parent / "results"
# Llama-2-7B projections (out_features, in_features), and how many of each shape a decoder layer has.
SHAPES = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2), "down": ((4096, 11008), 1)}


def ceilings(device) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written per second) and fp16 matmul rate."""
    src = torch.empty(2**28, dtype=torch.float16, device=device)  # 512 MiB
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), 20, 5, device)
    n = 8192
    a = torch.randn(n, n, dtype=torch.float16, device=device)
    b = torch.randn(n, n, dtype=torch.float16, device=device)
    mm_s = median_seconds(lambda: a @ b, 20, 5, device)
    return {"copy_bytes_per_s": 2 * src.numel() * 2 / copy_s, "matmul_flops_per_s": 2 * n**3 / mm_s}


def floor_seconds(out_f, in_f, tokens, sparse: bool, ceil: dict) -> float:
    flops = 2 * tokens * out_f * in_f
    weight_bytes = out_f * in_f * 2 * (0.5 + 1 / 16) if sparse else out_f * in_f * 2  # 2-bit positions per kept value
    moved = weight_bytes + tokens * (in_f + out_f) * 2
    rate = ceil["matmul_flops_per_s"] * (2 if sparse else 1)
    return max(flops / rate, moved / ceil["copy_bytes_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,16,128,2048,8192")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    if not semi_structured_supported():
        sys.exit("semi_structured_speed.py needs a CUDA GPU of compute capability 8.0 or newer (2:4 sparse tensor cores); none found")
    device = torch.device("cuda")
    token_counts = [int(t) for t in args.tokens.split(",")]
    ceil = ceilings(device)
    keys = [f"{o}x{i}" for (o, i), _ in SHAPES.values()]
    gate = SpeedGate.measure("2:4", keys, token_counts, device, torch.float16, args.repeats, args.warmup)
    rows = []
    for label, ((out_f, in_f), count) in SHAPES.items():
        for tokens, t in gate.timings[f"{out_f}x{in_f}"].items():
            rows.append({
                "shape": label, "out": out_f, "in": in_f, "per_layer": count, "tokens": tokens,
                "dense_us": t["dense_s"] * 1e6, "sparse_us": t["sparse_s"] * 1e6, "speedup": t["dense_s"] / t["sparse_s"],
                "choice": gate.choose(f"{out_f}x{in_f}", tokens),
                "dense_of_floor": floor_seconds(out_f, in_f, tokens, False, ceil) / t["dense_s"],
                "sparse_of_floor": floor_seconds(out_f, in_f, tokens, True, ceil) / t["sparse_s"],
            })
    layer = []
    for tokens in token_counts:
        mine = [r for r in rows if r["tokens"] == tokens]
        dense = sum(r["dense_us"] * r["per_layer"] for r in mine)
        gated = sum((r["sparse_us"] if r["choice"] == "sparse" else r["dense_us"]) * r["per_layer"] for r in mine)
        all_sparse = sum(r["sparse_us"] * r["per_layer"] for r in mine)
        layer.append({"tokens": tokens, "dense_us": dense, "all_sparse_us": all_sparse, "gated_us": gated,
                      "all_sparse_speedup": dense / all_sparse, "gated_speedup": dense / gated})
    env = environment()
    OUT.mkdir(exist_ok=True)
    doc = {"environment": env, "device_name": torch.cuda.get_device_name(), "ceilings": ceil, "gate": gate.to_dict(), "rows": rows, "layer": layer}
    (OUT / "semi_structured_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["| projection | tokens | dense µs | 2:4 µs | speedup | gate | dense % of floor | 2:4 % of floor |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} {r['out']}x{r['in']} | {r['tokens']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['choice']} | {r['dense_of_floor']:.0%} | {r['sparse_of_floor']:.0%} |")
    lay = ["| tokens | dense µs | all 2:4 µs | gated µs | all 2:4 speedup | gated speedup |", "|---|---|---|---|---|---|"]
    for r in layer:
        lay.append(f"| {r['tokens']} | {r['dense_us']:.1f} | {r['all_sparse_us']:.1f} | {r['gated_us']:.1f} | {r['all_sparse_speedup']:.2f}x | {r['gated_speedup']:.2f}x |")
    md = (f"# 2:4 semi-structured vs. dense products, Llama-2-7B layer shapes\n\nDevice: {doc['device_name']}, torch {env['torch']}, float16, "
          f"medians of {args.repeats} after {args.warmup} warm-up calls. Measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"dense matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s. Produced by `benchmarks/semi_structured_speed.py`.\n\n"
          + "\n".join(lines) + "\n\nPer decoder layer (4 x q/k/v/o, 2 x gate/up, 1 x down; attention itself not included):\n\n" + "\n".join(lay) + "\n")
    (OUT / "semi_structured_speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
