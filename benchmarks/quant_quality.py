"""Quality of weight quantization on the bundled model, the grid of issue 11: RTN, GPTQ and SpQR at 8, 4, 3 and 2
bits with groups of 32 and 128 columns (SpQR also at its default 16: the spqr-w3 preset), data-free EasyQuant at 4
and 3 bits (groups of 128), joint SparseGPT + GPTQ (50% unstructured and 2:4, each with 4 and 8 bits, groups of
128) and the sparsegpt-2of4+w4 preset (2:4 + 4 bits, embeddings 8 bits). RTN and GPTQ are symmetric, SpQR
asymmetric with 3-bit statistics (its paper's setting), EasyQuant symmetric with 1% outliers. Per setting:
perplexity, KL to dense and top-1 agreement, passkey and multi-key accuracy, bytes on disk (whole directory and
weight files, dense and compact storage; for outlier methods the bytes of codes, statistics and outliers apart),
and time to compress, all at 1 thread. Also re-runs SparseGPT 50% and 2:4 through the shared OBS solver and
compares their perplexity with benchmarks/results/weight_quality.json.

Resumable: every row is written when done, and a re-run keeps the rows already measured with the same
parameters and settings (delete the JSON to start over).
Writes benchmarks/results/quant_quality.json and .md (--quick: *_quick).
Usage: python benchmarks/quant_quality.py [--quick] [--only LABEL_SUBSTRING]
"""
from __future__ import annotations

import argparse
import json
import os
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
PROJECTION_WEIGHTS = None  # weights of the quantized projections (set in main), for bits per weight


def grid(quick: bool) -> list[tuple[str, dict, str]]:
    """(method, params, label) per row: the full cross the issue asks for, the rows most asked about first (a run
    cut short on the shared machine keeps those)."""
    first = [(4, 128), (3, 128)] if quick else [(4, 128), (3, 128), (2, 128)]
    rest = [] if quick else [(8, 128), (8, 32), (4, 32), (3, 32), (2, 32)]
    cell = lambda b, g: [(method, {"bits": b, "group_size": g}, f"w{b} g{g}") for method in ("rtn", "gptq", "spqr")]  # noqa: E731
    rows = [("spqr", {"bits": 3, "group_size": 16}, "w3 g16 (spqr-w3)")]
    rows += [("easyquant", {"bits": b, "group_size": 128}, f"w{b} g128") for b in (4, 3)]
    rows += [r for b, g in first for r in cell(b, g)]
    joint = [("50%", {"pattern": "unstructured", "sparsity": 0.5}), ("2:4", {"pattern": "2:4"})]
    rows += [("sparsegpt-gptq", {**pat, "bits": b, "group_size": 128}, f"{name} + w{b} g128") for name, pat in joint for b in (4, 8)]
    rows += [r for b, g in rest for r in cell(b, g)]
    return rows


