"""Explicit sparsity masks that survive training.

After pruning, a model's sparsity exists only as zeros in its weights: one optimizer step, one dense LoRA merge
or one zeroth-order perturbation fills them in. Here every pruned weight gets an explicit keep-mask (True where
the weight may be nonzero), taken from the zeros of the weights the pruned artifact holds, and `attach_masks`
keeps every pruned position exactly zero while the model trains:

- a gradient hook on each masked parameter zeroes the gradient at pruned positions, so gradient accumulation
  sums zeros there and the optimizer's state (Adam's moments, ...) stays zero there too: an Adam or SGD step
  (weight decay included) leaves a zero weight exactly zero;
- `MaskHandle.enforce()` (run after every optimizer step by the trainer, or by an optimizer step hook through
  `MaskHandle.hook_optimizer`) writes zeros at pruned positions again, for updates that are dense whatever the
  gradient is: GaLore's back-projected low-rank step, zeroth-order perturbations, a merge.

Why hooks and not `torch.nn.utils.parametrize` (weight = original * mask on every forward): a parametrization
renames the parameter (`...parametrizations.weight.original`), which changes state-dict keys, `save_pretrained`
output, PEFT's view of the base layer and FSDP's parameter names; it also costs one multiply per weight on every
forward, where the hooks cost one `where` per weight per backward and per step (benchmarks/training_recovery.py
measures both). Both use `torch.where`/`masked_fill` rather than a multiply, so a NaN or inf gradient at a pruned
position cannot survive as NaN (NaN * 0 is NaN).

`check_masks` is the checker: it reports every position that a mask says is pruned and whose weight is not zero.
`check_declared_patterns` checks the weights against the patterns the artifact's stages declare (N:M, unstructured
sparsity), i.e. that the model still validates as the artifact it came from.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable

import torch
from torch import nn

from sparseforge.core.adapter import ModelAdapter
from sparseforge.errors import UserInputError

MASKS_ATTR = "sparseforge_masks"


def masks_from_model(model: nn.Module, targets: Iterable[str] = ("*",), ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The keep-masks (bool, the parameter's own layout) the model carries, keyed by the parameter's name in
    `model.named_parameters()`: those attached by `attach_masks` when there are (the truth while training: a kept
    weight that happens to reach zero, or a LoRA B matrix that starts at zero, is not pruned), else one for every
    targeted projection weight that has zeros. Dense weights get no mask (nothing to keep zero)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    handle = masks_of(model)
    if handle is not None:
        return {names[id(p)]: keep for _, p, keep in handle.pairs if id(p) in names}
    masks = {}
    for proj in ModelAdapter(model).select(targets, ignore).values():
        p = proj.parameter
        keep = p.detach() != 0
        if not bool(keep.all()):
            masks[names.get(id(p), proj.state_key)] = _local(keep).to("cpu") if _is_dtensor(keep) else keep
    return masks


def declared_patterns(model: nn.Module) -> dict[str, tuple]:
    """{parameter name: (pattern, comparison group)} as the model's artifact records it: `sparseforge.json` stages
    with an N:M or unstructured pattern and the projections they pruned (OWL's per-layer sparsities included).
    Structured stages declare no weight pattern (their result is a smaller dense model). Later stages win."""
    from sparseforge.core.masks import Pattern

    declared = {}
    adapter = ModelAdapter(model)
    projections = adapter.projections()
    layer_of = {n: i for i in range(adapter.num_layers) for n in adapter.projections(i)}
    for stage in (getattr(model, "sparseforge_info", None) or {}).get("stages", []):
        text = str(stage.get("pattern") or "")
        if ":" in text:
            n, m = (int(x) for x in text.split(":"))
            make = lambda _i, n=n, m=m: Pattern("nm", 1 - n / m, n, m)  # noqa: E731
        elif text.startswith("unstructured@"):
            uniform = float(text.split("@", 1)[1])
            per_layer = {int(k): float(v) for k, v in (stage.get("layer_sparsity") or {}).items()}
            make = lambda i, u=uniform, pl=per_layer: Pattern("unstructured", pl.get(i, u))  # noqa: E731
        else:
            continue
        for name in stage.get("projections", []) or []:
            if name in projections:
                declared[projections[name].state_key] = (make(layer_of[name]), str(stage.get("compare") or "row"))
    return declared


def check_declared_patterns(model: nn.Module) -> dict:
    """Whether every projection still satisfies the pattern its artifact declares: {"checked": n, "failed": [names]}."""
    from sparseforge.core.masks import check_pattern

    projections = {p.state_key: p for p in ModelAdapter(model).projections().values()}
    failed, checked = [], 0
    for key, (pattern, compare) in declared_patterns(model).items():
        checked += 1
        if not check_pattern(_local(projections[key].weight().detach()).float(), pattern, compare):
            failed.append(key)
    return {"checked": checked, "failed": failed}


@dataclasses.dataclass
class MaskReport:
    """What `check_masks` found: positions that should be zero and are not, in total and per tensor."""

    tensors: int  # masked tensors checked
    pruned: int  # positions the masks keep at zero
    changed: int  # of those, how many are nonzero now
    changed_by_tensor: dict[str, int]
    missing: list[str]  # mask names with no parameter of that name (a renamed or removed weight)

    @property
    def ok(self) -> bool:
        return self.changed == 0 and not self.missing

    def to_json(self) -> dict:
        return {"tensors": self.tensors, "pruned": self.pruned, "changed": self.changed, "changed_by_tensor": self.changed_by_tensor,
                "missing": self.missing, "ok": self.ok}


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> MaskReport:
    """Every position that `masks` marks as pruned (False) and whose weight in `model` is not exactly zero."""
    params = dict(model.named_parameters(remove_duplicate=False))
    changed, by_tensor, missing, pruned = 0, {}, [], 0
    for name, keep in masks.items():
        p = params.get(name)
        if p is None:
            missing.append(name)
            continue
        w = _local(p.detach())
        keep = _local(_mask_like(keep, p))
        if w.shape != keep.shape:
            raise UserInputError(f"mask for '{name}' has shape {tuple(keep.shape)}, the weight {tuple(w.shape)}; the masks belong to another model")
        n = int(((w != 0) & ~keep).sum())
        pruned += int((~keep).sum())
        if n:
            by_tensor[name] = n
            changed += n
    return MaskReport(len(masks), pruned, changed, by_tensor, missing)


class MaskHandle:
    """The masks attached to a model: gradient hooks in place, `enforce()` to re-zero after an update, `remove()`
    to take the hooks off. `pairs` are (name, parameter, keep-mask on the parameter's device)."""

    def __init__(self, model: nn.Module, pairs: list[tuple[str, nn.Parameter, torch.Tensor]], masks: dict[str, torch.Tensor]):
        self.model, self.pairs, self.masks = model, pairs, masks
        self._hooks: list = []
        self._optimizer_hooks: list = []

    def _install(self) -> None:
        self._hooked: set[int] = set()
        # The complement once, not on every step: `enforce` and the hooks run once per step per weight.
        self._drop = [~keep for _, _, keep in self.pairs]
        self.refresh()

    def refresh(self) -> None:
        """Hook the masked parameters that require a gradient now (call again after unfreezing some): a hook
        can only sit on a tensor that requires grad."""
        for (_, p, _), drop in zip(self.pairs, self._drop):
            if p.requires_grad and id(p) not in self._hooked:
                self._hooks.append(p.register_hook(_grad_masker(drop)))
                self._hooked.add(id(p))

    def mask_for(self, param: nn.Parameter) -> torch.Tensor | None:
        """The keep-mask of `param` (on its device), or None when it has none: what optimizers that perturb or
        project use to keep their own updates inside the mask."""
        for _, p, keep in self.pairs:
            if p is param:
                return keep
        return None

    @torch.no_grad()
    def enforce(self) -> None:
        """Write exact zeros at every pruned position (after an optimizer step, a perturbation or a merge)."""
        for (_, p, _), drop in zip(self.pairs, self._drop):
            p.data.masked_fill_(drop, 0)

    def hook_optimizer(self, optimizer) -> None:
        """Re-zero after every `optimizer.step()` (torch.optim.Optimizer's step post-hooks)."""
        self._optimizer_hooks.append(optimizer.register_step_post_hook(lambda *_: self.enforce()))

    def remove(self) -> None:
        for h in self._hooks + self._optimizer_hooks:
            h.remove()
        self._hooks, self._optimizer_hooks, self._hooked = [], [], set()
        if getattr(self.model, MASKS_ATTR, None) is self:
            delattr(self.model, MASKS_ATTR)


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> MaskHandle:
    """Keep every pruned position of `model` exactly zero while it trains (see the module docstring). `masks` are
    keyed by `model.named_parameters()` names (as `masks_from_model` gives them). Parameters sharded by FSDP
    (DTensors) get their mask distributed the same way. Returns the handle, also kept on `model.sparseforge_masks`.
    Attach after the parameters are final (after `fully_shard`, after wrapping in PEFT, ...): a hook lives on the
    parameter object."""
    old = masks_of(model)
    if old is not None:
        old.remove()
    params = dict(model.named_parameters(remove_duplicate=False))
    pairs = []
    for name, keep in masks.items():
        if name not in params:
            raise UserInputError(f"mask '{name}' names no parameter of this model; masks must come from the same model (masks_from_model)")
        p = params[name]
        keep = _mask_like(keep, p)
        if tuple(keep.shape) != tuple(p.shape):
            raise UserInputError(f"mask '{name}' has shape {tuple(keep.shape)}, the weight {tuple(p.shape)}; the masks belong to another model")
        pairs.append((name, p, keep))
    handle = MaskHandle(model, pairs, masks)
    handle._install()
    handle.enforce()
    setattr(model, MASKS_ATTR, handle)
    return handle


def masks_of(model: nn.Module) -> MaskHandle | None:
    """The handle `attach_masks` left on `model`, if any."""
    return getattr(model, MASKS_ATTR, None)


def save_masks(path: str | pathlib.Path, masks: dict[str, torch.Tensor]) -> None:
    """Masks to one safetensors file (bool tensors)."""
    from safetensors.torch import save_file

    save_file({k: _local(v).to("cpu", torch.bool).contiguous() for k, v in masks.items()}, str(path))


def load_masks(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from sparseforge.formats.safetensors_check import check_safetensors

    check_safetensors(pathlib.Path(path))
    return {k: v.to(torch.bool) for k, v in load_file(str(path)).items()}


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Share of masked positions kept at zero, over all masked tensors."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / total if total else 0.0


def _grad_masker(drop: torch.Tensor):
    def hook(grad):
        return grad.masked_fill(drop if drop.device == grad.device else drop.to(grad.device), 0)

    return hook


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (gathered), the tensor itself otherwise."""
    return t.full_tensor() if _is_dtensor(t) else t


def _mask_like(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`keep` on `like`'s device, and distributed like it when `like` is an FSDP-sharded DTensor."""
    if _is_dtensor(like) and not _is_dtensor(keep):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(keep.to(like.device), like.device_mesh, like.placements)
    if _is_dtensor(keep) and not _is_dtensor(like):
        keep = keep.full_tensor()
    return keep.to(like.device) if keep.device != like.device else keep
