"""Quality of weight-pruning methods on the bundled model: perplexity, KL to dense, passkey accuracy, size on
disk (default and compact storage, both counted the same way) and compress time per setting, the layer-wise
reconstruction error ||WX - ŴX|| / ||WX|| of every projection on the dense model's calibration inputs, and
the compact storage codecs' byte ratios on the bundled model's weights (the figures formats/sparse_storage.py
quotes).

Writes benchmarks/results/weight_quality.json and weight_quality.md.
Usage: python benchmarks/weight_quality.py [--quick | --sizes-only]
  --quick       fewer settings and tokens, for a smoke run (writes weight_quality_quick.*)
  --sizes-only  keep the quality columns of the existing weight_quality.json; recompress every setting with
                its recorded calibration and measure only the sizes and the codec ratios (a few CPU minutes
                instead of the full run's evaluation)
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import tempfile
import time
import zlib

import torch

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig, calibration_batches, run_layerwise
from sparseforge.core.masks import Pattern, select_mask
from sparseforge.eval.efficiency import size_on_disk
from sparseforge.eval.tasks import EvalContext, environment, run_tasks
from sparseforge.formats.sparse_storage import encode_planes, pack_bitmask, pack_nm
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


def grid(quick: bool) -> list[tuple[str, dict, str]]:
    """(method, params, label) of every pruned row, in table order."""
    rows = [(meth, {"pattern": p} | ({"sparsity": sp} if sp is not None else {}), p if sp is None else f"{sp:.0%}")
            for meth in METHODS for p, sp in (SETTINGS[:1] + SETTINGS[3:4] if quick else SETTINGS)]
    rows += [("owl", {"base": "wanda", "sparsity": 0.7}, "70% (wanda)")]
    rows += [("dsnot", {"base": "wanda", "sparsity": sp}, f"{sp:.0%} (wanda)") for sp in ((0.6,) if quick else (0.6, 0.7))]
    rows += [("structured", {"mlp_sparsity": 0.25}, "25% MLP channels")]
    return rows


def sizes(model, tokenizer, recipe, path: str) -> dict[str, int]:
    """Save `model` in both storages and count each the same way: every file of the saved directory
    (weights, config, tokenizer, sparseforge.json), plus the weight files alone."""
    sparseforge.save(model, path, tokenizer, recipe=recipe)
    sparseforge.save(model, f"{path}-compact", tokenizer, recipe=recipe, storage="compact")
    weights = lambda d: sum(f.stat().st_size for f in pathlib.Path(d).glob("*.safetensors"))
    return {"size_bytes": size_on_disk(path), "compact_size_bytes": size_on_disk(f"{path}-compact"),
            "weights_bytes": weights(path), "compact_weights_bytes": weights(f"{path}-compact")}


def codec_ratios(model) -> dict[str, dict]:
    """Bytes each compact codec writes over the dense bytes, on the model's projection weights (pruned by
    magnitude per matrix to 50% for the bitmask, to 2:4 for N:M) and, for plane coding, on every float tensor
    of at least 1024 values (what a compact artifact plane-codes), in float32 and bfloat16; plus zlib level 1
    against level 9 on the planes' top bytes (size and time)."""
    projections = [p.weight().detach().float().contiguous() for p in ModelAdapter(model).projections().values()]
    unique = {t.data_ptr(): t for t in model.state_dict().values() if t.is_floating_point() and t.numel() >= 1024}  # tied once
    tensors = [t.detach().float().contiguous() for t in unique.values()]
    out: dict[str, dict] = {}
    nbytes = lambda parts: sum(x.numel() * x.element_size() for x in parts.values())
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=dtype).element_size()
        dense = sum(w.numel() for w in projections) * size
        half = [(w * select_mask(w.abs(), Pattern("unstructured", 0.5), "matrix")).to(dtype) for w in projections]
        two4 = [(w * select_mask(w.abs(), Pattern.parse("2:4", None), "row")).to(dtype) for w in projections]
        raw = sum(t.numel() for t in tensors) * size
        planes = [encode_planes(t.to(dtype)) for t in tensors]
        top = sum(p["planes_top"].numel() for p in planes)
        out[str(dtype).removeprefix("torch.")] = {
            "bitmask_50pct": sum(nbytes(pack_bitmask(w)) for w in half) / dense,
            "nm_2of4": sum(nbytes(pack_nm(w, 2, 4)) for w in two4) / dense,
            "planes_top_byte": top / sum(t.numel() for t in tensors),
            "planes_all_bytes": sum(nbytes(p) for p in planes) / raw,
        }
    tops = [t.to(torch.float32).reshape(-1).view(torch.uint8).reshape(-1, 4)[:, -1].contiguous().numpy().tobytes() for t in tensors]
    timed = {}
    for level in (1, 9):
        start = time.perf_counter()
        timed[level] = (sum(len(zlib.compress(b, level)) for b in tops), time.perf_counter() - start)
    out["zlib_level1_vs_9"] = {"size": timed[1][0] / timed[9][0], "time": timed[1][1] / timed[9][1]}
    return out


