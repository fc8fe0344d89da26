"""lm-evaluation-harness on a sparseforge model: `--tasks lm-eval:TASK[,lm-eval:TASK2]`.

The model goes to lm-eval as it is, runtime stages attached (KV presses, activation sparsity, sparse kernels act
in every forward lm-eval makes), wrapped as `HFLM(pretrained=model, tokenizer=tokenizer)`, the wrapping lm-eval
itself recommends for an already-loaded model. Tasks are lm-eval's own or local YAML task definitions in
`lm_eval_include_path` (lm-eval's `--include_path`), which is how the test runs offline over a dataset file in
the repository. lm-eval is an optional dependency: `pip install 'sparseforge[eval]'`.

Metrics come back flat, as `lm_eval/TASK/METRIC` (lm-eval's "acc,none" becomes "acc"; another filter stays as
"METRIC,FILTER"), plus `lm_eval_version`, `lm_eval_limit` and `lm_eval_samples` ({task: documents scored}).
"""
from __future__ import annotations

import logging
import os

from sparseforge.errors import UserInputError

PREFIX = "lm_eval/"


def check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserInputError("lm-eval:NAME tasks need lm-evaluation-harness: pip install 'sparseforge[eval]'") from None


_MANAGERS: dict = {}


def _task_manager(TaskManager, include_path, tasks):
    """Local tasks alone where they are all the run needs: indexing lm-eval's thousands of bundled task YAMLs
    takes tens of seconds, so that index is built only when a task is not local, and once per process."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    key = str(include_path)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include_path) if include_path else TaskManager()
    return _MANAGERS[key]


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None, batch_size: int = 1) -> dict:
    check_lm_eval()
    if tokenizer is None:
        raise UserInputError("lm-eval:NAME tasks need the model's tokenizer; pass --tokenizer")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = _task_manager(TaskManager, include_path, tasks)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in '{include_path}'" if include_path else " (pass --lm-eval-include DIR for local task YAMLs)"
        raise UserInputError(f"lm-eval knows no task {', '.join(missing)} among its own{where}")
    # Everything lm-eval loads must come from local files: its hub-backed datasets cannot be fetched here, and a
    # local task must not quietly fall back to the hub.
    offline = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    level = logging.getLogger("lm-eval").level
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                          fewshot_random_seed=0)
    finally:
        logging.getLogger("lm-eval").setLevel(level)
        for k, v in offline.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    metrics: dict = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            # sample_len is a count lm-eval puts beside the metrics; it is in lm_eval_samples.
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name = key.removesuffix(",none")
            metrics[f"{PREFIX}{task}/{name}"] = float(value)
    metrics["lm_eval_version"] = getattr(lm_eval, "__version__", None)
    metrics["lm_eval_limit"] = limit
    metrics["lm_eval_samples"] = {t: (n.get("effective") if isinstance(n, dict) else n) for t, n in (results.get("n-samples") or {}).items()}
    return metrics
