import pytest
import torch

from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig, calibration_batches, run_layerwise
from sparseforge.core.masks import check_nm, check_unstructured
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from tiny_models import tiny_model


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "gemma2"])
def test_layerwise_walk_feeds_each_layer_the_models_own_hidden_state(arch):
    """With a method that changes nothing, every input the pipeline feeds layer i must equal the dense
    model's hidden state i: capture and propagation are both right."""
    model = tiny_model(arch)
    ids = torch.randint(0, 4000, (2, 16))
    expected = _hidden_states(model, ids)
    adapter = ModelAdapter(model)
    seen = {i: [] for i in range(adapter.num_layers)}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: seen[i].append(a[0] if a else k["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(adapter.layers)
    ]
    calls = []
    run_layerwise(model, lambda i, *rest: calls.append(i), batches=[ids], stats=("col_norm",), progress=False)
    for h in hooks:
        h.remove()
    assert calls == list(range(adapter.num_layers))
    for i in range(adapter.num_layers):
        assert seen[i], f"layer {i} never ran"
        for x in seen[i]:
            assert torch.allclose(x, expected[i], atol=1e-5), f"layer {i} input differs"


def test_input_stats_match_a_manual_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 4000, (1, 20))
    adapter = ModelAdapter(model)
    target = "model.layers.1.mlp.down_proj"
    manual = []
    h = adapter.projections()[target].module.register_forward_hook(lambda m, a, o: manual.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    got = {}

    def grab(index, layer, projections, stats):
        if target in stats:
            got["norm"] = stats[target].col_norm.clone()
            got["hessian"] = stats[target].hessian.clone()
            got["n"] = stats[target].n_tokens

    run_layerwise(model, grab, batches=[ids], stats=("col_norm", "hessian"), progress=False)
    x = manual[0].reshape(-1, manual[0].shape[-1]).float()
    assert got["n"] == 20
    assert torch.allclose(got["norm"], x.norm(dim=0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(got["hessian"], x.t() @ x, rtol=1e-4, atol=1e-4)


def test_calibration_batches_are_seeded(tokenizer):
    cfg = CalibrationConfig(samples=3, seq_len=32, seed=7)
    a, b = calibration_batches(tokenizer, cfg), calibration_batches(tokenizer, cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (1, 32)
    c = calibration_batches(tokenizer, CalibrationConfig(samples=3, seq_len=32, seed=8))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(UserInputError, match="seq_len"):
        calibration_batches(tokenizer, CalibrationConfig(samples=1, seq_len=10**7))
    with pytest.raises(UserInputError, match="neither a bundled split"):
        calibration_batches(tokenizer, CalibrationConfig(source="/no/such/file.txt"))


def _masks(model):
    return {n: (p.weight() == 0).clone() for n, p in ModelAdapter(model).projections().items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_pruning_is_exact_and_deterministic(method, pattern, tokenizer):
    cls = get_method(method)
    params = cls.parse_params({"pattern": pattern, **({"sparsity": 0.6} if pattern == "unstructured" else {})})
    cal = CalibrationConfig(samples=2, seq_len=32)
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        cls(params).apply(model, tokenizer, calibration=cal, progress=False)
        runs.append(_masks(model))
        for name, proj in ModelAdapter(model).projections().items():
            w = proj.weight()
            if pattern == "unstructured":
                assert check_unstructured(w, 0.6, params.compare), name
                group = w.shape[-1] if params.compare == "row" else w.shape[-2] * w.shape[-1]
                assert (w == 0).sum().item() == w.numel() // group * int(group * 0.6), name
            else:
                n, m = map(int, pattern.split(":"))
                assert check_nm(w, n, m) and (w == 0).sum().item() == w.numel() * (m - n) // m, name
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_wanda_uses_activations(tokenizer):
    cal = CalibrationConfig(samples=2, seq_len=32)
    a, b = tiny_model("llama"), tiny_model("llama")
    get_method("magnitude")(get_method("magnitude").parse_params({"compare": "row"})).apply(a, tokenizer, progress=False)
    get_method("wanda")().apply(b, tokenizer, calibration=cal, progress=False)
    ma, mb = _masks(a), _masks(b)
    assert any(not torch.equal(ma[k], mb[k]) for k in ma)


def test_targets_and_ignore_select_projections(tokenizer):
    model = tiny_model("llama")
    cls = get_method("magnitude")
    result = cls(cls.parse_params({})).apply(model, tokenizer, targets=["*.mlp.*"], ignore=["*down_proj"], progress=False)
    assert result.projections and all(".mlp." in n and "down_proj" not in n for n in result.projections)
    for name, proj in ModelAdapter(model).projections().items():
        zeros = (proj.weight() == 0).float().mean().item()
        assert (zeros > 0.4) == (name in result.projections), name


def test_calibrated_method_prunes_fused_experts_or_leaves_them_when_ignored(tokenizer):
    # Per-expert statistics (issue 15; tests/test_moe_calibration.py): the experts are pruned like the rest ...
    cal = CalibrationConfig(samples=1, seq_len=16)
    result = get_method("wanda")().apply(tiny_model("mixtral"), tokenizer, calibration=cal, progress=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in result.projections and result.routing["blocks"]
    # ... and an ignore glob still leaves them dense, with no routing recorded.
    model = tiny_model("mixtral")
    result = get_method("wanda")().apply(model, tokenizer, ignore=["*experts*"], calibration=cal, progress=False)
    assert result.projections and not any("experts" in n for n in result.projections) and result.routing is None
    assert (model.model.layers[0].mlp.experts.down_proj != 0).all()


def test_calibrated_method_refuses_a_fused_expert_weight_outside_a_recognised_block(tokenizer):
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate.weight = torch.nn.Parameter(layer.mlp.gate.weight[:3].clone())  # no [E, H] router: no MoE block
    with pytest.raises(UserInputError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' is a fused expert weight.*ignore") as info:
        get_method("wanda")().apply(model, tokenizer, calibration=CalibrationConfig(samples=1, seq_len=16), progress=False)
    assert "\n" not in str(info.value)
