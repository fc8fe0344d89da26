"""SpQR as the paper does it (Hessian-sensitivity outliers in 16 bits, second-level quantized group statistics)
and data-free EasyQuant: the outliers are exactly the weights the criteria pick, storage round trips exactly,
and each method's extra machinery lowers the error it targets."""
import math

import pytest
import torch

import sparseforge
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.obs import obs_solve
from sparseforge.core.quantizer import QuantScheme, StatCodes, dequantize, quantize_codes, quantize_rtn, quantize_stat, quantized_weights
from sparseforge.formats.quant_storage import pack_quantized, unpack_quantized
from sparseforge.methods import get_method
from sparseforge.methods.weights.easyquant import easyquant
from sparseforge.methods.weights.spqr import SpQRFit, SpQRParams, leave_one_out_gain
from sparseforge.recipe import Recipe, Stage
from tiny_models import tiny_model

torch.set_num_threads(1)


def _problem(rows=32, cols=96, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    W = torch.randn(rows, cols, generator=g)
    W[torch.rand(rows, cols, generator=g) < 0.01] *= 12  # a few large weights, as trained layers have
    return W, X.t() @ X


def _spqr(W, H, blocksize=128, **overrides):
    p = SpQRParams(**overrides)
    fit = SpQRFit(p)
    res = obs_solve(W, H, quant=QuantScheme(p.bits, p.symmetric, p.group_size), blocksize=blocksize,
                    outlier_threshold=p.outlier_threshold, fit_group=fit)
    res.quantized.stats = fit.stats(res.quantized.scale.shape[1])
    return res, p


def reference_spqr(W, H, p: SpQRParams):
    """SpQR written plainly: no blocks (every column's error reaches all later columns at once), the threshold
    from its definition; the same group fit."""
    W = W.clone().float()
    rows, cols = W.shape
    H = H.clone() + 0.01 * torch.mean(torch.diag(H)) * torch.eye(cols)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = torch.diag(U)
    tau = p.outlier_threshold * float((W.var(dim=0, unbiased=False) / d**2).mean())
    fit = SpQRFit(p)
    outlier = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if j % p.group_size == 0:
            s, z = fit(j // p.group_size, W[:, j : j + p.group_size].clone(), d[j : j + p.group_size], tau)
        q = dequantize(quantize_codes(W[:, j], s, z, 2**p.bits - 1), s, z)
        out = ((W[:, j] - q) / d[j]) ** 2 > tau
        q = torch.where(out, W[:, j].half().float(), q)
        outlier[:, j] = out
        err = (W[:, j] - q) / d[j]
        W[:, j] = q
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return W, outlier, tau


def test_spqr_outliers_are_exactly_the_weights_above_the_hessian_threshold():
    W, H = _problem()
    res, p = _spqr(W, H, blocksize=32)
    qw = res.quantized
    mask = qw.outliers.to_dense() != 0
    dense_mask = torch.zeros_like(mask)
    dense_mask[qw.outliers.indices()[0], qw.outliers.indices()[1]] = True
    assert torch.equal(dense_mask, res.sensitivity > res.outlier_tau)  # the criterion, every weight
    assert 0 < int(dense_mask.sum()) < 0.05 * W.numel()
    # the threshold is the paper's: relative to the layer's mean of var_i(W_ij) / [H^-1]_jj^2
    ref_W, ref_mask, ref_tau = reference_spqr(W, H, p)
    assert math.isclose(res.outlier_tau, ref_tau, rel_tol=1e-4)
    assert torch.equal(dense_mask, ref_mask)
    assert torch.allclose(res.weight, ref_W, atol=1e-4)
    # kept in 16 bits, and the weight is exactly codes + outliers
    assert torch.equal(qw.outliers.values().half().float(), qw.outliers.values())
    assert torch.equal(qw.dequantize(), res.weight)


def test_spqr_statistics_are_quantized_and_the_outliers_help():
    W, H = _problem(rows=48, cols=128, seed=2)
    res, p = _spqr(W, H)
    qw = res.quantized
    assert set(qw.stats) == {"scale", "zero"}
    for name, sc in qw.stats.items():
        assert int(sc.codes.max()) < 8 and sc.scale.dtype == torch.float16 and sc.scale.shape == (3, 8)
        assert torch.equal(sc.values(), getattr(qw, name))  # the solver rounded with the stored statistics
    loss = lambda V: torch.trace((W - V) @ H @ (W - V).t()).item()  # noqa: E731
    plain = obs_solve(W, H, quant=QuantScheme(3, False, 16))
    assert loss(res.weight) < 0.7 * loss(plain.weight)
    # a second-level grid is within half a step of the statistic it rounds
    s = torch.rand(40, 5) + 0.1
    sc = quantize_stat(s, 3, 16)
    step = sc.scale.float().repeat_interleave(16, 0)[:40]
    assert ((sc.values() - s).abs() <= 0.5 * step + 1e-3 * s).all()
    flat = quantize_stat(torch.full((16, 1), 0.25), 3, 16)
    assert torch.equal(flat.values(), torch.full((16, 1), 0.25))  # a constant chunk is kept exactly


def test_leave_one_out_gain_flags_the_planted_weight():
    g = torch.Generator().manual_seed(0)
    part = torch.randn(8, 16, generator=g) * 0.1
    part[3, 5] = 4.0
    gain = leave_one_out_gain(part, torch.ones(16), 3, False)
    assert gain.argmax().item() == 3 * 16 + 5 and gain[3, 5] > 10 * gain[torch.arange(8) != 3].max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_spqr_storage_round_trip_is_exact_and_as_small_as_the_paper_says(symmetric):
    W, H = _problem(rows=64, cols=256, seed=1)
    res, _ = _spqr(W, H, symmetric=symmetric)
    qw = res.quantized
    parts, layout = pack_quantized(qw)
    back = unpack_quantized(parts, layout)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.dequantize(), res.weight)
    assert "qscale" not in parts and "qzero" not in parts and (("qz_codes" in parts) != symmetric)
    n_out = int(qw.outliers._nnz())
    assert parts["qoutlier_value"].dtype == torch.float16 and parts["qoutlier_cols"].dtype == torch.int16
    assert parts["qoutlier_rows"].numel() == 65 and parts["qoutlier_cols"].numel() == n_out
    groups = 256 // 16
    assert parts["qs_codes"].numel() == math.ceil(64 * groups * 3 / 8) and parts["qs_scale"].numel() == 4 * groups
    # bits per weight beyond the 3-bit codes: statistics (3 + 3) / 16 + second level 4 x 16 / 256, outliers 32 + row offsets
    extra = sum(t.numel() * t.element_size() for k, t in parts.items() if k != "qcodes") * 8 / W.numel()
    expected = (3 * (1 if symmetric else 2)) / 16 + (32 if symmetric else 64) / 256 + (32 * n_out + 32 * 65) / W.numel()
    assert extra <= expected + 0.01


def test_spqr_compact_artifact_reloads_exactly(tokenizer, tmp_path):
    model = tiny_model("llama")
    recipe = Recipe("t", [Stage("spqr", get_method("spqr").parse_params({}))], CalibrationConfig(samples=4, seq_len=64))
    out, report = sparseforge.compress(model, recipe, tokenizer, progress=False)
    assert report["stages"][0]["quant"]["stat_bits"] == 3
    sparseforge.save(out, tmp_path / "a", tokenizer, storage="compact")
    back = sparseforge.load(tmp_path / "a")
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in back.state_dict().items())
    assert any(qw.outliers is not None for qw in quantized_weights(back).values())
    assert all(qw.stats is not None for qw in quantized_weights(back).values())


