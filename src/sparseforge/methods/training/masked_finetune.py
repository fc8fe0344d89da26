"""Masked full fine-tuning: every parameter trains, and the pruning masks (core/sparsity_masks.py) keep each
pruned weight exactly zero: its gradient is zeroed before the optimizer sees it and it is re-zeroed after every
step. The strongest and most memory-hungry recovery (AdamW state is twice the model)."""
from __future__ import annotations

import dataclasses

from sparseforge.core.adapter import ModelAdapter
from sparseforge.methods.base import param, register
from sparseforge.methods.training.base import RecoveryMethod, TrainingParams, freeze, norm_parameters


@dataclasses.dataclass
class MaskedFinetuneParams(TrainingParams):
    lr: float = param(5e-5, "peak learning rate")
    train: str = param("all", "'all' parameters, or only the targeted 'projections' (plus the norms)", ("all", "projections"))


@register
class MaskedFinetune(RecoveryMethod):
    name = "masked-finetune"
    summary = "recovery after pruning: full fine-tuning with the pruning masks kept exactly (pruned weights stay zero)"
    Params = MaskedFinetuneParams

    def prepare(self, model, targets, ignore):
        if self.params.train == "all":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        freeze(model)
        for proj in ModelAdapter(model).select(targets, ignore).values():
            proj.parameter.requires_grad_(True)
        for p in norm_parameters(model).values():
            p.requires_grad_(True)
        return model

    def report_fields(self):
        return {"train": self.params.train}
