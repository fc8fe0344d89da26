"""The user's main job in Python: compress, evaluate, save, load; and the runtime stages a model carries."""
from __future__ import annotations

import copy
import datetime
import json
import os
import time
from typing import Iterable

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import check_calibration_memory
from sparseforge.core.offload import offload_store
from sparseforge.errors import UserInputError
from sparseforge.formats.artifact import load_model, load_tokenizer, save
from sparseforge.methods import get_method
from sparseforge.methods.base import AttachedStage, RuntimeContext, attach_stages, attached_stages, detach_stages
from sparseforge.recipe import Recipe, check_stage_order, load_recipe

__all__ = ["compress", "finetune", "evaluate", "load", "load_tokenizer", "save", "results_document", "attach_runtime", "detach_runtime",
           "runtime_stages", "attach_method"]


def load(path_or_hub_id: str | os.PathLike | None = None, device: str | None = None, dtype=None, offload: bool | str | os.PathLike = False,
         trust_remote_code: bool = False, runtime: bool = True):
    """A causal LM from a directory, a sparseforge artifact or a hub id (None: the bundled reference model).

    runtime=True attaches the runtime stages saved with an artifact (KV presses, sparse kernels, ...), so the
    model runs as compressed; runtime=False gives the plain weights.
    offload=True (or a scratch directory): keep the decoder layers on disk and hold one at a time in memory
    while compressing; such a model can be compressed and saved, not run (save it, then load the result).
    trust_remote_code=True lets a model that ships its own Python modelling code run it (refused otherwise)."""
    from sparseforge.formats import runtime_state

    model = load_model(path_or_hub_id, device=device, dtype=dtype, offload=offload, trust_remote_code=trust_remote_code,
                       leave_self_loaded=runtime and not offload)
    if runtime and not offload:
        runtime_state.attach_saved(model)
    return model


def runtime_stages(model) -> list[AttachedStage]:
    """The runtime stages attached to `model`, in attach order (each: stage dict, method instance, state)."""
    return attached_stages(model)


def detach_runtime(model) -> list[AttachedStage]:
    """Detach every runtime stage; the model then computes exactly what its plain weights compute. Returns the
    stages, which `attach_runtime(model, stages)` attaches again."""
    return detach_stages(model)


def attach_runtime(model, stages: list[AttachedStage]) -> list[AttachedStage]:
    """Attach runtime stages (as `detach_runtime` or `runtime_stages` returned them) in order, with their states."""
    return attach_stages(model, stages)


def attach_method(model, method: str, params: dict | None = None, targets=("*",), ignore=(), tokenizer=None,
                  calibration=None, progress: bool = False) -> dict:
    """Calibrate one runtime method on `model` and attach it, outside any recipe (what `--kernel` does).
    Returns its stage report."""
    cls = get_method(method)
    if cls.lifetime != "runtime":
        raise UserInputError(f"'{method}' is a {cls.lifetime} method; attach_method takes runtime methods, compress applies the rest")
    from sparseforge.recipe import Stage

    stage = Stage(cls.name, cls.parse_params(params or {}), list(targets), list(ignore))
    return _run_stage(model, stage, tokenizer, calibration, progress)


def _run_stage(model, stage, tokenizer, calibration, progress) -> dict:
    """Run one recipe stage: a transform's `apply`, or a runtime method's `calibrate` then `attach`. Returns the
    family-neutral stage report: method, family, lifetime, seconds, plus what the method itself reports."""
    from sparseforge.core.calibration import CalibrationConfig

    cls = get_method(stage.method)
    method = cls(stage.params)
    calibration = calibration or CalibrationConfig()
    start = time.perf_counter()
    if cls.lifetime == "runtime":
        context = RuntimeContext(tokenizer, calibration, progress, list(stage.targets), list(stage.ignore))
        state = method.calibrate(model, context)
        attach_stages(model, [AttachedStage(stage.to_dict(), method, state)])
        fields = method.report(state)
    else:
        fields = method.apply(model, tokenizer, stage.targets, stage.ignore, calibration, progress).to_json()
    seconds = round(time.perf_counter() - start, 3)
    # Through JSON once, so the report in memory is the one sparseforge.json gives back (OWL's int layer keys
    # become strings). A method may name itself more precisely (OWL reports "owl+wanda").
    fields = json.loads(json.dumps(fields))
    return {"method": fields.pop("method", cls.name), "family": cls.family, "lifetime": cls.lifetime, **fields, "seconds": seconds}


