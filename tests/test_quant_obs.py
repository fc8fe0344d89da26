"""The shared OBS solver: SparseGPT through it is bit-identical to the implementation it replaced (frozen below
as the reference), on random layers and on a tiny model; its quantize step is GPTQ."""
import pytest
import torch

from sparseforge.core.masks import Pattern, prune_count
from sparseforge.core.obs import obs_solve
from sparseforge.core.quantizer import QuantScheme, fake_quantize, find_params, quantize_rtn
from sparseforge.errors import UserInputError
from tiny_models import tiny_model

torch.set_num_threads(1)


def reference_sparsegpt(weight, hessian, pattern, blocksize=128, dampening=0.01):
    """sparsegpt_prune as it was before the shared solver (commit 6e474d5), unchanged."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    if pattern.kind == "nm":
        if blocksize % pattern.m:
            blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    target_total = prune_count(rows * cols, pattern.sparsity)
    pruned_total = 0
    for b1 in range(0, cols, blocksize):
        b2 = min(b1 + blocksize, cols)
        W1 = W[:, b1:b2].clone()
        Hinv1 = Hinv[b1:b2, b1:b2]
        Err1 = torch.zeros_like(W1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            k = prune_count(rows * b2, pattern.sparsity) - pruned_total if b2 < cols else target_total - pruned_total
            if k > 0:
                scores = (W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
                order = torch.argsort(scores, stable=True)
                prune.view(-1)[order[:k]] = True
            pruned_total += max(k, 0)
        for i in range(b2 - b1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m] ** 2 / torch.diag(Hinv1)[i : i + pattern.m].reshape(1, -1) ** 2
                order = torch.argsort(group, dim=1, stable=True)
                prune[:, i : i + pattern.m].scatter_(1, order[:, : pattern.m - pattern.n], True)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, b1:b2] = W1
        W[:, b2:] -= Err1 @ Hinv[b1:b2, b2:]
    return W.to(weight.dtype)


def _problem(rows=48, cols=96, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    return torch.randn(rows, cols, generator=g), X.t() @ X


@pytest.mark.parametrize("pattern,blocksize", [("0.5", 32), ("0.7", 128), ("2:4", 8), ("4:8", 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_through_the_solver_is_bit_identical_on_random_layers(pattern, blocksize, seed):
    W, H = _problem(cols=100 if ":" not in pattern else 96, seed=seed)
    H[:, 3] = H[3, :] = 0  # a dead input
    p = Pattern.parse(pattern, None) if ":" in pattern else Pattern.parse("unstructured", float(pattern))
    got = obs_solve(W, H, prune=p, blocksize=blocksize).weight
    assert torch.equal(got, reference_sparsegpt(W, H, p, blocksize))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_method_on_a_tiny_model_is_bit_identical(pattern, monkeypatch):
    import sparseforge
    import sparseforge.methods.weights.sparsegpt as sg

    recipe = {"stages": [{"method": "sparsegpt", "params": {"pattern": pattern, "sparsity": 0.5 if pattern == "unstructured" else None}}],
              "calibration": {"samples": 4, "seq_len": 64}}
    from sparseforge.recipe import parse_recipe
    import yaml

    tok = sparseforge.load_tokenizer(None)
    model = tiny_model("llama")
    new, _ = sparseforge.compress(model, parse_recipe(yaml.safe_dump(recipe), "test"), tokenizer=tok, progress=False)
    monkeypatch.setattr(sg, "sparsegpt_prune", reference_sparsegpt)
    old, _ = sparseforge.compress(model, parse_recipe(yaml.safe_dump(recipe), "test"), tokenizer=tok, progress=False)
    a, b = new.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], model.state_dict()[k]) for k in a)  # it did prune


def test_quantize_only_is_gptq_and_beats_rtn():
    W, H = _problem(rows=32, cols=256)
    for scheme in (QuantScheme(4, True, 128), QuantScheme(3, False, 32), QuantScheme(8, True, 128)):
        res = obs_solve(W, H, quant=scheme, blocksize=64)
        qw = res.quantized
        assert torch.equal(qw.dequantize(), res.weight)  # the weight is exactly its codes
        assert int(qw.codes.max()) <= scheme.maxq and qw.scale.shape == (32, scheme.groups(256))
        rtn = quantize_rtn(W, scheme).dequantize()
        loss = lambda V: torch.trace((W - V) @ H @ (W - V).t()).item()  # noqa: E731
        assert loss(res.weight) < loss(rtn)
        if scheme.bits == 8:  # 8 bits is close to lossless
            assert loss(res.weight) < 1e-3 * loss(torch.zeros_like(W))


def test_act_order_uses_static_groups_and_helps_on_skewed_inputs():
    W, H = _problem(rows=32, cols=128, seed=3)
    H = H * torch.linspace(0.05, 5, 128).sqrt().outer(torch.linspace(0.05, 5, 128).sqrt())
    scheme = QuantScheme(3, True, 32)
    plain = obs_solve(W, H, quant=scheme)
    ordered = obs_solve(W, H, quant=scheme, act_order=True)
    assert torch.equal(ordered.quantized.dequantize(), ordered.weight)
    # static groups: each group's parameters are min-max of the original weights
    s, z = find_params(W[:, 32:64], scheme)
    assert torch.equal(ordered.quantized.scale[:, 1], s)
    loss = lambda V: torch.trace((W - V) @ H @ (W - V).t()).item()  # noqa: E731
    assert loss(ordered.weight) < 1.2 * loss(plain.weight)


def test_joint_prune_and_quantize_keeps_the_pattern_and_the_codes():
    W, H = _problem(rows=32, cols=128)
    scheme = QuantScheme(4, True, 32)
    res = obs_solve(W, H, prune=Pattern.parse("2:4", None), quant=scheme, blocksize=64)
    groups = (res.weight != 0).reshape(32, -1, 4).sum(-1)
    assert (groups <= 2).all() and torch.equal(res.quantized.dequantize(), res.weight)
    un = obs_solve(W, H, prune=Pattern.parse("unstructured", 0.5), quant=scheme)
    assert (un.weight == 0).sum() >= W.numel() // 2
    with pytest.raises(UserInputError, match="act_order"):
        obs_solve(W, H, prune=Pattern.parse("2:4", None), quant=scheme, act_order=True)
    with pytest.raises(UserInputError, match="multiple of M"):
        obs_solve(W, H, prune=Pattern.parse("4:8", None), quant=QuantScheme(4, True, 36))


def test_quantizer_keeps_zero_exact_and_symmetric_matches_signed_codes():
    x = torch.randn(8, 64)
    x[:, ::3] = 0
    for sym in (True, False):
        s, z = find_params(x, QuantScheme(4, sym, 0))
        q = fake_quantize(x, s[:, None], z[:, None], 15)
        assert (q[:, ::3] == 0).all()
    s, z = find_params(x, QuantScheme(4, True, 0))
    assert (z == 8).all() and torch.allclose(s, x.abs().amax(1) / 7.5)


def test_per_channel_scales_see_the_whole_row_not_the_first_block():
    """One group per row spans every block: its min-max must cover all columns (the first block alone would clip
    larger weights further right to its range)."""
    W, H = _problem(rows=16, cols=256, seed=4)
    W[:, 200] *= 10  # the row maxima sit outside the first 128-column block
    scheme = QuantScheme(8, True, 0)
    res = obs_solve(W, H, quant=scheme, blocksize=128)
    s, _ = find_params(W, scheme)
    assert torch.equal(res.quantized.scale[:, 0], s)
    assert torch.equal(res.quantized.dequantize(), res.weight)
    loss = lambda V: torch.trace((W - V) @ H @ (W - V).t()).item()  # noqa: E731
    assert loss(res.weight) < 1e-3 * loss(torch.zeros_like(W))
