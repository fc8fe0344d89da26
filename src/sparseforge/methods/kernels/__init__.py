"""Sparse-kernel runtime stages: route pruned projections through a sparse product where a measured gate says it pays."""
from sparseforge.methods.kernels import quant_kernel, sparse_kernel  # noqa: F401
