"""Training that keeps sparsity: recovery methods after pruning (one file each) and the optimizer registry."""
from sparseforge.methods.training import lora, masked_finetune, perp, spiel  # noqa: F401
