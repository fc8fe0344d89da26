"""Quality of weight-pruning methods on the bundled model: perplexity, KL to dense, passkey accuracy, size on
disk and compress time per setting, and the layer-wise reconstruction error ||WX - ŴX|| / ||WX|| of every
projection on the dense model's calibration inputs.

Writes benchmarks/results/weight_quality.json and weight_quality.md.
Usage: python benchmarks/weight_quality.py [--quick]   (--quick: fewer settings and tokens, for a smoke run)
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import tempfile
import time

import torch

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig, calibration_batches, run_layerwise
from sparseforge.eval.tasks import EvalContext, environment, run_tasks
from sparseforge.recipe import Recipe, Stage
from sparseforge.methods import get_method

OUT = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")
SETTINGS = [("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", None), ("4:8", None)]


def dense_hessians(model, tokenizer, cal: CalibrationConfig) -> dict[str, torch.Tensor]:
    """XᵀX of every projection's input in the dense model (propagating dense activations)."""
    found = {}

    def grab(i, layer, projections, stats):
        for name, st in stats.items():
            found[name] = st.hessian.clone()

    run_layerwise(copy.deepcopy(model), grab, batches=calibration_batches(tokenizer, cal), stats=("hessian",), config=cal, progress=False)
    return found


def reconstruction_errors(dense, pruned, hessians) -> dict[str, float]:
    """||(W - Ŵ) X|| / ||W X|| from XᵀX: sqrt(tr(Δ H Δᵀ) / tr(W H Wᵀ))."""
    out = {}
    d_proj, p_proj = ModelAdapter(dense).projections(), ModelAdapter(pruned).projections()
    for name, H in hessians.items():
        W = d_proj[name].weight().float()
        delta = W - p_proj[name].weight().float()
        out[name] = (torch.trace(delta @ H @ delta.t()) / torch.trace(W @ H @ W.t())).sqrt().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig(samples=32, seq_len=512)
    settings = {"retrieval_per_cell": 2, "fidelity_max_windows": 64}
    if args.quick:
        settings.update({"max_tokens": 4096, "retrieval_per_cell": 1, "retrieval_lengths": (512,), "fidelity_max_windows": 4})
        cal = CalibrationConfig(samples=4, seq_len=256)
    tasks = ["perplexity", "fidelity", "passkey", "size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sparseforge.save(dense, f"{tmp}/dense", tokenizer)
        m = run_tasks(EvalContext(dense, tokenizer, model_dir=f"{tmp}/dense", settings=settings), ["perplexity", "passkey", "size"])
        rows.append({"method": "dense", "setting": "-", **{k: m.get(k) for k in ("perplexity", "passkey_accuracy", "size_bytes")}})
        print(rows[-1], flush=True)
        hessians = dense_hessians(dense, tokenizer, cal)
        recon = {}
        grid = [(meth, {"pattern": p} | ({"sparsity": s} if s is not None else {}), p if s is None else f"{s:.0%}")
                for meth in METHODS for p, s in (SETTINGS[:1] + SETTINGS[3:4] if args.quick else SETTINGS)]
        grid += [("owl", {"base": "wanda", "sparsity": 0.7}, "70% (wanda)")]
        grid += [("dsnot", {"base": "wanda", "sparsity": s}, f"{s:.0%} (wanda)") for s in ((0.6,) if args.quick else (0.6, 0.7))]
        grid += [("structured", {"mlp_sparsity": 0.25}, "25% MLP channels")]
        for method, raw, label in grid:
            cls = get_method(method)
            recipe = Recipe(f"{method}-{label}", [Stage(method, cls.parse_params(raw))], cal)
            start = time.perf_counter()
            pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            seconds = time.perf_counter() - start
            path = f"{tmp}/{method}-{len(rows)}"
            sparseforge.save(pruned, path, tokenizer, recipe=recipe)
            m = run_tasks(EvalContext(pruned, tokenizer, reference=dense, model_dir=path, settings=settings), tasks)
            compact = None
            if method != "structured":  # structured results are already smaller dense tensors
                sparseforge.save(pruned, f"{path}-compact", tokenizer, recipe=recipe, storage="compact")
                compact = sum(f.stat().st_size for f in pathlib.Path(f"{path}-compact").glob("*.safetensors"))
            rows.append({"method": method, "setting": label, "compress_seconds": round(seconds, 2),
                         **{k: m.get(k) for k in ("perplexity", "kl_to_reference", "top1_agreement", "passkey_accuracy", "size_bytes")},
                         "compact_size_bytes": compact})
            if method != "structured":  # its projections change shape; the error needs the same W shapes
                recon[f"{method} {label}"] = reconstruction_errors(dense, pruned, hessians)
            print(rows[-1], flush=True)
    env = environment()
    OUT.mkdir(exist_ok=True)
    name = "weight_quality_quick" if args.quick else "weight_quality"
    (OUT / f"{name}.json").write_text(json.dumps({"environment": env, "calibration": vars(cal), "settings": settings, "rows": rows, "reconstruction_error": recon}, indent=2, default=str) + "\n")
    lines = ["| method | setting | perplexity | KL to dense | top-1 agree | passkey | size MB | compact MB | compress s |", "|---|---|---|---|---|---|---|---|---|"]
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"
    for r in rows:
        f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])
        lines.append(f"| {r['method']} | {r['setting']} | {f('perplexity', '{:.2f}')} | {f('kl_to_reference', '{:.4f}')} | {f('top1_agreement', '{:.3f}')} | {f('passkey_accuracy', '{:.3f}')} | {r['size_bytes'] / 1e6:.2f} | {mb(r.get('compact_size_bytes'))} | {f('compress_seconds', '{:.1f}')} |")
    layers = sorted({n for e in recon.values() for n in e}, key=lambda n: (int(n.split(".")[2]), n))
    rec = ["| projection | " + " | ".join(recon) + " |", "|---|" + "---|" * len(recon)]
    for n in layers:
        rec.append(f"| {n} | " + " | ".join(f"{recon[k][n]:.4f}" for k in recon) + " |")
    # Issue 3's check: at 50%, SparseGPT's error is below Wanda's and magnitude's on every projection.
    check = ""
    if all(k in recon for k in ("sparsegpt 50%", "wanda 50%", "magnitude 50%")):
        wins = [n for n in layers if recon["sparsegpt 50%"][n] < min(recon["wanda 50%"][n], recon["magnitude 50%"][n])]
        check = f"\n\nSparseGPT 50% has the lowest error of the three 50% methods on {len(wins)} of {len(layers)} projections.\n"
    md = (f"# Weight pruning on the bundled model\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), {env['device']}, torch {env['torch']}. "
          f"Produced by `benchmarks/weight_quality.py{' --quick' if args.quick else ''}`. Calibration: {cal.samples} samples x {cal.seq_len} tokens "
          f"of the bundled calibration text. Perplexity on the held-out plays{' (first ' + str(settings['max_tokens']) + ' tokens)' if settings.get('max_tokens') else ''}; "
          f"passkey: {settings['retrieval_per_cell']} episodes per (length, depth) cell.\n\n" + "\n".join(lines)
          + "\n\nsize MB: the default (transformers-loadable) storage, pruned weights as zeros. compact MB: `--storage compact` "
          "(bitmask or N:M positions plus plane-coded values; loads with `sparseforge.load`). Structured results are smaller dense checkpoints.\n\n"
          "## Layer-wise reconstruction error ||WX - ŴX|| / ||WX|| on the dense calibration inputs\n\n" + "\n".join(rec) + check + "\n")
    (OUT / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
