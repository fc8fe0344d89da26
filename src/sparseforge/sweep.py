"""`sparseforge bench`: dense plus each recipe, compressed then evaluated, one record per (model, recipe, task
settings, machine) appended to the store in the output directory (`eval/store.py`), then the report.

Resumable: a record already in the store is not computed again (unless `force`), and every finished record is
on disk before the next recipe starts, so a sweep killed at any point (SIGKILL included) reruns only what is
missing. A compressed model's artifact, needed for its size on disk, goes to a scratch folder that the next run
removes if the process that made it is gone.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import tempfile
import time
from typing import Callable

from sparseforge.errors import UserInputError
from sparseforge.eval.store import SCHEMA, STORE_FILE, append_record, read_records, record_key

# Tasks and settings of a sweep: run's short evaluation plus the EfficientLLM metrics.
BENCH_TASKS = ("perplexity", "fidelity", "passkey", "multikey", "sparsity", "size", "memory", "speed", "efficiency")
BENCH_SETTINGS = {"max_tokens": 16384, "fidelity_max_windows": 16, "retrieval_per_cell": 1, "speed_repeats": 3, "speed_new_tokens": 32}


def check_bench_dir(out: pathlib.Path, inputs) -> None:
    """A sweep writes into a new or empty directory, or resumes one holding its store; anything else is refused."""
    from sparseforge.formats.output import check_not_an_input

    check_not_an_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STORE_FILE).is_file():
        raise UserInputError(f"'{out}' is not empty and holds no {STORE_FILE} of an earlier sweep; choose a new or empty --out")


def bench(model: str | None = None, recipes: list[str] = (), out: str | os.PathLike = "sparseforge-bench", tasks=None,
          settings: dict | None = None, force: bool = False, device: str | None = None, progress: bool = True,
          say: Callable[[str], None] = print, trust_remote_code: bool = False, report: bool = True) -> dict:
    """Run the sweep; returns {"store": path, "computed": [labels], "skipped": [labels], "report": paths or None}."""
    from sparseforge import api
    from sparseforge.eval.tasks import EvalContext, environment, unknown_tasks
    from sparseforge.formats.artifact import resolve_model_path, save
    from sparseforge.formats.output import remove_stale_scratch, scratch_prefix
    from sparseforge.recipe import load_recipe

    if not recipes:
        raise UserInputError("--recipes is empty; name at least one preset or recipe YAML (see `sparseforge methods`)")
    loaded = [load_recipe(r) for r in recipes]  # every recipe checked before any work
    names = [r.name for r in loaded]
    if len(set(names)) != len(names):
        raise UserInputError(f"recipe names repeat in --recipes ({', '.join(names)}); each recipe once")
    tasks = list(tasks or BENCH_TASKS)
    bad = unknown_tasks(tasks)
    if bad:
        raise UserInputError(f"unknown eval task(s) {', '.join(bad)}")
    settings = {**BENCH_SETTINGS, **(settings or {})}
    EvalContext(model=None, tokenizer=None, text="", settings=settings)  # rejects unknown settings now
    source = resolve_model_path(model)
    out = pathlib.Path(out).expanduser()
    check_bench_dir(out, [("input model", source)])
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out)
    env = environment()
    identity = {"tasks": tasks, "eval": settings}
    existing = {r.get("record_key") for r in read_records(out)} if (out / STORE_FILE).is_file() else set()
    plan = [(None, None)] + [(r.name, r) for r in loaded]
    keys = {name: record_key(source, name, {**identity, "recipe": r.to_dict() if r else None}, env) for name, r in plan}
    todo = [(n, r) for n, r in plan if force or keys[n] not in existing]
    skipped = [n or "dense" for n, r in plan if (n, r) not in todo]
    for name in skipped:
        say(f"{name}: results exist in {out / STORE_FILE}, skipped (--force recomputes)")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), initial=len(skipped), desc="bench", unit="recipe", disable=not progress)
    computed = []
    dense = tokenizer = None
    try:
        for name, recipe in todo:
            if dense is None:
                dense = api.load(source, device=device, trust_remote_code=trust_remote_code)
                tokenizer = api.load_tokenizer(source, trust_remote_code=trust_remote_code)
            label = name or "dense"
            bar.set_postfix_str(label)
            start = time.perf_counter()
            if recipe is None:
                doc = api.evaluate(dense, tokenizer, tasks, model_dir=source if pathlib.Path(source).is_dir() else None,
                                   settings=settings, model_name=source)
                stages, compress_s = [], None
            else:
                compressed, rep = api.compress(copy.deepcopy(dense), recipe, tokenizer, device=device, progress=False, inplace=True)
                with tempfile.TemporaryDirectory(prefix=scratch_prefix(label, "bench"), dir=out) as scratch:
                    artifact = pathlib.Path(scratch) / "model"
                    save(compressed, artifact, tokenizer, recipe=recipe, base_model=source)
                    doc = api.evaluate(compressed, tokenizer, tasks, reference=dense, model_dir=artifact, settings=settings, model_name=source)
                doc["recipe"] = name
                stages, compress_s = rep["stages"], rep["compress_seconds"]
                doc["metrics"]["compress_seconds"] = compress_s
                del compressed
            seconds = time.perf_counter() - start
            record = {"schema": SCHEMA, "record_key": keys[name], **doc, "recipe_spec": recipe.to_dict() if recipe else None,
                      "stages": stages, "tasks": tasks, "settings": identity, "wall_seconds": round(seconds, 2)}
            append_record(out, json.loads(json.dumps(record, default=str)))
            computed.append(label)
            headline = doc["metrics"].get("perplexity")
            bar.update(1)
            say(f"{label}: done in {seconds:.1f} s" + (f" (perplexity {headline:.2f})" if isinstance(headline, float) else ""))
    finally:
        bar.close()
    paths = None
    if report:
        from sparseforge.eval.report import write_report

        paths = write_report(read_records(out), out, title=f"sparseforge bench: {pathlib.Path(source).name}")
    return {"store": out / STORE_FILE, "computed": computed, "skipped": skipped, "report": paths}
