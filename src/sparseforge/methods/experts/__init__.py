"""Mixture-of-experts methods (issue 15); importing this package registers them."""
from sparseforge.methods.experts import offload  # noqa: F401