def test_easyquant_keeps_the_largest_weights_of_each_row_and_searches_the_range():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 256, generator=g)
    W[torch.rand(16, 256, generator=g) < 0.02] *= 10
    scheme = QuantScheme(3, True, 128)
    qw = easyquant(W, scheme, 0.02, 40, 0.5)
    idx = qw.outliers.indices()
    for r in range(16):  # exactly the ceil(2% x 256) = 6 largest |w| of each row
        assert set(idx[1][idx[0] == r].tolist()) == set(W[r].abs().topk(6).indices.tolist())
    assert torch.equal(qw.outliers.values(), W[idx[0], idx[1]].half().float())
    rtn = quantize_rtn(W, scheme).dequantize()
    assert (W - qw.dequantize()).pow(2).sum() < 0.3 * (W - rtn).pow(2).sum()
    # without outliers the search alone is never worse than min-max in any row
    plain = easyquant(W, scheme, 0.0, 40, 0.5)
    assert plain.outliers is None
    assert ((W - plain.dequantize()).pow(2).sum(1) <= (W - rtn).pow(2).sum(1)).all()
    back = unpack_quantized(*pack_quantized(qw))
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_easyquant_needs_no_calibration_data(tokenizer, tmp_path):
    model = tiny_model("llama")
    assert get_method("easyquant").needs_stats == ()
    recipe = Recipe("t", [Stage("easyquant", get_method("easyquant").parse_params({"bits": 4, "group_size": 32}))])
    out, _ = sparseforge.compress(model, recipe, tokenizer, progress=False)
    sparseforge.save(out, tmp_path / "a", tokenizer, storage="compact")
    back = sparseforge.load(tmp_path / "a")
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("method,params,match", [
    ("spqr", {"stat_bits": 5}, "stat_bits"), ("spqr", {"stat_group_size": 0}, "stat_group_size"),
    ("easyquant", {"outlier_fraction": 0.7}, "outlier_fraction"), ("easyquant", {"grid": 0}, "grid"),
    ("easyquant", {"min_shrink": 0}, "min_shrink")])
def test_bad_params_fail_in_one_line(method, params, match):
    from sparseforge.errors import UserInputError

    with pytest.raises(UserInputError, match=match) as err:
        get_method(method).parse_params(params, "stage 1")
    assert "\n" not in str(err.value)
