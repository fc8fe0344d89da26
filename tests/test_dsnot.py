import pytest
import torch

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.masks import prune_count, unstructured_mask
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from sparseforge.methods.weights.dsnot import dsnot_repair
from tiny_models import tiny_model


def test_repair_keeps_row_counts_and_cuts_the_expected_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 64, generator=g) + torch.linspace(-1, 2, 64)  # inputs with nonzero means
    W = torch.randn(32, 64, generator=g)
    pruned = W * unstructured_mask(W.abs() * X.norm(dim=0), 0.6, "row")
    repaired = dsnot_repair(W, pruned, X.mean(0), X.norm(dim=0), max_cycles=50, tolerance=0.0)
    assert torch.equal((repaired != 0).sum(1), (pruned != 0).sum(1))  # same budget in every row
    before = ((W - pruned) * X.mean(0)).sum(1).abs()
    after = ((W - repaired) * X.mean(0)).sum(1).abs()
    assert (after <= before + 1e-6).all() and after.mean() < 0.5 * before.mean()
    assert torch.equal(repaired[repaired != 0], W[repaired != 0])  # weights keep their dense values


def test_repair_keeps_updated_values_of_kept_weights():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    pruned = torch.tensor([[0.0, 0.0, 3.5, 4.5]])  # as if a SparseGPT update changed the survivors
    out = dsnot_repair(W, pruned, torch.ones(4), torch.ones(4), max_cycles=0)
    assert torch.equal(out, pruned)


def test_dsnot_on_a_model(tokenizer):
    torch.set_num_threads(1)
    model = tiny_model("llama")
    cls = get_method("dsnot")
    result = cls(cls.parse_params({"base": "wanda", "sparsity": 0.6})).apply(model, tokenizer, calibration=CalibrationConfig(samples=2, seq_len=64), progress=False)
    assert result.projections
    for name, proj in ModelAdapter(model).projections().items():
        w = proj.weight()
        assert ((w == 0).sum(1) == prune_count(w.shape[1], 0.6)).all(), name
    with pytest.raises(UserInputError):
        cls.parse_params({"sparsity": 1.0})
