"""CATS, WINA and R-Sparse on the shared base: what each zeroes, exact identities of their products, run-time
sparsity on held-out text, composition with weight pruning in one recipe, exact detach, and one-line errors."""
from __future__ import annotations

import pytest
import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.data import read_text
from sparseforge.errors import UserInputError
from sparseforge.kernels import activation_sparse as ak
from sparseforge.methods import get_method
from sparseforge.methods.activations import ActivationSparseLinear, measure_sparsity
from sparseforge.methods.activations.cats import ThresholdedActivation
from sparseforge.methods.activations.rsparse import low_rank
from sparseforge.recipe import Recipe, Stage, load_recipe, parse_recipe
from tiny_models import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(method, samples=8, seq_len=256, **params):
    params = {"gate_token_counts": [1], "gate_repeats": 1, **params}
    return Recipe("t", [Stage(method, get_method(method).parse_params(params))], CalibrationConfig(samples=samples, seq_len=seq_len))


def _heldout(tokenizer, n=1024):
    return torch.tensor([tokenizer(read_text("heldout"), add_special_tokens=False)["input_ids"][:n]])


@pytest.fixture(scope="module")
def reference():
    return sparseforge.load()


@pytest.mark.parametrize("method", ["wina", "rsparse", "cats"])
def test_runtime_sparsity_on_heldout_text(method, reference, tokenizer):
    model, _ = sparseforge.compress(reference, _recipe(method, sparsity=0.5), tokenizer, progress=False)
    with torch.no_grad(), measure_sparsity(model) as measured:
        model(_heldout(tokenizer))
    assert abs(measured["mean"] - 0.5) <= 0.03, measured
    routed = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in measured["projections"]}
    assert routed == ({"mlp.down_proj"} if method == "cats" else {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})


def test_wina_thresholds_scale_with_column_norms(reference, tokenizer):
    model, _ = sparseforge.compress(reference, _recipe("wina", sparsity=0.5), tokenizer, progress=False)
    for name, m in model.named_modules():
        if isinstance(m, ActivationSparseLinear):
            # threshold_j * ||W[:, j]|| is one value per projection: the score threshold t.
            score_t = m.threshold * m.weight.float().norm(dim=0)
            assert torch.allclose(score_t, score_t[0].expand_as(score_t), rtol=1e-4), name


def test_rsparse_product_identities():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(3, 64, generator=g)
    t = torch.rand(64, generator=g)
    lin = torch.nn.Linear(64, 48, bias=False)
    lin.weight.data.copy_(w)
    # Full rank: the low-rank term is exact, so the product is the dense one whatever is masked.
    full = ActivationSparseLinear(lin, t, 0.5, None, lowrank=low_rank(w, 48))
    # Rank 0: what remains is exactly the thresholded product.
    none = ActivationSparseLinear(lin, t, 0.5, None, lowrank=low_rank(w, 0))
    with torch.no_grad():
        assert torch.allclose(full(x), x @ w.t(), atol=1e-4)
        assert torch.allclose(none(x), ak.reference_product(x, w, t), atol=1e-6)
    # The low-rank factors are the best rank-r approximation (Eckart-Young: the error is the tail of the spectrum).
    u, v = low_rank(w, 8)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.matrix_norm(w - u @ v), s[8:].norm(), rtol=1e-4)


def test_rsparse_low_rank_term_lowers_the_error(reference, tokenizer):
    ids = _heldout(tokenizer, 256)
    with torch.no_grad():
        dense = reference(ids).logits.log_softmax(-1)
        kls = {}
        for rank in (0.0, 0.25):
            model, _ = sparseforge.compress(reference, _recipe("rsparse", sparsity=0.5, rank=rank), tokenizer, progress=False)
            kls[rank] = float((dense.exp() * (dense - model(ids).logits.log_softmax(-1))).sum(-1).mean())
    assert kls[0.25] < 0.8 * kls[0.0], kls


