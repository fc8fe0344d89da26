"""Expert pruning and merging on the bundled MoE reference model: dense vs. expert pruning at 25% and 50% (routing
frequency vs. HEAPr) and MC-SMoE merging to half the experts, plus (with --rows) the weight pruners at 50% and 2:4
on every expert and attention projection. Per row: held-out perplexity, KL to the dense model and top-1 agreement,
passkey accuracy, checkpoint size on disk (every file of the saved directory, and the weight files alone), whether
plain `AutoModelForCausalLM.from_pretrained` loads it, compress time, and the expert load histogram (share of
routed (token, slot) pairs per expert per layer on the held-out text, in the dense model's expert numbering).

Writes benchmarks/results/moe_experts.json and moe_experts.md (or --out NAME).
Usage: python benchmarks/moe_experts.py [--model PATH] [--rows dense,expert-prune-25,...] [--quick]
Rows are preset names (sparseforge presets) or the extra rows below; 'dense' is always measured first.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.moe import RoutingRecorder, find_moe_blocks
from sparseforge.data import read_text
from sparseforge.eval.efficiency import size_on_disk
from sparseforge.eval.perplexity import encode
from sparseforge.eval.tasks import EvalContext, environment, run_tasks
from sparseforge.formats import artifact
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage, load_recipe

OUT = pathlib.Path(__file__).resolve().parent / "results"
# The bundled MoE reference model (issue 15); formats.artifact names it once it ships.
REFERENCE_MOE_DIR = getattr(artifact, "REFERENCE_MOE_DIR", pathlib.Path(artifact.__file__).resolve().parents[1] / "assets" / "reference-moe")
DEFAULT_ROWS = ("expert-prune-25", "heapr-25", "expert-prune-50", "heapr-50", "merge-experts-50")
WEIGHT_ROWS = ("magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2of4", "wanda-2of4", "sparsegpt-2of4")
# Rows that are not presets: (method, params).
EXTRA_ROWS = {
    "heapr-expert-25": ("heapr", {"ratio": 0.25, "aggregate": "expert"}),
    "heapr-expert-50": ("heapr", {"ratio": 0.5, "aggregate": "expert"}),
    "merge-experts-50-unaligned": ("merge-experts", {"ratio": 0.5, "align": False}),
}


def recipe_for(row: str, cal: CalibrationConfig) -> Recipe:
    if row in EXTRA_ROWS:
        method, raw = EXTRA_ROWS[row]
        return Recipe(row, [Stage(method, get_method(method).parse_params(raw))], cal)
    recipe = load_recipe(row)
    recipe.calibration = cal
    return recipe


@torch.no_grad()
def expert_load(model, tokenizer, text: str, max_tokens: int, seq_len: int, original: dict[int, list[int]] | None, n_experts: int) -> dict[str, list]:
    """Share of routed (token, slot) pairs per expert of each MoE layer on `text` (first `max_tokens` tokens in
    windows of `seq_len`), in the dense model's numbering (`original[layer][k]` = dense index of kept expert k;
    removed experts get None)."""
    ids = encode(tokenizer, text)[:max_tokens]
    blocks = find_moe_blocks(model)
    with RoutingRecorder(blocks) as rec:
        for s in range(0, len(ids) - 1, seq_len):
            model(input_ids=torch.tensor([ids[s:s + seq_len]]), use_cache=False)
    out = {}
    for i, f in rec.frequencies().items():
        shares = [None] * n_experts
        for k, share in enumerate(f.tolist()):
            shares[original[i][k] if original else k] = round(share, 4)
        out[str(i)] = shares
    return out


def loads_with_transformers(path: str) -> dict:
    """Load the saved directory with plain transformers in a fresh process: its parameter count, or the error."""
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(sum(p.numel() for p in m.parameters()))")
    run = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    if run.returncode != 0:
        return {"loads_with_transformers": False, "load_error": (run.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return {"loads_with_transformers": True, "loaded_params": int(run.stdout.split()[-1])}


def measure_row(name, model, dense, tokenizer, recipe, settings, tmp, hist, n_experts) -> dict:
    row: dict = {"row": name}
    if recipe is not None:
        start = time.perf_counter()
        model, report = sparseforge.compress(dense, recipe, tokenizer, progress=False)
        row["compress_seconds"] = round(time.perf_counter() - start, 2)
        stage = report["stages"][0]
        row["method"] = stage["method"]
        row["experts"] = stage.get("experts_after", n_experts)
        if "layers" in stage:
            row["layers"] = stage["layers"]
    else:
        row["method"] = "dense"
        row["experts"] = n_experts
    path = f"{tmp}/{name}"
    sparseforge.save(model, path, tokenizer, recipe=recipe)
    row["size_bytes"] = size_on_disk(path)
    row["weights_bytes"] = sum(f.stat().st_size for f in pathlib.Path(path).glob("*.safetensors"))
    # Compact storage is where unstructured / N:M pruning shrinks a checkpoint (sparseforge.load only).
    sparseforge.save(model, f"{path}-compact", tokenizer, recipe=recipe, storage="compact")
    row["compact_size_bytes"] = size_on_disk(f"{path}-compact")
    row["params"] = sum(p.numel() for p in model.parameters())
    row.update(loads_with_transformers(path))
    tasks = ["perplexity", "passkey"] + (["fidelity"] if recipe is not None else [])
    m = run_tasks(EvalContext(model, tokenizer, reference=dense if recipe is not None else None, model_dir=path, settings=settings), tasks)
    row.update({k: m.get(k) for k in ("perplexity", "kl_to_reference", "top1_agreement", "passkey_accuracy", "passkey_by_length")})
    original = {int(i): layer["kept"] for i, layer in row["layers"].items()} if "layers" in row else None
    row["expert_load"] = expert_load(model, tokenizer, hist["text"], hist["max_tokens"], hist["seq_len"], original, n_experts)
    return row


def _rank(values: list[float]) -> torch.Tensor:
    return torch.argsort(torch.argsort(torch.tensor(values, dtype=torch.float64))).double()


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def ablation(dense, tokenizer, cal: CalibrationConfig, windows: int, seq_len: int) -> dict:
    """Ground truth for the scores: the held-out loss increase when one expert of one layer is taken away, the others
    kept, measured two ways. 'reroute': the router may no longer pick it (its logit is masked before softmax and
    top-k, the routing weights renormalised when the model renormalises them), which is what removal does;
    'zero': it is still picked but outputs nothing, which is what HEAPr's second-order term models. The scores
    (frequency, HEAPr) are the calibration-text ones a heapr stage reports."""
    _, report = sparseforge.compress(dense, Recipe("probe", [Stage("heapr", get_method("heapr").parse_params({"ratio": 0.25}))], cal), tokenizer, progress=False)
    layers = report["stages"][0]["layers"]
    ids = encode(tokenizer, read_text("heldout"))[: windows * seq_len]
    batches = [torch.tensor([ids[s:s + seq_len]]) for s in range(0, len(ids) - seq_len + 1, seq_len)]
    loss = lambda: sum(float(dense(input_ids=b, labels=b, use_cache=False).loss) for b in batches) / len(batches)  # noqa: E731
    base = loss()
    blocks = find_moe_blocks(dense)
    out = {"base_loss": base, "layers": {}}
    for b in blocks:
        normalised = None
        rows = {"reroute": [], "zero": []}
        for e in range(b.num_experts):
            def reroute(module, args, kwargs, e=e, b=b):
                hidden = args[0]
                logits = torch.nn.functional.linear(hidden, b.router.weight)
                logits[:, e] = float("-inf")
                probs = torch.softmax(logits.float(), -1)
                w, idx = probs.topk(b.top_k, -1)
                renorm = torch.allclose(args[2].sum(-1), torch.ones(()), atol=1e-4)
                w = w / w.sum(-1, keepdim=True) if renorm else w
                return (hidden, idx, w.to(hidden.dtype)), kwargs
            h = b.experts.register_forward_pre_hook(reroute, with_kwargs=True)
            try:
                rows["reroute"].append(loss() - base)
            finally:
                h.remove()
            down = b.expert_weights(e)["down"]
            saved = down.clone()
            down.zero_()
            try:
                rows["zero"].append(loss() - base)
            finally:
                down.copy_(saved)
        lay = layers[str(b.layer_index)]
        scores = {"frequency": lay["frequency"], "heapr_atomic": lay["saliency_atomic_sum"], "heapr_expert": lay["saliency_expert"]}
        k = int(b.num_experts * 0.25 + 1e-9)
        lowest = lambda v: sorted(sorted(range(len(v)), key=lambda i: (v[i], i))[:k])  # noqa: E731
        out["layers"][str(b.layer_index)] = {
            "delta_loss": rows, **scores,
            "spearman": {f"{s} vs {t}": round(spearman(scores[s], rows[t]), 3) for s in scores for t in rows},
            "removed_at_25": {"oracle_reroute": lowest(rows["reroute"]), "oracle_zero": lowest(rows["zero"]),
                              **{s: lowest(v) for s, v in scores.items()}},
        }
        print(b.layer_index, out["layers"][str(b.layer_index)]["spearman"], flush=True)
    return out


def render_ablation(doc: dict) -> str:
    md = (f"# Which experts matter: single-expert ablations vs. the pruning scores\n\nModel: `{doc['model']}`. Machine: {doc['machine']}. "
          f"Produced by `benchmarks/moe_experts.py --ablation`. Held-out loss change when one expert of one layer is removed "
          f"(base loss {doc['base_loss']:.4f}, {doc['tokens']} held-out tokens): 'reroute' masks its router logit (what removal does), "
          "'zero' keeps routing and zeroes its output (what HEAPr's second-order term models). Scores from a heapr stage on "
          f"{doc['calibration']['samples']} x {doc['calibration']['seq_len']} calibration tokens. Spearman rank correlation per layer "
          "(positive: the score ranks experts like their measured importance).\n\n")
    pairs = list(next(iter(doc["layers"].values()))["spearman"])
    md += "| layer | " + " | ".join(pairs) + " |\n|---|" + "---|" * len(pairs) + "\n"
    for i, lay in doc["layers"].items():
        md += f"| {i} | " + " | ".join(f"{lay['spearman'][p]:.2f}" for p in pairs) + " |\n"
    md += "\nExperts each criterion removes at 25%, against the two oracles:\n\n| layer | oracle reroute | oracle zero | frequency | heapr atomic | heapr expert |\n|---|---|---|---|---|---|\n"
    for i, lay in doc["layers"].items():
        r = lay["removed_at_25"]
        md += f"| {i} | {r['oracle_reroute']} | {r['oracle_zero']} | {r['frequency']} | {r['heapr_atomic']} | {r['heapr_expert']} |\n"
    md += "\nHeld-out loss change per expert (reroute / zero):\n\n| layer | " + " | ".join(f"e{e}" for e in range(doc["experts"])) + " |\n|---|" + "---|" * doc["experts"] + "\n"
    for i, lay in doc["layers"].items():
        md += f"| {i} | " + " | ".join(f"{a:+.4f} / {z:+.4f}" for a, z in zip(lay["delta_loss"]["reroute"], lay["delta_loss"]["zero"])) + " |\n"
    return md


def render(doc: dict) -> str:
    env, cal, s = doc["environment"], doc["calibration"], doc["settings"]
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"  # noqa: E731
    lines = ["| row | experts / block | params | perplexity | KL to dense | top-1 agree | passkey | dir MB | weights MB | compact dir MB | loads in transformers | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} |" + " |" * 10)
            continue
        f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        lines.append(f"| {r['row']} | {r.get('experts', '-')} | {r['params'] / 1e6:.2f} M | {f('perplexity', '{:.3f}')} | {f('kl_to_reference', '{:.4f}')} | "
                     f"{f('top1_agreement', '{:.3f}')} | {f('passkey_accuracy', '{:.3f}')} | {mb(r['size_bytes'])} | {mb(r['weights_bytes'])} | {mb(r['compact_size_bytes'])} | "
                     f"{'yes' if r.get('loads_with_transformers') else 'NO'} | {f('compress_seconds', '{:.1f}')} |")
    trained = doc.get("model_training") or {}
    trained = f", checkpoint of step {trained['steps']} ({trained['tokens_seen']} training tokens)" if "steps" in trained else ""
    md = (f"# Expert pruning and merging on the MoE reference model\n\nModel: `{doc['model']}` ({doc['experts']} experts per block, top-{doc['top_k']}, "
          f"{len(doc['rows'][0]['expert_load'])} MoE layers{trained}). Machine: {doc['machine']}. Produced by `benchmarks/moe_experts.py{doc['args']}`. "
          f"Calibration: {cal['samples']} samples x {cal['seq_len']} tokens of the bundled calibration text. Perplexity on the held-out plays"
          f"{' (first ' + str(s['max_tokens']) + ' tokens)' if s.get('max_tokens') else ''}; KL and top-1 agreement to the dense model on "
          f"{s.get('fidelity_max_windows')} windows; passkey: {s['retrieval_per_cell']} episodes per (length, depth) cell. dir MB counts every file "
          "of the saved directory (dense storage, the one plain transformers loads); weights MB the safetensors alone; compact dir MB the same model saved with `storage=\"compact\"` (bitmask / N:M packing and plane coding, loads with `sparseforge.load`).\n\n" + "\n".join(lines) + "\n")
    md += ("\n## Expert load on the held-out text\n\nShare of routed (token, slot) pairs per expert, per MoE layer, on the first "
           f"{doc['histogram']['max_tokens']} held-out tokens, in the dense model's expert numbering ('-': removed or merged away; a merged "
           "expert sits at its dominant expert's number).\n\n")
    n = doc["experts"]
    for r in doc["rows"]:
        if "expert_load" not in r:
            continue
        md += f"**{r['row']}**\n\n| layer | " + " | ".join(f"e{e}" for e in range(n)) + " |\n|---|" + "---|" * n + "\n"
        for layer, shares in r["expert_load"].items():
            md += f"| {layer} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in shares) + " |\n"
        groups = [f"layer {i}: " + ", ".join(f"{d}<-{[m for m in ms if int(m) != int(d)]}" for d, ms in lay["groups"].items() if len(ms) > 1)
                  for i, lay in r.get("layers", {}).items() if "groups" in lay]
        if groups:
            md += "\nMerge groups (dominant <- merged members): " + "; ".join(groups) + "\n"
        md += "\n"
    return md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REFERENCE_MOE_DIR), help="an MoE model directory (default: the bundled MoE reference model)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated presets or extra rows; weight rows: {','.join(WEIGHT_ROWS)}; extra: {','.join(EXTRA_ROWS)}")
    ap.add_argument("--quick", action="store_true", help="few tokens and episodes, for a smoke run (writes NAME_quick.*)")
    ap.add_argument("--out", default="moe_experts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ablation", action="store_true", help="instead: single-expert ablations vs. the scores (writes NAME_ablation.*)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not pathlib.Path(args.model, "config.json").is_file():
        raise SystemExit(f"no model at {args.model}; pass --model PATH of an MoE model directory")
    tokenizer = sparseforge.load_tokenizer(args.model)
    dense = sparseforge.load(args.model)
    blocks = find_moe_blocks(dense)
    if not blocks:
        raise SystemExit(f"{args.model} has no MoE block")
    cal = CalibrationConfig(samples=32, seq_len=512)
    settings = {"max_tokens": 16384, "retrieval_per_cell": 2, "fidelity_max_windows": 16}
    hist = {"max_tokens": 8192, "seq_len": 512}
    name = args.out
    if args.quick:
        cal = CalibrationConfig(samples=4, seq_len=256)
        settings = {"max_tokens": 2048, "retrieval_per_cell": 1, "retrieval_lengths": (512,), "fidelity_max_windows": 2}
        hist = {"max_tokens": 2048, "seq_len": 512}
        name += "_quick"
    hist["text"] = read_text("heldout")
    if args.ablation:
        load = os.getloadavg()
        windows = 2 if args.quick else 8
        doc = {"model": str(args.model), "experts": blocks[0].num_experts, "calibration": vars(cal), "tokens": windows * 512,
               **ablation(dense, tokenizer, cal, windows, 512)}
        env = environment()
        doc["machine"] = (f"{env['cpu']} ({env['cpu_count']} cores), {env['device']}, torch {env['torch']}, {args.threads} torch thread(s), "
                          f"shared machine, load average {load[0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end")
        OUT.mkdir(exist_ok=True)
        (OUT / f"{name}_ablation.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        md = render_ablation(doc)
        (OUT / f"{name}_ablation.md").write_text(md)
        print(md)
        return
    rows = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for row in ["dense"] + [r for r in args.rows.split(",") if r and r != "dense"]:
            try:
                recipe = None if row == "dense" else recipe_for(row, cal)
                rows.append(measure_row(row, dense, dense, tokenizer, recipe, settings, tmp, hist, blocks[0].num_experts))
            except Exception as exc:  # a row that cannot run here (e.g. a calibrated pruner before routing-aware calibration)
                rows.append({"row": row, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"})
            print({k: v for k, v in rows[-1].items() if k not in ("layers", "expert_load", "passkey_by_length")}, flush=True)
    load_after = os.getloadavg()
    env = environment()
    machine = (f"{env['cpu']} ({env['cpu_count']} cores), {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
               f"{args.threads} torch thread(s), shared machine, load average {load[0]:.2f} at the start and {load_after[0]:.2f} at the end")
    info_path = pathlib.Path(args.model, "training_info.json")
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    model_info = {k: info[k] for k in ("steps", "tokens_seen", "final", "last_validation") if k in info}
    doc = {"model": str(args.model), "model_training": model_info, "experts": blocks[0].num_experts, "top_k": blocks[0].top_k, "environment": env, "machine": machine,
           "args": (" --quick" if args.quick else "") + (f" --rows {args.rows}" if args.rows != ",".join(DEFAULT_ROWS) else ""),
           "calibration": vars(cal), "settings": settings, "histogram": {k: v for k, v in hist.items() if k != "text"}, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = render(doc)
    (OUT / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
