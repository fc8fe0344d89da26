"""Expert-level MoE methods (methods/experts): exact expert counts and loadable smaller checkpoints on every tiny
MoE architecture, the right experts removed on rigged routers, HEAPr's saliency on a hand-computed case, merging of
(permuted) identical experts keeping the function, and one-line errors for bad parameters."""
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import sparseforge
from sparseforge.core.calibration import CalibrationConfig, calibration_batches
from sparseforge.core.moe import find_moe_blocks
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from sparseforge.methods.experts.heapr import atomic_saliency, expert_saliency
from sparseforge.methods.experts import merge_experts
from sparseforge.methods.experts.merge_experts import match_neurons, merge_group
from sparseforge.recipe import Recipe, Stage
from tiny_models import MOE_ARCHITECTURES, VOCAB, tiny_model

CAL = CalibrationConfig(samples=2, seq_len=32)
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
METHODS = ("expert-prune", "heapr", "merge-experts")


def _compress(model, tokenizer, name, calibration=CAL, **params):
    cls = get_method(name)
    recipe = Recipe(f"test-{name}", [Stage(name, cls.parse_params(params))], calibration)
    return sparseforge.compress(model, recipe, tokenizer, progress=False)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_fewer_experts_saved_and_loaded_by_plain_transformers(arch, name, tokenizer, tmp_path):
    model = tiny_model(arch)
    shared_before = {k: v.clone() for k, v in model.state_dict().items() if "shared_expert" in k}
    out, report = _compress(model, tokenizer, name, ratio=0.5)
    (stage,) = report["stages"]
    assert (stage["experts_before"], stage["experts_after"]) == (4, 2)
    blocks = find_moe_blocks(out)
    assert [b.num_experts for b in blocks] == [2, 2]
    for b in blocks:
        assert b.experts.gate_up_proj.shape[0] == b.experts.down_proj.shape[0] == b.router.weight.shape[0] == 2
        layer = stage["layers"][str(b.layer_index)]
        assert len(layer["kept"]) == 2 and sorted(layer["kept"] + layer["removed"]) == [0, 1, 2, 3]
        assert sum(layer["tokens"]) == CAL.samples * CAL.seq_len * b.top_k
    # Shared experts (Qwen2-MoE) are never touched.
    assert all(torch.equal(out.state_dict()[k], v) for k, v in shared_before.items())
    assert stage["params_after"] < stage["params_before"]
    sparseforge.save(out, tmp_path / "a", tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert sum(p.numel() for p in plain.parameters()) == stage["params_after"]
    torch.testing.assert_close(_logits(plain), _logits(out))


def _rigged_mixtral(plus):
    """A tiny Mixtral whose routing is known per token: every embedding has +100 in dimension 0 and +-100 in
    dimension 1 (+ for token ids in `plus`), which dominate the residual stream, and router row e reads
    c_e x_0 + d_e x_1. '+' tokens go to experts {0, 1}, '-' tokens to {0, 2}; expert 3 is never picked."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 100.0
        emb[:, 1] = torch.where(plus(torch.arange(VOCAB)), 100.0, -100.0)
        for b in find_moe_blocks(model):
            b.router.weight.zero_()
            b.router.weight[:, 0] = torch.tensor([3.0, 1.0, 1.0, -5.0])
            b.router.weight[:, 1] = torch.tensor([0.0, 1.0, -1.0, 0.0])
    return model


@pytest.mark.parametrize("plus, removed_half", [(lambda i: i % 4 != 0, [2, 3]), (lambda i: i % 4 == 0, [1, 3])])
def test_frequency_pruning_removes_the_least_routed_experts_of_a_rigged_router(plus, removed_half, tokenizer):
    ids = torch.cat(calibration_batches(tokenizer, CAL)).flatten()
    n_plus = int(plus(ids).sum())
    for ratio, removed in ((0.25, [3]), (0.5, removed_half)):
        _, report = _compress(_rigged_mixtral(plus), tokenizer, "expert-prune", ratio=ratio)
        for layer in report["stages"][0]["layers"].values():
            assert layer["tokens"] == [len(ids), n_plus, len(ids) - n_plus, 0]
            assert layer["removed"] == removed
            assert layer["kept"] == sorted(set(range(4)) - set(removed))


def test_heapr_saliency_on_a_hand_computed_case():
    # One token x = [1, 2], routing weight 0.5, loss gradient [1, 1] at the block output, identity activation:
    # a = (gate x) * (up x) = [1 * 3, 2 * 2] = [3, 4]; w_0 . G = 1, w_1 . G = 3;
    # S_0 = 1/2 (0.5 * 3 * 1)^2 = 1.125, S_1 = 1/2 (0.5 * 4 * 3)^2 = 18; y = 3 w_0 + 4 w_1 = [3, 12], y . G = 15,
    # whole expert: 1/2 (0.5 * 15)^2 = 28.125.
    w = {"gate": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "up": torch.tensor([[1.0, 1.0], [2.0, 0.0]]), "down": torch.tensor([[1.0, 0.0], [0.0, 3.0]])}
    x, g, grad = torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]), torch.tensor([[1.0, 1.0]])
    ident = lambda t: t  # noqa: E731
    assert atomic_saliency(w, ident, x, g, grad).tolist() == [1.125, 18.0]
    assert expert_saliency(w, ident, x, g, grad).item() == 28.125
    # Tokens add up; a second token with a zero gradient adds nothing.
    x2, g2, grad2 = torch.cat([x, x]), torch.tensor([0.5, 0.9]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert atomic_saliency(w, ident, x2, g2, grad2).tolist() == [1.125, 18.0]


def test_heapr_removes_an_expert_that_contributes_nothing_even_when_it_is_routed(tokenizer):
    model = tiny_model("mixtral")
    with torch.no_grad():
        find_moe_blocks(model)[0].expert_weights(0)["down"].zero_()  # expert 0 of layer 0 is well routed, but outputs 0
    _, freq = _compress(tiny_model("mixtral"), tokenizer, "expert-prune", ratio=0.25)
    _, heapr = _compress(model, tokenizer, "heapr", ratio=0.25)
    freq0, heapr0 = freq["stages"][0]["layers"]["0"], heapr["stages"][0]["layers"]["0"]
    assert freq0["removed"] != [0]  # routing frequency alone keeps it
    assert heapr0["removed"] == [0] and heapr0["saliency_atomic_sum"][0] == 0 == heapr0["saliency_expert"][0]
    assert min(heapr0["saliency_atomic_sum"][1:]) > 0


def test_neuron_alignment_recovers_a_permutation_and_merge_of_permuted_copies_is_exact(monkeypatch):
    torch.manual_seed(0)
    a = {"gate": torch.randn(8, 6), "up": torch.randn(8, 6), "down": torch.randn(6, 8)}
    perm = torch.randperm(8)
    b = {"gate": a["gate"][perm], "up": a["up"][perm], "down": a["down"][:, perm]}  # the same function, neurons shuffled
    merged, solvers = merge_group([a, b], [0.3, 0.7], align=True)
    assert solvers == ["scipy.linear_sum_assignment"]
    for k in a:
        torch.testing.assert_close(merged[k], a[k])
    unaligned, _ = merge_group([a, b], [0.3, 0.7], align=False)
    assert not torch.allclose(unaligned["gate"], a["gate"], atol=1e-2)
    # The greedy fallback finds the same permutation on exact copies.
    similarity = torch.cat([a["gate"], a["up"], a["down"].T], 1) @ torch.cat([b["gate"], b["up"], b["down"].T], 1).T
    monkeypatch.setattr(merge_experts, "_assignment_solver", lambda: None)
    found, name = match_neurons(similarity)
    assert name == "greedy" and torch.equal(b["gate"][found], a["gate"])


def test_merging_permuted_twin_experts_keeps_the_function(tokenizer):
    """Top-1 Mixtral (routing weight 1) with experts 1 and 3 permuted copies of 0 and 2, router rows
    r1 = 1.5 r0 and r3 = 1.5 r2: a token goes to group {0, 1} exactly when r0 . x > r2 . x (max(l, 1.5 l) grows with
    l), both twins receive tokens, and after merging to the dominant experts the model computes the same thing."""
    config = transformers.CONFIG_MAPPING["mixtral"](**{**MOE_ARCHITECTURES["mixtral"], "num_experts_per_tok": 1, "vocab_size": VOCAB,
                                                        "max_position_embeddings": 512})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in find_moe_blocks(model):
            for src, dst in ((0, 1), (2, 3)):
                perm = torch.randperm(b.intermediate_size, generator=g)
                w, twin = b.expert_weights(src), b.expert_weights(dst)
                twin["gate"].copy_(w["gate"][perm])
                twin["up"].copy_(w["up"][perm])
                twin["down"].copy_(w["down"][:, perm])
                b.router.weight[dst] = 1.5 * b.router.weight[src]
    before = _logits(model)
    out, report = _compress(model, tokenizer, "merge-experts", calibration=CalibrationConfig(samples=4, seq_len=64), ratio=0.5)
    for layer in report["stages"][0]["layers"].values():
        assert all(t > 0 for t in layer["tokens"])
        assert sorted(sorted(m) for m in layer["groups"].values()) == [[0, 1], [2, 3]]
    torch.testing.assert_close(_logits(out), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_bad_parameters_give_one_line_errors(name, tokenizer):
    cls = get_method(name)
    for ratio in (0, 1, 1.5, -0.25):
        with pytest.raises(UserInputError, match=r"ratio .* is outside \(0, 1\)") as err:
            cls.parse_params({"ratio": ratio})
        assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="fewer than the 2 each token is routed to") as err:
        _compress(tiny_model("mixtral"), tokenizer, name, ratio=0.75)  # keeps 1 of 4 experts, top-2 routing
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="removes no expert of 4"):
        _compress(tiny_model("mixtral"), tokenizer, name, ratio=0.2)
    with pytest.raises(UserInputError, match="no mixture-of-experts block"):
        _compress(tiny_model("llama"), tokenizer, name, ratio=0.5)


@pytest.mark.parametrize("preset, kept", [("expert-prune-25", 3), ("expert-prune-50", 2), ("heapr-25", 3), ("heapr-50", 2), ("merge-experts-50", 2)])
def test_presets_keep_the_stated_share_of_experts(preset, kept, tokenizer):
    recipe = sparseforge.load_recipe(preset)
    recipe.calibration = CAL  # the presets' 32 x 512 tokens are for real models
    out, report = sparseforge.compress(tiny_model("olmoe"), recipe, tokenizer, progress=False)
    assert [b.num_experts for b in find_moe_blocks(out)] == [kept, kept] and out.config.num_experts == kept
