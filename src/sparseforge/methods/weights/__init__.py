"""Post-training weight sparsity; each module registers one method."""
from sparseforge.methods.weights import magnitude, sparsegpt, wanda  # noqa: F401
