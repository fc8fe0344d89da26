"""One attention layer with Llama-3-8B shapes (32 query heads, 8 KV heads, head size 128, float32), causal prefill
at 4K-32K tokens: dense SDPA (`is_causal=True`, GQA) against each sparse pattern at its density, index building
timed apart from the block-sparse kernel, both kernels (FlexAttention with `BlockMask.from_kv_blocks`, compiled; the
gather of key blocks into SDPA) where affordable, and the crossover length where sparse starts to win.

Inputs are random (seeded): A-shape and vertical-slash budgets are set per length to land near the target density
(0.1; A-shape also 0.2 and 0.3 for the speed gate's table); FlexPrefill runs at gamma 0.95 and reports the
density it chose on these inputs. Variants alternate within a repeat; medians over repeats. A 32K dense layer is
~9 TFLOP (minutes on one core), so the long lengths get fewer repeats (the `repeats` column says how many). The
first FlexAttention call of each length compiles and is not timed (warm-up; its seconds are reported).

    python benchmarks/attention_speed.py                     # 1K-32K (15-30 minutes on one busy core)
    python benchmarks/attention_speed.py --lengths 4096 8192 --out attention_speed_short
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kv_common import machine, machine_line, write  # noqa: E402

from sparseforge.kernels import block_sparse_attention as bsa  # noqa: E402
from sparseforge.kernels.block_sparse_attention import attention_flops, block_sparse_attention  # noqa: E402

bsa.FLEX_DYNAMIC = False  # a static kernel per length (what the committed table measured)
from sparseforge.methods import get_method  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 64
REPEATS = {1024: 3, 2048: 3, 4096: 3, 8192: 2, 16384: 1, 32768: 1, 65536: 1}
# The machine is shared and one 32K dense layer takes minutes, so the long lengths measure fewer variants: the
# gather kernel (the slower one), FlexPrefill (near-dense on random inputs) and A-shape at 0.2 / 0.3 (for the
# gate's table, whose crossovers lie at short lengths) only up to SHORT.
SHORT = 8192


def make(name, **params):
    cls = get_method(name)
    return cls(cls.parse_params(dict(params, block_size=BLOCK, gate="always")))


def tuned(name, key_fn, q, k, scale, target):
    """The budget (in blocks) whose density on these inputs is closest to `target`, and its method."""
    n = q.shape[2] // BLOCK
    best = None
    for blocks in range(1, n + 1):
        method = make(name, **key_fn(blocks * BLOCK))
        density = method.selection(q[:, :2], k[:, :1], scale).density()  # two heads suffice to size the budget
        if best is None or abs(density - target) < abs(best[1] - target):
            best = (method, density, blocks)
        if density > target * 1.5:
            break
    return best


SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize on a GPU, so a time covers the kernels it launched)


def timed(fn):
    SYNC()
    t = time.perf_counter()
    out = fn()
    SYNC()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="attention_speed")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16, FlexAttention through Triton; add 65536 to --lengths)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global SYNC
    dtype = torch.float32
    if args.device.startswith("cuda"):
        SYNC, dtype = torch.cuda.synchronize, torch.bfloat16
    warnings.filterwarnings("ignore")
    env = machine(args.threads)
    env["device"] = args.device
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    env["load_average_start"] = os.getloadavg()
    scale = DIM**-0.5
    rows = []
    for L in args.lengths:
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, h, L, DIM, generator=g).to(args.device, dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        variants = {}
        for target in (0.1, 0.2, 0.3) if L <= SHORT else (0.1,):
            m, d, b = tuned("ashape", lambda t: {"sinks": BLOCK, "window": t}, q, k, scale, target)
            variants[f"ashape@{target}"] = (m, f"sinks 64, window {b * BLOCK}")
        m, d, b = tuned("vertical-slash", lambda t: {"vertical": t, "slash": t}, q, k, scale, 0.1)
        variants["vertical-slash@0.1"] = (m, f"vertical {b * BLOCK}, slash {b * BLOCK}")
        if L <= SHORT:
            variants["flexprefill-95"] = (make("flexprefill", gamma=0.95), "gamma 0.95, tau 0.1")
        kernels = ["flex"] + (["gather"] if L <= SHORT else [])
        compile_s = {}
        sel0 = variants["ashape@0.1"][0].selection(q, k, scale)
        _, compile_s["flex"] = timed(lambda: block_sparse_attention(q, k, v, sel0, scale, "flex"))  # warm-up/compile
        times: dict[str, list[float]] = {"sdpa": []}
        index_t: dict[str, list[float]] = {}
        densities = {}
        for rep in range(REPEATS.get(L, 1)):
            _, t = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale))
            times["sdpa"].append(t)
            for name, (method, _) in variants.items():
                sel, ti = timed(lambda: method.selection(q, k, scale))
                index_t.setdefault(name, []).append(ti)
                densities[name] = sel.density()
                for kern in kernels:
                    if kern == "gather" and not name.startswith("ashape@0.1"):
                        continue
                    _, tk = timed(lambda: block_sparse_attention(q, k, v, sel, scale, kern))
                    times.setdefault(f"{name}|{kern}", []).append(tk)
                del sel
            print(f"L={L} repeat {rep}: sdpa {times['sdpa'][-1]:.2f}s", flush=True)
        dense = statistics.median(times["sdpa"])
        rows.append({"length": L, "variant": "sdpa", "kernel": "sdpa", "density": 1.0, "index_s": 0.0, "kernel_s": dense,
                     "total_s": dense, "speedup": 1.0, "repeats": len(times["sdpa"]), "budget": "dense causal",
                     "tflop": attention_flops(L, HEADS, DIM) / 1e12})
        for key, ts in times.items():
            if key == "sdpa":
                continue
            name, kern = key.split("|")
            idx = statistics.median(index_t[name])
            ker = statistics.median(ts)
            rows.append({"length": L, "variant": name, "kernel": kern, "density": round(densities[name], 4),
                         "index_s": idx, "kernel_s": ker, "total_s": idx + ker, "speedup": dense / (idx + ker),
                         "repeats": len(ts), "budget": variants[name][1], "compile_s": compile_s.get(kern),
                         "tflop": attention_flops(L, HEADS, DIM, densities[name]) / 1e12})
        print(f"L={L} done", flush=True)
        del q, k, v
    env["load_average_end"] = os.getloadavg()
    crossover = {}
    for variant in sorted({r["variant"] for r in rows if r["kernel"] == "flex"}):
        wins = [r["length"] for r in rows if r["variant"] == variant and r["kernel"] == "flex" and r["speedup"] > 1]
        crossover[variant] = min(wins) if wins else None
    doc = {"benchmark": "attention_speed", "machine": env, "shape": {"q_heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM,
           "block": BLOCK, "dtype": str(dtype).replace("torch.", "")}, "rows": rows, "crossover_flex": crossover}
    write(args.out, doc, markdown(doc))
    print(markdown(doc))


def markdown(doc) -> str:
    env = doc["machine"]
    la = env.get("load_average_start"), env.get("load_average_end")
    lines = [
        "# Sparse attention speed: one Llama-3-8B attention layer (32 q heads, 8 KV heads, head 128, fp32), causal prefill",
        "",
        f"Machine: {machine_line(env)}; load average {la[0][0]:.1f} at the start, {la[1][0]:.1f} at the end (shared machine).",
        "Produced by `python benchmarks/attention_speed.py`. Times in seconds, medians over `repeats` (alternating variants);",
        "`index` is building the block indices, `kernel` the block-sparse attention, `speedup` = dense SDPA / (index + kernel).",
        "Random inputs; density = chosen causal blocks / all causal blocks (block 64).",
        "",
        "| tokens | variant | kernel | budget | density | index s | kernel s | total s | speedup vs SDPA | repeats |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(f"| {r['length']} | {r['variant']} | {r['kernel']} | {r['budget']} | {r['density']:.3f} | {r['index_s']:.3f} | "
                     f"{r['kernel_s']:.2f} | {r['total_s']:.2f} | {r['speedup']:.2f}x | {r['repeats']} |")
    lines += ["", "Crossover (first benchmarked length where the FlexAttention path incl. index building beats SDPA):", ""]
    for k, v in doc["crossover_flex"].items():
        lines.append(f"- {k}: {v if v else 'none up to the longest length'}")
    compile_rows = [r for r in doc["rows"] if r.get("compile_s")]
    if compile_rows:
        lines += ["", "FlexAttention's first call per length compiles (not in the times above): " +
                  ", ".join(f"{r['length']}: {r['compile_s']:.0f} s" for r in compile_rows if r["variant"] == "ashape@0.1" and r["kernel"] == "flex")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
