"""Evaluation: perplexity, fidelity to a reference, long-context retrieval, sparsity, size, memory and speed.
Metric definitions are in docs/metrics.md."""
from sparseforge.eval.efficiency import measure_peak_memory, size_on_disk, speed, weight_sparsity
from sparseforge.eval.fidelity import fidelity
from sparseforge.eval.perplexity import perplexity
from sparseforge.eval.retrieval import retrieval_accuracy
from sparseforge.eval.tasks import DEFAULT_SETTINGS, DEFAULT_TASKS, TASKS, EvalContext, environment, run_tasks

__all__ = [
    "perplexity",
    "fidelity",
    "retrieval_accuracy",
    "weight_sparsity",
    "size_on_disk",
    "measure_peak_memory",
    "speed",
    "EvalContext",
    "TASKS",
    "DEFAULT_TASKS",
    "DEFAULT_SETTINGS",
    "run_tasks",
    "environment",
]
