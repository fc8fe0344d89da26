"""The measured effect of TEAL's `prefill` parameter on the bundled model: sparse (every token thresholded), dense
(prompts dense, decode steps sparse) and partial (the first 64 positions of a prompt dense), against dense.

Per held-out window: a 512-token prompt is prefilled through the cache in one forward (timed), then the next 128
tokens are fed one at a time as decode steps, and each is scored (teacher-forced) from the cache: the decode
perplexity is exp(mean NLL) of those 128 tokens, which is what a user of `generate` gets after a prompt. 8 windows
at fixed offsets of the held-out text; TEAL 50% calibrated once (16 x 512 calibration tokens, greedy allocation).

Writes benchmarks/results/activation_prefill.json and .md. Usage: python benchmarks/activation_prefill.py [--threads 1]
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

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.data import read_text
from sparseforge.eval.tasks import environment
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage

OUT = pathlib.Path(__file__).resolve().parent / "results"
PROMPT, DECODE, WINDOWS = 512, 128, 8


def decode_ppl(model, ids_all) -> tuple[float, float]:
    nll, prefill_s = [], []
    with torch.no_grad():
        for w in range(WINDOWS):
            start = w * (PROMPT + DECODE) * 2
            ids = ids_all[:, start: start + PROMPT + DECODE]
            t0 = time.perf_counter()
            out = model(ids[:, :PROMPT], use_cache=True)
            prefill_s.append(time.perf_counter() - t0)
            cache, logits = out.past_key_values, out.logits[:, -1]
            for i in range(PROMPT, PROMPT + DECODE):
                nll.append(float(-logits.log_softmax(-1)[0, ids[0, i]]))
                out = model(ids[:, i: i + 1], past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1]
    return math.exp(statistics.mean(nll)), statistics.median(prefill_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = sparseforge.load_tokenizer(None)
    dense = sparseforge.load()
    ids = torch.tensor([tok(read_text("heldout"), add_special_tokens=False)["input_ids"]])
    rows = []
    ppl, pre = decode_ppl(dense, ids)
    rows.append({"recipe": "dense", "prefill": "-", "decode_perplexity": ppl, "prefill_s": pre})
    print(rows[-1], flush=True)
    for mode in ("sparse", "dense", "partial"):
        params = get_method("teal").parse_params({"sparsity": args.sparsity, "prefill": mode, "prefill_dense_tokens": 64,
                                                  "gate_token_counts": [1], "gate_repeats": 3})
        model, _ = sparseforge.compress(dense, Recipe("p", [Stage("teal", params)], CalibrationConfig(samples=16, seq_len=512)), tok, progress=False)
        ppl, pre = decode_ppl(model, ids)
        rows.append({"recipe": f"teal-{round(args.sparsity * 100)}", "prefill": mode, "decode_perplexity": ppl, "prefill_s": pre})
        print(rows[-1], flush=True)
    doc = {"environment": environment(), "threads": args.threads, "load_average": [round(v, 2) for v in os.getloadavg()], "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "activation_prefill.json").write_text(json.dumps(doc, indent=1))
    env = doc["environment"]
    lines = ["# TEAL: how prefill is treated, measured", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {args.threads} thread(s), load average "
             f"{doc['load_average']}. Produced by `benchmarks/activation_prefill.py`: {WINDOWS} held-out windows, a {PROMPT}-token prompt "
             f"prefilled through the cache, then {DECODE} tokens fed one at a time and scored from the cache (decode perplexity); prefill "
             "seconds = median of the prompt forward.", "", "| recipe | prefill | decode perplexity | prefill s |", "|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['prefill']} | {r['decode_perplexity']:.2f} | {r['prefill_s']:.3f} |" for r in rows]
    (OUT / "activation_prefill.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
