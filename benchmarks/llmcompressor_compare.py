"""sparseforge vs. llm-compressor (PyPI `llmcompressor`): SparseGPT and Wanda at 50% unstructured and 2:4 on the
bundled model, both tools calibrated on the same token windows and evaluated by the same sparseforge code.

Writes benchmarks/results/llmcompressor_compare.json and llmcompressor_compare.md.

Usage (system python, where sparseforge is installed):
    python benchmarks/llmcompressor_compare.py [--llmc-python PATH] [--quick]
`--llmc-python` is a python interpreter of a separate environment that has llmcompressor installed (default:
$LLMC_PYTHON, else /work/venv-llmc/bin/python). llm-compressor pins its own torch / transformers versions, so it
must not share an environment with sparseforge. `--quick` scores perplexity on the first 4096 held-out tokens
only (smoke run) and writes llmcompressor_compare_quick.*. If that interpreter is missing, or llmcompressor
fails to import or to run, the llm-compressor rows are kept with their perplexity empty and the reason given.

How it runs:
  1. Calibration: sparseforge's `calibration_batches` at the default `CalibrationConfig` (32 windows of 512
     tokens at seeded random offsets in the bundled calibration text). The token ids are written to a JSON
     file; llm-compressor receives them as an in-memory `datasets.Dataset` with `input_ids` (and an all-ones
     `attention_mask`), `num_calibration_samples=32`, `max_seq_length=512`, no shuffling, batch size 1.
  2. sparseforge: `sparseforge.compress` with a one-stage recipe per setting; "compress s" is the wall time
     of that call (it includes the deep copy of the model and tokenising the calibration text).
  3. llm-compressor: this same file, run by the other interpreter with `--worker SPEC`, loads a copy of the
     bundled model directory with `AutoModelForCausalLM.from_pretrained(dtype=float32)` afresh for every
     setting, runs `oneshot(model=..., dataset=..., recipe=[modifier], pipeline="sequential")` and saves the
     result with `save_pretrained(..., save_compressed=False)` (plain safetensors, pruned weights as zeros).
     "compress s" is the wall time of the `oneshot` call only (it includes building the data loader and
     llm-compressor's torch.fx tracing of the model into per-layer subgraphs, not loading or saving).
  4. Evaluation, identical for every row, in this process: the llm-compressor weights are read from its
     safetensors into a copy of the dense bundled model (every tensor of the checkpoint must match a
     parameter by name and shape; only the tied lm_head may be absent); then sparseforge's `perplexity` task
     on the bundled held-out text (window 1024, stride 512, the task defaults) and `sparsity` (fraction of
     exact zeros over the 28 decoder-layer projections q/k/v/o/gate/up/down; embeddings, norms and lm_head
     are not counted). Two checks go into the JSON: `params_changed_outside_projections` (parameters other than
     those projections that differ from dense; 0 expected) and, per llm-compressor row, `vs_sparseforge`: the
     fraction of projection entries zero in one tool's result but not the other's and the largest absolute
     weight difference (also a second table in the Markdown).
  Both tools run with the same number of torch threads (this process's `torch.get_num_threads()`, passed to
  the worker), and the worker inherits this process's environment, so OMP_NUM_THREADS and niceness match.

Settings, matched where the tools allow it:
  - Layers pruned: both prune exactly the Linear projections inside the decoder layers. sparseforge's default
    targets ("*") are the decoder-layer projections; llm-compressor's modifiers get `targets=[<decoder layer
    class>]` (here LlamaDecoderLayer), which prunes every Linear inside those layers. Its default
    `targets=["Linear"]` would also prune lm_head, which in this model is tied to (the same tensor as) the
    input embedding, so it is not used.
  - Propagation: both feed each decoder layer the outputs of the already-pruned previous layers
    (sparseforge `propagate="pruned"`, llm-compressor `propagate_error=True`, its default).
  - SparseGPT block size 128 and dampening 0.01 x mean(diag H) in both (sparseforge `blocksize`,
    `dampening`; llm-compressor `block_size`, `dampening_frac`; 128 and 0.01 are both tools' defaults).
    Both accumulate H = XᵀX in float32 over all calibration tokens; llm-compressor scales it by 2/n_samples,
    which changes nothing since the dampening is relative to its mean diagonal. Both invert it with the same
    Cholesky sequence and both zero the weights of inputs that were always zero.
  - SparseGPT unstructured mask: both compare w² / [H⁻¹]_jj² over a slab of all rows x one 128-column block,
    chosen when the block is reached. Not matched exactly: llm-compressor prunes every entry whose score is
    <= the value at sorted position int(sparsity x slab size), i.e. one entry (more on ties) above
    int(sparsity x slab size) in each slab, so its sparsity lands slightly above 50%; sparseforge prunes
    exactly floor(0.5 x numel) per matrix, spread over the slabs.
  - SparseGPT and Wanda 2:4: both choose, per row, the 2 lowest-scoring of each group of 4 consecutive input
    weights (SparseGPT: when the group is reached, on the updated weights). llm-compressor's
    `mask_structure="N:M"` counts the PRUNED weights (N pruned of M) while sparseforge's `pattern` counts the
    KEPT ones; for 2:4 the two readings coincide. Ties within a group: sparseforge breaks them by position,
    llm-compressor by `torch.topk` order.
  - Wanda unstructured: both score |w_ij| x ||x_j|| and prune int(0.5 x in_features) per output row
    (sparseforge `compare="row"`). llm-compressor's ||x_j|| is the root of the per-sample mean of squared
    norms, a constant multiple of sparseforge's, so the ranking is the same; ties broken by position in both.
  - Compute: float32 weights and statistics, CPU, batch size 1 in both. llm-compressor runs under its own
    torch / transformers versions (see the environment in the JSON), so its forward passes may differ from
    sparseforge's in rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "results"
DEFAULT_LLMC_PYTHON = os.environ.get("LLMC_PYTHON", "/work/venv-llmc/bin/python")
# (method, pattern, sparsity) per setting; the same list is run by both tools.
GRID = [("sparsegpt", "unstructured", 0.5), ("sparsegpt", "2:4", None), ("wanda", "unstructured", 0.5), ("wanda", "2:4", None)]
BLOCKSIZE = 128
DAMPENING = 0.01
QUICK_TOKENS = 4096


def label(pattern: str, sparsity: float | None) -> str:
    return pattern if sparsity is None else f"{sparsity:.0%}"


# ---------------------------------------------------------------------------------------------------------
# llm-compressor side: runs in the llm-compressor environment. Imports only what that environment has.
# ---------------------------------------------------------------------------------------------------------

def _versions(*names: str) -> dict:
    from importlib import metadata

    found = {}
    for n in names:
        try:
            found[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            found[n] = None
    return found


def worker(spec_path: str) -> None:
    """Run every requested setting with llm-compressor and write {"environment", "runs"} to spec["result"]."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    result_path = pathlib.Path(spec["result"])
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    runs = []
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        env.update(_versions("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate"))
        env["torch_threads"] = torch.get_num_threads()
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
    except Exception as exc:  # report why, instead of dying without a trace
        result_path.write_text(json.dumps({"environment": env, "error": f"import failed: {type(exc).__name__}: {exc}", "runs": []}, indent=2))
        raise
    cal = json.loads(pathlib.Path(spec["calibration"]).read_text())
    ids = cal["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    for run in spec["runs"]:
        entry = dict(run)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
            model.eval()
            layer_class = type(model.model.layers[0]).__name__
            mask = "0:0" if run["pattern"] == "unstructured" else run["pattern"]  # llm-compressor: N pruned of M
            common = {"sparsity": run["sparsity"] if run["sparsity"] is not None else 0.5, "mask_structure": mask, "targets": [layer_class]}
            if run["method"] == "sparsegpt":
                modifier = SparseGPTModifier(block_size=spec["blocksize"], dampening_frac=spec["dampening"], **common)
            else:
                modifier = WandaPruningModifier(**common)
            entry["modifier"] = {"class": type(modifier).__name__, **modifier.model_dump(include={"sparsity", "mask_structure", "targets", "ignore", "block_size", "dampening_frac"})}
            start = time.perf_counter()
            oneshot(
                model=model,
                dataset=dataset,
                recipe=[modifier],
                num_calibration_samples=len(ids),
                max_seq_length=cal["seq_len"],
                shuffle_calibration_samples=False,
                batch_size=1,
                pipeline="sequential",
            )
            entry["compress_seconds"] = round(time.perf_counter() - start, 2)
            out_dir = pathlib.Path(spec["out_root"]) / f"{run['method']}-{run['pattern'].replace(':', 'of')}"
            model.save_pretrained(out_dir, save_compressed=False)
            entry["model_dir"] = str(out_dir)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            traceback.print_exc()
        runs.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "modifier"}), flush=True)
    result_path.write_text(json.dumps({"environment": env, "runs": runs}, indent=2))


