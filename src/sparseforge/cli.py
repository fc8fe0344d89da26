"""The `sparseforge` command line. Bad input exits with status 2 and one line on stderr; nothing half-written."""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time
import warnings

from sparseforge.errors import EXIT_ENVIRONMENT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER_ERROR, EnvironmentFailure, UserInputError

DEFAULT_RUN_DIR = "sparseforge-out"
# Settings of `sparseforge run`, sized so the main job takes about a minute on 2 CPU cores
# (benchmarks/run_wall_time.py): perplexity on the first 16384 held-out tokens (of 107242), fidelity on 16 windows
# of 512 tokens, retrieval at three lengths and five depths with one episode per cell, speed as the median of 3
# repeats. `run --full` uses eval's defaults instead (the whole text, 20 episodes per cell; several minutes).
RUN_EVAL_SETTINGS = {"max_tokens": 16384, "fidelity_max_windows": 16, "retrieval_per_cell": 1, "speed_repeats": 3, "speed_new_tokens": 32}
TOKENIZER_FREE_TASKS = {"sparsity", "size"}
RUN_TASKS = ("perplexity", "fidelity", "passkey", "multikey", "sparsity", "size", "memory", "speed")
# Speed rows and the metric holding their relative run-to-run spread.
SPEED_SPREAD = {"prefill_tokens_per_s": "speed_prefill_spread", "decode_tokens_per_s": "speed_decode_spread"}
TABLE_ROWS = (
    ("perplexity", "perplexity (held-out)", "{:.2f}"),
    ("kl_to_reference", "KL to dense (nats/token)", "{:.4f}"),
    ("top1_agreement", "top-1 agreement with dense", "{:.3f}"),
    ("passkey_accuracy", "passkey accuracy", "{:.3f}"),
    ("multikey_accuracy", "multi-key accuracy", "{:.3f}"),
    ("sparsity", "weight sparsity (targeted)", "{:.3f}"),
    ("size_bytes", "size on disk (MB)", "mb"),
    ("peak_memory_bytes", "peak memory (MB)", "mb"),
    ("prefill_tokens_per_s", "prefill tokens/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
)


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def side_by_side(columns: dict[str, dict]) -> str:
    """A Markdown table of the headline metrics, one column per model (plus a ratio for two)."""
    names = list(columns)
    header = ["metric", *names] + (["ratio"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, fmt in TABLE_ROWS:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        row = [label, *(_fmt(v, fmt) for v in values)]
        if len(names) == 2:
            a, b = values
            ratio = f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"
            spread = SPEED_SPREAD.get(key)
            if spread and ratio != "-":
                noise = sum(columns[n].get(spread) or 0.0 for n in names)
                if abs(b / a - 1) <= noise:
                    ratio += " (no measurable difference)"
            row.append(ratio)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def speed_note(metrics: dict) -> str:
    """How the speed rows were measured, for the report (empty when speed was not measured)."""
    if "speed_repeats" not in metrics:
        return ""
    return (f" Speed: medians of {metrics['speed_repeats']} repeats after {metrics['speed_warmup']} warm-up run(s) per model; a ratio "
            "closer to 1 than the two models' run-to-run spreads together ((slowest - fastest) / median, in results.json) "
            "is marked \"no measurable difference\".")


def _say(args, *text, file=None) -> None:
    """A status line: silenced by --quiet."""
    if not args.quiet:
        print(*text, flush=True, file=file)


def _result(*text) -> None:
    """A result (the final table, what was written where): printed even with --quiet."""
    print(*text, flush=True)


def cmd_methods(args) -> int:
    from sparseforge.methods import all_methods
    from sparseforge.recipe import presets

    for name, cls in all_methods().items():
        print(f"{name}  [{cls.family}, {cls.lifetime}]  {cls.summary}")
        for p in cls.describe():
            choices = f" (one of {', '.join(p['choices'])})" if p.get("choices") else ""
            print(f"    {p['name']}: {p['type']} = {p['default']!r}  - {p['help']}{choices}")
    print("presets: " + ", ".join(presets()))
    return 0


def cmd_compress(args) -> int:
    from sparseforge import api
    from sparseforge.eval.efficiency import weight_sparsity
    from sparseforge.formats.artifact import check_output_dir, resolve_model_path, save
    from sparseforge.formats.output import check_not_an_input, weights_bytes
    from sparseforge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    source = resolve_model_path(args.model)
    if args.offload_dir is not None:
        check_not_an_input(args.offload_dir, [("input model", source)], "--offload-dir")
    out = check_output_dir(args.out, args.overwrite, [("input model", source), ("offload directory", args.offload_dir)],
                           needed_bytes=weights_bytes(source))
    if args.offload_dir is not None and args.storage != "dense":
        raise UserInputError("--offload-dir writes a dense checkpoint layer by layer; drop --storage compact (convert the result afterwards)")
    trust = args.trust_remote_code
    model = api.load(args.model, offload=args.offload_dir or False, trust_remote_code=trust)
    tokenizer = api.load_tokenizer(args.model, trust_remote_code=trust)
    _say(args, f"compressing {source} with recipe '{recipe.name}' ({len(recipe.stages)} stage(s))")
    try:
        model, report = api.compress(model, recipe, tokenizer, device=args.device, progress=not args.quiet, inplace=True)
        from sparseforge.formats.runtime_state import detached

        with detached(model):  # the plain weights, also those a runtime stage keeps outside the model (offloaded experts)
            sparsity = weight_sparsity(model)
        metrics = {"sparsity": sparsity["sparsity"], "compress_seconds": report["compress_seconds"]}
        save(model, out, tokenizer, recipe=recipe, metrics=metrics, overwrite=args.overwrite, base_model=source, storage=args.storage)
    finally:
        from sparseforge.core.offload import offload_store

        store = offload_store(model)
        if store is not None:
            store.close()  # scratch files go now, not at interpreter exit
    _result(f"wrote {out}  (sparsity {sparsity['sparsity']:.3f}, {report['compress_seconds']:.1f} s)")
    return 0


def cmd_finetune(args) -> int:
    """Train a recipe's recovery stage with progress, evaluation and checkpoints; write the artifact, log and plot."""
    import torch

    from sparseforge import api

    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError:
        raise UserInputError(f"--device '{args.device}' is not a device; use e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is available here; use --device cpu")
    summary = api.finetune(args.model, args.recipe, args.out, data=args.data, steps=args.steps, resume=args.resume,
                           eval_every=args.eval_every, save_every=args.save_every, eval_tokens=args.eval_tokens,
                           overwrite=args.overwrite, progress=not args.quiet, device=args.device)
    t = summary["training"]
    ppl = summary["final_perplexity"]
    _result(f"wrote {args.out}  ({t['method']}: {t['steps']} steps, {t['tokens']} tokens, loss {t['loss_first']:.3f} -> "
            f"{t['loss_last']:.3f}{f', held-out perplexity {ppl:.2f}' if ppl is not None else ''}; pruned positions changed: "
            f"{t['mask_changed']}; log {args.out}/training_log.json, plot {args.out}/loss_curve.png)")
    return 0


def cmd_export(args) -> int:
    from sparseforge import api
    from sparseforge.formats.artifact import check_output_dir, resolve_model_path, save

    source = resolve_model_path(args.model)
    out = check_output_dir(args.dense, args.overwrite, [("input model", source)], "--dense")
    model = api.load(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = _tokenizer_or_none(args.model, model, args.trust_remote_code)
    if args.format == "compressed-tensors":
        from sparseforge.formats.compressed_tensors_export import export_compressed_tensors
        from sparseforge.formats.runtime_state import detached

        with detached(model):
            export_compressed_tensors(model, out, tokenizer, overwrite=args.overwrite)
        _result(f"wrote compressed-tensors (pack-quantized) checkpoint {out}")
        return 0
    info = dict(getattr(model, "sparseforge_info", {}) or {})
    save(model, out, tokenizer, recipe=info.get("recipe"), metrics=info.get("metrics"), overwrite=args.overwrite, base_model=info.get("base_model", source))
    _result(f"wrote plain Hugging Face checkpoint {out}")
    return 0


def cmd_eval(args) -> int:
    from sparseforge import api
    from sparseforge.formats.artifact import resolve_model_path

    from sparseforge.eval.tasks import TASKS

    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise UserInputError(f"--tasks is empty; name at least one of {', '.join(TASKS)}, or leave --tasks out to run them all")
    from sparseforge.eval.tasks import unknown_tasks

    unknown = unknown_tasks(tasks or [])
    if unknown:
        raise UserInputError(f"unknown eval task(s) {', '.join(unknown)}; known tasks: {', '.join(TASKS)}, or lm-eval:NAME")
    # Check every path before loading anything, so a bad one fails fast with one line.
    source = resolve_model_path(args.model)
    if args.reference:
        resolve_model_path(args.reference)
    if args.tokenizer:
        resolve_model_path(args.tokenizer)
    if args.json:
        _check_writable_file(args.json)
    settings = _settings(args)
    settings.update(_lm_eval_settings(args, tasks))
    _check_kernel(args)
    trust = args.trust_remote_code
    model = api.load(args.model, device=args.device, trust_remote_code=trust)
    needs_tokenizer = tasks is None or bool(set(tasks) - TOKENIZER_FREE_TASKS)
    tokenizer = _tokenizer_or_none(args.tokenizer or args.model, model, trust, required=needs_tokenizer)
    reference = api.load(args.reference, device=args.device, trust_remote_code=trust) if args.reference else None
    model_dir = source if pathlib.Path(source).is_dir() else None
    dispatched = _use_kernel(args, model)
    doc = api.evaluate(model, tokenizer, tasks, reference=reference, model_dir=model_dir, settings=settings, model_name=source)
    doc["metrics"].update(dispatched)
    if args.json:
        _write_text(args.json, json.dumps(doc, indent=2) + "\n")
    _result(side_by_side({source: doc["metrics"]}))
    return 0


def _lm_eval_settings(args, tasks) -> dict:
    """Settings of the lm-eval: task prefix, checked before any model is loaded."""
    settings = {}
    if args.lm_eval_include is not None:
        if not pathlib.Path(args.lm_eval_include).is_dir():
            raise UserInputError(f"--lm-eval-include '{args.lm_eval_include}' is not a directory; pass the folder holding the task YAML files")
        settings["lm_eval_include_path"] = str(pathlib.Path(args.lm_eval_include).resolve())
    if args.lm_eval_limit is not None:
        if args.lm_eval_limit < 1:
            raise UserInputError(f"--lm-eval-limit must be at least 1, got {args.lm_eval_limit}")
        settings["lm_eval_limit"] = args.lm_eval_limit
    if any(t.startswith("lm-eval:") for t in tasks or []):
        from sparseforge.eval.lm_eval_bridge import check_lm_eval

        check_lm_eval()
    return settings


def cmd_bench(args) -> int:
    """Dense plus each recipe on one model, resumable, into one results store and a report."""
    from sparseforge.sweep import bench

    recipes = [r.strip() for r in (args.recipes or "").split(",") if r.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    settings = _settings(args)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set takes KEY=VALUE (VALUE in JSON, e.g. efficiency_lengths=[128,512]), got {item!r}")
        try:
            settings[key.strip()] = json.loads(value)
        except ValueError:
            settings[key.strip()] = value
    result = bench(args.model, recipes, args.out, tasks, settings, force=args.force, device=args.device, progress=not args.quiet,
                   say=lambda line: _say(args, line), trust_remote_code=args.trust_remote_code)
    report = result["report"]
    _result(f"{len(result['computed'])} computed, {len(result['skipped'])} skipped; store: {result['store']}; "
            f"report: {report['html'] if report else '-'}")
    return 0


def cmd_report(args) -> int:
    """The HTML (and Markdown) report of a results store, written beside it or into --out."""
    from sparseforge.eval.report import write_report
    from sparseforge.eval.store import read_records

    records = read_records(args.dir)
    source = pathlib.Path(args.dir)
    out = pathlib.Path(args.out) if args.out else (source if source.is_dir() else source.parent)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = write_report(records, out, title=args.title or f"sparseforge results: {source.resolve().name}")
    _result(f"wrote {paths['html']} and {paths['markdown']} ({len(records)} records, {len(paths['plots'])} plots)")
    return 0


def cmd_run(args) -> int:
    import copy

    from sparseforge import api
    from sparseforge.formats.artifact import atomic_directory, resolve_model_path, save
    from sparseforge.formats.output import check_not_an_input
    from sparseforge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    source = resolve_model_path(args.model)
    out = pathlib.Path(args.out or os.path.join(DEFAULT_RUN_DIR, f"run-{recipe.name}"))
    # `run` is the demo job: rerunning it replaces its previous output (atomically), but never a directory
    # that is not a previous run's output, and never the model it reads.
    inputs = [("input model", source)]
    check_not_an_input(out, inputs)
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise UserInputError(f"'{out}' exists and is not the output of an earlier `sparseforge run`; choose another --out")
    settings = _settings(args, {} if args.full else RUN_EVAL_SETTINGS)
    _check_kernel(args)
    with atomic_directory(out, overwrite=True, inputs=inputs) as tmp:
        dense = api.load(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
        tokenizer = api.load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        _say(args, f"[1/4] evaluating dense model {source}")
        dense_doc = api.evaluate(dense, tokenizer, RUN_TASKS, model_dir=source if pathlib.Path(source).is_dir() else None, settings=settings, model_name=source)
        _say(args, f"[2/4] compressing with recipe '{recipe.name}'")
        compressed, report = api.compress(copy.deepcopy(dense), recipe, tokenizer, device=args.device, progress=not args.quiet, inplace=True)
        artifact = tmp / "model"
        save(compressed, artifact, tokenizer, recipe=recipe, base_model=source)
        _say(args, "[3/4] evaluating compressed model against the dense one")
        dispatched = _use_kernel(args, compressed)  # after saving: the artifact holds plain weights either way
        comp_doc = api.evaluate(compressed, tokenizer, RUN_TASKS, reference=dense, model_dir=artifact, settings=settings, model_name=str(out / "model"))
        comp_doc["metrics"].update(compress_seconds=report["compress_seconds"], **dispatched)
        table = side_by_side({"dense": dense_doc["metrics"], recipe.name: comp_doc["metrics"]})
        (tmp / "results.json").write_text(json.dumps([dense_doc, comp_doc], indent=2) + "\n")
        (tmp / "report.md").write_text(_report(source, recipe, table, report, dense_doc["environment"], dispatched,
                                               speed_note(comp_doc["metrics"])))
        _html_report(tmp, dense_doc, comp_doc, recipe, report)
        _say(args, "[4/4] writing artifact and report")
    _result("\n" + table + f"\n\n{speed_note(comp_doc['metrics']).strip()}\ncompressed in {report['compress_seconds']:.1f} s; artifact: {out / 'model'}; report: {out / 'report.md'}")
    return 0


def _html_report(directory: pathlib.Path, dense_doc: dict, comp_doc: dict, recipe, report: dict) -> None:
    """`run`'s report.html (plots under plots/): its two documents as records of the results store."""
    from sparseforge.eval.report import write_report

    records = [{**dense_doc, "recipe": None, "stages": []},
               {**comp_doc, "recipe": recipe.name, "stages": report["stages"], "recipe_spec": recipe.to_dict()}]
    for r in records:
        r["model"] = dense_doc["model"]  # one model, so the compressed record is compared with this dense one
    # run's own report.md stays; the HTML adds the plots (exports are for sweeps).
    write_report(records, directory, title=f"sparseforge run: {recipe.name}", markdown=False, exports=False)


def cmd_generate(args) -> int:
    """Load a saved model with its runtime stages attached and print the text it generates after the prompt."""
    prompt = _generate_prompt(args)
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise UserInputError(f"--temperature must be positive, got {args.temperature}; use e.g. 0.7 (or drop --do-sample for greedy)")
    import torch

    from sparseforge import api
    from sparseforge.formats.artifact import resolve_model_path

    source = resolve_model_path(args.model)
    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError:
        raise UserInputError(f"--device '{args.device}' is not a device; use e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is available here; use --device cpu")
    model = api.load(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    tokenizer = _tokenizer_or_none(args.model, model, args.trust_remote_code)
    ids = tokenizer(prompt, return_tensors="pt")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    prompt_len = ids["input_ids"].shape[1]
    if limit and prompt_len + args.max_new_tokens > limit:
        raise UserInputError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the model's "
                             f"{limit} positions; shorten the prompt or lower --max-new-tokens")
    stages = [s.stage["method"] for s in api.runtime_stages(model)]
    _say(args, f"# {source}: runtime stages {', '.join(stages) if stages else 'none'}", file=sys.stderr)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.do_sample else {"do_sample": False}
    if args.do_sample:
        torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**{k: v.to(model.device) for k, v in ids.items()}, max_new_tokens=args.max_new_tokens,
                             pad_token_id=pad, **sampling)
    print(tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True), flush=True)
    return 0


def _generate_prompt(args) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserInputError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if args.prompt_file is not None:
        path = pathlib.Path(args.prompt_file)
        try:
            prompt = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or type(exc).__name__)
            raise UserInputError(f"cannot read --prompt-file '{path}' ({why}); pass a readable UTF-8 text file") from None
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise UserInputError("the prompt is empty; pass some text with --prompt or a non-empty --prompt-file")
    return prompt


def _check_kernel(args) -> None:
    """Fail before any model is loaded if the chosen kernel cannot run on the chosen device at all."""
    if args.kernel == "dense":
        return
    import torch

    from sparseforge.kernels.base import get_kernel

    kernel, device = get_kernel(args.kernel), torch.device(args.device or "cpu")
    if not any(kernel.supports(device, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)):
        raise UserInputError(f"--kernel {args.kernel} cannot run on {device}: it needs {kernel.summary}; pick another --kernel or --device")


def _use_kernel(args, model) -> dict:
    """Shorthand for a `sparse-kernel` runtime stage: route the model's projections through a sparse kernel
    where a speed gate measured now says it pays."""
    if args.kernel == "dense":
        return {}
    from sparseforge import api

    _say(args, f"measuring the '{args.kernel}' kernel against dense on this model's projection shapes")
    stage = api.attach_method(model, "sparse-kernel", {"kernel": args.kernel})
    _say(args, f"'{args.kernel}' kernel: {len(stage['projections'])} projections routed; sparse chosen for {stage['sparse_cases']} of "
               f"{stage['measured_cases']} measured (shape, token count) cases, dense for the rest")
    gate = api.runtime_stages(model)[-1].state.data["gate"]
    return {"kernel": args.kernel, "kernel_projections": len(stage["projections"]), "kernel_gate": gate}


def _stage_line(stage: dict) -> str:
    """One stage of any family: its name, family and lifetime, then its own scalar fields (lists as counts)."""
    details = []
    for key, value in stage.items():
        if key in ("method", "family", "lifetime", "seconds") or value is None or isinstance(value, dict):
            continue
        details.append(f"{len(value)} {key}" if isinstance(value, list) else f"{key} {value}")
    head = f"- {stage['method']} ({stage.get('family', '?')}, {stage.get('lifetime', 'transform')})"
    return f"{head}: " + ", ".join(details + [f"{stage.get('seconds', 0.0):.2f} s"])


def _report(source, recipe, table, report, env, dispatched=None, note: str = "") -> str:
    stages = "\n".join(_stage_line(s) for s in report["stages"])
    kernel = (f" The compressed model ran its {dispatched['kernel_projections']} projections through the '{dispatched['kernel']}' "
              "kernel wherever the speed gate measured at start-up found it faster (gate timings in results.json); the dense "
              "model used the dense kernels." if dispatched else "")
    return (
        f"# sparseforge run: {recipe.name}\n\nModel: `{source}`\n\nMachine: {env.get('cpu')} ({env.get('cpu_count')} cores), "
        f"device {env.get('device')}, torch {env.get('torch')}, transformers {env.get('transformers')}\n\n"
        f"## Dense vs. compressed\n\n{table}\n\nRatio: compressed / dense.{note}{kernel}\n\n## Stages\n\n{stages}\n\n"
        f"## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n"
    )


def _settings(args, base: dict | None = None) -> dict:
    """Eval settings: `eval` uses the defaults (as the model card does); `run` passes its shorter ones."""
    settings = dict(base or {})
    if getattr(args, "max_tokens", None) is not None:
        if args.max_tokens < 1:  # checked here, before any model is loaded
            raise UserInputError(f"--max-tokens (max_tokens) must be a positive integer, got {args.max_tokens}; pass e.g. 4096 or leave it unset")
        settings["max_tokens"] = args.max_tokens
    per_cell = getattr(args, "retrieval_per_cell", None)
    if per_cell is not None:
        if per_cell < 1:
            raise UserInputError(f"--retrieval-per-cell must be at least 1, got {per_cell}")
        settings["retrieval_per_cell"] = per_cell
    return settings


def _write_text(path: str, text: str) -> None:
    from sparseforge.formats.output import write_text_atomic

    write_text_atomic(_check_writable_file(path), text)


def _tokenizer_or_none(spec, model, trust_remote_code: bool, required: bool = True):
    """The tokenizer of `spec`; failing that, of the model the artifact was made from (its base_model); with
    `required=False` None when neither has one (tasks such as sparsity and size need none)."""
    from sparseforge import api

    try:
        return api.load_tokenizer(spec, trust_remote_code=trust_remote_code)
    except UserInputError as first:
        base = (getattr(model, "sparseforge_info", None) or {}).get("base_model")
        if base:
            try:
                return api.load_tokenizer(base, trust_remote_code=trust_remote_code)
            except UserInputError:
                pass
        if required:
            raise first
        return None


def _check_writable_file(path: str) -> pathlib.Path:
    target = pathlib.Path(path)
    if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UserInputError(f"cannot write '{target}' (a directory, or its directory is missing or not writable); choose another --json path")
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseforge", description="Make transformer LMs sparse, small and fast, and measure it.",
                                     epilog="exit status: 0 ok, 1 internal error, 2 bad input, 3 machine limit (disk full, memory), 130 interrupted")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines (results still print)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--threads", default="auto",
                        help="CPU threads for torch: a number, or auto (the cores other processes are not keeping busy right now)")
    sub = parser.add_subparsers(dest="command", required=True)
    from sparseforge.kernels.base import kernel_names

    kernels = ("dense", *kernel_names())  # --kernel X: shorthand for a sparse-kernel stage with kernel X

    def common(p, model_help="model directory, hub id, or reference-moe for the bundled MoE (default: the bundled reference model)"):
        p.add_argument("--model", default=None, help=model_help)
        p.add_argument("--device", default=None, help="compute device, e.g. cpu or cuda (default: cpu)")
        p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars or status lines (results still print)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow a model that ships its own Python code (auto_map in its config) to run it; read that code first")

    p = sub.add_parser("run", help="the main job: compress the model, evaluate dense vs. compressed, save artifact and report")
    common(p)
    p.add_argument("--recipe", default=None, help="recipe YAML path or preset name (default: the default preset)")
    p.add_argument("--out", default=None, help=f"output directory (default: {DEFAULT_RUN_DIR}/run-RECIPE; replaced if present)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate perplexity on at most this many held-out tokens")
    p.add_argument("--retrieval-per-cell", type=int, default=None,
                   help="passkey/multi-key episodes per (length, depth) cell (default: %(prog)s's own, see docs/metrics.md)")
    p.add_argument("--full", action="store_true",
                   help="the full evaluation of `eval` (all held-out text, 20 retrieval episodes per cell) instead of run's short one")
    p.add_argument("--kernel", default="dense", choices=kernels,
                   help="run the compressed model's projections through this sparse kernel wherever a speed gate, measured at "
                        "start-up on this machine, finds it faster than dense (csr: CPU, float32; 2:4: CUDA, 16-bit)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compress", help="apply a recipe and write an artifact directory")
    common(p)
    p.add_argument("--recipe", required=True, help="recipe YAML path or preset name")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--storage", default="dense", choices=("dense", "compact"),
                   help="dense: plain HF checkpoint (zeros stored); compact: packed sparse weights (load with sparseforge)")
    p.add_argument("--offload-dir", default=None,
                   help="keep decoder layers on disk (scratch files in this directory) and hold one at a time in memory")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("finetune", help="train a recovery stage after pruning (masks kept exactly) with checkpoints and resume")
    common(p, "model or pruned artifact directory (default: the bundled reference model)")
    p.add_argument("--recipe", required=True, help="recipe YAML or preset with one training stage, e.g. recover-perp, recover-lora, recover-spiel")
    p.add_argument("--data", default=None, help="training text: 'bundled' (the calibration text) or a UTF-8 file (default: the stage's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the stage's)")
    p.add_argument("--out", required=True, help="artifact directory to create (with training_log.json and loss_curve.png)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT.checkpoints (same arguments)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every K steps and at the end (0: never)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens each evaluation scores (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps into OUT.checkpoints (0: never)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="write an artifact (e.g. a compact one) as a plain Hugging Face checkpoint, or as compressed-tensors")
    common(p, "artifact directory to export")
    p.add_argument("--dense", "--out", dest="dense", required=True, help="output directory")
    p.add_argument("--format", default="dense", choices=("dense", "compressed-tensors"),
                   help="dense: plain HF checkpoint; compressed-tensors: pack-quantized codes (quantized compact artifacts; vLLM/transformers load it)")
    p.add_argument("--overwrite", action="store_true", help="replace --dense if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="evaluate a model; print metrics and optionally write results JSON")
    common(p)
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all that apply); see docs/metrics.md")
    p.add_argument("--reference", default=None, help="reference model for KL and top-1 agreement")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's own, else its base model's)")
    p.add_argument("--json", default=None, help="write the results document here")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate perplexity on at most this many held-out tokens")
    p.add_argument("--retrieval-per-cell", type=int, default=None,
                   help="passkey/multi-key episodes per (length, depth) cell (default: %(prog)s's own, see docs/metrics.md)")
    p.add_argument("--kernel", default="dense", choices=kernels,
                   help="run the model's projections through this sparse kernel wherever a speed gate, measured at "
                        "start-up on this machine, finds it faster than dense (csr: CPU, float32; 2:4: CUDA, 16-bit)")
    p.add_argument("--lm-eval-include", default=None, help="directory of local lm-evaluation-harness task YAMLs for lm-eval:NAME tasks")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="lm-eval:NAME tasks: at most this many documents per task")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="run a saved model with its runtime stages and print the text it generates")
    common(p, "model or artifact directory (default: the bundled reference model)")
    p.add_argument("--prompt", default=None, help="the prompt text")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this UTF-8 text file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --do-sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed with --do-sample (default: %(default)s)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="sweep: dense plus each recipe, compressed and evaluated, into one resumable results store and a report")
    common(p)
    p.add_argument("--recipes", required=True, help="comma-separated presets or recipe YAML paths")
    p.add_argument("--tasks", default=None, help="comma-separated eval tasks (default: run's tasks plus efficiency)")
    p.add_argument("--out", default=os.path.join(DEFAULT_RUN_DIR, "bench"), help="sweep directory: results.jsonl, report.html, plots/ (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="recompute recipes whose results are already in the store")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate perplexity on at most this many held-out tokens")
    p.add_argument("--retrieval-per-cell", type=int, default=None, help="passkey/multi-key episodes per (length, depth) cell")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an eval setting (docs/metrics.md), VALUE in JSON; repeatable")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="write the HTML and Markdown report of a results store (a bench directory or results.jsonl)")
    p.add_argument("dir", help="bench directory (or its results.jsonl)")
    p.add_argument("--out", default=None, help="directory for report.html, report.md and plots/ (default: beside the store)")
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no status lines")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of an error")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="list registered methods with their parameters, and the presets")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.debug = getattr(args, "debug", False)
    try:
        _set_threads(args.threads)
    except UserInputError as exc:
        return _fail(args, exc, "error:", EXIT_USER_ERROR, str(exc))
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        import transformers

        transformers.utils.logging.disable_progress_bar()
    # transformers' own warnings (e.g. long-sequence tokenizer notices) are noise on this CLI.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")
    # transformers 5.24 renamed `past_key_values` to `cache` in forward(); the old name, which every supported
    # version accepts, keeps working until 5.40 and the notice is attributed to torch's module code.
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
    try:
        return args.func(args) or 0
    except UserInputError as exc:
        return _fail(args, exc, "error:", EXIT_USER_ERROR, str(exc))
    except EnvironmentFailure as exc:
        return _fail(args, exc, "error:", EXIT_ENVIRONMENT, str(exc))
    except KeyboardInterrupt as exc:
        return _fail(args, exc, "interrupted;", EXIT_INTERRUPTED, "nothing was written")
    except MemoryError as exc:
        return _fail(args, exc, "error:", EXIT_ENVIRONMENT, "ran out of memory; use a smaller model, fewer calibration samples, "
                     "or compress with --offload-dir DIR")
    except OSError as exc:
        from sparseforge.formats.output import is_disk_full

        if is_disk_full(exc):
            where = f" in '{exc.filename}'" if exc.filename else ""
            return _fail(args, exc, "error:", EXIT_ENVIRONMENT, f"no space left{where} ({exc.strerror}); free some space or write elsewhere")
        return _fail(args, exc, "error:", EXIT_ENVIRONMENT, f"{exc.strerror or exc}{f' (' + str(exc.filename) + ')' if exc.filename else ''}; "
                     "check the path and its permissions, or rerun with --debug")
    except Exception as exc:  # a bug: one line, the traceback on request
        from sparseforge.formats.output import is_disk_full

        if is_disk_full(exc):
            return _fail(args, exc, "error:", EXIT_ENVIRONMENT, "no space left on the device being written; free some space or write elsewhere")
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return _fail(args, exc, "internal error:", EXIT_INTERNAL, f"{type(exc).__name__}: {first}; rerun with --debug for the traceback and report it")


def busy_cores(interval: float = 0.2) -> float | None:
    """How many cores other processes keep busy right now, from two reads of /proc/stat `interval` seconds apart
    (this process sleeps meanwhile). None where /proc/stat is not available."""
    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def auto_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Threads for torch on a shared machine: the cores that other processes are not already keeping busy.
    torch's thread pool synchronises every operation, so one thread that shares its core with another busy
    process slows all of them: on a 2-core machine with one core busy, 1 thread beats 2."""
    cores = cores or os.cpu_count() or 1
    if busy is None:
        busy = busy_cores()
        if busy is None:
            busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


def _set_threads(value: str) -> None:
    import torch

    if value == "auto":
        torch.set_num_threads(min(torch.get_num_threads(), auto_threads()))
        return
    if not str(value).isdigit() or int(value) < 1:
        raise UserInputError(f"--threads must be a positive integer or 'auto', got {value!r}")
    torch.set_num_threads(int(value))


def _fail(args, exc: BaseException, kind: str, code: int, message: str) -> int:
    if args.debug:
        import traceback

        traceback.print_exception(exc)
    print(f"sparseforge: {kind} {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