def render(doc: dict, name: str) -> str:
    """The Markdown report of a results document."""
    env, cal, settings, rows, recon = doc["environment"], doc["calibration"], doc["settings"], doc["rows"], doc["reconstruction_error"]
    quick = name.endswith("_quick")
    lines = ["| method | setting | perplexity | KL to dense | top-1 agree | passkey | size MB (dir) | compact MB (dir) | compress s |",
             "|---|---|---|---|---|---|---|---|---|"]
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"
    for r in rows:
        f = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])
        lines.append(f"| {r['method']} | {r['setting']} | {f('perplexity', '{:.2f}')} | {f('kl_to_reference', '{:.4f}')} | {f('top1_agreement', '{:.3f}')} | {f('passkey_accuracy', '{:.3f}')} | {mb(r.get('size_bytes'))} | {mb(r.get('compact_size_bytes'))} | {f('compress_seconds', '{:.1f}')} |")
    layers = sorted({n for e in recon.values() for n in e}, key=lambda n: (int(n.split(".")[2]), n))
    rec = ["| projection | " + " | ".join(recon) + " |", "|---|" + "---|" * len(recon)]
    for n in layers:
        rec.append(f"| {n} | " + " | ".join(f"{recon[k][n]:.4f}" for k in recon) + " |")
    # Issue 3's check: at 50%, SparseGPT's error is below Wanda's and magnitude's on every projection.
    check = ""
    if all(k in recon for k in ("sparsegpt 50%", "wanda 50%", "magnitude 50%")):
        wins = [n for n in layers if recon["sparsegpt 50%"][n] < min(recon["wanda 50%"][n], recon["magnitude 50%"][n])]
        check = f"\n\nSparseGPT 50% has the lowest error of the three 50% methods on {len(wins)} of {len(layers)} projections.\n"
    size_env = doc.get("sizes_environment")
    size_note = ""
    if size_env:
        size_note = (f" The two size columns and the codec table were re-measured by `--sizes-only` (the quality columns kept): "
                     f"{size_env['cpu']} ({size_env['cpu_count']} cores), torch {size_env['torch']}, transformers {size_env['transformers']}.")
    md = (f"# Weight pruning on the bundled model\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), {env['device']}, torch {env['torch']}. "
          f"Produced by `benchmarks/weight_quality.py{' --quick' if quick else ''}`. Calibration: {cal['samples']} samples x {cal['seq_len']} tokens "
          f"of the bundled calibration text. Perplexity on the held-out plays{' (first ' + str(settings['max_tokens']) + ' tokens)' if settings.get('max_tokens') else ''}; "
          f"passkey: {settings['retrieval_per_cell']} episodes per (length, depth) cell.{size_note}\n\n" + "\n".join(lines)
          + "\n\nBoth size columns count every file of the saved directory (weights, config, tokenizer, sparseforge.json). "
          "size MB: the default (transformers-loadable) storage, pruned weights as zeros. compact MB: `--storage compact` "
          "(bitmask or N:M positions plus plane-coded values; loads with `sparseforge.load`). Structured results are smaller dense "
          "checkpoints; their compact size is plane coding alone. The weight files alone are in the JSON (`weights_bytes`, "
          "`compact_weights_bytes`).\n\n")
    codecs = doc.get("codec_ratios")
    if codecs:
        md += ("## Compact storage codecs on the bundled model\n\nBytes written over the dense bytes, measured on the bundled model's "
               "projection weights (magnitude-pruned per matrix to 50% for the bitmask, to 2:4 for N:M) and, for plane coding, on every "
               "float tensor of at least 1024 values.\n\n| codec | float32 | bfloat16 |\n|---|---|---|\n")
        labels = {"bitmask_50pct": "bitmask + values, 50% unstructured", "nm_2of4": "N:M values + 4-bit positions, 2:4",
                  "planes_top_byte": "plane coding: deflated top byte / its raw size", "planes_all_bytes": "plane coding: all bytes"}
        for key, label in labels.items():
            md += f"| {label} | {codecs['float32'][key]:.3f} | {codecs['bfloat16'][key]:.3f} |\n"
        z = codecs["zlib_level1_vs_9"]
        md += f"\nzlib level 1 against level 9 on the float32 top bytes: {z['size']:.3f}x the size in {z['time']:.4f}x the time.\n\n"
    md += "## Layer-wise reconstruction error ||WX - ŴX|| / ||WX|| on the dense calibration inputs\n\n" + "\n".join(rec) + check + "\n"
    return md


