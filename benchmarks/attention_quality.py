"""Sparse attention quality on the bundled reference model (4 layers, 8 query heads, 2 KV heads, 2048 context).

For each prefill pattern (gate "always", so the sparse path runs at every length; block 64). Attention runs through
the `masked` kernel (the pattern's blocks as a dense mask into SDPA): the same attention the block-sparse kernels
compute (tests check all three against one reference), and the quickest at 2048 tokens. For each:
* coverage: the share of the dense attention mass inside the pattern's blocks, per layer and head, from the model's
  real queries and keys on held-out windows of 2048 tokens, with the density (share of causal blocks attended);
* passkey and multi-key accuracy at every length and depth (teacher-forced exact match through the cache, the
  prompt's prefill running sparse; `--per-cell` episodes per cell for dense and the searched pattern, fewer for the
  others);
* perplexity on the held-out text (2048-token windows, stride 1024);
* the offline search's chosen pattern per head (calibrated on the calibration text, never the held-out text).
Composition: the searched pattern, snapkv-75 and sparsegpt-50 each alone and together in one recipe.

    python benchmarks/attention_quality.py                    # about 15 minutes, 1 thread
    python benchmarks/attention_quality.py --per-cell 4 --out attention_quality_quick
    python benchmarks/attention_quality.py --composition-only --others-per-cell 4 --out attention_quality_composition
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kv_common import machine, machine_line, write  # noqa: E402

import sparseforge  # noqa: E402
from sparseforge.core.calibration import CalibrationConfig  # noqa: E402
from sparseforge.data import read_text  # noqa: E402
from sparseforge.eval.perplexity import perplexity  # noqa: E402
from sparseforge.eval.retrieval import retrieval_accuracy  # noqa: E402
from sparseforge.methods import RuntimeContext, get_method  # noqa: E402
from sparseforge.methods.attention.base import PrefillParams, SparsePrefill, selection_coverage  # noqa: E402
from sparseforge.methods.base import RuntimeState  # noqa: E402
from sparseforge.recipe import Recipe, Stage  # noqa: E402

LENGTHS = (512, 1024, 2048)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BLOCK = 64


def make(name, **params):
    cls = get_method(name)
    return cls(cls.parse_params(dict(params, block_size=BLOCK, gate="always", kernel="masked")))


def patterns(search_target: float, max_density: float) -> dict:
    return {
        "ashape (sinks 64, window 512)": make("ashape", sinks=64, window=512),
        "vertical-slash (v 256, s 512)": make("vertical-slash", vertical=256, slash=512),
        "flexprefill (gamma 0.95)": make("flexprefill", gamma=0.95),
        f"minference-search (target {search_target}, max density {max_density})":
            make("minference-search", target=search_target, max_density=max_density),
    }


class CoverageProbe(SparsePrefill):
    """Measures every method's selection on the model's real attention; dense attention runs."""

    name = "_coverage_probe"

    def __init__(self, methods: dict):
        super().__init__(PrefillParams(gate="always"))
        self.methods = methods
        self.sums: dict = {}

    def run_prefill(self, module, index, q, k, v, scale):
        for label, m in self.methods.items():
            sel = m.selection(q, k, scale, index)
            n = sel.q_blocks
            cov = selection_coverage(q, k, sel, scale)[0]
            dens = sel.block_mask()[0].sum((-1, -2)).float() / (n * (n + 1) / 2)
            c, d, cnt = self.sums.get((label, index), (0, 0, 0))
            self.sums[(label, index)] = (c + cov, d + dens, cnt + 1)
        return None


def coverage(model, tokenizer, methods, windows=2, length=2048):
    ids = tokenizer(read_text("heldout"), add_special_tokens=False)["input_ids"]
    probe = CoverageProbe(methods)
    probe.attach(model)
    try:
        with torch.no_grad():
            for w in range(windows):
                model(input_ids=torch.tensor([ids[w * length:(w + 1) * length]]), use_cache=False)
    finally:
        probe.detach(model)
    out = {}
    for (label, layer), (c, d, cnt) in sorted(probe.sums.items(), key=lambda x: (x[0][0], x[0][1])):
        out.setdefault(label, {"coverage": [], "density": []})
        out[label]["coverage"].append([round(float(x), 4) for x in c / cnt])
        out[label]["density"].append([round(float(x), 4) for x in d / cnt])
    for label, v in out.items():
        flat_c = [x for row in v["coverage"] for x in row]
        flat_d = [x for row in v["density"] for x in row]
        v["mean_coverage"], v["min_coverage"] = sum(flat_c) / len(flat_c), min(flat_c)
        v["mean_density"] = sum(flat_d) / len(flat_d)
    return out


def quality(model, tokenizer, per_cell, ppl_tokens):
    res = {}
    for task in ("passkey", "multikey"):
        r = retrieval_accuracy(model, tokenizer, task, LENGTHS, DEPTHS, per_cell=per_cell, seed=0)
        res[task] = {"accuracy": r["accuracy"], "cells": r["cells"]}
    res["perplexity"] = perplexity(model, tokenizer, read_text("heldout"), window=2048, stride=1024, max_tokens=ppl_tokens)["perplexity"]
    return res


def densities_seen(method) -> float | None:
    d = [s["density"] for s in method.stats.values() if s.get("density") is not None]
    return sum(d) / len(d) if d else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-cell", type=int, default=20, help="episodes per (length, depth) for dense and the search")
    ap.add_argument("--others-per-cell", type=int, default=2, help="episodes per cell for the other patterns")
    ap.add_argument("--search-target", type=float, default=0.95)
    ap.add_argument("--search-max-density", type=float, default=0.5, help="per-head density cap of the search (0.5: skip half the blocks)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--no-composition", action="store_true")
    ap.add_argument("--composition-only", action="store_true", help="only the composition table (each recipe calibrates its own search)")
    ap.add_argument("--out", default="attention_quality")
    ap.add_argument("--smoke", action="store_true", help="one length, one depth, one episode: checks the script runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = machine(1)
    env["load_average_start"] = os.getloadavg()
    t0 = time.time()
    global LENGTHS, DEPTHS
    if args.smoke:  # a minute-long check that the script runs end to end (numbers meaningless)
        LENGTHS, DEPTHS = (512,), (0.5,)
        args.per_cell = args.others_per_cell = 1
        args.ppl_tokens = 2048
    model = sparseforge.load()
    tokenizer = sparseforge.load_tokenizer()
    if args.composition_only:
        composition = {"dense (no stage)": quality(model, tokenizer, args.others_per_cell, args.ppl_tokens)}
        composition.update(compose(model, tokenizer, args))
        env["load_average_end"] = os.getloadavg()
        doc = {"benchmark": "attention_quality_composition", "machine": env, "seconds": time.time() - t0, "lengths": LENGTHS,
               "depths": DEPTHS, "per_cell": args.others_per_cell, "ppl_tokens": args.ppl_tokens, "composition": composition}
        write(args.out, doc, composition_markdown(doc))
        print(composition_markdown(doc))
        return
    methods = patterns(args.search_target, args.search_max_density)
    search_label = next(k for k in methods if k.startswith("minference-search"))
    search = methods[search_label]
    calib = CalibrationConfig(samples=1 if args.smoke else 4, seq_len=2048)
    t = time.time()
    state = search.calibrate(model, RuntimeContext(tokenizer, calib))
    search_seconds = time.time() - t
    search.load_state(state)
    print(f"search calibrated in {search_seconds:.0f}s", flush=True)

    cov = coverage(model, tokenizer, methods)
    print("coverage done", flush=True)
    rows = {"dense": quality(model, tokenizer, args.per_cell, args.ppl_tokens)}
    print("dense done", flush=True)
    for label, m in methods.items():
        m.attach(model, state if m is search else None)
        try:
            rows[label] = quality(model, tokenizer, args.per_cell if m is search else args.others_per_cell, args.ppl_tokens)
            rows[label]["density_seen"] = densities_seen(m)
        finally:
            m.detach(model)
        print(label, "done", flush=True)

    composition = {} if args.no_composition else compose(model, tokenizer, args)
    env["load_average_end"] = os.getloadavg()
    candidates = list(search.params.candidates)
    choice = state.tensors["choice"].tolist()
    doc = {"benchmark": "attention_quality", "machine": env, "seconds": time.time() - t0, "lengths": LENGTHS, "depths": DEPTHS,
           "per_cell": args.per_cell, "others_per_cell": args.others_per_cell, "search": {
               "target": args.search_target, "max_density": args.search_max_density, "calibration": {"samples": calib.samples, "seq_len": calib.seq_len, "source": "calibration"},
               "seconds": search_seconds, "candidates": candidates,
               "choice": [[("dense" if c < 0 else candidates[c]) for c in row] for row in choice],
               "head_coverage": state.data["head_coverage"], "head_density": state.data["head_density"]},
           "coverage": cov, "quality": rows, "composition": composition}
    md = markdown(doc)
    write(args.out, doc, md)
    print(md)


def compose(model, tokenizer, args) -> dict:
    """The searched pattern, snapkv-75, sparsegpt-50: each alone and all together, one recipe each."""
    search_params = {"target": args.search_target, "max_density": args.search_max_density, "block_size": BLOCK,
                     "gate": "always", "kernel": "masked"}
    stage = {
        "sparsegpt-50": Stage("sparsegpt", get_method("sparsegpt").parse_params({"sparsity": 0.5})),
        "snapkv-75": Stage("snapkv", get_method("snapkv").parse_params({"compression_ratio": 0.75})),
        "search": Stage("minference-search", get_method("minference-search").parse_params(search_params)),
    }
    combos = {"sparsegpt-50": ["sparsegpt-50"], "snapkv-75": ["snapkv-75"], "search": ["search"],
              "search + snapkv-75 + sparsegpt-50": ["sparsegpt-50", "search", "snapkv-75"]}
    out = {}
    calib = CalibrationConfig(samples=1 if args.smoke else 4, seq_len=2048)
    for label, names in combos.items():
        recipe = Recipe(label, [stage[n] for n in names], calib)
        compressed, _ = sparseforge.compress(model, recipe, tokenizer, progress=False)
        out[label] = quality(compressed, tokenizer, args.others_per_cell, args.ppl_tokens)
        print("composition", label, "done", flush=True)
        del compressed
    return out


def _cell_table(rows: dict, task: str) -> list[str]:
    labels = list(rows)
    lines = [f"| {task}: length / depth | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    cells = {label: {(c["length"], c["depth"]): c for c in rows[label][task]["cells"]} for label in labels}
    for L in LENGTHS:
        for d in DEPTHS:
            vals = [f"{cells[l][(L, d)]['accuracy']:.2f} ({cells[l][(L, d)]['n']})" for l in labels]
            lines.append(f"| {L} / {d} | " + " | ".join(vals) + " |")
    return lines


def markdown(doc) -> str:
    env = doc["machine"]
    la0, la1 = env["load_average_start"][0], env["load_average_end"][0]
    q = doc["quality"]
    lines = [
        "# Sparse attention quality on the bundled reference model",
        "",
        f"Machine: {machine_line(env)}; load average {la0:.1f} at the start, {la1:.1f} at the end (shared machine). "
        f"Produced by `python benchmarks/attention_quality.py` in {doc['seconds'] / 60:.0f} min.",
        "Every pattern runs sparse at every length (gate `always`, block 64). Retrieval is teacher-forced exact match through",
        "the cache (the prompt's prefill is the sparse forward); cells give accuracy (episodes).",
        "",
        "## Summary",
        "",
        "| variant | passkey | multi-key | perplexity | mean coverage (2048) | min head coverage | mean density (2048) | density seen in episodes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in q.items():
        c = doc["coverage"].get(label)
        cov = f"{c['mean_coverage']:.3f} | {c['min_coverage']:.3f} | {c['mean_density']:.3f}" if c else "1 | 1 | 1"
        seen = r.get("density_seen")
        lines.append(f"| {label} | {r['passkey']['accuracy']:.3f} | {r['multikey']['accuracy']:.3f} | {r['perplexity']:.2f} | {cov} | "
                     f"{'-' if seen is None else f'{seen:.3f}'} |")
    lines += ["", "## Retrieval per length and depth", ""]
    lines += _cell_table(q, "passkey") + [""] + _cell_table(q, "multikey")
    s = doc["search"]
    lines += ["", f"## Offline search: chosen pattern per head (target {s['target']} of the dense mass, calibrated on "
              f"{s['calibration']['samples']} x {s['calibration']['seq_len']} tokens of the calibration text in {s['seconds']:.0f} s)", "",
              "| layer | " + " | ".join(f"head {h}" for h in range(len(s["choice"][0]))) + " |",
              "|---|" + "---|" * len(s["choice"][0])]
    for i, row in enumerate(s["choice"]):
        lines.append(f"| {i} | " + " | ".join(f"{c} ({s['head_coverage'][i][h]:.2f}, d {s['head_density'][i][h]:.2f})" for h, c in enumerate(row)) + " |")
    lines += ["", "(coverage on the calibration text, d = density at 2048)", "", "## Coverage per layer and head (held-out text, 2048 tokens)", ""]
    for label, c in doc["coverage"].items():
        lines.append(f"- {label}: " + "; ".join(f"layer {i}: " + " ".join(f"{x:.2f}" for x in row) for i, row in enumerate(c["coverage"])))
    if doc["composition"]:
        lines += ["", "## Composition (one recipe each)", ""] + _composition_table(doc["composition"])
    return "\n".join(lines) + "\n"


def _composition_table(comp: dict) -> list[str]:
    lines = ["| recipe | passkey | multi-key | perplexity |", "|---|---|---|---|"]
    for label, r in comp.items():
        lines.append(f"| {label} | {r['passkey']['accuracy']:.3f} | {r['multikey']['accuracy']:.3f} | {r['perplexity']:.2f} |")
    return lines


def composition_markdown(doc) -> str:
    env = doc["machine"]
    lines = ["# Sparse attention composed with a KV press and weight sparsity (bundled reference model)", "",
             f"Machine: {machine_line(env)}; load average {env['load_average_start'][0]:.1f} at the start, "
             f"{env['load_average_end'][0]:.1f} at the end (shared machine). Produced by "
             f"`python benchmarks/attention_quality.py --composition-only --others-per-cell {doc['per_cell']} --ppl-tokens {doc['ppl_tokens']}` "
             f"in {doc['seconds'] / 60:.0f} min.",
             "Each row is one recipe through `sparseforge.compress` (calibration: 4 x 2048 tokens of the calibration text); "
             "the searched prefill runs sparse at every length (gate `always`, block 64). Retrieval: "
             f"{len(doc['lengths'])} lengths x {len(doc['depths'])} depths x {doc['per_cell']} episode(s) per cell, teacher-forced "
             f"exact match; perplexity on {doc['ppl_tokens']} held-out tokens.", ""]
    lines += _composition_table(doc["composition"])
    lines += ["", "## Retrieval per length and depth", ""]
    lines += _cell_table(doc["composition"], "passkey") + [""] + _cell_table(doc["composition"], "multikey")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
