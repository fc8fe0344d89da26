"""Registry of evaluation tasks for the CLI (`--tasks perplexity,passkey,...`).

Each task is a function `EvalContext -> {metric name: value}` with flat, task-prefixed metric names, registered
under its name with `@register_task(name)` (default tasks with `default=True`); `run_tasks` runs the requested
ones and merges their metrics. Tasks that need something the context lacks (a reference model for `fidelity`, a
saved directory for `size`) are skipped and their metrics are absent.

Retrieval tasks run through the KV cache (prefill, then question and answer from the cache), so an attached KV
stage is measured: `passkey` / `multikey` are question-aware (the question is inside the compressed prompt),
`passkey_agnostic` / `multikey_agnostic` compress the context before the question is seen. `kv_perplexity` and
`kv_efficiency` are opt-in (not in DEFAULT_TASKS), so the default eval of a dense model costs what it did.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
from typing import Any, Callable, Iterable

import torch

from sparseforge.data import read_text
from sparseforge.errors import UserInputError
from sparseforge.eval.efficiency import measure_peak_memory, size_on_disk, speed, weight_sparsity
from sparseforge.eval.fidelity import fidelity
from sparseforge.eval.kv import kv_efficiency, kv_perplexity
from sparseforge.eval.perplexity import encode, eval_mode, max_positions, model_device, perplexity
from sparseforge.eval.retrieval import retrieval_accuracy

log = logging.getLogger(__name__)

Task = Callable[["EvalContext"], dict]
TASKS: dict[str, Task] = {}
_DEFAULT: list[str] = []


def register_task(name: str, default: bool = False) -> Callable[[Task], Task]:
    """Register `fn` as the eval task `name`; `default=True` also runs it when no tasks are named."""

    def add(fn: Task) -> Task:
        if name in TASKS and TASKS[name] is not fn:
            raise ValueError(f"eval task '{name}' registered twice")
        TASKS[name] = fn
        if default and name not in _DEFAULT:
            _DEFAULT.append(name)
        return fn

    return add

# Knobs tasks read from EvalContext.settings. None means "pick from the model" (see each task).
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_tokens": None,  # truncate the evaluation text to this many tokens (perplexity, fidelity)
    "window": None,  # perplexity window; None: min(model max positions, 1024)
    "stride": None,  # perplexity stride; None: window // 2
    "batch_size": 4,  # perplexity windows per forward pass
    "fidelity_seq_len": None,  # None: min(512, max positions of model and reference)
    "fidelity_max_windows": None,
    "retrieval_lengths": None,  # None: those of (512, 1024, 2048) the model supports
    "retrieval_depths": (0.0, 0.25, 0.5, 0.75, 1.0),
    # 20 episodes per (length, depth) cell: one miss moves a cell by 0.05, so a 95% bar means at most one miss.
    "retrieval_per_cell": 20,
    "retrieval_seed": 0,
    "speed_prompt_len": 256,
    "speed_new_tokens": 64,
    "speed_repeats": 5,
    "speed_warmup": 1,
    "memory_prompt_len": None,  # None: min(512, model max positions)
    "kv_chunk": 256,  # kv_perplexity: tokens fed per forward through the cache
    "kv_max_tokens": None,  # kv_perplexity: tokens of the text used; None: min(model max positions, 2048)
    "kv_prompt_len": None,  # kv_efficiency: prompt tokens; None: min(2048, max positions) - kv_new_tokens
    "kv_new_tokens": 32,  # kv_efficiency: tokens decoded
    "kv_chunk_size": None,  # kv_efficiency: chunked prefill of this many tokens; None: one forward
    "efficiency_prompt_len": None,  # efficiency: prompt tokens; None: min(512, max positions - new tokens)
    "efficiency_new_tokens": 16,  # efficiency: tokens decoded per timing
    "efficiency_lengths": None,  # efficiency: context lengths of the latency table; None: 128, 512, 2048 that fit
    "efficiency_repeats": 3,  # efficiency: timed repeats (medians), after one warm-up
    "efficiency_max_batch": 8,  # efficiency: largest batch the throughput batch may grow to
    "lm_eval_include_path": None,  # lm-eval: a directory of local YAML task definitions
    "lm_eval_limit": None,  # lm-eval: documents per task (None: all)
    "lm_eval_batch_size": 1,
    "targets": ("*",),  # projection globs for the sparsity metrics
    "ignore": (),
}
_RETRIEVAL_LENGTHS = (512, 1024, 2048)


@dataclasses.dataclass
class EvalContext:
    """Everything a task may need. `text` defaults to the bundled held-out text; `settings` overrides
    DEFAULT_SETTINGS (unknown keys are rejected so typos do not pass silently)."""

    model: Any
    tokenizer: Any
    reference: Any = None
    model_dir: str | os.PathLike | None = None
    text: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.text is None:
            self.text = read_text("heldout")
        unknown = sorted(set(self.settings) - set(DEFAULT_SETTINGS))
        if unknown:
            raise UserInputError(f"unknown eval settings {unknown}; known settings are {sorted(DEFAULT_SETTINGS)}")
        self.settings = {**DEFAULT_SETTINGS, **self.settings}


def _capped(value, default: int, limit: int | None) -> int:
    """An explicit setting as given; otherwise the default, capped at the model's limit."""
    if value is not None:
        return value
    return min(default, limit) if limit else default


