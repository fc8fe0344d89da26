"""LoRA through PEFT, merged under the pruning masks.

PEFT (`peft.LoraConfig` + `get_peft_model`) puts low-rank adapters on the targeted projections (nn.Linear and
GPT-2's Conv1D) and trains only them. PEFT's own `merge_and_unload` adds the dense delta B @ A to each weight,
which fills every pruned position (a Wanda user saw 40% sparsity fall to 32.7%). Here the merge adds the delta
times the weight's keep-mask instead, so the merged model keeps its exact pattern, N:M included, and then
`unload()` takes the adapters off. `merge: dense` does PEFT's dense merge, to measure what it costs."""
from __future__ import annotations

import dataclasses
import re

import torch

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.sparsity_masks import masks_of
from sparseforge.errors import UserInputError
from sparseforge.methods.base import param, register
from sparseforge.methods.training.base import RecoveryMethod, TrainingParams


@dataclasses.dataclass
class LoraParams(TrainingParams):
    lr: float = param(1e-3, "peak learning rate")
    rank: int = param(8, "rank r of each adapter (B is out x r, A is r x in)")
    alpha: float = param(16.0, "LoRA scaling numerator: the delta is (alpha / rank) * B @ A")
    dropout: float = param(0.0, "dropout on the adapters' input while training")
    merge: str = param("masked", "'masked': add the delta only where the weight is kept (pattern exact); 'dense': PEFT's plain merge",
                       ("masked", "dense"))


@register
class Lora(RecoveryMethod):
    name = "lora"
    summary = "recovery after pruning: LoRA adapters (PEFT), merged under the pruning masks so the sparsity pattern survives exactly"
    Params = LoraParams

    @classmethod
    def validate(cls, params, where: str = "") -> None:
        super().validate(params, where)
        if params.rank < 1:
            raise UserInputError(f"{where + ': ' if where else ''}'rank' of 'lora' must be at least 1, got {params.rank}")
        if not 0.0 <= params.dropout < 1.0:
            raise UserInputError(f"{where + ': ' if where else ''}'dropout' of 'lora' must be in [0, 1), got {params.dropout}")

    def prepare(self, model, targets, ignore):
        import peft

        names = [n for n, p in ModelAdapter(model).select(targets, ignore).items() if p.is_hookable()]
        if not names:
            raise UserInputError(f"'lora' found no linear projection matching targets {list(targets)} (fused expert weights take no LoRA here)")
        self._targets = names
        config = peft.LoraConfig(r=self.params.rank, lora_alpha=self.params.alpha, lora_dropout=self.params.dropout,
                                 target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$", bias="none")
        return peft.get_peft_model(model, config)

    @torch.no_grad()
    def finish(self, model, work):
        from peft.tuners.lora import LoraLayer

        handle = masks_of(model)
        self._masked = 0
        for module in work.modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).to(weight.dtype)
                keep = handle.mask_for(weight) if handle is not None and self.params.merge == "masked" else None
                if keep is not None:
                    delta = delta.masked_fill(~keep, 0)
                    self._masked += 1
                weight.add_(delta)
        base = work.unload()  # adapters off; the base model's own modules back in place
        if base is not model:  # pragma: no cover - PEFT returns the wrapped model itself
            raise RuntimeError("PEFT's unload returned another model object")
        return model

    def report_fields(self):
        return {"rank": self.params.rank, "adapted_projections": len(getattr(self, "_targets", [])), "merge": self.params.merge,
                "masked_merges": getattr(self, "_masked", 0)}
