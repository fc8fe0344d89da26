"""Every sparse-attention preset under its default gate against dense SDPA, in the same run: does the gate ever make a
preset slower than dense?

One attention layer with Llama-3-8B shapes (32 query heads, 8 KV heads, head size 128, float32, random inputs, one
thread), called the way a model calls it: through the attention hook `attach` installs (`_AttentionHook.attend`,
whose fallback is transformers' own `sdpa` attention function), against that same `sdpa` function called directly
(dense). Prefill presets (`ashape-4k`, `vertical-slash`, `flexprefill-95`, `minference-search`) run a prompt at
1K-8K tokens; the decode preset (`quest-decode`) runs one decode step over a cache of 4K-32K tokens. Each preset's
parameters come from its recipe file; the gate is the default (`auto`, the CPU FlexAttention crossover table).

`minference-search` needs a calibrated per-head choice, which exists for the bundled model (4 layers x 8 heads). Here
its 32 calibrated heads (read from `benchmarks/results/attention_quality.json`, the offline search on the bundled
model) become the 32 query heads of this one 8B-shaped layer: a plausible state, run through the search's own
dispatch and predictions.

Variants alternate within a repeat (dense, a second dense call as a noise control, then each preset); the ratio is
preset time / dense time of the same repeat, its median and range over repeats are reported, and the range of the
dense-vs-dense control ratio is the measurement noise. The gate's decision per preset ("sdpa" with the predicted
density that decided it, or "sparse" with the built selection's density) comes from the method's stats. Longer
prompts (16K, 32K) get only the gate's decision and the prediction's time (`--decide-only`), since a dense 32K layer
takes minutes here; the sparse path's speed at those lengths is in attention_speed.md.

    python benchmarks/attention_presets.py                   # 1K-8K timed: 10-40 minutes on one busy core
    python benchmarks/attention_presets.py --lengths 1024 2048 4096 --decide-only 8192 16384 32768
    python benchmarks/attention_presets.py --lengths 1024 --repeats 1 --decode-lengths 4096 --out attention_presets_smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from kv_common import RESULTS, machine, machine_line, write  # noqa: E402

from sparseforge.kernels import block_sparse_attention as bsa  # noqa: E402
from sparseforge.methods import get_method  # noqa: E402
from sparseforge.methods.attention.base import _AttentionHook  # noqa: E402
from sparseforge.methods.base import RuntimeState  # noqa: E402
from sparseforge.recipe import load_recipe  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

bsa.FLEX_DYNAMIC = False  # a static kernel per length, as attention_speed.py measured the gate's table
HEADS, KV_HEADS, DIM = 32, 8, 128
PREFILL = ("ashape-4k", "vertical-slash", "flexprefill-95", "minference-search")
DECODE = ("quest-decode",)
REPEATS = {1024: 15, 2048: 7, 4096: 3, 8192: 1}


class Layer(nn.Module):
    """What transformers' sdpa function and the hook read from an attention module."""

    def __init__(self):
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.scaling, self.layer_idx = True, HEADS // KV_HEADS, DIM**-0.5, 0


def preset_method(name: str, search_choice):
    stage = load_recipe(name).stages[0]
    method = get_method(stage.method)(stage.params)
    if stage.method == "minference-search":
        index = {text: i for i, text in enumerate(method.params.candidates)}
        flat = [index.get(c, -1) for row in search_choice for c in row][:HEADS]
        method.load_state(RuntimeState(tensors={"choice": torch.tensor([flat])}, data={"gate": method.gate.to_json()}))
    return method


def decision(method) -> dict:
    if hasattr(method, "steps"):  # Quest counts its steps
        return {"path": "sparse" if method.steps["sparse"] else "sdpa", "steps": dict(method.steps)}
    return dict(method.stats.get(0, {}))


