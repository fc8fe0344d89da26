"""sparseforge vs. llm-compressor (PyPI `llmcompressor`): SparseGPT and Wanda at 50% unstructured and 2:4 on the
bundled model, both tools calibrated on the same token windows and evaluated by the same sparseforge code.

Writes benchmarks/results/llmcompressor_compare.json and llmcompressor_compare.md (calibration seed 0), or with
`--seeds` other than "0" llmcompressor_seeds.json and .md.

Usage (system python, where sparseforge is installed):
    python benchmarks/llmcompressor_compare.py [--llmc-python PATH] [--quick] [--seeds 0,1,2]
`--llmc-python` is a python interpreter of a separate environment that has llmcompressor installed (default:
$LLMC_PYTHON, else /work/venv-llmc/bin/python). llm-compressor pins its own torch / transformers versions, so it
must not share an environment with sparseforge. `--quick` scores perplexity on the first 4096 held-out tokens
only (smoke run) and writes llmcompressor_compare_quick.*. If that interpreter is missing, or llmcompressor
fails to import or to run, the llm-compressor rows are kept with their perplexity empty and the reason given.
`--seeds` (comma-separated, default "0") repeats steps 1-4 below once per calibration seed, to tell a systematic
perplexity difference between the tools from one that depends on which windows were drawn; the dense model is
scored once. Any list other than "0" writes llmcompressor_seeds.json / .md (…_quick with `--quick`) and leaves
llmcompressor_compare.* alone: per setting and seed both tools' perplexity and the difference (sparseforge minus
llm-compressor), and per setting the mean difference and on how many seeds each tool is lower or the two are tied
(exactly equal perplexity).

How it runs:
  1. Calibration: sparseforge's `calibration_batches` at the default `CalibrationConfig` (32 windows of 512
     tokens at random offsets in the bundled calibration text, drawn from the seed; `seed` is the only field
     `--seeds` changes). The token ids are written to a JSON file; llm-compressor receives them as an
     in-memory `datasets.Dataset` with `input_ids` (and an all-ones `attention_mask`),
     `num_calibration_samples=32`, `max_seq_length=512`, no shuffling, batch size 1. sparseforge's `compress`
     draws its windows from the same config, so both tools see the same token ids for each seed.
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


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a non-empty list of distinct seeds expected, got {text!r}")
    return seeds


def evaluate(model, tokenizer, settings: dict) -> dict:
    from sparseforge.eval.tasks import EvalContext, run_tasks

    m = run_tasks(EvalContext(model, tokenizer, settings=settings), ["perplexity", "sparsity"])
    return {"perplexity": m["perplexity"], "sparsity": m["sparsity"], "tokens_scored": m["perplexity_tokens_scored"]}


def sparseforge_rows(dense, tokenizer, cal, settings: dict) -> tuple[list[dict], dict]:
    """One row per GRID setting pruned by sparseforge, and the pruned models by (method, pattern)."""
    import sparseforge
    from sparseforge.methods import get_method
    from sparseforge.recipe import Recipe, Stage

    rows, ours = [], {}
    for method, pattern, sparsity in GRID:
        raw = {"pattern": pattern} | ({"sparsity": sparsity} if sparsity is not None else {})
        raw |= {"blocksize": BLOCKSIZE, "dampening": DAMPENING} if method == "sparsegpt" else {"compare": "row"}
        recipe = Recipe(f"{method}-{label(pattern, sparsity)}", [Stage(method, get_method(method).parse_params(raw))], cal)
        start = time.perf_counter()
        pruned, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
        seconds = round(time.perf_counter() - start, 2)
        ours[(method, pattern)] = pruned
        rows.append({"tool": "sparseforge", "method": method, "pattern": label(pattern, sparsity), **evaluate(pruned, tokenizer, settings),
                     "compress_seconds": seconds, "params_changed_outside_projections": changed_outside_projections(dense, pruned)})
        print(rows[-1], flush=True)
    return rows, ours


def llmc_rows(llmc_python: str, dense, tokenizer, cal, batches, settings: dict, threads: int, ours: dict) -> tuple[list[dict], dict | None, str | None]:
    """One row per GRID setting pruned by llm-compressor on `batches` (the token ids sparseforge calibrated on),
    the worker's environment, and why llm-compressor is unavailable (None if it ran)."""
    from sparseforge.formats.artifact import resolve_model_path

    rows = []
    with tempfile.TemporaryDirectory(prefix="llmc-compare-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "calibration.json").write_text(json.dumps({"seq_len": cal.seq_len, "input_ids": [b[0].tolist() for b in batches]}))
        model_copy = tmp / "reference-model"
        shutil.copytree(resolve_model_path(None), model_copy)
        spec = {"calibration": str(tmp / "calibration.json"), "model_dir": str(model_copy), "out_root": str(tmp / "pruned"),
                "result": str(tmp / "llmc_result.json"), "threads": threads, "blocksize": BLOCKSIZE, "dampening": DAMPENING,
                "runs": [{"method": m, "pattern": p, "sparsity": s} for m, p, s in GRID]}
        result, llmc_reason = run_llmc(llmc_python, spec, tmp)
        if llmc_reason:
            print(f"llm-compressor unavailable: {llmc_reason}\n--- worker log (tail) ---", flush=True)
            log = tmp / "llmc_worker.log"
            print("\n".join(log.read_text().splitlines()[-30:]) if log.is_file() else "(none)", flush=True)
        by_setting = {(r["method"], r["pattern"]): r for r in (result or {}).get("runs", [])}
        for method, pattern, sparsity in GRID:
            run = by_setting.get((method, pattern), {})
            row = {"tool": "llm-compressor", "method": method, "pattern": label(pattern, sparsity), "perplexity": None,
                   "sparsity": None, "compress_seconds": run.get("compress_seconds"), "modifier": run.get("modifier")}
            if run.get("model_dir"):
                try:
                    pruned = load_llmc_weights(dense, run["model_dir"])
                    row.update(evaluate(pruned, tokenizer, settings))
                    row["params_changed_outside_projections"] = changed_outside_projections(dense, pruned)
                    row["vs_sparseforge"] = agreement(ours[(method, pattern)], pruned)
                except Exception as exc:
                    row["unavailable"] = f"evaluation failed: {type(exc).__name__}: {exc}"
            else:
                row["unavailable"] = run.get("error") or llmc_reason or "not run"
                row["unavailable_short"] = run.get("error") or "unavailable, see below"
            rows.append(row)
            print(rows[-1], flush=True)
    return rows, (result or {}).get("environment"), llmc_reason


def compare_seed(seed: int, dense, tokenizer, settings: dict, threads: int, llmc_python: str) -> dict:
    """Both tools on every GRID setting, calibrated on the windows that `seed` picks."""
    from sparseforge.core.calibration import CalibrationConfig, calibration_batches

    cal = CalibrationConfig(seed=seed)
    # sparseforge.compress draws its windows again from `cal`; the same function and seed give the same ids.
    batches = calibration_batches(tokenizer, cal)
    ours_rows, ours = sparseforge_rows(dense, tokenizer, cal, settings)
    theirs_rows, llmc_env, llmc_reason = llmc_rows(llmc_python, dense, tokenizer, cal, batches, settings, threads, ours)
    return {"cal": cal, "rows": ours_rows + theirs_rows, "llmc_env": llmc_env, "llmc_reason": llmc_reason}


def machine_line(env: dict, threads: int, llmc_env: dict | None) -> str:
    if llmc_env and llmc_env.get("llmcompressor"):
        other = (f"llm-compressor side: llmcompressor {llmc_env.get('llmcompressor')}, compressed-tensors {llmc_env.get('compressed-tensors')}, "
                 f"torch {llmc_env.get('torch')}, transformers {llmc_env.get('transformers')}, {llmc_env.get('torch_threads')} torch threads.")
    else:
        other = "llm-compressor side: not available."
    return (f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['device']}, {env['platform']}. "
            f"sparseforge side: torch {env['torch']}, transformers {env['transformers']}, {threads} torch threads. {other}")


