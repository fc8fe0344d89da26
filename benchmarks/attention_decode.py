"""One decode step of one Llama-3-8B attention layer (32 query heads, 8 KV heads, head 128, fp32) over a cache of
4K-32K tokens: dense SDPA against Quest (page 16, budget 512 tokens) with its page summaries kept between steps
(the steady state while decoding: one new token per step, so one page in 16 steps is summarised anew).
Alternating, medians of `--steps` steps after warm-up; random inputs.

    python benchmarks/attention_decode.py     # about a minute, 1 thread
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kv_common import machine, machine_line, write  # noqa: E402

from sparseforge.methods import get_method  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--out", default="attention_decode")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = machine(1)
    env["load_average_start"] = os.getloadavg()
    scale = DIM**-0.5
    rows = []
    for L in args.lengths:
        g = torch.Generator().manual_seed(L)
        k = torch.randn(1, KV_HEADS, L + args.steps + 2, DIM, generator=g)
        v = torch.randn(1, KV_HEADS, L + args.steps + 2, DIM, generator=g)
        cls = get_method("quest")
        quest = cls(cls.parse_params({"page_size": args.page_size, "token_budget": args.budget, "gate": "always"}))
        dense_t, quest_t = [], []
        for step in range(args.steps + 2):
            S = L + step
            q = torch.randn(1, HEADS, 1, DIM, generator=g)
            ks, vs = k[:, :, :S], v[:, :, :S]
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True, scale=scale)
            t1 = time.perf_counter()
            quest.run_decode(None, 0, q, ks, vs, scale)
            t2 = time.perf_counter()
            if step >= 2:  # the first steps summarise every page (a prefill's worth); steady state after
                dense_t.append(t1 - t)
                quest_t.append(t2 - t1)
        d, qt = statistics.median(dense_t), statistics.median(quest_t)
        rows.append({"cache_tokens": L, "sdpa_ms": d * 1e3, "quest_ms": qt * 1e3, "speedup": d / qt, "steps": len(dense_t),
                     "attended_tokens": args.budget})
        print(rows[-1], flush=True)
    env["load_average_end"] = os.getloadavg()
    doc = {"benchmark": "attention_decode", "machine": env, "page_size": args.page_size, "token_budget": args.budget, "rows": rows}
    lines = ["# Quest decode step vs dense SDPA: one Llama-3-8B attention layer (32 q heads, 8 KV heads, head 128, fp32)", "",
             f"Machine: {machine_line(env)}; load average {env['load_average_start'][0]:.1f} / {env['load_average_end'][0]:.1f} "
             "(start / end, shared machine). Produced by `python benchmarks/attention_decode.py`; medians over steps, alternating.",
             f"Quest: page {args.page_size}, budget {args.budget} tokens, page summaries kept between steps.", "",
             "| cache tokens | SDPA ms | Quest ms | speedup | steps |", "|---|---|---|---|---|"]
    lines += [f"| {r['cache_tokens']} | {r['sdpa_ms']:.2f} | {r['quest_ms']:.2f} | {r['speedup']:.2f}x | {r['steps']} |" for r in rows]
    write(args.out, doc, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
