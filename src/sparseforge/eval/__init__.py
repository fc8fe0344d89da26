"""Evaluation: perplexity, fidelity to a reference, long-context retrieval (through the KV cache), KV-cache
perplexity and efficiency, sparsity, size, memory and speed.
Metric definitions are in docs/metrics.md."""
from sparseforge.eval.efficiency import measure_peak_memory, peak_allocated, size_on_disk, speed, weight_sparsity
from sparseforge.eval.fidelity import fidelity
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.retrieval import retrieval_accuracy
from sparseforge.eval.kv import kv_efficiency, kv_perplexity
from sparseforge.eval.tasks import DEFAULT_SETTINGS, DEFAULT_TASKS, TASKS, EvalContext, environment, register_task, run_tasks

__all__ = [
    "perplexity",
    "fidelity",
    "retrieval_accuracy",
    "weight_sparsity",
    "size_on_disk",
    "measure_peak_memory",
    "peak_allocated",
    "kv_perplexity",
    "kv_efficiency",
    "register_task",
    "speed",
    "EvalContext",
    "TASKS",
    "DEFAULT_TASKS",
    "DEFAULT_SETTINGS",
    "run_tasks",
    "environment",
]
