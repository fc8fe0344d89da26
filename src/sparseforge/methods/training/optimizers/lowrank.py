"""What GaLore and APOLLO share: Adam moments kept on a smaller (projected) gradient, which 2-D weights get
projected, and the FSDP2 composition: each sharded gradient is gathered one matrix at a time, the update is
computed on the whole matrix (identically on every rank) and each rank applies its own rows. That is what
galore-torch and apollo-torch lack (galore issue #2, apollo issue #5): they compute projections on whatever
local piece they are handed. The price: a transient full-size gradient per matrix and replicated low-rank state."""
from __future__ import annotations

import torch
from torch import nn

from sparseforge.methods.training.optimizers.base import SparseforgeOptimizer, full_tensor, local_rows, local_tensor

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def projectable(model: nn.Module, trainable: list[nn.Parameter], rank: int, targets: str) -> set[int]:
    """Ids of the parameters to project: 2-D weights with both sides larger than `rank`; with targets="linears"
    only the weights of linear layers other than the output head (embeddings and the head keep full state,
    as in GaLore's and APOLLO's recipes); with "all" every such 2-D parameter."""
    wanted = {id(p) for p in trainable}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = id(head.weight) if head is not None and getattr(head, "weight", None) is not None else None
    out: set[int] = set()
    if targets == "all":
        candidates = [p for p in trainable]
    else:
        candidates = []
        for module in model.modules():
            if isinstance(module, (nn.Linear, Conv1D)) and module.weight is not None and id(module.weight) != head_weight:
                candidates.append(module.weight)
    for p in candidates:
        if id(p) in wanted and p.ndim == 2 and min(p.shape) > rank:
            out.add(id(p))
    return out


class ProjectedAdam(SparseforgeOptimizer, torch.optim.Optimizer):
    """Adam on a projected gradient for the parameters in `projected`, plain Adam on the rest. Subclasses
    implement `project(p, state, g) -> r` (refreshing their projection when due) and `update(p, state, g, n)`:
    the full-size update from the Adam-normalised low-rank `n` (and the full gradient `g`)."""

    def __init__(self, params, projected: set[int], masks, lr, betas, eps, weight_decay):
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._projected = projected
        self._setup_masks(masks)

    def is_projected(self, p) -> bool:
        return id(p) in self._projected

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # elementwise Adam works on this rank's shard; a projection needs the whole matrix
                g = full_tensor(p.grad) if self.is_projected(p) else local_tensor(p.grad)
                self.step_param(p, group, g.float() if g.element_size() < 4 else g)  # bf16/fp16 math in fp32
        return loss

    @torch.no_grad()
    def step_param(self, p, group, g: torch.Tensor | None, low: torch.Tensor | None = None) -> None:
        """One step of `p` from its gradient `g` (the whole matrix where projected, else this rank's shard), or
        from an already projected gradient `low`."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        if self.is_projected(p):
            r = low if low is not None else self.project(p, state, g)
        else:
            r = g
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(r)
            state["exp_avg_sq"] = torch.zeros_like(r)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(r, 1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
        t = state["step"]
        n = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt_().add_(group["eps"]))
        u = self.update(p, state, g, r, n) if self.is_projected(p) else n
        local = local_tensor(p)
        if group["weight_decay"]:
            local.mul_(1 - group["lr"] * group["weight_decay"])
        if self.is_projected(p):
            u = local_rows(u, p)
        local.add_(u.to(local.dtype), alpha=-group["lr"])
        self.reapply_masks(only=p)

    def project(self, p, state, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, p, state, g, r, n):  # pragma: no cover - abstract
        raise NotImplementedError
