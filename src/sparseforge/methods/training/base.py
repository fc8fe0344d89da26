"""Recovery fine-tuning after pruning: the small base class of the training family.

A recovery method is a transform stage (it changes weights once, inside `compress` or `sparseforge finetune`)
that trains the model it is given for a fixed number of steps on text that is not the held-out text, with the
pruning masks attached (core/sparsity_masks.py), so every pruned position stays exactly zero. A method says
only what trains and how it folds back into plain weights:

- `prepare(model, targets, ignore)`: freeze/unfreeze, wrap (PEFT) or parametrize (sparse deltas); returns the
  module to run (the model itself or a wrapper);
- `trainable(work)`: the parameters the optimizer gets;
- `on_step_end(step, work, optimizer)`: periodic work between steps (SpIEL's prune and regrow);
- `finish(model, work)`: fold what was trained into the model's own weights, under the masks (LoRA's merge);
- `state()` / `load_state()`: what a checkpoint must hold besides the trainable tensors, for an exact resume.

The loop itself (data, optimizer, schedule, precision, checkpoints, evaluation) is `trainer.py`, shared.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, ClassVar

import torch
from torch import nn

from sparseforge.errors import UserInputError
from sparseforge.methods.base import Method, param


def _optimizer_names() -> tuple[str, ...]:
    from sparseforge.methods.training.optimizers import optimizer_names

    return tuple(optimizer_names())


@dataclasses.dataclass
class TrainingParams:
    steps: int = param(100, "optimizer steps")
    lr: float = param(1e-4, "peak learning rate (linear warm-up, then the schedule)")
    batch_size: int = param(4, "sequences per micro-batch")
    seq_len: int = param(256, "tokens per training sequence")
    grad_accum: int = param(1, "micro-batches per optimizer step (gradient accumulation)")
    warmup_steps: int = param(10, "steps of linear learning-rate warm-up from 0")
    schedule: str = param("cosine", "learning rate after warm-up: 'cosine' (to 10% of lr) or 'constant'", ("cosine", "constant"))
    optimizer: str = param("adamw", "optimizer from the training registry (see docs/methods/training.md)", _optimizer_names)
    optimizer_params: dict = param({}, "further optimizer parameters, e.g. {weight_decay: 0.01} (lr comes from 'lr')")
    data: str = param("calibration", "training text: 'calibration' (the bundled calibration text) or a UTF-8 text file; never the held-out text")
    precision: str = param("fp32", "'fp32', or 'bf16' (autocast: bf16 matmuls, fp32 weights and optimizer state)", ("fp32", "bf16"))
    seed: int = param(0, "seed of the data order and of any random initialisation (LoRA, sparse-delta indices)")


@dataclasses.dataclass
class TrainingResult:
    """What a recovery stage did; `fields` are the method's own (rank, budget, merge)."""

    method: str
    steps: int
    tokens: int
    trainable_params: int
    trainable_share: float
    loss_first: float | None
    loss_last: float | None
    optimizer: str
    masked_tensors: int
    sparsity_before: float
    sparsity_after: float
    mask_changed: int
    fields: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(out.pop("fields"))
        return out


class RecoveryMethod(Method):
    """Base of every recovery method (see the module docstring)."""

    family: ClassVar[str] = "training"
    Params: ClassVar[type] = TrainingParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        where = f"{where}: " if where else ""
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(params, name) < 1:
                raise UserInputError(f"{where}'{name}' of '{cls.name}' must be at least 1, got {getattr(params, name)}")
        if params.seq_len < 2:
            raise UserInputError(f"{where}'seq_len' of '{cls.name}' must be at least 2 tokens, got {params.seq_len}")
        if params.warmup_steps < 0:
            raise UserInputError(f"{where}'warmup_steps' of '{cls.name}' must be >= 0, got {params.warmup_steps}")
        if not params.lr > 0:
            raise UserInputError(f"{where}'lr' of '{cls.name}' must be positive, got {params.lr}")
        if str(params.data) == "heldout":
            raise UserInputError(f"{where}'{cls.name}' may not train on the held-out text (it measures the result); use 'calibration' or a file")
        if not isinstance(params.optimizer_params, dict) or "lr" in params.optimizer_params:
            raise UserInputError(f"{where}'optimizer_params' of '{cls.name}' must be a mapping without 'lr' (set 'lr' on the stage)")

    @classmethod
    def example_params(cls) -> dict[str, Any]:
        return {"steps": 2, "batch_size": 1, "seq_len": 16, "warmup_steps": 0}

    # -- what subclasses implement ---------------------------------------------------------------------------

    def prepare(self, model: nn.Module, targets, ignore) -> nn.Module:
        raise NotImplementedError

    def trainable(self, work: nn.Module) -> list[nn.Parameter]:
        return [p for p in work.parameters() if p.requires_grad]

    def on_step_end(self, step: int, work: nn.Module, optimizer) -> None:
        """Called after optimizer step `step` (0-based) and the mask re-zeroing."""

    def finish(self, model: nn.Module, work: nn.Module) -> nn.Module:
        """Fold the training into `model`'s own parameters and return it (default: nothing to fold)."""
        return model

    def report_fields(self) -> dict[str, Any]:
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON a checkpoint needs besides the trainable parameters and the optimizer."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], data: dict) -> None:
        pass

    # -- shared ----------------------------------------------------------------------------------------------

    def apply(self, model, tokenizer=None, targets=("*",), ignore=(), calibration=None, progress=True) -> TrainingResult:
        from sparseforge.methods.training.trainer import train

        if tokenizer is None:
            raise UserInputError(f"'{self.name}' trains on text, so it needs the model's tokenizer; pass one to compress")
        return train(self, model, tokenizer, targets, ignore, progress=progress)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of normalisation modules (LayerNorm, RMSNorm and every model's own *Norm class), by name."""
    found = {}
    for name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower():
            for pname, p in mod.named_parameters(recurse=False):
                found[f"{name}.{pname}" if name else pname] = p
    return found


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}


def matches(name: str, targets, ignore) -> bool:
    return any(fnmatch.fnmatchcase(name, t) for t in targets) and not any(fnmatch.fnmatchcase(name, g) for g in ignore)