def outlier_bytes(path: str) -> dict | None:
    """Bytes of the compact weight file by part: codes, group statistics (first and second level), outliers."""
    from safetensors import safe_open

    groups = {"codes": ("qcodes", "qmask"), "stats": ("qscale", "qzero", "qs_", "qz_"), "outliers": ("qoutlier",)}
    out = dict.fromkeys(groups, 0)
    from sparseforge.formats.artifact import COMPACT_WEIGHTS_FILE

    with safe_open(str(pathlib.Path(path) / COMPACT_WEIGHTS_FILE), "pt") as f:
        for key in f.keys():
            part = key.split("::", 1)[1] if "::" in key else ""
            for name, prefixes in groups.items():
                if part.startswith(prefixes):
                    t = f.get_tensor(key)
                    out[name] += t.numel() * t.element_size()
    return out if out["outliers"] else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="run only rows whose 'method setting' contains this")
    args = ap.parse_args()
    torch.set_num_threads(1)
    global PROJECTION_WEIGHTS
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    from sparseforge.core.adapter import ModelAdapter

    PROJECTION_WEIGHTS = sum(p.weight().numel() for p in ModelAdapter(dense).projections().values())
    cal = CalibrationConfig(samples=32, seq_len=512)
    # Perplexity on the first 16384 held-out tokens and retrieval at 512 and 1024 tokens: the full settings took
    # over 7 minutes for the dense row alone on the shared machine.
    settings = {"max_tokens": 16384, "retrieval_per_cell": 1, "retrieval_lengths": (512, 1024), "fidelity_max_windows": 8}
    if args.quick:
        settings.update({"max_tokens": 4096, "retrieval_per_cell": 1, "retrieval_lengths": (512,), "fidelity_max_windows": 4})
        cal = CalibrationConfig(samples=4, seq_len=256)
    tasks = ["perplexity", "fidelity", "passkey", "multikey"]
    keys = ("perplexity", "kl_to_reference", "top1_agreement", "passkey_accuracy", "multikey_accuracy")
    name = "quant_quality_quick" if args.quick else "quant_quality"
    previous = json.loads((OUT / f"{name}.json").read_text()) if (OUT / f"{name}.json").is_file() else {}
    same = previous.get("settings") == json.loads(json.dumps(settings)) and previous.get("calibration") == json.loads(json.dumps(vars(cal), default=str))
    done = {(r["method"], r["setting"]): r for r in previous.get("rows", []) if same and "params" in r}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if ("dense", "-") in done:
            rows.append(done[("dense", "-")])
        else:
            size = sizes(dense, tokenizer, None, f"{tmp}/dense")
            m = run_tasks(EvalContext(dense, tokenizer, model_dir=f"{tmp}/dense", settings=settings), ["perplexity", "passkey", "multikey"])
            rows.append({"method": "dense", "setting": "-", "params": {}, **{k: m.get(k) for k in keys}, **size, "load_average": os.getloadavg()[0]})
        print(rows[-1], flush=True)
        recipes = [(Recipe(f"{meth}-{label}", [Stage(meth, get_method(meth).parse_params(raw))], cal), meth, label) for meth, raw, label in grid(args.quick)]
        if not args.quick:
            recipes.insert(3, (load_recipe("sparsegpt-2of4+w4"), "preset", "sparsegpt-2of4+w4"))
        for recipe, meth, label in recipes:
            params = {s.method: vars(s.params) for s in recipe.stages}
            key = (meth, label)
            if key in done and done[key]["params"] == json.loads(json.dumps(params)):
                rows.append(done[key])
                continue
            if args.only and args.only not in f"{meth} {label}":
                continue
            recipe.calibration = cal
            start = time.perf_counter()
            model, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            seconds = time.perf_counter() - start
            path = f"{tmp}/q{len(rows)}"
            size = sizes(model, tokenizer, recipe, path)
            back = sparseforge.load(f"{path}-compact")
            exact = all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
            m = run_tasks(EvalContext(model, tokenizer, reference=dense, model_dir=path, settings=settings), tasks)
            rows.append({"method": meth, "setting": label, "params": params, "compress_seconds": round(seconds, 2), **{k: m.get(k) for k in keys},
                         **size, "compact_reload_identical": exact, "part_bytes": outlier_bytes(f"{path}-compact"),
                         "load_average": os.getloadavg()[0]})
            print(rows[-1], flush=True)
            write(args.quick, cal, settings, rows, [])  # after every row: a long run that is stopped keeps what it measured
    # SparseGPT through the shared solver against the figures recorded before it was shared.
    check = list(previous.get("sparsegpt_check", [])) if same else []
    previous = json.loads((OUT / "weight_quality.json").read_text()) if (OUT / "weight_quality.json").is_file() else None
    if previous and not args.quick and len(check) < 2 and not args.only:
        check = []
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
    doc = {"environment": environment(), "calibration": vars(cal), "settings": settings, "rows": rows, "sparsegpt_check": check,
           "projection_weights": PROJECTION_WEIGHTS}
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
             f"{settings['retrieval_per_cell']} episodes per (length, depth) cell. RTN and GPTQ symmetric; SpQR asymmetric with 3-bit "
             "statistics in groups of 16 rows and outlier threshold 0.2; EasyQuant symmetric, 1% outliers per row; joint rows symmetric. "
             "1 thread. Sizes count every file of the "
             "saved directory (config, tokenizer, sparseforge.json included); x dense = compact directory / dense float32 directory, "
             "weights x = compact weight file / dense model.safetensors. Load: the 1-minute load average when each row finished "
             f"(range {min(r.get('load_average', 0) for r in doc['rows']):.1f}-{max(r.get('load_average', 0) for r in doc['rows']):.1f}).\n",
             "| method | setting | perplexity | KL to dense | top-1 agree | passkey | multi-key | compact MB | x dense | weights x | reload exact | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        lines.append(f"| {r['method']} | {r['setting']} | {f('perplexity', '{:.2f}')} | {f('kl_to_reference', '{:.4f}')} | {f('top1_agreement', '{:.3f}')} | "
                     f"{f('passkey_accuracy', '{:.3f}')} | {f('multikey_accuracy', '{:.3f}')} | {r['compact_size_bytes'] / 1e6:.2f} | "
                     f"{r['compact_size_bytes'] / dense_dir:.3f} | {r['compact_weights_bytes'] / dense_w:.3f} | {r.get('compact_reload_identical', '-')} | "
                     f"{f('compress_seconds', '{:.1f}')} |")
    parted = [r for r in doc["rows"] if r.get("part_bytes")]
    if parted:
        n_weights = doc.get("projection_weights")
        lines += ["", "## Bytes of the compact weight file by part (methods with outliers)", "",
                  "| method | setting | codes kB | statistics kB | outliers kB | bits per projection weight |", "|---|---|---|---|---|---|"]
        for r in parted:
            b = r["part_bytes"]
            bpw = f"{8 * sum(b.values()) / n_weights:.2f}" if n_weights else "-"
            lines.append(f"| {r['method']} | {r['setting']} | {b['codes'] / 1e3:.1f} | {b['stats'] / 1e3:.1f} | {b['outliers'] / 1e3:.1f} | {bpw} |")
    if doc["sparsegpt_check"]:
        lines += ["", "## SparseGPT through the shared OBS solver vs. the recorded weight_quality.json", "",
                  "| setting | perplexity now | recorded | identical |", "|---|---|---|---|"]
        lines += [f"| {c['setting']} | {c['perplexity_now']:.6f} | {c['perplexity_recorded']:.6f} | {c['identical']} |" for c in doc["sparsegpt_check"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
