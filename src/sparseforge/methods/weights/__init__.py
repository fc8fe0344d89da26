"""Post-training weight sparsity; each module registers one method."""
from sparseforge.methods.weights import dsnot, magnitude, owl, sparsegpt, structured, wanda  # noqa: F401