def test_cats_zeroes_the_activation_and_detach_restores_it(tokenizer):
    model = tiny_model("llama")
    act_before = model.model.layers[0].mlp.act_fn
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
    # sparse_up off: this test watches the down projection's input, which the fused MLP path never forms.
    sparseforge.attach_method(model, "cats", {"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1, "sparse_up": False},
                              tokenizer=tokenizer, calibration=CalibrationConfig(samples=2, seq_len=32))
    act = model.model.layers[0].mlp.act_fn
    assert isinstance(act, ThresholdedActivation) and act.original[0] is act_before
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    zero = float((seen[0] == 0).float().mean())
    assert 0.3 < zero < 0.7  # about half, calibrated on other text
    sparseforge.detach_runtime(model)
    assert model.model.layers[0].mlp.act_fn is act_before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_weights_pruned_first_then_thresholds_calibrated_on_the_pruned_model(tokenizer):
    model = tiny_model("llama")
    recipe = Recipe("c", [Stage("magnitude", get_method("magnitude").parse_params({"sparsity": 0.5})),
                          Stage("teal", get_method("teal").parse_params({"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1}))],
                    CalibrationConfig(samples=2, seq_len=32))
    compressed, report = sparseforge.compress(model, recipe, tokenizer, progress=False)
    assert [s["method"] for s in report["stages"]] == ["magnitude", "teal"]
    down = compressed.model.layers[0].mlp.down_proj
    assert isinstance(down, ActivationSparseLinear)
    assert abs(float((down.weight == 0).float().mean()) - 0.5) < 0.01  # the routed weight is the pruned one
    # The thresholds are those of the pruned model: calibrating TEAL alone on it gives the same state.
    pruned = sparseforge.detach_runtime(compressed)
    again, _ = sparseforge.compress(compressed, _recipe("teal", samples=2, seq_len=32, sparsity=0.5), tokenizer, progress=False)
    (a,), (b,) = pruned, sparseforge.runtime_stages(again)
    assert all(torch.equal(a.state.tensors[k], b.state.tensors[k]) for k in a.state.tensors)


@pytest.mark.parametrize("preset, method", [("cats-50", "cats"), ("wina-50", "wina"), ("rsparse-50", "rsparse")])
def test_presets(preset, method):
    (stage,) = load_recipe(preset).stages
    assert stage.method == method and stage.params.sparsity == 0.5


@pytest.mark.parametrize("method, params, message", [
    ("wina", {"sparsity": 0.95}, "sparsity 0.95 must be in [0, 0.9]"),
    ("wina", {"prefill": "x"}, "allowed: sparse, dense, partial"),
    ("rsparse", {"rank": 1.5}, "rank 1.5 must be a fraction"),
    ("rsparse", {"rank": -0.1}, "rank -0.1 must be a fraction"),
    ("rsparse", {"sparsity": 1.0}, "sparsity 1.0 must be in [0, 0.95]"),
    ("cats", {"sparsity": 0.99}, "sparsity 0.99 must be in [0, 0.95]"),
    ("cats", {"gate_repeats": 0}, "gate_repeats must be >= 1"),
    ("cats", {"kernel": "gpu"}, "allowed: auto, row-skip, reference, triton"),
    ("teal", {"int8": "yes"}, "allowed: auto, off"),
])
def test_bad_params(method, params, message):
    text = f"stages:\n  - method: {method}\n    params: " + repr(params).replace("'", '"') + "\n"
    with pytest.raises(UserInputError) as err:
        parse_recipe(text, "r.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cats_without_an_mlp_activation_is_a_one_line_error(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(UserInputError, match="cats found no MLP"):
        sparseforge.attach_method(model, "cats", {"gate_token_counts": [1], "gate_repeats": 1}, targets=["*.self_attn.*"], tokenizer=tokenizer,
                                  calibration=CalibrationConfig(samples=2, seq_len=32))


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma2", "opt", "gpt_neox", "mixtral"])
@pytest.mark.parametrize("method", ["teal", "wina"])
def test_architectures_attach_change_and_detach_exactly(arch, method, tokenizer):
    """No per-model code: every nn.Linear the adapter finds in the decoder layers is routed (fused experts and
    GPT-2's Conv1D stay dense), outputs change, and detach restores them bit for bit."""
    model = tiny_model(arch)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(ids).logits
    sparseforge.attach_method(model, method, {"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1}, tokenizer=tokenizer,
                              calibration=CalibrationConfig(samples=2, seq_len=32))
    assert any(isinstance(m, ActivationSparseLinear) for m in model.modules())
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before, atol=1e-4)
    sparseforge.detach_runtime(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt_neox"])
def test_cats_on_other_architectures(arch, tokenizer):
    model = tiny_model(arch)
    sparseforge.attach_method(model, "cats", {"sparsity": 0.5, "gate_token_counts": [1], "gate_repeats": 1}, tokenizer=tokenizer,
                              calibration=CalibrationConfig(samples=2, seq_len=32))
    assert sum(isinstance(m, ThresholdedActivation) for m in model.modules()) == 2
    sparseforge.detach_runtime(model)
    assert not any(isinstance(m, (ThresholdedActivation, ActivationSparseLinear)) for m in model.modules())
