"""Mixture-of-experts layout: which module of a decoder layer routes tokens, which holds the experts, and in what form.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE fused: one module with 3-D parameters
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, called as `experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k])` after a router whose `weight` is `[E, H]`. Other models keep a `ModuleList` of per-expert
MLPs (each an ordinary gated MLP of nn.Linear). Discovery here is structural (a child holding experts beside a child
with an `[E, H]` weight), never by model name, so every family member the adapter supports is covered.

Everything that needs to know where tokens go (routing-aware calibration, expert pruning and merging, offloading)
builds on `find_moe_blocks` and `RoutingRecorder`; `keep_experts` is the one module surgery that removes experts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import ModelAdapter

# Config fields that hold the number of routed experts, in the order transformers' configs use them.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k")
# Per-expert MLP leaves in the ModuleList form (transformers' names first, then the original Mixtral w1/w3/w2).
_UNFUSED_ROLES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


@dataclass
class MoEBlock:
    """One sparse MoE block of one decoder layer."""

    layer_index: int
    name: str  # qualified name of the block, e.g. "model.layers.0.mlp"
    module: nn.Module
    router_name: str  # qualified, e.g. "model.layers.0.mlp.gate"
    router: nn.Module  # has `.weight` [E, H]
    experts_name: str
    experts: nn.Module  # fused module with 3-D parameters, or an nn.ModuleList of expert MLPs
    top_k: int
    fused: bool
    shared_expert_names: tuple[str, ...] = field(default_factory=tuple)  # always-on experts (Qwen2-MoE), never pruned

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.router.weight.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.expert_weights(0)["down"].shape[1]

    def expert_weights(self, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's weights as `[out, in]`: gate [I, H], up [I, H], down [H, I]."""
        if self.fused:
            gate, up = self.experts.gate_up_proj[expert].chunk(2, dim=0)
            return {"gate": gate, "up": up, "down": self.experts.down_proj[expert]}
        mlp = self.experts[expert]
        return {role: getattr(mlp, next(n for n in names if hasattr(mlp, n))).weight for role, names in _UNFUSED_ROLES.items()}

    def act_fn(self):
        if self.fused:
            return self.experts.act_fn
        mlp = self.experts[0]
        return getattr(mlp, "act_fn", None) or getattr(mlp, "act", None) or nn.functional.silu

    def expert_intermediate(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """act(gate x) * up x for tokens `x [T, H]` routed to `expert`: the input its down projection sees."""
        w = self.expert_weights(expert)
        return self.act_fn()(x @ w["gate"].T) * (x @ w["up"].T)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's output for `x [T, H]`, before the routing weight (a reference for the fused forward)."""
        return self.expert_intermediate(expert, x) @ self.expert_weights(expert)["down"].T

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top_k_index [T, k], top_k_weights [T, k]) the router picks for `hidden [..., H]`."""
        out = self.router(hidden.reshape(-1, self.hidden_size))
        if isinstance(out, tuple):  # transformers 5 routers return (logits, weights, indices)
            return out[2], out[1]
        # nn.Linear routers return logits only: the block applies softmax and top-k itself.
        probs = torch.softmax(out.float(), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        return index, (weights / weights.sum(-1, keepdim=True)).to(out.dtype)


def _config_value(config, keys) -> tuple[str, int] | None:
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return k, v
    return None


def _block_in_layer(layer: nn.Module):
    """(relative block name, router name, experts name, fused) of the first MoE block inside `layer`, or None."""
    for name, mod in layer.named_modules():
        experts = getattr(mod, "experts", None)
        if experts is None:
            continue
        fused = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and experts.gate_up_proj.dim() == 3
        unfused = isinstance(experts, nn.ModuleList) and len(experts) > 0
        if not (fused or unfused):
            continue
        n_experts = experts.gate_up_proj.shape[0] if fused else len(experts)
        for child_name, child in mod.named_children():
            w = getattr(child, "weight", None)
            if child_name != "experts" and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n_experts:
                shared = tuple(c for c, _ in mod.named_children() if c.startswith("shared_expert"))
                return name, child_name, fused, shared
    return None


def find_moe_blocks(model: nn.Module, adapter: ModelAdapter | None = None) -> list[MoEBlock]:
    """Every sparse MoE block, one per decoder layer that has one (dense layers of mixed models are skipped)."""
    adapter = adapter or ModelAdapter(model)
    config = adapter._text_config()
    top_k = _config_value(config, TOP_K_KEYS)
    blocks = []
    for i, layer in enumerate(adapter.layers):
        found = _block_in_layer(layer)
        if found is None:
            continue
        rel, router_rel, fused, shared = found
        prefix = adapter.layer_name(i) + (f".{rel}" if rel else "")
        module = layer.get_submodule(rel) if rel else layer
        router = getattr(module, router_rel)
        k = getattr(router, "top_k", None) or getattr(module, "top_k", None) or (top_k[1] if top_k else None)
        if not k:
            raise ValueError(f"{prefix}: cannot tell how many experts each token is routed to (no top_k)")
        blocks.append(MoEBlock(i, prefix, module, f"{prefix}.{router_rel}", router, f"{prefix}.experts", module.experts,
                               int(k), fused, tuple(f"{prefix}.{s}" for s in shared)))
    return blocks


class RoutingRecorder(contextlib.AbstractContextManager):
    """Records, while active, which experts each MoE block's router picks: per-expert token counts always, and the
    full (hidden, top_k_index, top_k_weights) of every call when `keep_calls` is set (calibration needs the tokens).

    It hooks the experts module's inputs, so it sees exactly what the block computes with, in every form."""

    def __init__(self, blocks: list[MoEBlock], keep_calls: bool = False):
        self.blocks = blocks
        self.keep_calls = keep_calls
        self.counts = {b.layer_index: torch.zeros(b.num_experts, dtype=torch.long) for b in blocks}
        self.weight_sums = {b.layer_index: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {b.layer_index: [] for b in blocks}
        self._handles = []

    def _record(self, block: MoEBlock, hidden, index, weights):
        index = index.reshape(-1, index.shape[-1])
        self.counts[block.layer_index] += torch.bincount(index.flatten().cpu(), minlength=block.num_experts)[: block.num_experts]
        self.weight_sums[block.layer_index].index_add_(0, index.flatten().cpu(), weights.reshape(-1).detach().double().cpu())
        if self.keep_calls:
            self.calls[block.layer_index].append((hidden.detach().reshape(-1, block.hidden_size), index.detach(), weights.detach().reshape(index.shape)))

    def __enter__(self):
        for block in self.blocks:
            if block.fused:
                def pre(module, args, kwargs, block=block):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                    weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
                    self._record(block, hidden, index, weights)
                self._handles.append(block.experts.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                # The ModuleList form has no call of its own: route the block's input the way the block does.
                def pre(module, args, kwargs, block=block):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    with torch.no_grad():
                        index, weights = block.route(hidden)
                    self._record(block, hidden, index, weights)
                self._handles.append(block.module.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def frequencies(self) -> dict[int, torch.Tensor]:
        """Share of routed (token, slot) pairs per expert, per layer; each sums to 1 where anything was routed."""
        return {i: c.double() / max(int(c.sum()), 1) for i, c in self.counts.items()}

    def expert_tokens(self, layer_index: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [n, H], routing weights [n]) of every recorded token routed to `expert` (needs keep_calls)."""
        xs, ws = [], []
        for hidden, index, weights in self.calls[layer_index]:
            token, slot = torch.where(index == expert)
            xs.append(hidden[token])
            ws.append(weights[token, slot])
        if not xs:
            block = next(b for b in self.blocks if b.layer_index == layer_index)
            return torch.zeros(0, block.hidden_size), torch.zeros(0)
        return torch.cat(xs), torch.cat(ws)


def set_expert_count(config, count: int) -> None:
    """Write the new number of routed experts into every config field that holds it (and the text sub-config)."""
    configs = [config]
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        configs.append(config.get_text_config())
    for c in configs:
        written = False
        for k in EXPERT_COUNT_KEYS:
            if isinstance(getattr(c, k, None), int):
                setattr(c, k, count)
                written = True
        if not written:
            raise ValueError(f"{type(c).__name__} has none of {EXPERT_COUNT_KEYS}: cannot record the new expert count")
        top_k = _config_value(c, TOP_K_KEYS)
        if top_k and top_k[1] > count:
            raise ValueError(f"keeping {count} experts is fewer than the {top_k[1]} each token is routed to ({top_k[0]})")


@torch.no_grad()
def keep_experts(model: nn.Module, keep: dict[int, list[int]], replacements: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    """Keep only the listed experts of each MoE block (the same number in every block, since the config holds one
    count), in the listed order: expert weights, the router's rows and the modules' counters shrink, and the config
    records the new count, so `save_pretrained` writes a smaller model that plain transformers loads.

    `replacements[layer]` may give new fused tensors (`gate_up_proj [E', 2I, H]`, `down_proj [E', H, I]`) for the kept
    experts, e.g. merged ones; otherwise the kept experts' weights are sliced."""
    blocks = {b.layer_index: b for b in find_moe_blocks(model)}
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1 or set(keep) != set(blocks):
        raise ValueError("keep_experts needs the same number of experts kept in every MoE block (the config holds one count)")
    count = counts.pop()
    for i, block in blocks.items():  # validate everything before changing anything
        if len(set(keep[i])) != len(keep[i]) or min(keep[i]) < 0 or max(keep[i]) >= block.num_experts:
            raise ValueError(f"layer {i}: expert indices {keep[i]} must be distinct and below {block.num_experts}")
    set_expert_count(model.config, count)
    for i, block in blocks.items():
        idx = torch.tensor(keep[i], dtype=torch.long)
        new = (replacements or {}).get(i, {})
        if block.fused:
            for pname in ("gate_up_proj", "down_proj"):
                old = getattr(block.experts, pname)
                value = new.get(pname, old.data[idx])
                setattr(block.experts, pname, nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad))
            for pname in ("gate_up_proj_bias", "down_proj_bias"):
                if isinstance(getattr(block.experts, pname, None), torch.Tensor):
                    old = getattr(block.experts, pname)
                    setattr(block.experts, pname, nn.Parameter(old.data[idx].contiguous(), requires_grad=old.requires_grad))
        else:
            block.module.experts = nn.ModuleList([block.experts[j] for j in keep[i]])
            block.experts = block.module.experts
        router = block.router
        router.weight = nn.Parameter(router.weight.data[idx].contiguous(), requires_grad=router.weight.requires_grad)
        if isinstance(getattr(router, "bias", None), torch.Tensor):
            router.bias = nn.Parameter(router.bias.data[idx].contiguous())
        for mod in (router, block.experts, block.module):
            for attr in ("num_experts", "num_local_experts"):
                if isinstance(getattr(mod, attr, None), int):
                    setattr(mod, attr, count)
            if isinstance(mod, nn.Linear):
                mod.out_features = count