def _check_targets(model, recipe: Recipe) -> None:
    adapter = ModelAdapter(model)
    if not adapter.projections():
        raise UserInputError(
            f"{type(model).__name__} has no linear layers (nn.Linear, Conv1D or expert weights) in its decoder layers; "
            "sparseforge's weight methods need them"
        )
    for i, stage in enumerate(recipe.stages, 1):
        # Runtime methods interpret their globs themselves (projections, attention modules, ...).
        if get_method(stage.method).lifetime == "transform" and not adapter.select(stage.targets, stage.ignore):
            raise UserInputError(
                f"stage {i} ({stage.method}): targets {stage.targets} minus ignore {stage.ignore} match no linear layer; "
                f"names look like '{next(iter(adapter.projections()))}'"
            )


def compress(model=None, recipe: Recipe | str | None = None, tokenizer=None, device: str | None = None, progress: bool = True, inplace: bool = False):
    """Apply a recipe's stages in order: a transform changes the weights, a runtime stage is calibrated on the
    model the transforms before it produced and stays attached (saved with the model by `save`). Returns
    `(model, report)`: report["stages"] says what each stage did (method, family, lifetime, seconds, and the
    method's own fields) and report["compress_seconds"] the total. `model` may be a loaded model or anything
    `load` accepts. Runtime stages the model already carried (from its artifact) are detached and dropped: the
    new recipe says what runs."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_stage_order(recipe.stages)
    if model is None or isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model)
    elif not inplace and offload_store(model) is None:
        # A disk-offloaded model is always compressed in place: its layers change in scratch files, never in
        # the checkpoint it was loaded from. The copy is taken with the runtime stages detached: hooks' closures
        # are not deep-copied and would keep acting on the original's modules.
        from sparseforge.formats.runtime_state import detached

        with detached(model):
            model = copy.deepcopy(model)
    _check_targets(model, recipe)
    if offload_store(model) is not None and any(get_method(s.method).lifetime == "runtime" for s in recipe.stages):
        raise UserInputError("runtime stages run the whole model, which a disk-offloaded model cannot; compress the transforms "
                             "with offload, then load the result in memory and compress again with the runtime stages")
    if device:
        recipe.calibration.device = device
    check_calibration_memory(model, recipe.calibration)
    detach_stages(model)
    reports = [_run_stage(model, stage, tokenizer, recipe.calibration, progress) for stage in recipe.stages]
    model.sparseforge_info = {
        **(getattr(model, "sparseforge_info", None) or {}),
        "recipe": recipe.to_dict(),
        "stages": reports,
    }
    return model, {"stages": reports, "compress_seconds": round(sum(r["seconds"] for r in reports), 3)}


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


def checkpoint_dir_for(out: str | os.PathLike) -> "os.PathLike":
    """Where `finetune` keeps the checkpoints of a run writing `out`: the sibling folder `OUT.checkpoints`
    (the output itself appears only at the end, atomically)."""
    import pathlib

    out = pathlib.Path(out).expanduser()
    return out.parent / f"{out.name}.checkpoints"


def finetune(model=None, recipe: Recipe | str | None = None, out: str | os.PathLike | None = None, tokenizer=None, data: str | None = None,
             steps: int | None = None, resume: bool = False, eval_every: int = 0, save_every: int = 0, eval_tokens: int = 4096,
             overwrite: bool = False, progress: bool = True, device: str | None = None, _stop_after: int | None = None) -> dict:
    """Run a recipe whose one training stage (`perp`, `masked-finetune`, `lora`, `spiel`) trains with checkpoints,
    evaluation and resume, and write the result to `out` atomically: the artifact (as `compress` + `save` would),
    `training_log.json` (loss, learning rate and tokens/s per step; held-out perplexity every `eval_every` steps)
    and `loss_curve.png`. Stages before the training stage run first, as in `compress`; runtime stages after it
    are calibrated on the trained model. `data` ("bundled" or a file) and `steps` override the training stage's.
    Checkpoints go to `OUT.checkpoints` every `save_every` steps and are removed once `out` is written; `resume`
    continues from the last one, bit-identically on CPU (same thread count). Returns the training report."""
    import dataclasses
    import pathlib

    from sparseforge.core.sparsity_masks import check_declared_patterns
    from sparseforge.data import read_text
    from sparseforge.eval.perplexity import perplexity
    from sparseforge.formats.artifact import atomic_directory, check_output_dir, resolve_model_path
    from sparseforge.methods.training.trainer import RunOptions, log_document, train, write_loss_curve

    if out is None:
        raise UserInputError("finetune needs an output directory (--out)")
    for flag, value in (("--eval-every", eval_every), ("--save-every", save_every)):
        if value < 0:
            raise UserInputError(f"{flag} must be 0 (never) or a positive number of steps, got {value}")
    if eval_tokens < 2:
        raise UserInputError(f"--eval-tokens must be at least 2, got {eval_tokens}")
    if steps is not None and steps < 1:
        raise UserInputError(f"--steps must be at least 1, got {steps}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    training = [i for i, s in enumerate(recipe.stages) if get_method(s.method).family == "training"]
    if len(training) != 1:
        raise UserInputError(f"recipe '{recipe.name}' has {len(training)} training stages; finetune needs exactly one "
                             "(e.g. the preset recover-perp, or a pruning stage followed by one)")
    at = training[0]
    if any(get_method(s.method).lifetime == "transform" for s in recipe.stages[at + 1:]):
        raise UserInputError(f"recipe '{recipe.name}' changes weights after its training stage; put the training stage last among the transforms")
    stage = recipe.stages[at]
    cls = get_method(stage.method)
    changes = {}
    if data is not None:
        changes["data"] = "calibration" if data == "bundled" else str(data)
    if steps is not None:
        changes["steps"] = steps
    if changes:
        raw = {**dataclasses.asdict(stage.params), **changes}
        stage.params = cls.parse_params(raw, "finetune")
    from sparseforge.methods.training.trainer import training_text

    training_text(stage.params.data)  # a missing or held-out file fails now, before any model is loaded
    source = resolve_model_path(model) if model is None or isinstance(model, (str, os.PathLike)) else getattr(model, "sparseforge_source", None)
    out = check_output_dir(out, overwrite, [("input model", source)])
    ckpt = pathlib.Path(checkpoint_dir_for(out))
    from sparseforge.methods.training.trainer import latest_checkpoint

    if resume and latest_checkpoint(ckpt) is None:
        raise UserInputError(f"--resume: no complete checkpoint in '{ckpt}'; run without --resume to start afresh")
    if not resume and ckpt.exists() and any(ckpt.iterdir()):
        raise UserInputError(f"'{ckpt}' holds checkpoints of an earlier run; pass --resume to continue it, or remove that folder")
    check_stage_order(recipe.stages)
    if model is None or isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, device=device)
    elif device:
        model.to(device)
    if tokenizer is None:
        raise UserInputError("finetune needs the model's tokenizer")
    _check_targets(model, recipe)
    check_calibration_memory(model, recipe.calibration)
    detach_stages(model)
    previous = list((getattr(model, "sparseforge_info", None) or {}).get("stages", []))
    heldout = read_text("heldout")

    def evaluate_heldout(work) -> dict:
        return {"perplexity": perplexity(work, tokenizer, heldout, max_tokens=eval_tokens)["perplexity"]}

    fingerprint = {"model": str(source), "recipe": json.loads(json.dumps(recipe.to_dict())), "sparseforge": _version()}
    run = RunOptions(checkpoint_dir=ckpt, save_every=save_every, eval_every=eval_every, evaluate=evaluate_heldout if eval_every else None,
                     resume=resume, fingerprint=fingerprint, stop_after=_stop_after)
    reports = []
    result = None
    for i, s in enumerate(recipe.stages):
        if i != at:
            reports.append(_run_stage(model, s, tokenizer, recipe.calibration, progress))
            continue
        start = time.perf_counter()
        result = train(get_method(s.method)(s.params), model, tokenizer, s.targets, s.ignore, progress=progress, run=run)
        fields = json.loads(json.dumps(result.to_json()))
        reports.append({"method": fields.pop("method"), "family": cls.family, "lifetime": cls.lifetime, **fields,
                        "seconds": round(time.perf_counter() - start, 3)})
    model.sparseforge_info = {**(getattr(model, "sparseforge_info", None) or {}), "recipe": recipe.to_dict(), "stages": previous + reports}
    patterns = check_declared_patterns(model)
    summary = {"training": reports[at], "mask_report": result.mask_report.to_json(), "declared_patterns": patterns,
               "final_perplexity": result.log.evals[-1]["perplexity"] if result.log.evals else None}
    with atomic_directory(out, overwrite, [("input model", source)]) as tmp:
        # The output is the artifact itself (sparseforge.load(out) works), with the log and the plot beside its files.
        save(model, tmp, tokenizer, recipe=recipe, metrics={"training": summary}, overwrite=True, base_model=str(source) if source else None)
        (tmp / "training_log.json").write_text(json.dumps(log_document(result.log, summary), indent=2) + "\n", encoding="utf-8")
        write_loss_curve(result.log, tmp / "loss_curve.png", f"{recipe.name}: {stage.method}")
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def _version() -> str:
    import sparseforge

    return sparseforge.__version__
