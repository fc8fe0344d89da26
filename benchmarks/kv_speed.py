"""KV-cache time cost and gain (issue 10): time to first token and time per output token of every press and of KIVI
against the full cache, as ratios measured in one process, variants alternating, medians over rounds.

`kv_scale.py` measures memory in a fresh process per cell, one cell after another, so its TTFT and TPOT columns move
with the machine's load between cells. This script answers the speed question on its own: on the same random-weight
Llama with 8B-shaped attention (kv_scale.py's model: hidden 4096, 32 query heads, 8 KV heads, head size 128, 2 layers,
float32), each round runs every variant once in a rotated order on one model instance (the press attached, the
prompt prefilled, `--new-tokens` greedy decode steps, the press detached), and each variant's time is divided by
the full cache's time of the same round. A ratio above 1 means the variant costs time; below 1, it saves time.

Why ratios per round: the machine is shared, its speed drifts between rounds, and a ratio of two runs taken a few
seconds apart cancels most of that drift. The first round is a warm-up and is discarded.

Usage:
    python benchmarks/kv_speed.py [--lengths 1024,4096] [--presses snapkv,h2o] [--ratio 0.875] [--rounds 5]
        [--chunked snapkv,streaming_llm] [--new-tokens 16] [--threads 1] [--name kv_speed] [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kv_common as kc  # noqa: E402
import kv_scale  # noqa: E402  (the model and prompts are kv_scale.py's, so the two tables describe one model)

NAME = "kv_speed"


def variants(args) -> list[dict]:
    out = [{"label": "full cache", "press": None}]
    if args.chunk:
        out.append({"label": f"full cache, chunked {args.chunk}", "press": None, "chunk": args.chunk})
    for p in args.presses:
        out.append({"label": f"{p} {args.ratio:g}", "press": p, "params": {"compression_ratio": args.ratio}})
    for p in args.chunked:
        out.append({"label": f"{p} {args.ratio:g}, chunked {args.chunk}", "press": p,
                    "params": {"compression_ratio": args.ratio}, "chunk": args.chunk})
    for bits in args.kivi_bits:
        out.append({"label": f"kivi {bits}-bit", "press": "kivi", "params": {"bits": bits}})
    return out


def run_variant(model, ids, v: dict, new_tokens: int) -> tuple[float, float]:
    """Prefill (all chunks) through the first token, then greedy decode; returns (TTFT s, median TPOT s)."""
    import torch
    from transformers import DynamicCache

    from sparseforge.methods import get_method

    press = None
    if v["press"]:
        method = get_method(v["press"])
        press = method(method.parse_params(v["params"]))
        press.attach(model, press.calibrate(model, None) if v["press"] == "kivi" else None)
    try:
        n, chunk = ids.shape[1], v.get("chunk")
        sched = press.schedule(prompt_len=n) if (press is not None and chunk) else contextlib.nullcontext()
        with torch.inference_mode():
            cache = DynamicCache()
            sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
            sync()
            t0 = time.perf_counter()
            with sched:
                for c in (ids.split(chunk, dim=1) if chunk else [ids]):
                    out = model(input_ids=c, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            ttft = time.perf_counter() - t0
            steps = kv_scale._decode(model, cache, token, n, new_tokens)  # the scale grid's decode loop, timed per step
        return ttft, statistics.median(steps)
    finally:
        if press is not None:
            press.detach(model)


def measure(args, length: int) -> dict:
    model = kv_scale.build_model(args.threads).to(args.device)
    ids = kv_scale.prompt(length).to(args.device)
    vs = variants(args)
    rounds = []
    for r in range(args.rounds + 1):  # round 0: warm-up, discarded
        order = vs[r % len(vs):] + vs[:r % len(vs)]
        times = {}
        for v in order:
            times[v["label"]] = run_variant(model, ids, v, args.new_tokens)
        if r:
            rounds.append(times)
        print(length, "round", r, {k: (round(a, 2), round(1000 * b, 1)) for k, (a, b) in times.items()}, flush=True)
    rows = []
    for v in vs:
        ttft_ratio = [t[v["label"]][0] / t["full cache"][0] for t in rounds]
        tpot_ratio = [t[v["label"]][1] / t["full cache"][1] for t in rounds]
        rows.append({"variant": v, "ttft_s_median": statistics.median(t[v["label"]][0] for t in rounds),
                     "tpot_s_median": statistics.median(t[v["label"]][1] for t in rounds),
                     "ttft_ratio_median": statistics.median(ttft_ratio), "ttft_ratio_range": [min(ttft_ratio), max(ttft_ratio)],
                     "tpot_ratio_median": statistics.median(tpot_ratio), "tpot_ratio_range": [min(tpot_ratio), max(tpot_ratio)]})
    return {"length": length, "rows": rows, "rounds": rounds}


def markdown(doc: dict) -> str:
    a = doc["args"]
    lines = ["# KV cache: time cost of each press against the full cache\n",
             f"Machine: {kc.machine_line(doc['env'])}; load average {doc['load_before']} before, {doc['load_after']} after. "
             f"Produced by `benchmarks/kv_speed.py` (command in the JSON). Model: kv_scale.py's random Llama with 8B-shaped "
             f"attention (32 query heads, 8 KV heads, head size 128, 2 layers, float32, sdpa). One process; each round runs "
             f"every variant once in a rotated order, after one discarded warm-up round; {a['rounds']} rounds. Ratios are the "
             f"variant's time over the full cache's in the same round (median, range over rounds): above 1 costs time, below "
             f"1 saves it. TTFT: the whole prefill through the first token; TPOT: median of {a['new_tokens']} decode steps. "
             f"Presses at ratio {a['ratio']:g}.\n",
             "| tokens | variant | TTFT s | TTFT / full | TPOT ms | TPOT / full |", "|---|---|---|---|---|---|"]
    for block in doc["lengths"]:
        for row in block["rows"]:
            lo, hi = row["ttft_ratio_range"]
            plo, phi = row["tpot_ratio_range"]
            lines.append(f"| {block['length']} | {row['variant']['label']} | {row['ttft_s_median']:.2f} | "
                         f"{row['ttft_ratio_median']:.2f} ({lo:.2f}-{hi:.2f}) | {1000 * row['tpot_s_median']:.1f} | "
                         f"{row['tpot_ratio_median']:.2f} ({plo:.2f}-{phi:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--lengths", type=ints, default=[1024, 4096])
    ap.add_argument("--presses", type=names, default=list(kv_scale.PRESSES))
    ap.add_argument("--chunked", type=names, default=["snapkv", "streaming_llm"], help="presses also run with chunked prefill")
    ap.add_argument("--chunk", type=int, default=512, help="chunk size of the chunked variants (0: none)")
    ap.add_argument("--kivi-bits", type=ints, default=[4, 2])
    ap.add_argument("--ratio", type=float, default=0.875)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=None, help="results file stem; default kv_speed, or kv_speed_gpu with --device cuda")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    args.name = args.name or (NAME if args.device == "cpu" else f"{NAME}_gpu")
    import os

    import torch

    from sparseforge.methods import get_method

    for p in [*args.presses, *args.chunked]:
        try:
            get_method(p)  # unknown names fail before any measuring
        except Exception as exc:  # noqa: BLE001 - the registry's message names the choices
            sys.exit(f"kv_speed.py: {exc}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kv_speed.py: --device cuda but torch sees no CUDA GPU; run on a GPU machine or drop --device")
    if args.rounds < 1 or args.new_tokens < 1:
        sys.exit("kv_speed.py: --rounds and --new-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    doc = {"args": vars(args) | {"command": " ".join(sys.argv)}, "env": kc.machine(args.threads) | {"device": args.device}, "config": kv_scale.CONFIG,
           "load_before": load_before, "lengths": []}
    for length in args.lengths:
        doc["lengths"].append(measure(args, length))
        doc["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        kc.write(args.name, doc, markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
