"""Mixture-of-experts methods: remove or merge whole routed experts (transforms, see experts/base.py) and keep
experts off the model's memory while it runs (the `expert-offload` runtime stage)."""
from sparseforge.methods.experts import expert_prune, heapr, merge_experts, offload  # noqa: F401
