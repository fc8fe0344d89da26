"""PERP (Zimmer et al., 2023, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs"): after pruning,
retrain only the normalisation parameters and biases (optionally the embeddings), a fraction of a percent of
the model, with everything else frozen. The pruned weights are frozen, so their masks hold trivially; the
masks are attached anyway (trainer.py), as for every recovery stage."""
from __future__ import annotations

import dataclasses

from sparseforge.methods.base import param, register
from sparseforge.methods.training.base import RecoveryMethod, TrainingParams, bias_parameters, freeze, norm_parameters


@dataclasses.dataclass
class PerpParams(TrainingParams):
    lr: float = param(1e-3, "peak learning rate (norms and biases take a larger one than full fine-tuning)")
    norms: bool = param(True, "train the normalisation layers' parameters")
    biases: bool = param(True, "train every bias")
    embeddings: bool = param(False, "also train the input embeddings (and a head tied to them)")


@register
class Perp(RecoveryMethod):
    name = "perp"
    summary = "recovery after pruning: train only norms and biases (optionally embeddings), the rest frozen"
    Params = PerpParams

    def prepare(self, model, targets, ignore):
        freeze(model)
        chosen = {}
        if self.params.norms:
            chosen.update(norm_parameters(model))
        if self.params.biases:
            chosen.update(bias_parameters(model))
        if self.params.embeddings and model.get_input_embeddings() is not None:
            chosen.update({f"embeddings.{n}": p for n, p in model.get_input_embeddings().named_parameters()})
        for p in chosen.values():
            p.requires_grad_(True)
        self._names = sorted(chosen)
        return model

    def report_fields(self):
        return {"trained_groups": [g for g, on in (("norms", self.params.norms), ("biases", self.params.biases),
                                                   ("embeddings", self.params.embeddings)) if on]}
