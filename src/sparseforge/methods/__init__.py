"""Compression methods, one package per family; importing this package registers them all."""
from sparseforge.methods import weights  # noqa: F401
from sparseforge.methods.base import REGISTRY, Method, RuntimeMethod, RuntimeState, all_methods, get_method, register

__all__ = ["REGISTRY", "Method", "RuntimeMethod", "RuntimeState", "all_methods", "get_method", "register"]
