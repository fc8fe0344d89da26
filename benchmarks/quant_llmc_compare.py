"""sparseforge's GPTQ vs. llm-compressor's `GPTQModifier` (W4A16 g128 and W8A16) on the bundled model, both
calibrated on the same token windows (32 x 512, per seed) and evaluated by the same sparseforge code, over
several calibration seeds. The pattern of benchmarks/llmcompressor_compare.py (whose helpers this imports):
llm-compressor runs in its own environment (`--llmc-python`, default $LLMC_PYTHON or /work/venv-llmc/bin/python)
as a worker of this same file, on a fresh copy of the bundled model per setting, `oneshot(..., pipeline=
"sequential")` with `GPTQModifier(targets="Linear", scheme=..., ignore=["lm_head"], block_size=128,
dampening_frac=0.01)`, saved with `save_compressed=False` (its fake-quantized float weights); this process
reads those float weights into a copy of the dense model (scales and zero points are not needed) and scores
held-out perplexity. sparseforge: `gptq` with bits 4 / group 128 and bits 8 / per channel, symmetric, block 128,
dampening 0.01, no activation order. "compress s" is each tool's own wall time of its compress call.

Resumable: rows (seed, scheme, tool) already in the JSON with the same evaluation settings are kept and not
re-run, so `--schemes W8A16` adds that scheme beside the W4A16 rows measured before. Each row records its threads.

Writes benchmarks/results/quant_llmc_compare.json and .md.
Usage: python benchmarks/quant_llmc_compare.py [--seeds 0,1,2,3,4] [--schemes W8A16] [--threads 1] [--max-tokens 16384] [--llmc-python PATH] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "results"
SCHEMES = {"W4A16 g128": {"bits": 4, "group_size": 128}, "W8A16": {"bits": 8, "group_size": 0}}


def worker(spec_path: str) -> None:
    from llmcompressor_compare import _versions

    spec = json.loads(pathlib.Path(spec_path).read_text())
    env = {"python": sys.version.split()[0], "platform": platform.platform()}
    runs = []
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    env.update(_versions("llmcompressor", "compressed-tensors", "torch", "transformers"))
    cal = json.loads(pathlib.Path(spec["calibration"]).read_text())
    ids = cal["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    for run in spec["runs"]:
        entry = dict(run)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
            modifier = GPTQModifier(targets="Linear", scheme=run["llmc_scheme"], ignore=["lm_head"], block_size=128, dampening_frac=0.01)
            entry["modifier"] = json.loads(modifier.model_dump_json(include={"scheme", "targets", "ignore", "block_size", "dampening_frac", "actorder"}))
            start = time.perf_counter()
            oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=len(ids), max_seq_length=cal["seq_len"],
                    shuffle_calibration_samples=False, batch_size=1, pipeline="sequential")
            entry["compress_seconds"] = round(time.perf_counter() - start, 2)
            out_dir = pathlib.Path(spec["out_root"]) / run["name"].replace(" ", "_")
            model.save_pretrained(out_dir, save_compressed=False)
            entry["model_dir"] = str(out_dir)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        runs.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "modifier"}), flush=True)
    pathlib.Path(spec["result"]).write_text(json.dumps({"environment": env, "runs": runs}, indent=2))


def run_llmc(llmc_python: str, spec: dict, workdir: pathlib.Path) -> tuple[dict | None, str | None]:
    """This file as the worker in the llm-compressor interpreter (llmcompressor_compare.run_llmc starts its own file)."""
    import subprocess

    if not pathlib.Path(llmc_python).exists():
        return None, f"no llm-compressor interpreter at {llmc_python} (pass --llmc-python)"
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(HERE)})
    proc = subprocess.run([llmc_python, str(pathlib.Path(__file__).resolve()), "--worker", str(workdir / "spec.json")],
                          env=env, cwd=workdir, capture_output=True, text=True)
    log = (proc.stdout + proc.stderr).strip()
    result = json.loads(pathlib.Path(spec["result"]).read_text()) if pathlib.Path(spec["result"]).is_file() else None
    if proc.returncode != 0:
        return result, f"llm-compressor worker failed (exit {proc.returncode}): {log.splitlines()[-1] if log else ''}"
    return result, None


def load_float_weights(dense, model_dir: str):
    """A copy of `dense` with every tensor of the checkpoint that the dense model has (quantization
    parameters such as weight_scale are skipped; every dense tensor but a tied lm_head must be present)."""
    import copy

    import torch
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    model = copy.deepcopy(dense)
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"checkpoint lacks {missing[:3]}")
    with torch.no_grad():
        for k in own:
            if k in tensors:
                own[k].copy_(tensors[k].to(own[k].dtype))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON", "/work/venv-llmc/bin/python"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset of: " + ", ".join(SCHEMES))
    ap.add_argument("--max-tokens", type=int, default=None, help="score perplexity on the first N held-out tokens only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    import sparseforge
    from sparseforge.core.calibration import CalibrationConfig, calibration_batches
    from sparseforge.eval.tasks import EvalContext, environment, run_tasks
    from sparseforge.formats.artifact import resolve_model_path
    from sparseforge.methods import get_method
    from sparseforge.recipe import Recipe, Stage

    torch.set_num_threads(args.threads)
    threads = args.threads
    tokenizer = sparseforge.load_tokenizer()
    dense = sparseforge.load()
    settings = {"max_tokens": 4096} if args.quick else ({"max_tokens": args.max_tokens} if args.max_tokens else {})
    schemes = {k: SCHEMES[k] for k in args.schemes.split(",")}
    ppl = lambda m: run_tasks(EvalContext(m, tokenizer, settings=settings), ["perplexity"])["perplexity"]  # noqa: E731
    name_out = "quant_llmc_compare" + ("_quick" if args.quick else "")
    previous = json.loads((OUT / f"{name_out}.json").read_text()) if (OUT / f"{name_out}.json").is_file() else {}
    same = previous.get("settings") == settings
    rows = [dict(r, threads=r.get("threads", previous.get("threads"))) for r in previous.get("rows", [])] if same else []
    llmc_env, reasons = (previous.get("llmc_environment") if same else None), []
    have = {(r["seed"], r["scheme"], r["tool"]) for r in rows if r.get("perplexity") is not None}
    dense_ppl = previous["dense_perplexity"] if same and "dense_perplexity" in previous else ppl(dense)
    schemes_all = {k: SCHEMES[k] for k in SCHEMES if k in schemes or any(r["scheme"] == k for r in rows)}
    for seed in [int(s) for s in args.seeds.split(",")]:
        cal = CalibrationConfig(seed=seed)
        batches = calibration_batches(tokenizer, cal)
        for name, params in schemes.items():
            if (seed, name, "sparseforge") in have:
                continue
            recipe = Recipe(name, [Stage("gptq", get_method("gptq").parse_params(params))], cal)
            start = time.perf_counter()
            q, _ = sparseforge.compress(dense, recipe, tokenizer, progress=False)
            rows.append({"seed": seed, "scheme": name, "tool": "sparseforge", "perplexity": ppl(q), "compress_seconds": round(time.perf_counter() - start, 2),
                         "threads": threads, "load_average": round(os.getloadavg()[0], 1)})
            print(rows[-1], flush=True)
        todo = [n for n in schemes if (seed, n, "llm-compressor") not in have]
        if not todo:
            continue
        with tempfile.TemporaryDirectory(prefix="llmc-gptq-") as tmp:
            tmp = pathlib.Path(tmp)
            (tmp / "calibration.json").write_text(json.dumps({"seq_len": cal.seq_len, "input_ids": [b[0].tolist() for b in batches]}))
            shutil.copytree(resolve_model_path(None), tmp / "model")
            spec = {"calibration": str(tmp / "calibration.json"), "model_dir": str(tmp / "model"), "out_root": str(tmp / "out"),
                    "result": str(tmp / "result.json"), "threads": threads,
                    "runs": [{"name": n, "llmc_scheme": n.split()[0]} for n in todo]}
            result, reason = run_llmc(args.llmc_python, spec, tmp)
            if reason:
                reasons.append(reason)
            llmc_env = (result or {}).get("environment", llmc_env)
            for run in (result or {}).get("runs", []):
                row = {"seed": seed, "scheme": run["name"], "tool": "llm-compressor", "perplexity": None, "compress_seconds": run.get("compress_seconds"),
                       "modifier": run.get("modifier"), "threads": threads}
                if run.get("model_dir"):
                    row["perplexity"] = ppl(load_float_weights(dense, run["model_dir"]))
                else:
                    row["unavailable"] = run.get("error")
                row["load_average"] = round(os.getloadavg()[0], 1)
                rows.append(row)
                print(rows[-1], flush=True)
        report(args, rows, llmc_env, reasons, schemes_all, threads, dense_ppl, settings)  # after every seed
    report(args, rows, llmc_env, reasons, schemes_all, threads, dense_ppl, settings)


def report(args, rows, llmc_env, reasons, schemes, threads, dense_ppl, settings) -> None:
    import statistics

    from sparseforge.eval.tasks import environment

    summary = []
    for name in schemes:
        for tool in ("sparseforge", "llm-compressor"):
            vals = [r["perplexity"] for r in rows if r["scheme"] == name and r["tool"] == tool and r["perplexity"] is not None]
            secs = [r["compress_seconds"] for r in rows if r["scheme"] == name and r["tool"] == tool and r["compress_seconds"] is not None]
            if vals:
                summary.append({"scheme": name, "tool": tool, "seeds": len(vals), "mean_perplexity": statistics.mean(vals),
                                "spread": max(vals) - min(vals), "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                "mean_compress_seconds": statistics.mean(secs),
                                "threads": sorted({r.get("threads") for r in rows if r["scheme"] == name and r["tool"] == tool and r.get("threads")})})
    doc = {"environment": environment(), "llmc_environment": llmc_env, "threads": threads, "dense_perplexity": dense_ppl, "rows": rows,
           "summary": summary, "unavailable": reasons, "settings": settings}
    name = "quant_llmc_compare" + ("_quick" if args.quick else "")
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    env = doc["environment"]
    md = [f"# GPTQ: sparseforge vs. llm-compressor on the bundled model\n",
          f"Machine: {env['cpu']} ({env['cpu_count']} cores, shared with other jobs), torch {env['torch']} (llm-compressor: "
          f"{(llmc_env or {}).get('llmcompressor')} with torch {(llmc_env or {}).get('torch')}, transformers {(llmc_env or {}).get('transformers')}), "
          "threads per row below (the W4A16 rows were measured at 2 threads in an earlier run, W8A16 at 1; compress times compare within a "
          "scheme). Same 32 x 512 calibration windows per seed for both tools; held-out perplexity by sparseforge's code "
          f"(dense {dense_ppl:.2f}{', first ' + str(settings['max_tokens']) + ' tokens' if settings.get('max_tokens') else ''}). Written by `benchmarks/quant_llmc_compare.py`.\n",
          "| scheme | tool | seeds | mean perplexity | spread (max - min) | stdev | mean compress s | threads |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {s['scheme']} | {s['tool']} | {s['seeds']} | {s['mean_perplexity']:.3f} | {s['spread']:.3f} | {s['stdev']:.3f} | {s['mean_compress_seconds']:.1f} | "
           f"{'/'.join(map(str, s['threads']))} |" for s in summary]
    md += ["", "| seed | scheme | tool | perplexity | compress s | threads | load average |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['seed']} | {r['scheme']} | {r['tool']} | {'-' if r['perplexity'] is None else format(r['perplexity'], '.3f')} | {r['compress_seconds']} | "
           f"{r.get('threads', '-')} | {r.get('load_average', '-')} |" for r in rows]
    if reasons:
        md += ["", "llm-compressor unavailable: " + "; ".join(sorted(set(reasons)))]
    (OUT / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))



if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
