"""The optimizer registry: one small spec class per optimizer (name, `Params` dataclass with help text, what it
supports) that builds a `torch.optim.Optimizer`. First-order optimizers are plain torch optimizers, so a Hugging
Face `Trainer(optimizers=(opt, None))` can drive them; a zeroth-order one (`opt.zeroth_order`) needs
`step(closure)` and calls the closure (forward only, returns the loss) itself.

Optimizer state goes to safetensors + JSON, never pickle: `optimizer_state_tensors(opt)` flattens
`opt.state_dict()` into named tensors and a JSON dict, `load_optimizer_state` puts it back exactly.

Masks: every optimizer re-applies the pruning masks it finds on the model after each step, so pruned positions
stay exactly zero whatever the update direction (GaLore's back-projected update and MeZO's perturbations are
dense, AdamW's are not)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.errors import UserInputError
from sparseforge.methods.base import _coerce, _type_name, param, resolve_choices  # noqa: F401  (param re-exported)

OPTIMIZERS: dict[str, type["OptimizerSpec"]] = {}


class OptimizerSpec:
    """One registered optimizer. Subclasses set `name`, `summary`, `Params`, the capability flags, and `build`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type]
    zeroth_order: ClassVar[bool] = False
    fsdp: ClassVar[bool] = False  # tested under FSDP2 (`fully_shard`) in tests/test_training_fsdp.py
    implementation: ClassVar[str] = "sparseforge"  # which library does the work (docs/methods/training_optimizers.md says why)

    @classmethod
    def validate(cls, params) -> None:
        """Check values together; raise UserInputError with one line."""

    @classmethod
    def build(cls, model: nn.Module, params, trainable: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

    @classmethod
    def parse_params(cls, raw: dict[str, Any] | Any) -> Any:
        if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
            if not isinstance(raw, cls.Params):
                raise UserInputError(f"optimizer '{cls.name}' got parameters of type {type(raw).__name__}")
            cls.validate(raw)
            return raw
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        hints = typing.get_type_hints(cls.Params)
        clean = {}
        for key, value in (raw or {}).items():
            if key not in fields:
                raise UserInputError(f"unknown parameter '{key}' for optimizer '{cls.name}'; allowed: {', '.join(fields) or 'none'}")
            choices = resolve_choices(fields[key].metadata.get("choices"))
            clean[key] = _coerce(value, hints[key], f"parameter '{key}' of optimizer '{cls.name}'", choices)
        params = cls.Params(**clean)
        cls.validate(params)
        return params

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        hints = typing.get_type_hints(cls.Params)
        rows = []
        for f in dataclasses.fields(cls.Params):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default, "help": f.metadata.get("help", "")})
        return rows


def register_optimizer(cls: type[OptimizerSpec]) -> type[OptimizerSpec]:
    if cls.name in OPTIMIZERS and OPTIMIZERS[cls.name] is not cls:
        raise ValueError(f"optimizer name '{cls.name}' registered twice")
    OPTIMIZERS[cls.name] = cls
    return cls