def setup_text(cal, seeds: str) -> str:
    """The setup paragraph both reports share; `seeds` names the calibration seed(s), e.g. "seed 0"."""
    return (f"Both tools calibrate on the same {cal.samples} windows of {cal.seq_len} tokens of the bundled calibration text "
            f"(sparseforge's `calibration_batches`, {seeds}), prune the 28 decoder-layer projections with pruned-layer "
            f"propagation, SparseGPT block size {BLOCKSIZE} and dampening {DAMPENING}; every row is evaluated by sparseforge: ")


def write_compare(dense_row: dict, res: dict, env: dict, settings: dict, threads: int, quick: bool) -> None:
    """The single-seed report: llmcompressor_compare.json and .md."""
    rows, cal, llmc_env, llmc_reason = [dense_row] + res["rows"], res["cal"], res["llmc_env"], res["llmc_reason"]
    name = "llmcompressor_compare_quick" if quick else "llmcompressor_compare"
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
    md = (f"# sparseforge vs. llm-compressor on the bundled model\n\n"
          f"{machine_line(env, threads, llmc_env)} "
          f"Produced by `benchmarks/llmcompressor_compare.py{' --quick' if quick else ''}`.\n\n"
          + setup_text(cal, f"seed {cal.seed}") +
          f"perplexity on the held-out plays{' (first ' + str(QUICK_TOKENS) + ' tokens)' if quick else ''}, sparsity as the "
          f"fraction of zeros in those projections. Compress s: sparseforge `compress` call vs. llm-compressor `oneshot` call "
          f"(wall time on a shared machine).\n\n" + "\n".join(lines)
          + ("\n\nllm-compressor unavailable: " + llmc_reason if llmc_reason else "")
          + ("\n\nSame setting, llm-compressor's pruned projections against sparseforge's: the fraction of entries zero in "
             "one but not the other, and the largest absolute weight difference.\n\n" + "\n".join(comp) if len(comp) > 2 else "")
          + "\n\nSettings that differ between the tools are listed in the script's docstring.\n")
    (OUT / f"{name}.md").write_text(md)
    print(md)


