"""The training optimizers (methods/training/optimizers): registry and parameter errors, each optimizer's
defining property checked on small random problems, gradient accumulation, exact state round trips through
safetensors + JSON, pruned positions kept zero, and a Hugging Face Trainer driving them."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseforge.core.sparsity_masks import masks_from_model
from sparseforge.errors import UserInputError
from sparseforge.methods.training.optimizers import (OPTIMIZERS, build_optimizer, load_optimizer_state, optimizer_names,
                                                     optimizer_state_tensors, state_bytes)
from tiny_models import tiny_model

HAVE_TORCHAO = "adamw-8bit" in OPTIMIZERS  # optional dependency (sparseforge[optim8bit])
FIRST_ORDER = ["adamw", *(["adamw-8bit"] if HAVE_TORCHAO else []), "galore", "apollo"]
# small ranks and a short refresh so every code path runs within a few steps on the tiny Llama (hidden 64)
PARAMS = {"adamw": {"lr": 1e-3}, "adamw-8bit": {"lr": 1e-3}, "galore": {"lr": 1e-3, "rank": 8, "update_gap": 2},
          "apollo": {"lr": 1e-3, "rank": 8, "update_gap": 2}, "mezo": {"lr": 1e-3, "eps": 1e-3},
          "sparse-mezo": {"lr": 1e-3, "eps": 1e-3, "perturb_fraction": 0.5}}
IDS = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _train(model, opt, steps, ids=IDS, halves=False):
    for _ in range(steps):
        if getattr(opt, "zeroth_order", False):
            if halves:
                opt.step(lambda: (_loss(model, ids[:2]) + _loss(model, ids[2:])) / 2)
            else:
                opt.step(lambda: _loss(model, ids))
            continue
        opt.zero_grad(set_to_none=True)
        if halves:
            for part in (ids[:2], ids[2:]):
                (_loss(model, part) / 2).backward()
        else:
            _loss(model, ids).backward()
        opt.step()


def _build(name, model, **extra):
    return build_optimizer(name, model, {**PARAMS[name], **extra}, list(model.parameters()))


def _pruned(seed=0):
    """The tiny Llama with half of every decoder projection zeroed (smallest magnitudes), as a pruner leaves it."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers" in name and p.ndim == 2:
                p.masked_fill_(p.abs() <= p.abs().flatten().kthvalue(p.numel() // 2).values, 0)
    return model


def test_registry_names_and_params():
    expected = ["adamw", "adamw-8bit", "apollo", "galore", "mezo", "sparse-mezo"]
    assert optimizer_names() == (expected if HAVE_TORCHAO else [n for n in expected if n != "adamw-8bit"])
    for name, spec in OPTIMIZERS.items():
        rows = spec.describe()
        assert rows and all(r["help"] for r in rows), name
        assert spec.zeroth_order == name.endswith("mezo")


@pytest.mark.parametrize("name, params, message", [
    ("adam", {}, "unknown optimizer 'adam'"),
    ("adamw", {"lr": -1.0}, "lr must be > 0"),
    ("adamw", {"betas": 0.9}, "unknown parameter 'betas'"),
    ("adamw", {"beta2": 1.0}, "beta2 must be in [0, 1)"),
    ("galore", {"rank": 0}, "rank must be >= 1"),
    ("galore", {"accumulation_steps": 2}, "accumulation_steps is for layerwise mode"),
    ("galore", {"targets": "heads"}, "allowed: linears, all"),
    ("apollo", {"scaling": "row"}, "allowed: channel, tensor"),
    ("apollo", {"limiter": 0.5}, "limiter must be 0 (off) or >= 1"),
    ("mezo", {"eps": 0.0}, "eps must be > 0"),
    ("sparse-mezo", {"perturb_fraction": 0.0}, "perturb_fraction must be in (0, 1]"),
    ("adamw-8bit", {"lr": "fast"}, "expected a number" if HAVE_TORCHAO else "needs torchao"),
])
def test_bad_params_are_one_line_errors(name, params, message):
    model = tiny_model("llama")
    with pytest.raises(UserInputError) as err:
        build_optimizer(name, model, params, list(model.parameters()))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_trainable_parameters_is_an_error():
    with pytest.raises(UserInputError, match="no trainable parameters"):
        build_optimizer("adamw", tiny_model("llama"), {}, [])


def test_adamw_is_torch_adamw_bit_for_bit():
    a, b = tiny_model("llama"), tiny_model("llama")
    ours = build_optimizer("adamw", a, {"lr": 1e-3, "weight_decay": 0.1}, list(a.parameters()))
    ref = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    _train(a, ours, 3)
    _train(b, ref, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def _linear_problem(m, n, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(m, n, dtype=dtype))
    x = torch.randn(32, n, dtype=dtype)
    target = torch.randn(32, m, dtype=dtype)
    return w, lambda: ((x @ w.T - target) ** 2).mean()


class _Holder(torch.nn.Module):
    """One weight inside a Linear, so `targets: linears` projects it."""

    def __init__(self, w):
        super().__init__()
        self.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight = w


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_galore_step_is_low_rank_and_state_is_small(shape):
    w, loss = _linear_problem(*shape)
    holder = _Holder(w)
    opt = build_optimizer("galore", holder, {"lr": 1e-2, "rank": 4, "update_gap": 3}, [w])
    projections = []
    for step in range(5):
        before = w.detach().clone()
        opt.zero_grad()
        loss().backward()
        opt.step()
        delta = w.detach() - before
        # the update lives in the rank-4 subspace (rtol: the subtraction of two float32 weights adds noise)
        assert torch.linalg.matrix_rank(delta, rtol=1e-3).item() <= 4
        projections.append(opt.state[w]["proj"].clone())
    m, n = shape
    # refreshed on steps 1 and 4 (update_gap 3), kept in between
    assert torch.equal(projections[0], projections[1]) and torch.equal(projections[1], projections[2])
    assert not torch.equal(projections[2], projections[3])
    side, other = min(m, n), max(m, n)
    assert state_bytes(opt) == 4 * (side * 4 + 2 * other * 4)  # projection + two r-wide moments, fp32


def test_galore_randomized_svd_finds_the_top_subspace():
    """On a matrix of exact rank 4 plus noise, the range finder's subspace is the SVD's (projectors agree)."""
    torch.manual_seed(0)
    g = torch.randn(60, 4) @ torch.randn(4, 30) * 10 + 1e-3 * torch.randn(60, 30)
    w = torch.nn.Parameter(torch.zeros(60, 30))
    found = {}
    for how in ("exact", "randomized"):
        opt = build_optimizer("galore", _Holder(w), {"rank": 4, "svd": how}, [w])
        w.grad = g.clone()
        opt.step()
        proj = opt.state[w]["proj"]  # 30 x 4 (m >= n: right singular vectors)
        found[how] = proj @ proj.T
    assert torch.allclose(found["exact"], found["randomized"], atol=1e-4)


def test_galore_layerwise_accumulation_matches_full_batch():
    """Layer-wise GaLore over 2 micro-batches (stepping inside backward) equals plain GaLore on the whole batch,
    across a projection refresh."""
    a, b = tiny_model("llama"), tiny_model("llama")
    plain = _build("galore", a)
    layerwise = build_optimizer("galore", b, {**PARAMS["galore"], "layerwise": True, "accumulation_steps": 2}, list(b.parameters()))
    _train(a, plain, 4)
    _train(b, layerwise, 4, halves=True)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), name
    assert all(p.grad is None for p in b.parameters())  # the hooks freed every gradient


def test_apollo_scales_the_raw_gradient_per_channel_and_stores_no_projection():
    w, loss = _linear_problem(24, 40, dtype=torch.float64)  # float64: the weight difference below is exact enough
    opt = build_optimizer("apollo", _Holder(w), {"lr": 1e-2, "rank": 4, "limiter": 0.0}, [w])
    for _ in range(3):
        before = w.detach().clone()
        opt.zero_grad()
        loss().backward()
        g = w.grad.clone()
        opt.step()
        ratio = (before - w.detach()) / g  # m <= n projects rows: one factor per column
        assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-8)
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq"}  # limiter off: no last norm either
    assert state_bytes(opt) == 8 * 2 * 4 * 40  # two 4 x 40 float64 moments; the projection is regenerated from its seed


def test_apollo_projection_comes_from_its_seed():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model("llama")
        _train(model, _build("apollo", model, seed=seed), 3)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_apollo_limiter_caps_update_growth():
    w, loss = _linear_problem(24, 40)
    opt = build_optimizer("apollo", _Holder(w), {"lr": 1e-2, "rank": 4, "limiter": 1.01}, [w])
    norms = []
    for _ in range(4):
        before = w.detach().clone()
        opt.zero_grad()
        loss().backward()
        opt.step()
        norms.append(float((before - w.detach()).norm()))
    assert all(b <= 1.01 * a * (1 + 1e-5) for a, b in zip(norms, norms[1:]))


def test_mezo_step_is_spsa_along_a_seeded_direction():
    """With a linear loss L = <c, w>, SPSA's estimate is exactly <c, z>, so one step moves w by -lr <c, z> z."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    c = torch.randn(6, 5, dtype=torch.float64)
    opt = build_optimizer("mezo", torch.nn.Module(), {"lr": 0.1, "eps": 1e-2, "seed": 3}, [w])
    before = w.detach().clone()
    opt.step(lambda: (c * w).sum())
    z = opt._direction(w, 0, 3 * 1_000_003 + 1).double()
    expected = before - 0.1 * float((c * z).sum()) * z
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert w.grad is None
    with pytest.raises(UserInputError, match="zeroth-order"):
        opt.step()


def test_sparse_mezo_moves_only_small_weights():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = build_optimizer("sparse-mezo", torch.nn.Module(), {"lr": 0.1, "perturb_fraction": 0.25}, [w])
    before = w.detach().clone()
    small = before.abs() <= before.abs().flatten().kthvalue(16).values
    opt.step(lambda: (w ** 3).sum())
    changed = w.detach() != before
    assert changed.any() and not (changed & ~small).any()


@pytest.mark.parametrize("name", FIRST_ORDER + ["mezo", "sparse-mezo"])
def test_gradient_accumulation_equals_full_batch(name):
    """Two half-batches (loss / 2 each) and one step equal one step on the whole batch, to float rounding
    (2e-5 = 2% of one step of lr 1e-3). 8-bit state: a rounding-level difference can move a moment across a
    quantisation boundary, so there a few entries in 10,000 may differ, by at most the 3 steps taken. Sparse
    MeZO: one step, since its magnitude selection is discontinuous (a rounding-level change flips an entry in
    or out of the next step's selection)."""
    steps = 1 if name == "sparse-mezo" else 3
    a, b = tiny_model("llama"), tiny_model("llama")
    _train(a, _build(name, a), steps)
    _train(b, _build(name, b), steps, halves=True)
    for (key, x), y in zip(a.named_parameters(), b.parameters()):
        diff = (x - y).detach().abs()
        if name == "adamw-8bit":
            assert float((diff > 2e-5).float().mean()) < 1e-3 and float(diff.max()) <= 3 * 1e-3 * 1.01, (key, float(diff.max()))
        else:
            assert float(diff.max()) <= 2e-5, (name, key, float(diff.max()))


@pytest.mark.parametrize("name", optimizer_names())
def test_state_round_trip_through_safetensors_is_exact(name, tmp_path):
    """Saved after 3 steps and loaded into a fresh optimizer, the next 2 steps are bit-identical to going on."""
    model = tiny_model("llama")
    opt = _build(name, model)
    _train(model, opt, 3)
    tensors, data = optimizer_state_tensors(opt)
    save_file(tensors, tmp_path / "optimizer.safetensors")
    twin = copy.deepcopy(model)
    fresh = _build(name, twin)
    load_optimizer_state(fresh, load_file(tmp_path / "optimizer.safetensors"), data)
    again, _ = optimizer_state_tensors(fresh)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    _train(model, opt, 2)
    _train(twin, fresh, 2)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), twin.parameters()))
    with pytest.raises(UserInputError, match="saved by"):
        load_optimizer_state(build_optimizer("adamw" if name != "adamw" else "galore", twin, {}, list(twin.parameters())), tensors, data)


