"""The user's main job in Python: compress, evaluate, save, load."""
from __future__ import annotations

import copy
import datetime
import os
import time
from typing import Iterable

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import check_calibration_memory
from sparseforge.core.offload import offload_store
from sparseforge.errors import UserInputError
from sparseforge.formats.artifact import load_model, load_tokenizer, save
from sparseforge.methods import get_method
from sparseforge.recipe import Recipe, load_recipe

__all__ = ["compress", "evaluate", "load", "load_tokenizer", "save", "results_document"]


def load(path_or_hub_id: str | os.PathLike | None = None, device: str | None = None, dtype=None, offload: bool | str | os.PathLike = False,
         trust_remote_code: bool = False):
    """A causal LM from a directory, a sparseforge artifact or a hub id (None: the bundled reference model).

    offload=True (or a scratch directory): keep the decoder layers on disk and hold one at a time in memory
    while compressing; such a model can be compressed and saved, not run (save it, then load the result).
    trust_remote_code=True lets a model that ships its own Python modelling code run it (refused otherwise)."""
    return load_model(path_or_hub_id, device=device, dtype=dtype, offload=offload, trust_remote_code=trust_remote_code)


def _check_targets(model, recipe: Recipe) -> None:
    adapter = ModelAdapter(model)
    if not adapter.projections():
        raise UserInputError(
            f"{type(model).__name__} has no linear layers (nn.Linear, Conv1D or expert weights) in its decoder layers; "
            "sparseforge's weight methods need them"
        )
    for i, stage in enumerate(recipe.stages, 1):
        if not adapter.select(stage.targets, stage.ignore):
            raise UserInputError(
                f"stage {i} ({stage.method}): targets {stage.targets} minus ignore {stage.ignore} match no linear layer; "
                f"names look like '{next(iter(adapter.projections()))}'"
            )


def compress(model=None, recipe: Recipe | str | None = None, tokenizer=None, device: str | None = None, progress: bool = True, inplace: bool = False):
    """Apply a recipe's stages in order. Returns `(model, report)` where report lists what each stage did
    and how long it took. `model` may be a loaded model or anything `load` accepts."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if model is None or isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model)
    elif not inplace and offload_store(model) is None:
        # A disk-offloaded model is always compressed in place: its layers change in scratch files, never in
        # the checkpoint it was loaded from.
        model = copy.deepcopy(model)
    _check_targets(model, recipe)
    if device:
        recipe.calibration.device = device
    check_calibration_memory(model, recipe.calibration)
    stages, timings = [], []
    for stage in recipe.stages:
        method = get_method(stage.method)(stage.params)
        start = time.perf_counter()
        stages.append(method.apply(model, tokenizer, stage.targets, stage.ignore, recipe.calibration, progress))
        timings.append(round(time.perf_counter() - start, 3))
    model.sparseforge_info = {
        **(getattr(model, "sparseforge_info", None) or {}),
        "recipe": recipe.to_dict(),
        "stages": [s.to_json() | {"seconds": t} for s, t in zip(stages, timings)],
    }
    return model, {"stages": model.sparseforge_info["stages"], "compress_seconds": round(sum(timings), 3)}


def results_document(model_name: str, recipe: str | None, metrics: dict) -> dict:
    """One results schema for every command: model, recipe, metrics, environment, timestamp."""
    from sparseforge.eval.tasks import environment

    return {
        "model": model_name,
        "recipe": recipe,
        "metrics": metrics,
        "environment": environment(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def evaluate(model, tokenizer, tasks: Iterable[str] | None = None, reference=None, model_dir=None, settings: dict | None = None, model_name: str | None = None) -> dict:
    """Run evaluation tasks and return a results document (see docs/metrics.md for metric names)."""
    from sparseforge.eval.tasks import DEFAULT_TASKS, EvalContext, run_tasks

    context = EvalContext(model=model, tokenizer=tokenizer, reference=reference, model_dir=model_dir, settings=settings or {})
    metrics = run_tasks(context, list(tasks) if tasks else list(DEFAULT_TASKS))
    info = getattr(model, "sparseforge_info", None) or {}
    recipe = (info.get("recipe") or {}).get("name")
    name = model_name or getattr(model, "sparseforge_source", None) or type(model).__name__
    return results_document(str(name), recipe, metrics)