# ---------------------------------------------------------------------------------------------------------
# sparseforge side and evaluation: runs in the system environment.
# ---------------------------------------------------------------------------------------------------------

def run_llmc(llmc_python: str, spec: dict, workdir: pathlib.Path) -> tuple[dict | None, str | None]:
    """Returns (worker result, None) or (None-or-partial result, reason it is unavailable)."""
    if not pathlib.Path(llmc_python).exists():
        return None, f"no llm-compressor interpreter at {llmc_python} (pass --llmc-python)"
    spec_path = workdir / "llmc_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run([llmc_python, str(pathlib.Path(__file__).resolve()), "--worker", str(spec_path)],
                          env=env, cwd=workdir, capture_output=True, text=True)
    log = (proc.stdout + proc.stderr).strip()
    (workdir / "llmc_worker.log").write_text(log)
    result_file = pathlib.Path(spec["result"])
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if proc.returncode != 0:
        reason = (result or {}).get("error") or (log.splitlines()[-1] if log else f"exit status {proc.returncode}")
        return result, f"llm-compressor worker failed (exit {proc.returncode}): {reason}"
    return result, None


def load_llmc_weights(dense, model_dir: str):
    """A copy of `dense` carrying the tensors of llm-compressor's saved checkpoint."""
    import copy

    import torch
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise RuntimeError(f"no safetensors in {model_dir}")
    model = copy.deepcopy(dense)
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in tensors and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if bad or missing:
        raise RuntimeError(f"checkpoint does not match the model: unexpected/misshapen {bad[:5]}, missing {missing[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))
    return model


def changed_outside_projections(dense, pruned) -> int:
    """Parameters outside the decoder-layer projections that differ from the dense model (expected: 0)."""
    import torch

    from sparseforge.core.adapter import ModelAdapter

    proj = {id(p.parameter) for p in ModelAdapter(pruned).projections().values()}
    d = dict(dense.named_parameters())
    return sum(1 for n, p in pruned.named_parameters() if id(p) not in proj and not torch.equal(p, d[n]))


def agreement(ours, theirs) -> dict:
    """How close two pruned models are over the decoder-layer projections: the fraction of entries that are zero
    in one and not the other, and the largest absolute weight difference."""
    import torch

    from sparseforge.core.adapter import ModelAdapter

    a, b = ModelAdapter(ours).projections(), ModelAdapter(theirs).projections()
    differ = total = 0
    max_diff = 0.0
    for name, proj in a.items():
        wa, wb = proj.weight().float(), b[name].weight().float()
        differ += int(((wa == 0) != (wb == 0)).sum())
        total += wa.numel()
        max_diff = max(max_diff, float((wa - wb).abs().max()))
    return {"zero_mask_mismatch": differ / total, "max_abs_weight_diff": max_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON, help="python of the environment with llmcompressor")
    ap.add_argument("--quick", action="store_true", help=f"perplexity on the first {QUICK_TOKENS} held-out tokens only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    import torch

    import sparseforge
    from sparseforge.core.calibration import CalibrationConfig, calibration_batches
    from sparseforge.eval.tasks import EvalContext, environment, run_tasks
    from sparseforge.formats.artifact import resolve_model_path
    from sparseforge.methods import get_method
    from sparseforge.recipe import Recipe, Stage

    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    cal = CalibrationConfig()
    batches = calibration_batches(tokenizer, cal)
    settings = {"max_tokens": QUICK_TOKENS} if args.quick else {}
    threads = torch.get_num_threads()

    def evaluate(model) -> dict:
        m = run_tasks(EvalContext(model, tokenizer, settings=settings), ["perplexity", "sparsity"])
        return {"perplexity": m["perplexity"], "sparsity": m["sparsity"], "tokens_scored": m["perplexity_tokens_scored"]}

    ours = {}
    rows = [{"tool": "dense", "method": "-", "pattern": "-", **evaluate(dense), "compress_seconds": None}]
    print(rows[-1], flush=True)
    for method, pattern, sparsity in GRID:
        raw = {"pattern": pattern} | ({"sparsity": sparsity} if sparsity is not None else {})
        raw |= {"blocksize": BLOCKSIZE, "dampening": DAMPENING} if method == "sparsegpt" else {"compare": "row"}
        recipe = Recipe(f"{method}-{label(pattern, sparsity)}", [Stage(method, get_method(method).parse_params(raw))], cal)
        start = time.perf_counter()
        pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
        seconds = round(time.perf_counter() - start, 2)
        ours[(method, pattern)] = pruned
        rows.append({"tool": "sparseforge", "method": method, "pattern": label(pattern, sparsity), **evaluate(pruned),
                     "compress_seconds": seconds, "params_changed_outside_projections": changed_outside_projections(dense, pruned)})
        print(rows[-1], flush=True)

    llmc_env, llmc_reason = None, None
    with tempfile.TemporaryDirectory(prefix="llmc-compare-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "calibration.json").write_text(json.dumps({"seq_len": cal.seq_len, "input_ids": [b[0].tolist() for b in batches]}))
        model_copy = tmp / "reference-model"
        shutil.copytree(resolve_model_path(None), model_copy)
        spec = {"calibration": str(tmp / "calibration.json"), "model_dir": str(model_copy), "out_root": str(tmp / "pruned"),
                "result": str(tmp / "llmc_result.json"), "threads": threads, "blocksize": BLOCKSIZE, "dampening": DAMPENING,
                "runs": [{"method": m, "pattern": p, "sparsity": s} for m, p, s in GRID]}
        result, llmc_reason = run_llmc(args.llmc_python, spec, tmp)
        if llmc_reason:
            print(f"llm-compressor unavailable: {llmc_reason}\n--- worker log (tail) ---", flush=True)
            log = tmp / "llmc_worker.log"
            print("\n".join(log.read_text().splitlines()[-30:]) if log.is_file() else "(none)", flush=True)
        llmc_env = (result or {}).get("environment")
        by_setting = {(r["method"], r["pattern"]): r for r in (result or {}).get("runs", [])}
        for method, pattern, sparsity in GRID:
            run = by_setting.get((method, pattern), {})
            row = {"tool": "llm-compressor", "method": method, "pattern": label(pattern, sparsity), "perplexity": None,
                   "sparsity": None, "compress_seconds": run.get("compress_seconds"), "modifier": run.get("modifier")}
            if run.get("model_dir"):
                try:
                    pruned = load_llmc_weights(dense, run["model_dir"])
                    row.update(evaluate(pruned))
                    row["params_changed_outside_projections"] = changed_outside_projections(dense, pruned)
                    row["vs_sparseforge"] = agreement(ours[(method, pattern)], pruned)
                except Exception as exc:
                    row["unavailable"] = f"evaluation failed: {type(exc).__name__}: {exc}"
            else:
                row["unavailable"] = run.get("error") or llmc_reason or "not run"
                row["unavailable_short"] = run.get("error") or "unavailable, see below"
            rows.append(row)
            print(rows[-1], flush=True)

    env = environment() | {"torch_threads": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                           "sparseforge": _versions("sparseforge")["sparseforge"]}
    OUT.mkdir(exist_ok=True)
    name = "llmcompressor_compare_quick" if args.quick else "llmcompressor_compare"
    doc = {"environment": {"sparseforge": env, "llmcompressor": llmc_env}, "llmcompressor_unavailable": llmc_reason,
           "calibration": {k: v for k, v in vars(cal).items() if k != "device"}, "eval_settings": settings,
           "sparsegpt": {"blocksize": BLOCKSIZE, "dampening": DAMPENING}, "rows": rows}
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")

    f = lambda v, fmt: "-" if v is None else fmt.format(v)
    lines = ["| tool | method | pattern | perplexity | sparsity | compress s |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r.get('unavailable_short') or r['unavailable']})" if r.get("unavailable") else ""
        lines.append(f"| {r['tool']} | {r['method']} | {r['pattern']} | {f(r['perplexity'], '{:.2f}')}{note} | {f(r['sparsity'], '{:.5f}')} | {f(r['compress_seconds'], '{:.1f}')} |")
    comp = ["| method | pattern | zero-mask mismatch | max abs weight difference |", "|---|---|---|---|"]
    for r in rows:
        if r.get("vs_sparseforge"):
            v = r["vs_sparseforge"]
            comp.append(f"| {r['method']} | {r['pattern']} | {v['zero_mask_mismatch']:.5f} | {v['max_abs_weight_diff']:.2e} |")
    if llmc_env and llmc_env.get("llmcompressor"):
        other = (f"llm-compressor side: llmcompressor {llmc_env.get('llmcompressor')}, compressed-tensors {llmc_env.get('compressed-tensors')}, "
                 f"torch {llmc_env.get('torch')}, transformers {llmc_env.get('transformers')}, {llmc_env.get('torch_threads')} torch threads.")
    else:
        other = "llm-compressor side: not available."
    md = (f"# sparseforge vs. llm-compressor on the bundled model\n\n"
          f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['device']}, {env['platform']}. "
          f"sparseforge side: torch {env['torch']}, transformers {env['transformers']}, {threads} torch threads. {other} "
          f"Produced by `benchmarks/llmcompressor_compare.py{' --quick' if args.quick else ''}`.\n\n"
          f"Both tools calibrate on the same {cal.samples} windows of {cal.seq_len} tokens of the bundled calibration text "
          f"(sparseforge's `calibration_batches`, seed {cal.seed}), prune the 28 decoder-layer projections with pruned-layer "
          f"propagation, SparseGPT block size {BLOCKSIZE} and dampening {DAMPENING}; every row is evaluated by sparseforge: "
          f"perplexity on the held-out plays{' (first ' + str(QUICK_TOKENS) + ' tokens)' if args.quick else ''}, sparsity as the "
          f"fraction of zeros in those projections. Compress s: sparseforge `compress` call vs. llm-compressor `oneshot` call "
          f"(wall time on a shared machine).\n\n" + "\n".join(lines)
          + ("\n\nllm-compressor unavailable: " + llmc_reason if llmc_reason else "")
          + ("\n\nSame setting, llm-compressor's pruned projections against sparseforge's: the fraction of entries zero in "
             "one but not the other, and the largest absolute weight difference.\n\n" + "\n".join(comp) if len(comp) > 2 else "")
          + "\n\nSettings that differ between the tools are listed in the script's docstring.\n")
    (OUT / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