@pytest.mark.parametrize("name", optimizer_names())
def test_pruned_positions_stay_zero(name):
    """No gradient masking here (the trainer adds that): the optimizer alone keeps the pruned zeros."""
    model = _pruned()
    masks = masks_from_model(model)
    assert masks
    opt = _build(name, model)
    _train(model, opt, 3)
    params = dict(model.named_parameters())
    for key, keep in masks.items():
        assert not params[key][~keep].any(), (name, key)
        assert (params[key][keep] != 0).all()


def test_state_bytes_fractions_on_tiny_llama():
    """Exact state sizes from shapes: AdamW two fp32 moments; 8-bit one byte per value plus a scale per
    256 (plus a code map per tensor); MeZO none."""
    model = tiny_model("llama")
    numel = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    sizes = {}
    for name in optimizer_names():
        m = copy.deepcopy(model)
        opt = _build(name, m)
        _train(m, opt, 1)
        sizes[name] = state_bytes(opt)
    assert sizes["adamw"] == 2 * 4 * numel + 4 * n_tensors  # + the fp32 step counter per tensor
    assert sizes["mezo"] == sizes["sparse-mezo"] == 0
    if HAVE_TORCHAO:
        assert sizes["adamw-8bit"] < 0.3 * sizes["adamw"]
    assert sizes["galore"] < sizes["adamw"] and sizes["apollo"] < sizes["galore"]


@pytest.mark.parametrize("name, extra, accumulate", [("adamw", {}, 1), ("galore", {}, 1),
                                                      ("galore", {"layerwise": True, "accumulation_steps": 2}, 2),
                                                      ("apollo", {}, 1)])
def test_hugging_face_trainer_uses_them(name, extra, accumulate, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama").train()
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(name, model, {**PARAMS[name], **extra}, list(model.parameters()))
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 4096, (8, 16), generator=torch.Generator().manual_seed(1))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=accumulate,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, max_grad_norm=0.0 if accumulate > 1 else 1.0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    out = trainer.train()
    assert out.global_step == 3 and out.training_loss == out.training_loss
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, model.parameters()) if b.ndim == 2)