def get_optimizer(name: str) -> type[OptimizerSpec]:
    if name not in OPTIMIZERS:
        if name == "adamw-8bit":
            raise UserInputError("optimizer 'adamw-8bit' needs torchao: pip install 'sparseforge[optim8bit]'")
        raise UserInputError(f"unknown optimizer '{name}'; registered optimizers: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


# -- shared checks ---------------------------------------------------------------------------------------------

def check_positive(value: float, what: str, opt: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value:
        raise UserInputError(f"optimizer '{opt}': {what} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_beta(value: float, what: str, opt: str) -> None:
    if not 0.0 <= value < 1.0:
        raise UserInputError(f"optimizer '{opt}': {what} must be in [0, 1), got {value}")


def check_adam(p, opt: str) -> None:
    check_positive(p.lr, "lr", opt)
    check_beta(p.beta1, "beta1", opt)
    check_beta(p.beta2, "beta2", opt)
    check_positive(p.eps, "eps", opt)
    check_positive(p.weight_decay, "weight_decay", opt, allow_zero=True)


# -- masks -----------------------------------------------------------------------------------------------------

def parameter_masks(model: nn.Module, trainable: list[nn.Parameter]) -> dict[nn.Parameter, torch.Tensor]:
    """The keep-mask (True = may be nonzero) of each trainable parameter that has pruned zeros, from
    core.sparsity_masks (the same masks the trainer attaches). Empty for a dense model."""
    from sparseforge.core.sparsity_masks import masks_from_model

    try:
        masks = masks_from_model(model)
    except UserInputError:  # not a decoder LM (a bare module in a test or a custom loop): no pruned projections
        return {}
    wanted = {id(p) for p in trainable}
    named = dict(model.named_parameters(remove_duplicate=False))
    found: dict[nn.Parameter, torch.Tensor] = {}
    for name, keep in masks.items():
        p = named.get(name)
        if p is not None and id(p) in wanted:
            found[p] = keep.to(torch.bool)
    return found


def local_mask(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`mask` as this rank's rows of `p`: masks of a sharded model may come full size or as the local shard."""
    local = local_tensor(p)
    m = mask if tuple(mask.shape) == tuple(local.shape) else local_rows(mask, p)
    return m.to(local.device)


class SparseforgeOptimizer:
    """Mixin of every optimizer built here: its registry name, whether it is zeroth-order, and mask keeping."""

    optimizer_name: str = ""
    zeroth_order: bool = False
    _masks: dict = {}

    def _setup_masks(self, masks: dict[nn.Parameter, torch.Tensor] | None) -> None:
        self._masks = dict(masks or {})

    @torch.no_grad()
    def reapply_masks(self, only: torch.Tensor | None = None) -> None:
        for p, mask in self._masks.items():
            if only is not None and p is not only:
                continue
            local = local_tensor(p)
            local.masked_fill_(~local_mask(mask, p), 0)


# -- FSDP2: parameters are DTensors sharded on dim 0 -------------------------------------------------------------

def is_sharded(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly FSDP-sharded DTensor) tensor that this process holds."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank where it is sharded (a collective: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def local_rows(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The rows of a full-size tensor that this rank's shard of `p` holds: FSDP2 splits dim 0 like
    `torch.chunk` (ceil-sized pieces, the last ones shorter or empty)."""
    if not is_sharded(p):
        return full
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise UserInputError(f"this optimizer supports FSDP sharding on dim 0 only, got placements {p.placements}")
    world = p.device_mesh.size()
    rank = p.device_mesh.get_local_rank()
    chunk = -(-full.shape[0] // world)
    start = min(rank * chunk, full.shape[0])
    return full[start:start + local_tensor(p).shape[0]]


# -- state to and from safetensors + JSON ------------------------------------------------------------------------

def optimizer_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """`opt.state_dict()` as named tensors (for safetensors) and a JSON-safe dict (everything else). Under FSDP
    each rank writes its own shard (the entries listed in `data["sharded"]`)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    sharded: list[str] = []
    for idx, entry in sd["state"].items():
        plain[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                if is_sharded(value):
                    value = value.to_local()
                    sharded.append(f"state.{idx}.{key}")
                flat = opt.flatten_state_tensor(value) if hasattr(opt, "flatten_state_tensor") else None
                if flat is not None:  # a tensor subclass (torchao's 8-bit state) goes in plain parts
                    parts, meta = flat
                    for part, t in parts.items():
                        tensors[f"state.{idx}.{key}.{part}"] = t.detach().to("cpu").clone().contiguous()
                    if meta is not None:
                        plain[str(idx)].setdefault("__parts__", {})[key] = meta
                    continue
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").clone().contiguous()
            else:
                plain[str(idx)][key] = _jsonable(value)
    data = {"optimizer": getattr(opt, "optimizer_name", type(opt).__name__), "param_groups": _jsonable(sd["param_groups"]),
            "state": plain, "sharded": sharded}
    return tensors, data


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], data: dict) -> None:
    """Restore what `optimizer_state_tensors` wrote, onto an optimizer built the same way."""
    name = getattr(opt, "optimizer_name", type(opt).__name__)
    if data.get("optimizer") != name:
        raise UserInputError(f"optimizer state was saved by '{data.get('optimizer')}', not '{name}'")
    def key_of(i: str):  # parameter indices were ints; an optimizer's own entries (MeZO's counters) keep names
        return int(i) if i.isdigit() else i

    state: dict = {key_of(i): dict(entry) for i, entry in data["state"].items()}
    parts: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, field = key.split(".", 2)
        if "." in field:  # one part of a flattened tensor subclass
            base_field, part = field.split(".", 1)
            parts.setdefault((key_of(idx), base_field), {})[part] = value
        else:
            state.setdefault(key_of(idx), {})[field] = value
    for (idx, field), pieces in parts.items():
        state[idx][field] = opt.unflatten_state_tensor(pieces, state[idx].get("__parts__", {}).get(field))
    for entry in state.values():
        entry.pop("__parts__", None)
    groups = [dict(g) for g in data["param_groups"]]
    for g in groups:
        for k, v in list(g.items()):
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)  # betas and the like were tuples before JSON
    if hasattr(opt, "prepare_groups"):
        groups = opt.prepare_groups(groups)
    sharded = set(data.get("sharded", []))
    opt.load_state_dict({"state": state, "param_groups": groups})
    _restore_local_shards(opt, sharded)


def _restore_local_shards(opt, sharded: set[str]) -> None:
    """Under FSDP the saved state holds each rank's shard of the entries listed as sharded; make those DTensors
    placed like their parameter again (low-rank and replicated entries stay plain tensors)."""
    if not sharded:
        return
    from torch.distributed.tensor import DTensor

    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if f"state.{index}.{k}" in sharded and not is_sharded(v):
                    opt.state[p][k] = DTensor.from_local(v.to(local_tensor(p).device), p.device_mesh, p.placements,
                                                         run_check=False, shape=p.shape, stride=p.stride())
            index += 1


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Exact bytes of the optimizer's state tensors (this process's share under FSDP)."""
    tensors, _ = optimizer_state_tensors(opt)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"optimizer state value of type {type(value).__name__} is not JSON")