def _prefixed(prefix: str, metrics: dict, keys: Iterable[str]) -> dict:
    return {f"{prefix}_{k}": metrics[k] for k in keys}


@register_task("perplexity", default=True)
def task_perplexity(ctx: EvalContext) -> dict:
    s = ctx.settings
    r = perplexity(ctx.model, ctx.tokenizer, ctx.text, s["window"], s["stride"], s["max_tokens"], s["batch_size"])
    return {"perplexity": r["perplexity"], **_prefixed("perplexity", r, ("tokens_scored", "window", "stride"))}


@register_task("fidelity", default=True)
def task_fidelity(ctx: EvalContext) -> dict:
    if ctx.reference is None:
        log.info("fidelity skipped: no reference model")
        return {}
    s = ctx.settings
    limits = [m for m in (max_positions(ctx.model), max_positions(ctx.reference)) if m]
    seq_len = _capped(s["fidelity_seq_len"], 512, min(limits) if limits else None)
    max_windows = s["fidelity_max_windows"]
    if max_windows is None and s["max_tokens"] is not None:
        max_windows = max(1, s["max_tokens"] // seq_len)
    r = fidelity(ctx.model, ctx.reference, ctx.tokenizer, ctx.text, seq_len, max_windows)
    return {
        "kl_to_reference": r["kl_to_reference"],
        "top1_agreement": r["top1_agreement"],
        **_prefixed("fidelity", r, ("positions", "seq_len")),
    }


def _retrieval_task(name: str, mode: str = "aware") -> Callable[[EvalContext], dict]:
    episode_kind = name.removesuffix("_agnostic")

    def task(ctx: EvalContext) -> dict:
        s = ctx.settings
        lengths = s["retrieval_lengths"]
        if lengths is None:
            limit = max_positions(ctx.model)
            lengths = [L for L in _RETRIEVAL_LENGTHS if limit is None or L <= limit] or [limit]
        r = retrieval_accuracy(
            ctx.model, ctx.tokenizer, episode_kind, lengths, s["retrieval_depths"], s["retrieval_per_cell"],
            s["retrieval_seed"], filler_text=ctx.text, mode=mode,
        )
        return _prefixed(name, r, ("accuracy", "by_length", "by_depth", "cells"))

    task.__name__ = f"task_{name}"
    task.__doc__ = f"{episode_kind} retrieval accuracy ({mode} of the question), overall and by length and depth."
    return task


register_task("passkey", default=True)(_retrieval_task("passkey"))
register_task("multikey", default=True)(_retrieval_task("multikey"))
register_task("passkey_agnostic")(_retrieval_task("passkey_agnostic", "agnostic"))
register_task("multikey_agnostic")(_retrieval_task("multikey_agnostic", "agnostic"))


@register_task("sparsity", default=True)
def task_sparsity(ctx: EvalContext) -> dict:
    return weight_sparsity(ctx.model, ctx.settings["targets"], ctx.settings["ignore"])


@register_task("speed", default=True)
def task_speed(ctx: EvalContext) -> dict:
    s = ctx.settings
    r = speed(ctx.model, ctx.tokenizer, s["speed_prompt_len"], s["speed_new_tokens"], s["speed_repeats"], s["speed_warmup"])
    return {
        "prefill_tokens_per_s": r["prefill_tokens_per_s"],
        "decode_tokens_per_s": r["decode_tokens_per_s"],
        **_prefixed("speed", r, ("prefill_median_s", "decode_median_s", "prefill_spread", "decode_spread", "repeats", "warmup",
                                 "prompt_len", "new_tokens", "device")),
    }


@register_task("memory", default=True)
def task_memory(ctx: EvalContext) -> dict:
    """Peak memory of one perplexity-style forward pass (no KV cache) over the first tokens of the text."""
    prompt_len = _capped(ctx.settings["memory_prompt_len"], 512, max_positions(ctx.model))
    ids = encode(ctx.tokenizer, ctx.text, prompt_len)
    device = model_device(ctx.model)
    batch = torch.tensor([ids], dtype=torch.long, device=device)

    def forward():
        with torch.inference_mode(), eval_mode(ctx.model):
            ctx.model(input_ids=batch, use_cache=False)

    _, peak = measure_peak_memory(forward, device=device)
    return {"peak_memory_bytes": peak, "memory_prompt_len": len(ids), "memory_device": str(device)}


@register_task("size", default=True)
def task_size(ctx: EvalContext) -> dict:
    if ctx.model_dir is None:
        log.info("size skipped: no saved model directory")
        return {}
    return {"size_bytes": size_on_disk(ctx.model_dir)}


@register_task("kv_perplexity")
def task_kv_perplexity(ctx: EvalContext) -> dict:
    """Perplexity fed through the cache in chunks, compressed after each by an attached KV press."""
    s = ctx.settings
    return kv_perplexity(ctx.model, ctx.tokenizer, ctx.text, s["kv_chunk"], s["kv_max_tokens"])


@register_task("kv_efficiency")
def task_kv_efficiency(ctx: EvalContext) -> dict:
    """Peak memory of prefill and of decode, the cache's bytes, TTFT and TPOT through the attached KV stage."""
    s = ctx.settings
    limit = max_positions(ctx.model)
    prompt_len = s["kv_prompt_len"] or (min(2048, limit or 2048) - s["kv_new_tokens"])
    ids = encode(ctx.tokenizer, ctx.text, prompt_len)
    return kv_efficiency(ctx.model, torch.tensor([ids]), s["kv_new_tokens"], s["kv_chunk_size"])


@register_task("efficiency")
def task_efficiency(ctx: EvalContext) -> dict:
    """The EfficientLLM metrics: memory by phase, compute utilization, latency by length, throughput, energy."""
    from sparseforge.eval.efficientllm import efficiency_metrics

    s = ctx.settings
    return efficiency_metrics(ctx.model, ctx.tokenizer, s["efficiency_prompt_len"], s["efficiency_new_tokens"],
                              s["efficiency_lengths"], s["efficiency_repeats"], s["efficiency_max_batch"])


DEFAULT_TASKS: tuple[str, ...] = tuple(_DEFAULT)

# Task families named "PREFIX:NAME" (e.g. lm-eval:hellaswag), run by one function over all their names at once.
PrefixTask = Callable[["EvalContext", list], dict]
TASK_PREFIXES: dict[str, PrefixTask] = {}


def register_task_prefix(prefix: str) -> Callable[[PrefixTask], PrefixTask]:
    def add(fn: PrefixTask) -> PrefixTask:
        TASK_PREFIXES[prefix] = fn
        return fn

    return add


@register_task_prefix("lm-eval")
def task_lm_eval(ctx: EvalContext, names: list) -> dict:
    from sparseforge.eval.lm_eval_bridge import run_lm_eval

    s = ctx.settings
    return run_lm_eval(ctx.model, ctx.tokenizer, names, s["lm_eval_include_path"], s["lm_eval_limit"], s["lm_eval_batch_size"])


def unknown_tasks(names: Iterable[str]) -> list[str]:
    """The names that are neither a registered task nor PREFIX:NAME with a registered prefix."""
    return [n for n in names if n not in TASKS and not (":" in n and n.split(":", 1)[0] in TASK_PREFIXES and n.split(":", 1)[1])]


def run_tasks(context: EvalContext, tasks: str | Iterable[str] = DEFAULT_TASKS) -> dict:
    """Run the named tasks (a sequence, or a comma-separated string) in order and merge their metrics.
    All names are checked before anything runs."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = unknown_tasks(names)
    if unknown:
        raise UserInputError(f"unknown eval task(s) {', '.join(unknown)}; known tasks are {', '.join(TASKS)}, "
                             f"or {', '.join(p + ':NAME' for p in TASK_PREFIXES)}")
    metrics: dict[str, Any] = {}
    for name in names:
        if name in TASKS:
            metrics.update(TASKS[name](context))
    prefixed: dict[str, list] = {}
    for name in names:
        if name not in TASKS:
            prefix, task = name.split(":", 1)
            prefixed.setdefault(prefix, []).append(task)
    for prefix, tasks_of_prefix in prefixed.items():
        metrics.update(TASK_PREFIXES[prefix](context, tasks_of_prefix))
    return metrics


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model=None) -> dict:
    """Where the numbers were measured, for the results schema. `device` is the model's device when a model
    is given, otherwise the GPU if one is visible, else "cpu"."""
    import transformers

    device = model_device(model) if model is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device_name,
    }