def sizes_only(tokenizer, dense) -> None:
    """Re-measure the size columns and codec ratios of the existing full results, keeping everything else."""
    path = OUT / "weight_quality.json"
    doc = json.loads(path.read_text())
    cal = CalibrationConfig(**doc["calibration"])
    labels = {(m, label): (m, raw) for m, raw, label in grid(quick=False)}
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(doc["rows"]):
            if row["method"] == "dense":
                model, recipe = dense, None
            else:
                method, raw = labels[(row["method"], row["setting"])]
                recipe = Recipe(f"{method}-{row['setting']}", [Stage(method, get_method(method).parse_params(raw))], cal)
                model, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            before = row.get("size_bytes")
            row.update(sizes(model, tokenizer, recipe, f"{tmp}/{i}"))
            print(row["method"], row["setting"], "default bytes before/now:", before, row["size_bytes"], "compact:", row["compact_size_bytes"], flush=True)
    doc["codec_ratios"] = codec_ratios(dense)
    doc["sizes_environment"] = environment()
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (OUT / "weight_quality.md").write_text(render(doc, "weight_quality"))


def main() -> None:
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--sizes-only", action="store_true")
    args = ap.parse_args()
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    if args.sizes_only:
        sizes_only(tokenizer, dense)
        print((OUT / "weight_quality.md").read_text())
        return
    cal = CalibrationConfig(samples=32, seq_len=512)
    settings = {"retrieval_per_cell": 2, "fidelity_max_windows": 64}
    if args.quick:
        settings.update({"max_tokens": 4096, "retrieval_per_cell": 1, "retrieval_lengths": (512,), "fidelity_max_windows": 4})
        cal = CalibrationConfig(samples=4, seq_len=256)
    tasks = ["perplexity", "fidelity", "passkey"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        size = sizes(dense, tokenizer, None, f"{tmp}/dense")
        m = run_tasks(EvalContext(dense, tokenizer, model_dir=f"{tmp}/dense", settings=settings), ["perplexity", "passkey"])
        rows.append({"method": "dense", "setting": "-", **{k: m.get(k) for k in ("perplexity", "passkey_accuracy")}, **size})
        print(rows[-1], flush=True)
        hessians = dense_hessians(dense, tokenizer, cal)
        recon = {}
        for method, raw, label in grid(args.quick):
            cls = get_method(method)
            recipe = Recipe(f"{method}-{label}", [Stage(method, cls.parse_params(raw))], cal)
            start = time.perf_counter()
            pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            seconds = time.perf_counter() - start
            path = f"{tmp}/{method}-{len(rows)}"
            size = sizes(pruned, tokenizer, recipe, path)
            m = run_tasks(EvalContext(pruned, tokenizer, reference=dense, model_dir=path, settings=settings), tasks)
            rows.append({"method": method, "setting": label, "compress_seconds": round(seconds, 2),
                         **{k: m.get(k) for k in ("perplexity", "kl_to_reference", "top1_agreement", "passkey_accuracy")}, **size})
            if method != "structured":  # its projections change shape; the error needs the same W shapes
                recon[f"{method} {label}"] = reconstruction_errors(dense, pruned, hessians)
            print(rows[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    name = "weight_quality_quick" if args.quick else "weight_quality"
    doc = {"environment": environment(), "calibration": vars(cal), "settings": settings, "rows": rows,
           "reconstruction_error": recon, "codec_ratios": codec_ratios(dense)}
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = render(doc, name)
    (OUT / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
