"""Compute kernels: pure-PyTorch references and fast paths, with speed gates that pick between them.
Importing this package registers every sparse kernel (`kernels.base.KERNELS`); a new kernel module is added here."""
from sparseforge.kernels import semi_structured, sparse_csr  # noqa: F401
