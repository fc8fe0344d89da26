"""Find the parts of a causal LM that compression methods act on, by introspection rather than per-model code.

A `Projection` is one weight matrix (or a stack of expert matrices) seen in a single orientation,
`[..., out_features, in_features]`, whatever its module stores: `nn.Linear` keeps `[out, in]`, GPT-2's
`Conv1D` keeps `[in, out]`, and fused mixture-of-experts modules (Mixtral in transformers 5) keep 3-D
parameters `[experts, out, in]`. `AttentionLayout` and `MLPLayout` say which projections of a layer play which
role (q/k/v/o, gate/up/down, ...) with the head geometry: what structured pruning cuts and what cache and
attention methods address.
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

# Attribute paths of the decoder-layer list, tried first and in this order; they cover the architectures named
# in docs/architecture.md and most others on the hub. Only when none matches does `_find_layers` fall back to
# searching the module tree (the largest list of identical blocks, as long as config.num_hidden_layers).
_LAYER_LIST_HINTS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers")
ATTENTION_HINTS = ("self_attn", "attn", "attention", "self_attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_ROUTER_HINTS = ("gate", "router")
# Leaf names of projections by role, matched exactly (a role is found only where one projection matches);
# callers that depend on a layout confirm it by shapes.
ATTENTION_ROLE_NAMES = {
    "q": ("q_proj", "query", "wq", "q"),
    "k": ("k_proj", "key", "wk", "k"),
    "v": ("v_proj", "value", "wv", "v"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "wo", "o"),
    "qkv": ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv"),  # q, k and v fused in one weight
}
MLP_OUTPUT_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")
_MLP_INPUT_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "gate_up_proj": "gate_up"}  # else "in"
# Config fields holding the head counts, tried in order.
HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "num_heads")
KV_HEAD_COUNT_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


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


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """One decoder layer's attention: which projection plays which role, and its head geometry.

    Names are relative to the decoder layer ("self_attn.q_proj"); `qualified` prefixes the layer's name. A
    role is None where no single projection has it: GPT-2, GPT-NeoX and Phi-3 compute q, k and v in one fused
    projection (`qkv`). Head counts come from the config; head_dim from the query (or fused) projection's
    width, which is what the model computes with."""

    module: str | None  # the attention module, e.g. "self_attn"; None if the layer has none of ATTENTION_HINTS
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qkv: str | None = None
    projections: tuple[str, ...] = ()  # every projection inside the attention module, in module order
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    prefix: str = dataclasses.field(default="", compare=False)  # the decoder layer, e.g. "model.layers.3"

    @property
    def separate_qkv(self) -> bool:
        """Whether q, k, v and o are four separate projections (what per-head surgery needs)."""
        return all((self.q, self.k, self.v, self.o))

    @property
    def group_size(self) -> int | None:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads if self.num_heads and self.num_kv_heads else None

    def roles(self) -> dict[str, str]:
        """{role: name relative to the layer} for the roles found ("q", "k", "v", "o", "qkv")."""
        return {r: getattr(self, r) for r in ATTENTION_ROLE_NAMES if getattr(self, r)}

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name


@dataclasses.dataclass(frozen=True)
class MLPLayout:
    """One decoder layer's MLP: every projection of the layer outside attention, split into the one output
    that writes back to the residual stream (down_proj, fc2, c_proj, ...) and the inputs that read the MLP's
    input. Names are relative to the decoder layer ("mlp.up_proj"; OPT keeps "fc1"/"fc2" on the layer itself).
    `roles` maps each name to "gate", "up", "gate_up" (fused, Phi-3), "in" (a single ungated input, fc1/c_fc)
    or "out". `width` is the number of intermediate channels (the output's input size), 0 unless exactly one
    output was found."""

    module: str | None  # the MLP module, e.g. "mlp"; None where the projections sit on the layer (OPT)
    inputs: tuple[str, ...] = ()
    output: str | None = None
    output_candidates: tuple[str, ...] = ()  # everything named like an output; more than one is ambiguous
    roles: dict = dataclasses.field(default_factory=dict, hash=False)
    width: int = 0
    hidden: int = 0
    experts: bool = False  # fused expert stacks (Mixtral): no per-channel nn.Linear layout
    prefix: str = dataclasses.field(default="", compare=False)

    @property
    def fused_inputs(self) -> tuple[str, ...]:
        """Inputs with a role other than a plain gate, up or single input (e.g. Phi-3's fused gate_up_proj)."""
        return tuple(n for n in self.inputs if self.roles.get(n) == "gate_up")

    def qualified(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name


def _unique(names: Iterable[str], leaves: tuple[str, ...]) -> str | None:
    found = [n for n in names if n.rsplit(".", 1)[-1] in leaves]
    return found[0] if len(found) == 1 else None


def _config_int(config, keys: tuple[str, ...]) -> int | None:
    return next((getattr(config, k) for k in keys if isinstance(getattr(config, k, None), int)), None)


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

    def _relative_projections(self, layer_index: int) -> dict[str, Projection]:
        prefix = self.layer_name(layer_index) + "."
        return {n[len(prefix):]: p for n, p in self.projections(layer_index).items()}

    def _attention_name(self, layer_index: int) -> str | None:
        layer = self.layers[layer_index]
        return next((h for h in ATTENTION_HINTS if isinstance(getattr(layer, h, None), nn.Module)), None)

    def _text_config(self):
        config = getattr(self.model, "config", None)
        # Multimodal configs keep the decoder's fields in a sub-config; text-only ones return themselves.
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def head_counts(self) -> tuple[int | None, int | None]:
        """(query heads, KV heads) from the config; KV heads default to the query heads (multi-head attention)."""
        config = self._text_config()
        heads = _config_int(config, HEAD_COUNT_KEYS)
        kv = _config_int(config, KV_HEAD_COUNT_KEYS)
        return heads, kv if kv is not None else heads

    def attention_layout(self, layer_index: int = 0) -> AttentionLayout:
        """Which projections of decoder layer `layer_index` are q, k, v, o (or a fused qkv), with the head
        counts and head_dim. Never raises for an unusual model: roles not found are None."""
        attn = self._attention_name(layer_index)
        prefix = self.layer_name(layer_index)
        if attn is None:
            return AttentionLayout(None, prefix=prefix)
        projs = {r: p for r, p in self._relative_projections(layer_index).items() if r.startswith(attn + ".")}
        roles = {role: _unique(projs, leaves) for role, leaves in ATTENTION_ROLE_NAMES.items()}
        heads, kv = self.head_counts()
        head_dim = None
        if heads:
            if roles["q"]:
                head_dim = projs[roles["q"]].out_features // heads
            elif roles["qkv"] and kv:
                head_dim = projs[roles["qkv"]].out_features // (heads + 2 * kv)
            else:
                config = self._text_config()
                head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads) or None
        return AttentionLayout(attn, **roles, projections=tuple(projs), num_heads=heads, num_kv_heads=kv,
                               head_dim=head_dim, prefix=prefix)

    def mlp_layout(self, layer_index: int = 0) -> MLPLayout:
        """The MLP projections of decoder layer `layer_index` by role, and its width. Never raises: an
        ambiguous or missing output leaves `output` None and `width` 0."""
        layer = self.layers[layer_index]
        attn = self._attention_name(layer_index)
        others = {r: p for r, p in self._relative_projections(layer_index).items() if not (attn and r.startswith(attn + "."))}
        module = next((h for h in _MLP_HINTS if isinstance(getattr(layer, h, None), nn.Module)), None)
        candidates = tuple(r for r in others if r.rsplit(".", 1)[-1] in MLP_OUTPUT_NAMES)
        output = candidates[0] if len(candidates) == 1 else None
        inputs = tuple(r for r in others if r not in candidates)
        roles = {r: _MLP_INPUT_ROLES.get(r.rsplit(".", 1)[-1], "in") for r in inputs}
        if output:
            roles[output] = "out"
        width, hidden = (others[output].in_features, others[output].out_features) if output else (0, 0)
        return MLPLayout(module, inputs, output, candidates, roles, width, hidden,
                         any(p.kind == "experts" for p in others.values()), self.layer_name(layer_index))

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
