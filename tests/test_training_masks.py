"""Explicit sparsity masks (core/sparsity_masks.py): pruned positions stay exactly zero through optimizer steps,
gradient accumulation, bf16 autocast, dense updates and NaN gradients; the checker finds any that changed."""
from __future__ import annotations

import pytest
import torch

from sparseforge.core.masks import check_nm
from sparseforge.core.sparsity_masks import (attach_masks, check_declared_patterns, check_masks, load_masks, mask_sparsity, masks_from_model,
                                             masks_of, save_masks)
from sparseforge.errors import UserInputError
from tiny_models import tiny_model


def _pruned_24(arch="llama"):
    """A tiny model whose projections keep the 2 largest of every 4 input weights (a 2:4 pattern)."""
    from sparseforge.core.adapter import ModelAdapter
    from sparseforge.core.masks import nm_mask

    model = tiny_model(arch)
    for proj in ModelAdapter(model).projections().values():
        w = proj.weight()
        proj.set_weight(w * nm_mask(w.abs(), 2, 4))
    return model


def _ids(seed=0, batch=2, length=16):
    return torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_masks_cover_pruned_projections_only():
    model = _pruned_24()
    masks = masks_from_model(model)
    assert len(masks) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(k.endswith(".weight") and "layers" in k for k in masks)
    assert mask_sparsity(masks) == 0.5
    assert masks_from_model(tiny_model("llama")) == {}  # dense: nothing to keep


def test_adamw_accumulation_and_bf16_keep_zeros_exactly():
    model = _pruned_24()
    masks = masks_from_model(model)
    attach_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for step in range(3):
        for micro in range(2):  # gradient accumulation
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(_ids(step * 2 + micro), labels=_ids(step * 2 + micro)).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
    report = check_masks(model, masks)
    assert report.ok and report.changed == 0 and report.pruned == sum(int((~m).sum()) for m in masks.values())
    # ...and training did change the kept weights, so the test is not vacuous.
    name = next(iter(masks))
    assert not torch.equal(model.state_dict()[name], before[name])
    # The optimizer never saw a gradient at a pruned position: its moments are zero there.
    p = dict(model.named_parameters())[name]
    assert torch.count_nonzero(opt.state[p]["exp_avg"][~masks[name]]) == 0


def test_without_masks_adamw_fills_pruned_positions():
    """The failure the masks prevent (the control for the test above)."""
    model = _pruned_24()
    masks = masks_from_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(_ids(), labels=_ids()).loss.backward()
    opt.step()
    report = check_masks(model, masks)
    assert not report.ok and report.changed > 0.9 * report.pruned
    assert set(report.changed_by_tensor) == set(masks)


def test_dense_update_is_rezeroed_after_optimizer_step_and_nan_gradients_stay_out():
    model = _pruned_24()
    masks = masks_from_model(model)
    handle = attach_masks(model, masks)

    class DenseStep(torch.optim.SGD):
        """An optimizer whose update is dense whatever the gradient (like GaLore's back-projection)."""

        def step(self, closure=None):
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.add_(0.01)

    opt = DenseStep(model.parameters(), lr=0.1)
    handle.hook_optimizer(opt)
    opt.step()
    assert check_masks(model, masks).ok
    # A NaN gradient at a pruned position is zeroed by the hook (a multiply by the mask would keep NaN).
    name = next(iter(masks))
    p = dict(model.named_parameters())[name]
    (p * torch.full_like(p, float("nan"))).sum().backward()
    assert (p.grad[~masks[name]] == 0).all() and p.grad[masks[name]].isnan().all()
    handle.remove()
    assert masks_of(model) is None


def test_checker_reports_exactly_the_changed_positions():
    model = _pruned_24()
    masks = masks_from_model(model)
    name = "model.layers.1.mlp.down_proj.weight"
    pruned = (~masks[name]).nonzero()[:3]
    with torch.no_grad():
        w = dict(model.named_parameters())[name]
        for r, c in pruned.tolist():
            w[r, c] = 0.5
    report = check_masks(model, masks)
    assert report.changed == 3 and report.changed_by_tensor == {name: 3} and not report.ok
    assert report.to_json()["ok"] is False


def test_masks_round_trip_safetensors(tmp_path):
    masks = masks_from_model(_pruned_24())
    save_masks(tmp_path / "m.safetensors", masks)
    back = load_masks(tmp_path / "m.safetensors")
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)


def test_masks_of_another_model_are_refused():
    masks = masks_from_model(_pruned_24())
    with pytest.raises(UserInputError, match="names no parameter"):
        attach_masks(tiny_model("gpt2"), masks)


def test_gpt2_conv1d_masks_keep_nm_pattern_under_training():
    model = _pruned_24("gpt2")
    masks = masks_from_model(model)
    attach_masks(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(_ids(), labels=_ids()).loss.backward()
    opt.step()
    assert check_masks(model, masks).ok
    from sparseforge.core.adapter import ModelAdapter

    assert all(check_nm(p.weight(), 2, 4) for p in ModelAdapter(model).projections().values())


def test_declared_pattern_check_finds_a_broken_projection():
    model = _pruned_24()
    from sparseforge.core.adapter import ModelAdapter

    names = list(ModelAdapter(model).projections())
    model.sparseforge_info = {"stages": [{"method": "wanda", "pattern": "2:4", "compare": "row", "projections": names}]}
    assert check_declared_patterns(model) == {"checked": 14, "failed": []}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert check_declared_patterns(model)["failed"] == ["model.layers.0.self_attn.q_proj.weight"]
