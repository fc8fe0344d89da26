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
    # The variance term changes which weights are revived but not the guarantees above.
    var = X.var(0, unbiased=False)
    with_var = dsnot_repair(W, pruned, X.mean(0), X.norm(dim=0), max_cycles=50, tolerance=0.0, col_var=var, variance_power=1.0)
    assert torch.equal((with_var != 0).sum(1), (pruned != 0).sum(1))
    after_var = ((W - with_var) * X.mean(0)).sum(1).abs()
    assert (after_var <= before + 1e-6).all() and not torch.equal(with_var != 0, repaired != 0)


def test_growth_prefers_low_variance_inputs():
    # Two pruned weights would cut the error equally; the variance term picks the one whose input varies less.
    W = torch.tensor([[1.0, 1.0, -0.1, 5.0]])
    pruned = torch.tensor([[0.0, 0.0, -0.1, 5.0]])
    mean, norm = torch.ones(4), torch.ones(4)
    var = torch.tensor([4.0, 0.25, 1.0, 1.0])
    out = dsnot_repair(W, pruned, mean, norm, max_cycles=1, tolerance=0.0, col_var=var, variance_power=1.0)
    assert out[0, 1] == 1.0 and out[0, 0] == 0.0 and out[0, 2] == 0.0  # grew column 1, pruned the -0.1


def test_repair_keeps_updated_values_of_kept_weights():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    pruned = torch.tensor([[0.0, 0.0, 3.5, 4.5]])  # as if a SparseGPT update changed the survivors
    out = dsnot_repair(W, pruned, torch.ones(4), torch.ones(4), max_cycles=0)
    assert torch.equal(out, pruned)


def test_dsnot_on_a_model(tokenizer):
    torch.set_num_threads(1)
    model = tiny_model("llama")
    cls = get_method("dsnot")
    calibration = CalibrationConfig(samples=2, seq_len=64)
    result = cls(cls.parse_params({"base": "wanda", "sparsity": 0.6, "repair": "all"})).apply(model, tokenizer, calibration=calibration, progress=False)
    assert result.projections
    for name, proj in ModelAdapter(model).projections().items():
        w = proj.weight()
        assert ((w == 0).sum(1) == prune_count(w.shape[1], 0.6)).all(), name
    with pytest.raises(UserInputError):
        cls.parse_params({"sparsity": 1.0})


def test_default_repairs_attention_only(tokenizer):
    # With repair=attention the MLP masks must equal plain Wanda's; the attention masks differ somewhere.
    torch.set_num_threads(1)
    calibration = CalibrationConfig(samples=2, seq_len=64)
    wanda, dsnot = tiny_model("llama"), tiny_model("llama")
    get_method("wanda")(get_method("wanda").parse_params({"sparsity": 0.6})).apply(wanda, tokenizer, calibration=calibration, progress=False)
    cls = get_method("dsnot")
    cls(cls.parse_params({"base": "wanda", "sparsity": 0.6})).apply(dsnot, tokenizer, calibration=calibration, progress=False)
    a, b = ModelAdapter(wanda).projections(), ModelAdapter(dsnot).projections()
    # Layer 0 only: later layers calibrate on the (differently) pruned outputs of the layers before them.
    mlp = [n for n in a if n.startswith("model.layers.0.mlp.")]
    attn = [n for n in a if ".self_attn." in n]
    assert mlp and attn
    for n in mlp:
        assert torch.equal(a[n].weight() != 0, b[n].weight() != 0), n
    assert any(not torch.equal(a[n].weight() != 0, b[n].weight() != 0) for n in attn)
