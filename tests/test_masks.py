import pytest
import torch

from sparseforge.core.masks import Pattern, check_nm, check_pattern, check_unstructured, nm_mask, select_mask, unstructured_mask
from sparseforge.errors import UserInputError


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_row_prunes_exact_count_per_row(sparsity):
    scores = torch.randn(16, 100)
    mask = unstructured_mask(scores, sparsity, "row")
    assert ((~mask).sum(-1) == int(100 * sparsity)).all()
    # the kept weights are exactly the top scores of each row
    kept_min = torch.where(mask, scores, torch.inf).min(-1).values
    dropped_max = torch.where(~mask, scores, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_unstructured_matrix_compares_whole_matrix():
    scores = torch.zeros(4, 8)
    scores[0] = 10.0  # one row holds all the big values
    mask = unstructured_mask(scores, 0.75, "matrix")
    assert mask.sum() == 8 and mask[0].all()
    assert check_unstructured(scores * mask, 0.75, "matrix")
    assert not check_unstructured(scores * mask, 0.75, "row")


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_keeps_top_n_of_every_m(n, m):
    scores = torch.randn(3, 8, 32)  # a stack of matrices (e.g. experts) works too
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(3, 8, -1, m)
    assert (groups.sum(-1) == n).all()
    sg = scores.reshape(3, 8, -1, m)
    kept_min = torch.where(groups, sg, torch.inf).min(-1).values
    dropped_max = torch.where(~groups, sg, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert check_nm(scores * mask, n, m)


def test_validators_reject_violations():
    w = torch.ones(2, 8)
    assert not check_nm(w, 2, 4)
    w[:, [0, 1, 4, 5]] = 0
    assert check_nm(w, 2, 4)
    assert not check_nm(w, 1, 4)
    assert not check_nm(torch.zeros(2, 6), 2, 4)  # 6 is not a multiple of 4
    assert check_unstructured(w, 0.5) and not check_unstructured(w, 0.7)  # floor(0.7 * 8) = 5 zeros needed


def test_masks_are_deterministic_with_ties():
    scores = torch.ones(8, 64)  # all tied: position breaks ties
    a = select_mask(scores, Pattern.parse("unstructured", 0.5))
    b = select_mask(scores.clone(), Pattern.parse("unstructured", 0.5))
    assert torch.equal(a, b)
    assert not a[:, :32].any() and a[:, 32:].all()
    c, d = nm_mask(scores, 2, 4), nm_mask(scores.clone(), 2, 4)
    assert torch.equal(c, d)


def test_pattern_parse_and_errors():
    assert Pattern.parse("2:4", None).sparsity == 0.5
    assert Pattern.parse("4:8", 0.5).n == 4
    assert Pattern.parse("unstructured", None).sparsity == 0.5
    for bad_pattern, bad_sparsity in [("4:4", None), ("5:4", None), ("two:four", None), ("unstructured", 1.0), ("unstructured", -0.1), ("2:4", 0.6)]:
        with pytest.raises(UserInputError):
            Pattern.parse(bad_pattern, bad_sparsity)
    with pytest.raises(UserInputError, match="multiple of M"):
        nm_mask(torch.randn(2, 6), 2, 4)
    assert check_pattern(torch.zeros(4, 8), Pattern.parse("2:4", None))


@pytest.mark.parametrize("group", ["row", "matrix"])
def test_linear_time_selection_equals_a_stable_sort(group):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (3, 6, 40), generator=g).float()  # many ties
    for sparsity in (0.1, 0.5, 0.75):
        flat = scores if group == "row" else scores.reshape(3, 1, -1)
        k = int(flat.shape[-1] * sparsity)
        reference = torch.ones_like(flat, dtype=torch.bool)
        reference.scatter_(-1, torch.argsort(flat, dim=-1, stable=True)[..., :k], False)
        assert torch.equal(unstructured_mask(scores, sparsity, group), reference.reshape(scores.shape))