def clocked(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call. On a machine this loaded (load average near 4x the
    cores) wall time mostly measures the scheduler; the thread's CPU time is the work done, so both are kept."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def median_time(fn, n=3) -> float:
    return statistics.median(clocked(fn)[1] for _ in range(n))


def run_prefill(args, search_choice, env) -> list[dict]:
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    layer = Layer()
    rows = []
    for L in args.lengths + args.decide_only:
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, h, L, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
        methods = {name: preset_method(name, search_choice) for name in PREFILL}
        hooks = {name: _AttentionHook(0, sdpa, prefill=m) for name, m in methods.items()}
        heads = torch.arange(HEADS)
        predict_s = {name: median_time(lambda: m.predicted_density(q, k, layer.scaling, heads, 0)) for name, m in methods.items()}
        if L in args.decide_only:  # the gate's decision only: no timing of dense attention
            for name, m in methods.items():
                guess = m.predicted_density(q, k, layer.scaling, heads, 0)
                p = float(guess.mean()) if guess is not None else None
                sparse = p is not None and m.gate.sparse_wins(L, p)
                rows.append({"kind": "prefill", "tokens": L, "preset": name, "decision": {"path": "sparse" if sparse else "sdpa", "predicted": p},
                             "predict_cpu_s": predict_s[name], "decide_only": True})
            print(f"L={L} decisions done", flush=True)
            continue
        call = {"dense": lambda: sdpa(layer, q, k, v, None, dropout=0.0, scaling=layer.scaling)}
        call["dense (again)"] = call["dense"]
        for name in PREFILL:
            call[name] = (lambda h: lambda: h.attend(layer, q, k, v, None, dropout=0.0, scaling=layer.scaling))(hooks[name])
        # Warm-up: one untimed call of dense and of each preset its gate sends to the sparse path (which compiles
        # FlexAttention on its first call); a preset that runs SDPA has nothing to warm up.
        for name, fn in call.items():
            guess = methods[name].predicted_density(q, k, layer.scaling, heads, 0) if name in methods else None
            if name == "dense" or (guess is not None and methods[name].gate.sparse_wins(L, float(guess.mean()))):
                fn()
        times = {name: [] for name in call}
        for rep in range(args.repeats or REPEATS.get(L, 1)):
            order = list(call) if rep % 2 == 0 else list(call)[::-1]  # reversed every other repeat: no order bias
            for name in order:
                times[name].append(clocked(call[name]))
            print(f"L={L} repeat {rep}: dense {times['dense'][-1][0]:.2f}s wall, {times['dense'][-1][1]:.2f}s cpu", flush=True)
        rows += summarise("prefill", L, times, {n: decision(m) for n, m in methods.items()}, predict_s)
        del q, k, v
    return rows


def run_decode(args, env) -> list[dict]:
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    layer = Layer()
    rows = []
    for S in args.decode_lengths:
        g = torch.Generator().manual_seed(S)
        k = torch.randn(1, KV_HEADS, S + args.steps + 2, DIM, generator=g)
        v = torch.randn(1, KV_HEADS, S + args.steps + 2, DIM, generator=g)
        methods = {name: preset_method(name, None) for name in DECODE}
        hooks = {name: _AttentionHook(0, sdpa, decode=m) for name, m in methods.items()}
        times = {"dense": [], "dense (again)": [], **{n: [] for n in DECODE}}
        for step in range(args.steps + 2):  # one new token per step; the first two are warm-up
            q = torch.randn(1, HEADS, 1, DIM, generator=g)
            ks, vs = k[:, :, :S + step], v[:, :, :S + step]
            call = {"dense": lambda: sdpa(layer, q, ks, vs, None, dropout=0.0, scaling=layer.scaling)}
            call["dense (again)"] = call["dense"]
            for name in DECODE:
                call[name] = (lambda h: lambda: h.attend(layer, q, ks, vs, None, dropout=0.0, scaling=layer.scaling))(hooks[name])
            for name, fn in call.items():
                t = clocked(fn)
                if step >= 2:
                    times[name].append(t)
        rows += summarise("decode", S, times, {n: decision(m) for n, m in methods.items()}, {})
        print(f"decode S={S} done", flush=True)
    return rows


def summarise(kind, tokens, times, decisions, predict_s) -> list[dict]:
    rows = []
    for name, ts in times.items():
        if name == "dense":
            continue
        row = {"kind": kind, "tokens": tokens, "preset": name, "repeats": len(ts),
               "decision": decisions.get(name, {"path": "sdpa (control)"}), "predict_cpu_s": predict_s.get(name)}
        for c, clock in enumerate(("wall", "cpu")):
            dense = [t[c] for t in times["dense"]]
            mine = [t[c] for t in ts]
            ratios = [t / d for t, d in zip(mine, dense)]
            row[clock] = {"dense_s": statistics.median(dense), "preset_s": statistics.median(mine), "ratio": statistics.median(ratios),
                          "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--decide-only", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=0, help="repeats per prefill length (0: 15 at 1K, 7 at 2K, 3 at 4K, 1 at 8K)")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per cache length")
    ap.add_argument("--search-state", default=str(RESULTS / "attention_quality.json"))
    ap.add_argument("--out", default="attention_presets")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    env = machine(1)
    env["load_average_start"] = os.getloadavg()
    t0 = time.time()
    search = json.load(open(args.search_state))["search"]
    rows = run_prefill(args, search["choice"], env) + run_decode(args, env)
    env["load_average_end"] = os.getloadavg()
    doc = {"benchmark": "attention_presets", "machine": env, "seconds": time.time() - t0, "shape": {"q_heads": HEADS, "kv_heads": KV_HEADS,
           "head_dim": DIM, "dtype": "float32"}, "search_state": {"source": os.path.relpath(args.search_state, RESULTS.parent.parent),
           "choice": search["choice"], "calibration": search.get("calibration")}, "rows": rows}
    write(args.out, doc, markdown(doc))
    print(markdown(doc))


def _decision_text(d: dict) -> str:
    path = d.get("path", "?")
    if d.get("density") is not None:
        return f"{path} (built, d {d['density']:.2f})"
    if d.get("predicted") is not None:
        return f"{path} (predicted d {d['predicted']:.2f}, " + ("no index)" if path == "sdpa" else "the index decides next)")
    if "steps" in d:
        return f"{path} ({d['steps']['dense']} of {sum(d['steps'].values())} steps dense)"
    return path if path != "sdpa" else "sdpa (length below the crossover)"


def markdown(doc) -> str:
    env = doc["machine"]
    la0, la1 = env["load_average_start"][0], env["load_average_end"][0]
    lines = [
        "# Sparse-attention presets under their default gate vs dense SDPA (one Llama-3-8B attention layer)", "",
        f"Machine: {machine_line(env)}; load average {la0:.1f} at the start, {la1:.1f} at the end (shared machine). "
        f"Produced by `python benchmarks/attention_presets.py` in {doc['seconds'] / 60:.0f} min.",
        "32 query heads, 8 KV heads, head 128, fp32, random inputs, one thread. Each preset is called through the attention hook",
        "(its fallback: transformers' `sdpa` function), dense is that `sdpa` function called directly; alternating within a",
        "repeat. ratio = preset time / dense time of the same repeat (median, range over repeats), by this thread's CPU time and by",
        "wall time (at this load wall time mostly measures the scheduler); `dense (again)` is a second dense call per repeat, so",
        "its range is the measurement noise. minference-search: the bundled model's 32 searched heads",
        f"(`{doc['search_state']['source']}`) as this layer's 32 heads.", "",
        "| phase | tokens | preset | gate decision | dense CPU s | ratio CPU (median, range) | dense wall s | ratio wall (median, range) | predict CPU ms | repeats |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r.get("decide_only"):
            continue
        pm = f"{r['predict_cpu_s'] * 1e3:.1f}" if r.get("predict_cpu_s") is not None else "-"
        c, w = r["cpu"], r["wall"]
        lines.append(f"| {r['kind']} | {r['tokens']} | {r['preset']} | {_decision_text(r['decision'])} | {c['dense_s']:.4f} | "
                     f"{c['ratio']:.3f} ({c['ratio_min']:.3f}-{c['ratio_max']:.3f}) | {w['dense_s']:.4f} | "
                     f"{w['ratio']:.3f} ({w['ratio_min']:.3f}-{w['ratio_max']:.3f}) | {pm} | {r['repeats']} |")
    decide = [r for r in doc["rows"] if r.get("decide_only")]
    if decide:
        lines += ["", "Longer prompts, the gate's decision only (no dense timing):", "", "| tokens | preset | gate decision | predict CPU ms |", "|---|---|---|---|"]
        for r in decide:
            lines.append(f"| {r['tokens']} | {r['preset']} | {_decision_text(r['decision'])} | {r['predict_cpu_s'] * 1e3:.1f} |")
    timed = [r for r in doc["rows"] if not r.get("decide_only")]
    control = [r for r in timed if r["preset"] == "dense (again)"]
    presets = [r for r in timed if r["preset"] != "dense (again)"]
    for clock in ("cpu", "wall"):
        if presets and control:
            worst = max(presets, key=lambda r: r[clock]["ratio"])
            lo, hi = min(r[clock]["ratio_min"] for r in control), max(r[clock]["ratio_max"] for r in control)
            med = statistics.median(r[clock]["ratio"] for r in control)
            lines += ["", f"{clock}: highest preset ratio (median over repeats) {worst[clock]['ratio']:.3f} ({worst['preset']}, {worst['kind']} "
                      f"{worst['tokens']}); the dense-vs-dense control's per-repeat ratios span {lo:.3f}-{hi:.3f} (median of its medians {med:.3f}): the noise."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
