"""KV-cache quality on the bundled model (issue 10, item 8): every sparseforge press at ratios 0.5, 0.75, 0.875 and
0.9375 on passkey and multi-key retrieval (question-aware), question-agnostic passkey, and kv_perplexity; KIVI at
4 and 2 bits as rows; and the composed recipe sparsegpt-50 + snapkv-75 against each stage alone.

Usage (the sparseforge environment):
    python benchmarks/kv_quality.py [--presses streaming_llm,snapkv,...] [--ratios 0.5,0.75,0.875,0.9375]
        [--per-depth 4] [--lengths 2048] [--no-composed] [--no-kivi] [--threads 1]
Writes benchmarks/results/kv_quality.json and .md after every row, so a stopped run keeps what it measured
(rows already present are skipped; --redo reruns them).

Every number comes from sparseforge's own eval tasks run through the cache with the press attached
(`sparseforge.eval.run_tasks`): `passkey` / `multikey` (question-aware: the prompt up to the question's last token
is prefilled and compressed, then the rest is fed and the answer scored teacher-forced, which equals exact-match
greedy decoding), `passkey_agnostic` (the document is compressed before the question is seen), and
`kv_perplexity` (the held-out text fed 256 tokens at a time, the cache compressed to the ratio of everything seen
after each chunk, first 2048 tokens). Retrieval: episodes of 2048 tokens, needle depths 0, 0.25, 0.5, 0.75, 1,
`--per-depth` each (20 per cell by default), seed 0, the same episodes for every row.
DuoAttention-style heads are calibrated once per ratio on sparseforge's synthetic passkey prompts (its own
calibration data, built from the calibration text, not the held-out text the episodes use).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kv_common as kc  # noqa: E402

NAME = "kv_quality"
PRESSES = ("streaming_llm", "snapkv", "pyramidkv", "knorm", "tova", "h2o", "duo_attention")
RATIOS = (0.5, 0.75, 0.875, 0.9375)
TASKS = ("passkey", "multikey", "passkey_agnostic", "kv_perplexity")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def evaluate(model, tok, args) -> dict:
    from sparseforge.eval.tasks import EvalContext, run_tasks

    settings = {"retrieval_lengths": args.lengths, "retrieval_depths": DEPTHS, "retrieval_per_cell": args.per_depth,
                "retrieval_seed": 0}
    t0 = time.perf_counter()
    m = run_tasks(EvalContext(model, tok, settings=settings), list(TASKS))
    keep = {t: m.get(f"{t}_accuracy") for t in TASKS if t != "kv_perplexity"}
    keep["kv_perplexity"] = m.get("kv_perplexity")
    keep["kv_perplexity_peak_cache_bytes"] = m.get("kv_perplexity_peak_cache_bytes")
    keep["seconds"] = round(time.perf_counter() - t0, 1)
    return keep


def make(name: str, params: dict):
    from sparseforge.methods import get_method

    method = get_method(name)
    return method(method.parse_params(params))


def with_press(model, tok, press, args) -> dict:
    from sparseforge.core.calibration import CalibrationConfig
    from sparseforge.methods.base import RuntimeContext

    state = press.calibrate(model, RuntimeContext(tokenizer=tok, calibration=CalibrationConfig()))
    press.attach(model, state)
    try:
        return evaluate(model, tok, args)
    finally:
        press.detach(model)


def rows_plan(args) -> list[dict]:
    """Most decisive rows first, so a run cut short still has them: every press at the issue's headline ratio
    0.875, the composed recipe and its parts, KIVI, then the other ratios."""
    press_rows = {r: [{"row": f"{p}-{r:g}", "press": p, "ratio": r, "params": {"compression_ratio": r}} for p in args.presses]
                  for r in args.ratios}
    plan = [{"row": "none", "press": None, "ratio": 0.0}] + press_rows.pop(0.875, [])
    if not args.no_composed:
        plan += [{"row": "snapkv-0.75", "press": "snapkv", "ratio": 0.75, "params": {"compression_ratio": 0.75}},
                 {"row": "sparsegpt-50", "weights": "sparsegpt-50", "press": None, "ratio": 0.0},
                 {"row": "sparsegpt-50+snapkv-75", "weights": "sparsegpt-50", "press": "snapkv", "ratio": 0.75,
                  "params": {"compression_ratio": 0.75}}]
    if not args.no_kivi:
        plan += [{"row": f"kivi-{bits}bit", "press": "kivi", "ratio": None, "params": {"bits": bits}} for bits in (4, 2)]
    for r in sorted(press_rows, key=lambda x: (x != 0.75, x)):
        plan += [row for row in press_rows[r] if row["row"] not in {p["row"] for p in plan}]
    return plan


def pruned_model(dense, tok):
    """The bundled model pruned by the sparsegpt-50 preset (the weight stage of the composed recipe)."""
    import sparseforge
    from sparseforge.recipe import load_recipe

    pruned, _ = sparseforge.compress(dense, load_recipe("sparsegpt-50"), tok, progress=False)
    return pruned


def markdown(doc: dict) -> str:
    env = doc["environment"]
    rows = doc["rows"]
    n = doc["per_cell"]
    lines = ["# KV-cache quality on the bundled model\n",
             f"Machine: {kc.machine_line(env)}. Produced by `benchmarks/kv_quality.py` (protocol in its docstring). "
             f"Bundled 4 M-parameter Llama, float32. Retrieval at {', '.join(map(str, doc['lengths']))} tokens, {n} episodes "
             f"per cell (one episode = {1 / n:.2f}); ratio = fraction of the cache removed. passkey / multikey: question-aware; "
             f"passkey agnostic: document compressed before the question; kv ppl: held-out perplexity through the cache "
             f"compressed after every 256-token chunk (first 2048 tokens). Cache KiB: kv_perplexity's peak cache bytes.\n",
             "| row | ratio | passkey | multikey | passkey agnostic | kv ppl | cache KiB (kv ppl peak) | s |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
    kib = lambda v: "-" if v is None else f"{v / 1024:.0f}"  # noqa: E731
    order = {p: i for i, p in enumerate(PRESSES)}
    rows = sorted(rows, key=lambda r: (bool(r.get("weights")), r.get("press") == "kivi", r.get("press") is not None,
                                       order.get(r.get("press"), 99), r.get("ratio") or 0))
    for r in rows:
        m = r["metrics"]
        if "error" in m:
            lines.append(f"| {r['row']} | {f(r.get('ratio'), '{:g}')} | error: {m['error'][:150]} ||||||")
            continue
        lines.append(f"| {r['row']} | {f(r.get('ratio'), '{:g}')} | {f(m['passkey'], '{:.2f}')} | {f(m['multikey'], '{:.2f}')} | "
                     f"{f(m['passkey_agnostic'], '{:.2f}')} | {f(m['kv_perplexity'], '{:.2f}')} | "
                     f"{kib(m.get('kv_perplexity_peak_cache_bytes'))} | {m['seconds']:.0f} |")
    lines += ["", *summary(rows)]
    return "\n".join(lines) + "\n"


def summary(rows) -> list[str]:
    ok = [r for r in rows if "error" not in r["metrics"] and r.get("press") not in (None, "kivi") and not r.get("weights")]
    out = ["## Summary", ""]
    for ratio in sorted({r["ratio"] for r in ok}):
        at = [r for r in ok if r["ratio"] == ratio]
        best_aware = max(at, key=lambda r: r["metrics"]["passkey"] or 0)
        best_agn = max(at, key=lambda r: r["metrics"]["passkey_agnostic"] or 0)
        out.append(f"- ratio {ratio:g}: best question-aware passkey {best_aware['metrics']['passkey']:.2f} ({best_aware['press']}); "
                   f"best question-agnostic passkey {best_agn['metrics']['passkey_agnostic']:.2f} ({best_agn['press']}).")
    by = {r["row"]: r["metrics"] for r in rows if "error" not in r["metrics"]}
    if all(k in by for k in ("none", "sparsegpt-50", "snapkv-0.75", "sparsegpt-50+snapkv-75")):
        parts = [f"{k}: passkey {by[k]['passkey']:.2f}, multikey {by[k]['multikey']:.2f}, agnostic {by[k]['passkey_agnostic']:.2f}, "
                 f"kv ppl {by[k]['kv_perplexity']:.2f}" for k in ("none", "sparsegpt-50", "snapkv-0.75", "sparsegpt-50+snapkv-75")]
        out.append("- composed recipe vs each stage alone: " + "; ".join(parts) + ".")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--presses", type=names, default=list(PRESSES))
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",") if x], default=list(RATIOS))
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048])
    ap.add_argument("--per-depth", type=int, default=4)
    ap.add_argument("--no-kivi", action="store_true")
    ap.add_argument("--no-composed", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import sparseforge
    from sparseforge.formats.artifact import load_tokenizer

    tok = load_tokenizer(None)
    dense = sparseforge.load().eval()
    path = kc.RESULTS / f"{args.name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    doc.update(environment=kc.machine(args.threads), command=" ".join(sys.argv), per_cell=args.per_depth * len(DEPTHS),
               lengths=args.lengths, tasks=list(TASKS))
    done = {r["row"]: i for i, r in enumerate(doc["rows"])}
    pruned = None
    for spec in rows_plan(args):
        if spec["row"] in done and not args.redo and "error" not in doc["rows"][done[spec["row"]]]["metrics"]:
            continue
        try:
            model = dense
            if spec.get("weights"):
                pruned = pruned if pruned is not None else pruned_model(dense, tok)
                model = pruned
            if spec["press"] is None:
                metrics = evaluate(model, tok, args)
            else:
                metrics = with_press(model, tok, make(spec["press"], spec["params"]), args)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            metrics = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        entry = spec | {"metrics": metrics}
        if spec["row"] in done:
            doc["rows"][done[spec["row"]]] = entry
        else:
            done[spec["row"]] = len(doc["rows"])
            doc["rows"].append(entry)
        print(spec["row"], metrics, flush=True)
        kc.write(args.name, doc, markdown(doc))
    kc.write(args.name, doc, markdown(doc))


if __name__ == "__main__":
    main()