def seed_table(results: dict[int, dict]) -> list[dict]:
    """Per setting and seed: both tools' perplexity and sparseforge minus llm-compressor (None if either is missing)."""
    table = []
    for method, pattern, sparsity in GRID:
        for seed, res in results.items():
            ppl = {r["tool"]: r["perplexity"] for r in res["rows"] if (r["method"], r["pattern"]) == (method, label(pattern, sparsity))}
            ours, theirs = ppl.get("sparseforge"), ppl.get("llm-compressor")
            table.append({"method": method, "pattern": label(pattern, sparsity), "seed": seed, "sparseforge": ours,
                          "llm-compressor": theirs, "difference": None if ours is None or theirs is None else ours - theirs})
    return table


def seed_summary(table: list[dict]) -> list[dict]:
    """Per setting over the seeds where both tools have a perplexity: the mean difference and the sign counts.
    A tie is exactly equal perplexity (the same float), as happens when both tools produce the same weights."""
    summary = []
    for method, pattern, sparsity in GRID:
        diffs = [t["difference"] for t in table if (t["method"], t["pattern"]) == (method, label(pattern, sparsity)) and t["difference"] is not None]
        summary.append({"method": method, "pattern": label(pattern, sparsity), "seeds": len(diffs),
                        "mean_difference": sum(diffs) / len(diffs) if diffs else None,
                        "sparseforge_lower": sum(d < 0 for d in diffs), "tied": sum(d == 0 for d in diffs),
                        "llmcompressor_lower": sum(d > 0 for d in diffs)})
    return summary


