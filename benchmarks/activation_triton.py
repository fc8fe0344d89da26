"""The Triton row-skipping kernel (kernels/activation_sparse_triton.py) vs. the dense product on an NVIDIA GPU.

Llama-2-7B projection shapes (4096x4096, 11008x4096, 4096x11008 as OUTxIN), activation sparsity 0, 25, 40, 50, 65,
80, 90%, float16 and bfloat16, batch 1 (and 4, each token its own zeroed channels), in one process: the two
products alternate after warm-up, each timed as the median of CUDA-synchronised calls; weights rotate over copies
totalling more than twice the L2 so each call reads from HBM. First, at 50% on 4096x11008 float16 batch 1, a few
block shapes (BLOCK_K x BLOCK_N, warps) are timed and the best is used for the grid; bytes floor = weight bytes
of the active rows at the measured device-to-device copy bandwidth.

Writes benchmarks/results/gpu/activation_triton.json and .md. Needs CUDA and triton (pip install 'sparseforge[gpu]').
Usage: python benchmarks/activation_triton.py [--repeats 50] [--batches 1,4]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch
import torch.nn.functional as F

from sparseforge.eval.tasks import environment
from sparseforge.kernels import activation_sparse as ak
from sparseforge.kernels import activation_sparse_triton as tk

OUT = pathlib.Path(__file__).resolve().parent / "results" / "gpu"
SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)
CONFIGS = [(16, 256, 4), (32, 128, 4), (16, 128, 4), (8, 512, 4), (32, 256, 8), (64, 128, 4)]


def cuda_time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def alternate(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    rounds = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            rounds[k].append(cuda_time(fn, repeats, warmup))
    return {k: sorted(v)[1] for k, v in rounds.items()}


def bandwidth() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 20, 3)
    return 2 * 2**30 / t


class Rot:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def weights(out_f, in_f, dtype, g):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(2, -(-2 * l2 // (out_f * in_f * 2)))
    ws = [torch.randn(out_f, in_f, generator=g).to("cuda", dtype) for _ in range(copies)]
    return ws, [w.t().contiguous() for w in ws]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and tk.triton_available()):
        raise SystemExit("needs a CUDA GPU and triton")
    g = torch.Generator().manual_seed(0)
    bw = bandwidth()
    # Block shapes, on the headline cell.
    ws, wts = weights(4096, 11008, torch.float16, g)
    x = ak.random_sparse_input(1, 11008, 0.5, g).to("cuda", torch.float16)
    ref = F.linear(x.float(), ws[0].float())
    sweep = []
    for bk, bn, nw in CONFIGS:
        y = tk.triton_product(x, wts[0], 0.0, bk, bn, nw)
        ok = bool(torch.allclose(y.float(), ref, atol=5e-2, rtol=2e-2))
        r = Rot(wts)
        sweep.append({"block_k": bk, "block_n": bn, "warps": nw, "correct": ok,
                      "ms": cuda_time(lambda: tk.triton_product(x, r.next(), 0.0, bk, bn, nw), args.repeats, args.warmup) * 1e3})
        print(sweep[-1], flush=True)
    best = min((s for s in sweep if s["correct"]), key=lambda s: s["ms"])
    cfg = (best["block_k"], best["block_n"], best["warps"])
    del ws, wts
    rows = []
    for label, (out_f, in_f) in SHAPES.items():
        for dtype in (torch.float16, torch.bfloat16):
            ws, wts = weights(out_f, in_f, dtype, g)
            for tokens in (int(b) for b in args.batches.split(",")):
                for s in SPARSITIES:
                    x = ak.random_sparse_input(tokens, in_f, s, g, shared=tokens == 1).to("cuda", dtype)
                    y = tk.triton_product(x, wts[0], 0.0, *cfg)
                    ok = bool(torch.allclose(y.float(), F.linear(x.float(), ws[0].float()), atol=5e-2, rtol=2e-2))
                    rd, rs = Rot(ws), Rot(wts)
                    t = alternate({"dense": lambda: F.linear(x, rd.next()), "sparse": lambda: tk.triton_product(x, rs.next(), 0.0, *cfg)},
                                  args.repeats, args.warmup)
                    active = int((x != 0).any(0).sum())
                    floor = active * out_f * 2 / bw
                    rows.append({"shape": label, "out": out_f, "in": in_f, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
                                 "sparsity": s, "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3, "speedup": t["dense"] / t["sparse"],
                                 "sparse_of_floor": floor / t["sparse"], "correct": ok})
                    print(rows[-1], flush=True)
            del ws, wts
    env = environment()
    doc = {"environment": env, "device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "block_sweep": sweep, "config": cfg, "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "activation_triton.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Triton row-skipping kernel vs. dense on the GPU", "",
             f"Device: {doc['device']}, torch {env['torch']}; copy bandwidth {bw / 1e9:.0f} GB/s (read + written). Produced by "
             f"`benchmarks/activation_triton.py`; block config (BLOCK_K, BLOCK_N, warps) = {cfg}, the fastest correct one of the sweep below. "
             "Batch 1: shared zeroed channels; batch 4: each token its own.", "",
             "| shape | dtype | batch | sparsity | dense ms | sparse ms | speedup | % of floor | agrees |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['out']}x{r['in']} ({r['shape']}) | {r['dtype']} | {r['tokens']} | {r['sparsity']:.2f} | {r['dense_ms']:.4f} | "
                     f"{r['sparse_ms']:.4f} | {r['speedup']:.2f} | {100 * r['sparse_of_floor']:.0f}% | {r['correct']} |")
    lines += ["", "Block sweep (4096x11008 float16, batch 1, 50%):", "", "| BLOCK_K | BLOCK_N | warps | ms | agrees |", "|---|---|---|---|---|"]
    lines += [f"| {s['block_k']} | {s['block_n']} | {s['warps']} | {s['ms']:.4f} | {s['correct']} |" for s in sweep]
    (OUT / "activation_triton.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}/activation_triton.json and .md")


if __name__ == "__main__":
    main()
