"""Find the parts of a causal LM that compression methods act on, by introspection rather than per-model code.

A `Projection` is one weight matrix (or a stack of expert matrices) seen in a single orientation,
`[..., out_features, in_features]`, whatever its module stores: `nn.Linear` keeps `[out, in]`, GPT-2's
`Conv1D` keeps `[in, out]`, and fused mixture-of-experts modules (Mixtral in transformers 5) keep 3-D
parameters `[experts, out, in]`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

import torch
from torch import nn

from sparseforge.errors import UserInputError

try:  # GPT-2 style layers store their weight transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()

# Attribute names of the decoder-layer list, tried after the config-driven search; covers the
# architectures named in docs/architecture.md and most others on the hub.
_LAYER_LIST_HINTS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")
ATTENTION_HINTS = ("self_attn", "attn", "attention", "self_attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_ROUTER_HINTS = ("gate", "router")


@dataclasses.dataclass
class Projection:
    """One weight of a decoder layer, addressed by its module and parameter name."""

    name: str  # qualified name, e.g. "model.layers.0.mlp.down_proj" or "...experts.gate_up_proj"
    module: nn.Module
    param_name: str
    kind: str  # "linear", "conv1d" or "experts"

    @property
    def state_key(self) -> str:
        """The weight's key in the model's state dict."""
        return self.name if self.kind == "experts" else f"{self.name}.{self.param_name}"

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def in_features(self) -> int:
        return self.weight().shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight().shape[-2]

    def weight(self) -> torch.Tensor:
        """The weight as `[..., out, in]` (a view for linear/experts, a transposed view for Conv1D)."""
        w = self.parameter.data
        return w.t() if self.kind == "conv1d" else w

    def set_weight(self, new: torch.Tensor) -> None:
        """Write `[..., out, in]` values back in the module's own layout and dtype."""
        target = self.parameter.data
        target.copy_(new.t() if self.kind == "conv1d" else new)

    def is_hookable(self) -> bool:
        """Whether a forward hook on the module sees exactly this weight's input (not true for fused experts)."""
        return self.kind in ("linear", "conv1d")


class ModelAdapter:
    """Generic access to a causal LM's decoder layers, projections, attention modules and MLPs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layer_list_name, self.layers = self._find_layers(model)

    @staticmethod
    def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
        for dotted in _LAYER_LIST_HINTS:
            obj = model
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                return dotted, obj
        # Fallback: the largest ModuleList whose children all share one class (the repeated block).
        expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        best = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
                n_params = sum(p.numel() for p in mod.parameters())
                if expected is not None and len(mod) != expected:
                    continue
                if best is None or n_params > best[2]:
                    best = (name, mod, n_params)
        if best is None:
            raise UserInputError(
                f"found no decoder layers in {type(model).__name__}; sparseforge needs a causal LM whose blocks "
                "sit in an nn.ModuleList (as every Hugging Face decoder model does)"
            )
        return best[0], best[1]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        return f"{self.layer_list_name}.{index}"

    def projections(self, layer_index: int | None = None) -> dict[str, Projection]:
        """Every weight matrix inside the decoder layers (or inside one of them), keyed by qualified name.
        Routers (MoE gates) are left out: they are tiny and pruning them breaks expert selection."""
        indices = range(self.num_layers) if layer_index is None else [layer_index]
        found: dict[str, Projection] = {}
        for i in indices:
            prefix = self.layer_name(i)
            for name, mod in self.layers[i].named_modules():
                qual = f"{prefix}.{name}" if name else prefix
                leaf = name.rsplit(".", 1)[-1]
                if isinstance(mod, nn.Linear):
                    if leaf in _ROUTER_HINTS and mod.out_features < 64 and _is_moe_router(self.layers[i], name):
                        continue
                    found[qual] = Projection(qual, mod, "weight", "linear")
                elif Conv1D and isinstance(mod, Conv1D):
                    found[qual] = Projection(qual, mod, "weight", "conv1d")
                else:
                    for pname, p in mod.named_parameters(recurse=False):
                        if p.dim() == 3 and "expert" in type(mod).__name__.lower():
                            found[f"{qual}.{pname}"] = Projection(f"{qual}.{pname}", mod, pname, "experts")
        return found

    def select(self, targets: Iterable[str] = ("*",), ignore: Iterable[str] = (), layer_index: int | None = None) -> dict[str, Projection]:
        """Projections whose qualified name matches a target glob and no ignore glob."""
        targets, ignore = list(targets), list(ignore)
        return {
            n: p
            for n, p in self.projections(layer_index).items()
            if any(fnmatch.fnmatchcase(n, t) for t in targets) and not any(fnmatch.fnmatchcase(n, g) for g in ignore)
        }

    def attention_modules(self) -> dict[str, nn.Module]:
        return self._child_by_hint(ATTENTION_HINTS)

    def mlp_modules(self) -> dict[str, nn.Module]:
        return self._child_by_hint(_MLP_HINTS)

    def _child_by_hint(self, hints) -> dict[str, nn.Module]:
        out = {}
        for i, layer in enumerate(self.layers):
            for hint in hints:
                child = getattr(layer, hint, None)
                if isinstance(child, nn.Module):
                    out[f"{self.layer_name(i)}.{hint}"] = child
                    break
        return out


def _is_moe_router(layer: nn.Module, name: str) -> bool:
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    parent = layer.get_submodule(parent_name) if parent_name else layer
    return any("expert" in n for n, _ in parent.named_children())
