"""Module surgery by qualified name: put a new submodule or parameter where an old one sits.

Methods that reshape a model (structured pruning), swap layers for faster ones (sparse kernels) or stream
weights from disk (offload) all address a part by its dotted name, e.g. "model.layers.3.mlp.down_proj"; these
helpers are the one place that resolves such a name to its owner, so every caller handles the top level (an
empty owner path) and a missing name the same way.
"""
from __future__ import annotations

from torch import nn


def owner_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds `name` directly, and the last part of the name ("a.b.c" -> (root.a.b, "c"))."""
    owner_path, _, leaf = name.rpartition(".")
    if not leaf:
        raise ValueError(f"'{name}' is not a qualified name of a submodule or parameter")
    return (root.get_submodule(owner_path) if owner_path else root), leaf


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at qualified `name` under `root`; returns the module it replaced."""
    owner, leaf = owner_of(root, name)
    old = owner.get_submodule(leaf)  # raises AttributeError naming the missing part
    setattr(owner, leaf, new)
    return old


def replace_parameter(root: nn.Module, name: str, new: nn.Parameter) -> None:
    """Register `new` as the parameter at qualified `name` under `root` (e.g. "self_attn.sinks")."""
    owner, leaf = owner_of(root, name)
    if leaf not in owner._parameters:
        raise AttributeError(f"{type(owner).__name__} has no parameter '{leaf}' (from '{name}')")
    # Straight into _parameters: the name is already a parameter, so __setattr__'s bookkeeping would do the
    # same work slower, and offload replaces every parameter of a layer each time it streams one in.
    owner._parameters[leaf] = new