def write_seeds(dense_row: dict, results: dict[int, dict], env: dict, settings: dict, threads: int, quick: bool, seconds: float) -> None:
    """The multi-seed report: llmcompressor_seeds.json and .md (llmcompressor_compare.* stays the seed-0 record)."""
    seeds = list(results)
    cal = results[seeds[0]]["cal"]
    llmc_env = next((r["llmc_env"] for r in results.values() if r["llmc_env"]), None)
    reasons = {s: r["llmc_reason"] for s, r in results.items() if r["llmc_reason"]}
    table = seed_table(results)
    summary = seed_summary(table)
    name = "llmcompressor_seeds_quick" if quick else "llmcompressor_seeds"
    doc = {"environment": {"sparseforge": env, "llmcompressor": llmc_env}, "llmcompressor_unavailable": reasons or None,
           "seeds": seeds, "calibration": {k: v for k, v in vars(cal).items() if k not in ("device", "seed")}, "eval_settings": settings,
           "sparsegpt": {"blocksize": BLOCKSIZE, "dampening": DAMPENING}, "total_seconds": round(seconds, 1), "dense": dense_row,
           "per_seed": table, "summary": summary, "rows": {str(s): r["rows"] for s, r in results.items()}}
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")

    f = lambda v, fmt: "-" if v is None else fmt.format(v)
    lines = ["| method | pattern | seed | sparseforge | llm-compressor | difference |", "|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['method']} | {t['pattern']} | {t['seed']} | {f(t['sparseforge'], '{:.3f}')} | {f(t['llm-compressor'], '{:.3f}')} | {f(t['difference'], '{:+.3f}')} |")
    summ = ["| method | pattern | seeds | mean difference | sparseforge lower | tied | llm-compressor lower |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        summ.append(f"| {s['method']} | {s['pattern']} | {s['seeds']} | {f(s['mean_difference'], '{:+.4f}')} | {s['sparseforge_lower']} | {s['tied']} | {s['llmcompressor_lower']} |")
    seed_arg = ",".join(map(str, seeds))
    md = (f"# sparseforge vs. llm-compressor on the bundled model, per calibration seed\n\n"
          f"{machine_line(env, threads, llmc_env)} "
          f"Produced by `benchmarks/llmcompressor_compare.py{' --quick' if quick else ''} --seeds {seed_arg}` "
          f"({seconds / 60:.0f} min in all).\n\n"
          + setup_text(cal, f"seeds {seed_arg}, one full comparison per seed") +
          f"perplexity on the held-out plays{' (first ' + str(QUICK_TOKENS) + ' tokens)' if quick else ''}. "
          f"Dense perplexity: {dense_row['perplexity']:.3f}. Difference: sparseforge minus llm-compressor (negative: "
          f"sparseforge lower).\n\n" + "\n".join(lines)
          + "\n\nPer setting, over the seeds where both tools have a perplexity: the mean difference and on how many seeds "
            "each tool has the lower perplexity (tied: exactly the same perplexity).\n\n" + "\n".join(summ)
          + "".join(f"\n\nllm-compressor unavailable for seed {s}: {r}" for s, r in reasons.items())
          + "\n\nSparsity, compress times and the weight comparison per seed are in the JSON; settings that differ "
            "between the tools are listed in the script's docstring.\n")
    (OUT / f"{name}.md").write_text(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON, help="python of the environment with llmcompressor")
    ap.add_argument("--quick", action="store_true", help=f"perplexity on the first {QUICK_TOKENS} held-out tokens only")
    ap.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated calibration seeds, one comparison each (default: 0)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    import torch

    import sparseforge
    from sparseforge.eval.tasks import environment

    start = time.perf_counter()
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    settings = {"max_tokens": QUICK_TOKENS} if args.quick else {}
    threads = torch.get_num_threads()
    # The dense model does not depend on the calibration seed: scored once.
    dense_row = {"tool": "dense", "method": "-", "pattern": "-", **evaluate(dense, tokenizer, settings), "compress_seconds": None}
    print(dense_row, flush=True)
    results = {seed: compare_seed(seed, dense, tokenizer, settings, threads, args.llmc_python) for seed in args.seeds}

    env = environment() | {"torch_threads": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                           "sparseforge": _versions("sparseforge")["sparseforge"]}
    OUT.mkdir(exist_ok=True)
    # Only the default run rewrites llmcompressor_compare.*, the seed-0 record; any other seed list goes to llmcompressor_seeds.*.
    if args.seeds == [0]:
        write_compare(dense_row, results[0], env, settings, threads, args.quick)
    else:
        write_seeds(dense_row, results, env, settings, threads, args.quick, time.perf_counter() - start)


if __name__ == "__main__":
    main()
