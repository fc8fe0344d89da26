"""Post-training weight sparsity; each module registers one method."""
from sparseforge.methods.weights import dsnot, easyquant, gptq, magnitude, owl, rtn, sparsegpt, sparsegpt_gptq, spqr, structured, wanda  # noqa: F401
