import pytest
import torch

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.masks import prune_count
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from sparseforge.methods.weights.owl import allocate
from tiny_models import tiny_model


def test_allocation_mean_range_and_order():
    ratios = {0: 0.01, 1: 0.05, 2: 0.03, 3: 0.02}
    s = allocate(ratios, 0.7, 0.08)
    assert abs(sum(s.values()) / 4 - 0.7) < 1e-12
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)
    assert s[1] < s[2] < s[3] < s[0]  # more outliers, fewer weights removed
    assert set(allocate({0: 0.1, 1: 0.1}, 0.5, 0.08).values()) == {0.5}
    with pytest.raises(UserInputError, match="spread"):
        allocate(ratios, 0.95, 0.08)


def test_owl_prunes_each_layer_to_its_allocated_sparsity(tokenizer):
    torch.set_num_threads(1)
    model = tiny_model("llama")
    cls = get_method("owl")
    result = cls(cls.parse_params({"base": "wanda", "sparsity": 0.6, "spread": 0.1})).apply(
        model, tokenizer, calibration=CalibrationConfig(samples=2, seq_len=64), progress=False)
    assert result.method == "owl+wanda" and len(set(result.layer_sparsity.values())) == 2
    adapter = ModelAdapter(model)
    for i, s in result.layer_sparsity.items():
        for name, proj in adapter.projections(i).items():
            w = proj.weight()
            assert (w == 0).sum().item() == w.shape[0] * prune_count(w.shape[1], s), name  # Wanda: per row
    with pytest.raises(UserInputError):
        cls.parse_params({"base": "sparsegpt-typo"})
