"""Compression methods, one package per family; importing this package registers them all."""
from sparseforge.methods import kernels, weights  # noqa: F401
from sparseforge.methods import kv  # noqa: F401
from sparseforge.methods import activations  # noqa: F401
from sparseforge.methods import training  # noqa: F401
from sparseforge.methods import attention  # noqa: F401
from sparseforge.methods import experts  # noqa: F401
from sparseforge.methods.base import (REGISTRY, AttachedStage, Method, RuntimeContext, RuntimeMethod, RuntimeState, all_methods,
                                      get_method, register)

__all__ = ["REGISTRY", "AttachedStage", "Method", "RuntimeContext", "RuntimeMethod", "RuntimeState", "all_methods", "get_method", "register"]
