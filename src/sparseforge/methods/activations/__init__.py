"""Activation sparsity: runtime stages that zero a projection's small input channels per token and skip the
matching weight rows (kernels/activation_sparse.py). One file per method on `base.ActivationMethod`."""
from sparseforge.methods.activations import cats, rsparse, teal, wina  # noqa: F401
from sparseforge.methods.activations.base import ActivationMethod, ActivationSparseLinear, measure_sparsity

__all__ = ["ActivationMethod", "ActivationSparseLinear", "measure_sparsity"]
