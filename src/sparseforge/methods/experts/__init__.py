"""Expert-level MoE methods: remove or merge whole routed experts (see experts/base.py)."""
from sparseforge.methods.experts import expert_prune, heapr, merge_experts  # noqa: F401
