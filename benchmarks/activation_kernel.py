"""What activation sparsity buys per projection on CPU: the row-skipping kernel (kernels/activation_sparse.py)
vs. the dense product, on Llama-2-7B projection shapes.

For each shape (OUTxIN: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down), activation sparsity (0, 25, 40,
50, 65, 80, 90%) and batch (1, 2, 4, 8 tokens), in this one process, the products alternate call by call after
warm-up and each time is a median:
- dense: `F.linear(x, W)` (MKL);
- sparse (shared mask): the kernel on inputs whose zeroed channels are the same for every token (its best case,
  and exactly the decode case at batch 1);
- sparse (independent masks): every token zeroes its own random channels, so a row is read when any token needs it
  (the worst case: at batch 8 and 50% almost every row);
- gather (batch 1 only): the pure-PyTorch alternative, `x[:, idx] @ Wt[idx]`, which copies the active rows first.
Weights are cold: each call uses the next of several copies whose total exceeds twice the last-level cache, and
the next of 7 inputs with their own zeroed channels, so every product reads its weight from memory as a model's
decode step does (one weight of 180 MB, or the active rows of several, would otherwise sit in this machine's
260 MB L3 between calls and flatter whichever product touches less).

Bytes floor: weight bytes actually read (active rows x OUT x element size) divided by the measured copy bandwidth
(bytes read + written per second by `dst.copy_(src)` on 1 GiB buffers, the convention of the other speed
benchmarks); "% of floor" = floor time / measured time. Because other processes' load moves the bandwidth from
minute to minute, each cell also times, in the same alternation, a copy of exactly the bytes the kernel reads
from the same cold weights: "% of cell floor" = (that copy's time / 2, as it reads and writes each byte) /
kernel time. The machine's load average is recorded before and after.

Writes benchmarks/results/activation_kernel.json and .md (--quick: *_quick, a smoke test).
Usage: python benchmarks/activation_kernel.py [--threads N] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics

import torch
import torch.nn.functional as F

from sparseforge.eval.tasks import environment
from timing_common import interleaved  # benchmarks/ is on sys.path when run as a script
from sparseforge.kernels import activation_sparse as ak

OUT = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)
BATCHES = (1, 2, 4, 8)
L3_BYTES = 260 * 2**20  # this machine's (lscpu); cold weights must exceed twice it
X_POOL = 7  # inputs cycled per cell




def bandwidth() -> dict:
    src = torch.randn(2**28)  # 1 GiB
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src), "sum": lambda: src.sum()}, 5, 1)
    del src, dst
    return {"copy_bytes_per_s": 2 * 2**28 * 4 / t["copy"], "read_bytes_per_s": 2**28 * 4 / t["sum"]}


class Rotation:
    """Calls `fn(i)` on the next copy each time, so no copy is in cache when it is used again."""

    def __init__(self, n: int):
        self.n, self.i = n, 0

    def next(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def run(shapes, sparsities, batches, dtypes, repeats, warmup, bw) -> list[dict]:
    rows = []
    for label, (out_f, in_f) in shapes.items():
        for dtype in dtypes:
            el = torch.tensor([], dtype=dtype).element_size()
            copies = max(2, math.ceil(2 * L3_BYTES / (out_f * in_f * el)))
            copies += copies % X_POOL == 0
            g = torch.Generator().manual_seed(0)
            ws = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(copies)]
            wts = [w.t().contiguous() for w in ws]
            rd, rs = Rotation(copies), Rotation(copies)
            for tokens in batches:
                for s in sparsities:
                    if tokens > 1 and dtype != torch.float32:
                        continue
                    # Several inputs, each with its own zeroed channels, cycled against the weight copies (X_POOL is
                    # coprime with the copy count): the rows read differ from call to call, so the sparse product's
                    # working set is not left in the cache either.
                    xs = [ak.random_sparse_input(tokens, in_f, s, g, shared=True).to(dtype) for _ in range(X_POOL)]
                    xi = [ak.random_sparse_input(tokens, in_f, s, g, shared=False).to(dtype) for _ in range(X_POOL)]
                    y, rows_read, _ = ak.row_skip_product(xs[0], wts[0], 0.0)
                    assert torch.allclose(y.float(), F.linear(xs[0].float(), ws[0].float()), atol=1e-2, rtol=1e-2)
                    rows_indep = statistics.mean(ak.row_skip_product(x, wts[0], 0.0)[1] for x in xi)
                    xr_d, xr_s, xr_i = Rotation(X_POOL), Rotation(X_POOL), Rotation(X_POOL)
                    fns = {"dense": lambda: F.linear(xs[xr_d.next()], ws[rd.next()]),
                           "sparse": lambda: ak.row_skip_product(xs[xr_s.next()], wts[rs.next()], 0.0),
                           "sparse_indep": lambda: ak.row_skip_product(xi[xr_i.next()], wts[rs.next()], 0.0)}
                    if tokens == 1:
                        idx = [(x[0] != 0).nonzero().flatten() for x in xs]
                        xr_g = Rotation(X_POOL)

                        def gather():
                            j = xr_g.next()
                            return xs[j][:, idx[j]] @ wts[rs.next()][idx[j]]

                        fns["gather"] = gather
                    # The floor in the same conditions: a copy of exactly the bytes the sparse kernel reads, from the
                    # same cold weight copies, timed in the same alternation (load changes from minute to minute).
                    n_read = rows_read * out_f
                    dst = torch.empty(n_read, dtype=dtype)
                    rc = Rotation(copies)
                    fns["copy"] = lambda: dst.copy_(wts[rc.next()].view(-1)[:n_read])
                    t = interleaved(fns, repeats, warmup)
                    floor = rows_read * out_f * el / bw["copy_bytes_per_s"]
                    # copy reads n_read and writes n_read elements; reading alone would take at most half of it.
                    floor_cell = t["copy"] / 2
                    dense_floor = in_f * out_f * el / bw["copy_bytes_per_s"]
                    r = {"shape": label, "out": out_f, "in": in_f, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
                         "sparsity": s, "dense_ms": t["dense"] * 1e3, "sparse_ms": t["sparse"] * 1e3,
                         "sparse_indep_ms": t["sparse_indep"] * 1e3, "gather_ms": t["gather"] * 1e3 if "gather" in t else None,
                         "speedup": t["dense"] / t["sparse"], "speedup_indep": t["dense"] / t["sparse_indep"],
                         "rows_read": rows_read, "rows_read_indep": rows_indep,
                         "sparse_of_floor": floor / t["sparse"], "dense_of_floor": dense_floor / t["dense"],
                         "copy_ms": t["copy"] * 1e3, "sparse_of_cell_floor": floor_cell / t["sparse"]}
                    rows.append(r)
                    print(f"{label:8s} {r['dtype']:8s} T={tokens} s={s:.2f} dense {r['dense_ms']:7.2f} ms  sparse {r['sparse_ms']:7.2f} ms "
                          f"(x{r['speedup']:.2f}, {100 * r['sparse_of_floor']:.0f}% of floor, {100 * r['sparse_of_cell_floor']:.0f}% of cell floor)  indep x{r['speedup_indep']:.2f}"
                          + (f"  gather {r['gather_ms']:.2f} ms" if r["gather_ms"] else ""), flush=True)
            del ws, wts
    return rows


def gate_rows(rows) -> list[dict]:
    """What an ActivationGate built from these very timings chooses, and whether that choice was the faster one."""
    gate = ak.ActivationGate()
    for r in rows:
        key = ak.gate_key(r["out"], r["in"], getattr(torch, r["dtype"]))
        gate.timings.setdefault(key, {}).setdefault(r["tokens"], {})[round(1 - r["sparsity"], 2)] = {
            "dense_s": r["dense_ms"], "sparse_s": r["sparse_indep_ms"]}
    out = []
    for r in rows:
        key = ak.gate_key(r["out"], r["in"], getattr(torch, r["dtype"]))
        choice = gate.choose(key, r["tokens"], 1 - r["sparsity"])
        chosen = r["sparse_indep_ms"] if choice == "sparse" else r["dense_ms"]
        out.append({**r, "gate": choice, "gate_slower": chosen > min(r["dense_ms"], r["sparse_indep_ms"])})
    return out


def markdown(doc) -> str:
    env, bw = doc["environment"], doc["bandwidth"]
    lines = [
        "# Activation-sparse products on CPU: row skipping vs. dense",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {doc['threads']} threads; load average "
        f"{doc['load_before']} before, {doc['load_after']} after (other processes share the cores: timings are noisy). "
        f"Copy bandwidth {bw['copy_bytes_per_s'] / 1e9:.2f} GB/s (read + written), read bandwidth {bw['read_bytes_per_s'] / 1e9:.2f} GB/s.",
        "Produced by `benchmarks/activation_kernel.py`. Speedup = dense time / sparse time; \"floor\" = weight bytes read "
        "by the sparse kernel at the copy bandwidth; shared = the same channels zeroed in every token, indep = each token "
        "its own; cell floor = half the time of copying the bytes read, timed alongside; gate = what an ActivationGate built from the indep timings picks (✗ where that was the slower one).",
        "",
        "| shape | dtype | batch | sparsity | dense ms | sparse ms (shared) | speedup | % of floor | % of cell floor | indep ms | speedup indep | gather ms | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        gather = f"{r['gather_ms']:.2f}" if r["gather_ms"] else ""
        lines.append(f"| {r['out']}x{r['in']} ({r['shape']}) | {r['dtype']} | {r['tokens']} | {r['sparsity']:.2f} | {r['dense_ms']:.2f} | "
                     f"{r['sparse_ms']:.2f} | {r['speedup']:.2f} | {100 * r['sparse_of_floor']:.0f}% | {100 * r.get('sparse_of_cell_floor', float('nan')):.0f}% | {r['sparse_indep_ms']:.2f} | "
                     f"{r['speedup_indep']:.2f} | {gather} | {r['gate']}{' ✗' if r['gate_slower'] else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread by default: on a shared, loaded 2-core machine a 2-thread product waits for its slower thread, and
    # every product then took one scheduler slice (about 24 ms) whatever its size.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sparsities", default=",".join(str(v) for v in SPARSITIES))
    ap.add_argument("--batches", default=",".join(str(v) for v in BATCHES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="activation_kernel", help="results file stem")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ak.available():
        raise SystemExit("the row-skipping kernel could not be built here (see the warning); nothing to measure")
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    sparsities = tuple(float(v) for v in args.sparsities.split(","))
    batches = tuple(int(v) for v in args.batches.split(","))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.quick:
        shapes, sparsities, batches = {"down": (1024, 2752)}, (0.0, 0.5), (1, 4)
    load_before = os.getloadavg()
    bw = bandwidth()
    rows = run(shapes, sparsities, batches, dtypes, args.repeats, args.warmup, bw)
    doc = {"environment": environment(), "threads": args.threads, "bandwidth": bw, "load_before": [round(v, 2) for v in load_before],
           "load_after": [round(v, 2) for v in os.getloadavg()], "rows": gate_rows(rows)}
    stem = args.out + ("_quick" if args.quick else "")
    OUT.mkdir(exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (OUT / f"{stem}.md").write_text(markdown(doc))
    print(f"wrote {OUT / stem}.json and .md")


if __name__ == "__main__":
    main()
