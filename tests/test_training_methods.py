"""Recovery methods (methods/training/): what each trains, that pruned positions stay exactly zero, that LoRA's
masked merge equals the dense merge under the mask (so N:M survives exactly), and SpIEL's prune-and-regrow."""
from __future__ import annotations

import pytest
import torch

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.masks import check_nm, nm_mask
from sparseforge.core.sparsity_masks import check_masks, masks_from_model
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from sparseforge.methods.training.trainer import TokenWindows, lr_factor, train, training_text
from sparseforge.recipe import Recipe, Stage
from tiny_models import tiny_model

FAST = {"steps": 4, "batch_size": 2, "seq_len": 32, "warmup_steps": 0}


def _pruned_24(arch="llama"):
    model = tiny_model(arch)
    for proj in ModelAdapter(model).projections().values():
        w = proj.weight()
        proj.set_weight(w * nm_mask(w.abs(), 2, 4))
    return model


def _run(name, tokenizer, model=None, **params):
    cls = get_method(name)
    model = model if model is not None else _pruned_24()
    masks = masks_from_model(model)
    result = train(cls(cls.parse_params({**FAST, **params})), model, tokenizer, progress=False)
    return model, masks, result


def test_perp_trains_only_norms_and_biases(tokenizer):
    model = _pruned_24("gpt2")  # GPT-2 has biases and LayerNorms
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, masks, result = _run("perp", tokenizer, model, lr=1e-2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "PERP changed nothing"
    assert all(k.endswith("bias") or ".ln_" in k for k in changed), changed
    assert any(".ln_" in k for k in changed) and any(k.endswith("bias") for k in changed)
    assert not any(k.endswith("weight") and "ln" not in k for k in changed)
    assert result.mask_changed == 0 and result.trainable_share < 0.05


def test_masked_finetune_changes_kept_weights_and_keeps_every_pruned_zero(tokenizer):
    model = _pruned_24()
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    model, masks, result = _run("masked-finetune", tokenizer, model, lr=1e-2)
    w = model.model.layers[0].mlp.down_proj.weight
    keep = masks["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(w[keep], before[keep])
    assert check_masks(model, masks).ok and result.mask_changed == 0
    assert result.sparsity_before == result.sparsity_after == 0.5
    assert all(check_nm(p.weight(), 2, 4) for p in ModelAdapter(model).projections().values())
    assert result.loss_last < result.loss_first  # lr 1e-2 on 4 steps of the same text: the loss must fall


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_masked_merge_is_dense_merge_under_the_mask(tokenizer, arch):
    dense_model, masks, dense = _run("lora", tokenizer, _pruned_24(arch), merge="dense", lr=1e-2)
    masked_model, _, masked = _run("lora", tokenizer, _pruned_24(arch), merge="masked", lr=1e-2)
    base = _pruned_24(arch).state_dict()
    d, m = dense_model.state_dict(), masked_model.state_dict()
    assert d.keys() == m.keys() == base.keys()  # adapters gone: a plain model again
    for name, keep in masks.items():
        assert not torch.equal(m[name], base[name])  # the adapters did train and merge
        assert torch.equal(m[name], torch.where(keep, d[name], torch.zeros_like(d[name])))
    assert masked.mask_changed == 0 and masked.sparsity_after == 0.5
    assert dense.mask_changed > 0 and dense.sparsity_after < 0.01  # PEFT's merge fills the pruned positions
    projections = ModelAdapter(masked_model).projections().values()
    assert all(check_nm(p.weight(), 2, 4) for p in projections)


def test_spiel_keeps_its_budget_inside_the_mask_and_regrows(tokenizer):
    model = _pruned_24()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cls = get_method("spiel")
    method = cls(cls.parse_params({**FAST, "steps": 6, "update_every": 2, "swap": 0.5, "density": 0.05, "lr": 1e-2}))
    masks = masks_from_model(model)
    seen = []
    original = method.on_step_end

    def spy(step, work, optimizer):
        seen.append({n: d.index.clone() for n, d in method._deltas.items()})
        original(step, work, optimizer)

    method.on_step_end = spy
    result = train(method, model, tokenizer, progress=False)
    name = "model.layers.0.mlp.up_proj"
    k = int(0.05 * model.model.layers[0].mlp.up_proj.weight.numel())
    assert all(s[name].numel() == k for s in seen)
    assert not torch.equal(seen[0][name], seen[-1][name])  # prune-and-regrow moved indices
    assert result.fields["updates"] == 3
    after = model.state_dict()
    for key, keep in masks.items():
        diff = after[key] != base[key]
        assert int(diff.sum()) <= k * 1.05 + 1  # only the budget's positions moved
        assert not (diff & ~keep).any()
    assert check_masks(model, masks).ok and result.mask_changed == 0
    assert not any("parametrizations" in n for n in after)  # merged back into plain weights


def test_spiel_swap_drops_smallest_deltas_and_grows_at_largest_gradient():
    from sparseforge.methods.training.spiel import SparseDelta, Spiel

    method = Spiel(Spiel.parse_params({"swap": 0.5}))
    d = SparseDelta(torch.tensor([0, 1, 2, 3]), torch.float32)
    with torch.no_grad():
        d.delta.copy_(torch.tensor([0.5, -0.01, 0.3, 0.02]))
    d.accumulated = torch.tensor([9.0, 9.0, 0.0, 0.0, 1.0, -7.0, 5.0, 2.0])
    allowed = torch.tensor([True] * 6 + [False, True])  # position 6 is pruned: never grown despite its gradient
    method._allowed = {"w": allowed}
    opt = torch.optim.Adam([d.delta])
    d.delta.grad = torch.ones(4)
    opt.step()
    kept = d.delta.detach()[[0, 2]].clone()
    method._swap("w", d, 2, opt)
    # Slots 1 and 3 (|delta| 0.01, 0.02) go; positions 5 (|g| 7) and 7 (|g| 2) come; 6 is pruned, 0-2 are held.
    assert d.index.tolist() == [0, 5, 2, 7]
    assert torch.equal(d.delta.detach()[[0, 2]], kept) and d.delta.detach()[[1, 3]].tolist() == [0.0, 0.0]
    assert opt.state[d.delta]["exp_avg"][[1, 3]].abs().sum() == 0 and opt.state[d.delta]["exp_avg"][[0, 2]].abs().sum() > 0


def test_recovery_after_pruning_in_one_recipe(tokenizer):
    recipe = Recipe("wanda-then-perp", [Stage("wanda", get_method("wanda").parse_params({"pattern": "2:4"})),
                                        Stage("perp", get_method("perp").parse_params(FAST))], CalibrationConfig(samples=2, seq_len=32))
    model, report = sparseforge.compress(tiny_model("llama"), recipe, tokenizer, progress=False)
    wanda, perp = report["stages"]
    assert perp["method"] == "perp" and perp["family"] == "training" and perp["mask_changed"] == 0
    assert perp["masked_tensors"] == len(wanda["projections"]) and perp["sparsity_after"] == 0.5
    from sparseforge.core.sparsity_masks import check_declared_patterns

    assert check_declared_patterns(model) == {"checked": 14, "failed": []}


def test_bad_training_settings_are_one_line_errors():
    for name in ("perp", "lora", "spiel", "masked-finetune"):
        with pytest.raises(UserInputError, match="held-out"):
            get_method(name).parse_params({"data": "heldout"})
    with pytest.raises(UserInputError, match="steps"):
        get_method("perp").parse_params({"steps": 0})
    with pytest.raises(UserInputError, match="optimizer_params"):
        get_method("perp").parse_params({"optimizer_params": {"lr": 1.0}})
    with pytest.raises(UserInputError, match="unknown optimizer|allowed"):
        get_method("perp").parse_params({"optimizer": "nope"})
    with pytest.raises(UserInputError, match="rank"):
        get_method("lora").parse_params({"rank": 0})
    with pytest.raises(UserInputError, match="density"):
        get_method("spiel").parse_params({"density": 0.0})
    from sparseforge.data import HELDOUT_TEXT

    with pytest.raises(UserInputError, match="held-out"):
        training_text(str(HELDOUT_TEXT))
    with pytest.raises(UserInputError, match="neither a bundled split"):
        training_text("/nonexistent/file.txt")


def test_data_order_is_a_function_of_seed_and_position():
    ids = list(range(100))
    a, b = TokenWindows(ids, 10, seed=3), TokenWindows(ids, 10, seed=3)
    first_epoch = torch.stack([a.sample(k) for k in range(10)])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 100, 10))  # each window once per epoch
    assert torch.equal(b.sample(17), a.sample(17)) and torch.equal(b.batch(5, 3), a.batch(5, 3))
    assert not torch.equal(first_epoch, torch.stack([TokenWindows(ids, 10, seed=4).sample(k) for k in range(10)]))


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == 1.0
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def _optimizer_names():
    from sparseforge.methods.training.optimizers import optimizer_names

    # torchao's 8-bit AdamW spends about 50 s compiling on first use on this CPU: out of the default run.
    return [pytest.param(n, marks=pytest.mark.slow) if n == "adamw-8bit" else n for n in optimizer_names()]


@pytest.mark.parametrize("optimizer", _optimizer_names())
def test_every_registered_optimizer_keeps_the_mask_through_the_trainer(tokenizer, optimizer):
    """Dense-update optimizers (GaLore's back-projection, MeZO's perturbations) included: the trainer re-zeroes."""
    model = _pruned_24()
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    model, masks, result = _run("masked-finetune", tokenizer, model, optimizer=optimizer, steps=3, lr=1e-3)
    assert result.optimizer == optimizer and result.mask_changed == 0 and check_masks(model, masks).ok
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)  # it did train
