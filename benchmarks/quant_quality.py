"""Quality of weight quantization on the bundled model: RTN and GPTQ at 8, 4, 3 and 2 bits with groups of 32 and/or
128 columns (symmetric; see grid()), joint SparseGPT + GPTQ (50% unstructured with 4 and 8 bits, 2:4 with 8 bits,
groups of 128) and the sparsegpt-2of4+w4 preset (2:4 + 4 bits, embeddings 8 bits); per setting perplexity, KL to dense and top-1 agreement, passkey and multi-key accuracy, bytes on
disk (whole directory and weight files, dense and compact storage) and time to compress. Also re-runs SparseGPT
50% and 2:4 through the shared OBS solver and compares their perplexity with benchmarks/results/weight_quality.json
(the numbers before the solver was shared).

Writes benchmarks/results/quant_quality.json and .md (--quick: *_quick).
Usage: python benchmarks/quant_quality.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.eval.tasks import EvalContext, environment, run_tasks
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, Stage, load_recipe
from weight_quality import sizes

OUT = pathlib.Path(__file__).resolve().parent / "results"


def grid(quick: bool) -> list[tuple[str, dict, str]]:
    """(method, params, label) per row. Not the full cross of bits, groups and methods: on the shared 2-core
    machine each row's evaluation takes minutes."""
    cells = [(4, 128), (3, 128)] if quick else [(4, 128), (3, 128), (4, 32)]
    rows = [(method, {"bits": b, "group_size": g}, f"w{b} g{g}") for b, g in cells for method in ("rtn", "gptq")]
    if not quick:
        rows += [("gptq", {"bits": 8, "group_size": 128}, "w8 g128"), ("gptq", {"bits": 2, "group_size": 32}, "w2 g32"),
                 ("spqr", {"bits": 3, "group_size": 16, "outlier_threshold": 3.0}, "w3 g16 (spqr-w3)")]
    rows.append(("sparsegpt-gptq", {"pattern": "unstructured", "sparsity": 0.5, "bits": 4, "group_size": 128}, "50% + w4 g128"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig(samples=32, seq_len=512)
    # Perplexity on the first 16384 held-out tokens and retrieval at 512 and 1024 tokens: the full settings took
    # over 7 minutes for the dense row alone on the shared machine.
    settings = {"max_tokens": 16384, "retrieval_per_cell": 1, "retrieval_lengths": (512, 1024), "fidelity_max_windows": 8}
    if args.quick:
        settings.update({"max_tokens": 4096, "retrieval_per_cell": 1, "retrieval_lengths": (512,), "fidelity_max_windows": 4})
        cal = CalibrationConfig(samples=4, seq_len=256)
    tasks = ["perplexity", "fidelity", "passkey", "multikey"]
    keys = ("perplexity", "kl_to_reference", "top1_agreement", "passkey_accuracy", "multikey_accuracy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        size = sizes(dense, tokenizer, None, f"{tmp}/dense")
        m = run_tasks(EvalContext(dense, tokenizer, model_dir=f"{tmp}/dense", settings=settings), ["perplexity", "passkey", "multikey"])
        rows.append({"method": "dense", "setting": "-", **{k: m.get(k) for k in keys}, **size})
        print(rows[-1], flush=True)
        recipes = [(Recipe(f"{meth}-{label}", [Stage(meth, get_method(meth).parse_params(raw))], cal), meth, label) for meth, raw, label in grid(args.quick)]
        if not args.quick:
            recipes.insert(0, (load_recipe("sparsegpt-2of4+w4"), "preset", "sparsegpt-2of4+w4"))
            recipes.insert(1, (load_recipe("gptq-w4g128"), "preset", "gptq-w4g128"))
        for recipe, meth, label in recipes:
            recipe.calibration = cal
            start = time.perf_counter()
            model, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            seconds = time.perf_counter() - start
            path = f"{tmp}/q{len(rows)}"
            size = sizes(model, tokenizer, recipe, path)
            back = sparseforge.load(f"{path}-compact")
            exact = all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
            m = run_tasks(EvalContext(model, tokenizer, reference=dense, model_dir=path, settings=settings), tasks)
            rows.append({"method": meth, "setting": label, "compress_seconds": round(seconds, 2), **{k: m.get(k) for k in keys}, **size,
                         "compact_reload_identical": exact})
            print(rows[-1], flush=True)
            write(args.quick, cal, settings, rows, [])  # after every row: a long run that is stopped keeps what it measured
    # SparseGPT through the shared solver against the figures recorded before it was shared.
    check = []
    previous = json.loads((OUT / "weight_quality.json").read_text()) if (OUT / "weight_quality.json").is_file() else None
    if previous and not args.quick:
        pcal = CalibrationConfig(**{k: v for k, v in previous["calibration"].items() if k in ("samples", "seq_len", "source", "seed", "propagate")})
        for label, raw in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
            recipe = Recipe(f"sparsegpt-{label}", [Stage("sparsegpt", get_method("sparsegpt").parse_params(raw))], pcal)
            model, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            ppl = run_tasks(EvalContext(model, tokenizer, settings=previous.get("settings", {})), ["perplexity"])["perplexity"]
            before = next(r["perplexity"] for r in previous["rows"] if r["method"] == "sparsegpt" and r["setting"] == label)
            check.append({"setting": label, "perplexity_now": ppl, "perplexity_recorded": before, "identical": ppl == before})
            print(check[-1], flush=True)
            write(args.quick, cal, settings, rows, check)
    print(write(args.quick, cal, settings, rows, check))


def write(quick, cal, settings, rows, check) -> str:
    name = "quant_quality_quick" if quick else "quant_quality"
    doc = {"environment": environment(), "calibration": vars(cal), "settings": settings, "rows": rows, "sparsegpt_check": check}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = render(doc, name)
    (OUT / f"{name}.md").write_text(md)
    return md


def render(doc: dict, name: str) -> str:
    env, cal, settings = doc["environment"], doc["calibration"], doc["settings"]
    dense_dir = doc["rows"][0]["size_bytes"]
    dense_w = doc["rows"][0]["weights_bytes"]
    lines = [f"# Weight quantization on the bundled model\n",
             f"Machine: {env['cpu']} ({env['cpu_count']} cores, shared with other jobs), {env['device']}, torch {env['torch']}. Produced by "
             f"`benchmarks/{name.removesuffix('_quick')}.py{' --quick' if name.endswith('_quick') else ''}`. Calibration: {cal['samples']} samples x "
             f"{cal['seq_len']} tokens of the bundled calibration text (seed {cal['seed']}). Perplexity on the held-out plays"
             f"{' (first ' + str(settings['max_tokens']) + ' tokens)' if settings.get('max_tokens') else ''}; passkey and multi-key: "
             f"{settings['retrieval_per_cell']} episodes per (length, depth) cell. Symmetric codes throughout. Sizes count every file of the "
             "saved directory (config, tokenizer, sparseforge.json included); x dense = compact directory / dense float32 directory, "
             "weights x = compact weight file / dense model.safetensors.\n",
             "| method | setting | perplexity | KL to dense | top-1 agree | passkey | multi-key | compact MB | x dense | weights x | reload exact | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        lines.append(f"| {r['method']} | {r['setting']} | {f('perplexity', '{:.2f}')} | {f('kl_to_reference', '{:.4f}')} | {f('top1_agreement', '{:.3f}')} | "
                     f"{f('passkey_accuracy', '{:.3f}')} | {f('multikey_accuracy', '{:.3f}')} | {r['compact_size_bytes'] / 1e6:.2f} | "
                     f"{r['compact_size_bytes'] / dense_dir:.3f} | {r['compact_weights_bytes'] / dense_w:.3f} | {r.get('compact_reload_identical', '-')} | "
                     f"{f('compress_seconds', '{:.1f}')} |")
    if doc["sparsegpt_check"]:
        lines += ["", "## SparseGPT through the shared OBS solver vs. the recorded weight_quality.json", "",
                  "| setting | perplexity now | recorded | identical |", "|---|---|---|---|"]
        lines += [f"| {c['setting']} | {c['perplexity_now']:.6f} | {c['perplexity_recorded']:.6f} | {c['identical']} |" for c in doc["sparsegpt_check"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
