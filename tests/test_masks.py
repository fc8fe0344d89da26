import pytest
import torch

from sparseforge.core.masks import (
    HeadPlan,
    Pattern,
    block_mask,
    channel_mask,
    channel_weight_mask,
    check_blocks,
    check_channels,
    check_heads,
    check_nm,
    check_pattern,
    check_unstructured,
    head_mask,
    nm_mask,
    select_mask,
    unstructured_mask,
)
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


# --- structured patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,b", [(0.5, 2), (0.25, 4), (0.7, 2), (0.0, 4)])
def test_block_mask_removes_lowest_blocks_exactly(sparsity, b):
    scores = torch.rand(3, 8, 16, generator=torch.Generator().manual_seed(0))  # a stack of matrices
    mask = block_mask(scores, sparsity, b)
    blocks = mask.reshape(3, 8 // b, b, 16 // b, b)
    kept = blocks.all(-1).all(-2)
    assert (blocks.any(-1).any(-2) == kept).all()  # each block is kept or removed whole
    n_blocks = (8 // b) * (16 // b)
    assert ((~kept).flatten(1).sum(-1) == int(n_blocks * sparsity)).all()
    sums = scores.reshape(3, 8 // b, b, 16 // b, b).sum((-3, -1))
    if 0 < sparsity:
        assert (torch.where(kept, sums, torch.inf).flatten(1).min(-1).values >= torch.where(~kept, sums, -torch.inf).flatten(1).max(-1).values).all()
    assert check_blocks(scores * mask, sparsity, b)


def test_block_validator_rejects_violations_and_bad_tiling():
    w = torch.ones(4, 8)
    w[:2, :2] = 0  # one zero 2x2 block of eight
    assert check_blocks(w, 1 / 8, 2) and not check_blocks(w, 0.25, 2)
    w[0, 2] = 0  # a partly zero block does not count
    assert not check_blocks(w, 0.25, 2)
    assert not check_blocks(torch.zeros(4, 6), 0.5, 4)
    with pytest.raises(UserInputError, match="tiled"):
        block_mask(torch.rand(4, 6), 0.5, 4)
    with pytest.raises(UserInputError, match="outside"):
        block_mask(torch.rand(4, 8), 1.0, 2)


def test_channel_mask_counts_and_validators():
    scores = torch.rand(2, 40, generator=torch.Generator().manual_seed(0))
    keep = channel_mask(scores, 0.3)
    assert ((~keep).sum(-1) == 12).all()
    w = torch.randn(2, 5, 40) * channel_weight_mask(keep, (2, 5, 40), "in")
    assert check_channels(w, 0.3, "in") and not check_channels(w, 0.35, "in")
    assert not check_channels(w, 0.3, "out")
    rows = torch.randn(2, 40, 5) * channel_weight_mask(keep, (2, 40, 5), "out")
    assert check_channels(rows, 0.3, "out")
    w[0, 0, ~keep[0]] = 1.0  # one nonzero entry in each removed column breaks the pattern
    assert not check_channels(w, 0.3, "in")


def test_head_plan_grouped_and_whole_groups():
    gqa = HeadPlan.make(32, 8, 0.25)  # groups of 4: one query head per group, KV heads stay
    assert (gqa.per_group, gqa.groups, gqa.heads_after, gqa.kv_heads_after, gqa.mode) == (1, 0, 24, 8, "per_group")
    mha = HeadPlan.make(32, None, 0.25)  # plain multi-head attention: whole heads with their K/V
    assert (mha.heads_after, mha.kv_heads_after, mha.mode) == (24, 24, "whole_groups")
    pairs = HeadPlan.make(8, 4, 0.25)  # groups of 2 cannot lose a quarter each: one whole group goes
    assert (pairs.heads_after, pairs.kv_heads_after) == (6, 3)
    with pytest.raises(UserInputError, match="removes no head"):
        HeadPlan.make(4, 2, 0.25)
    with pytest.raises(UserInputError, match="outside"):
        HeadPlan.make(4, 2, 1.0)


def test_head_mask_per_group_whole_groups_and_validator():
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0, 8.0, 7.0, 5.0, 6.0])  # 2 KV groups of 4 heads
    keep = head_mask(scores, HeadPlan.make(8, 2, 0.5))
    assert keep.tolist() == [True, False, True, False, True, True, False, False]
    keep_groups = head_mask(scores, HeadPlan.make(8, 4, 0.25))  # groups of 2: the lowest-sum pair goes
    assert keep_groups.tolist() == [False, False, True, True, True, True, True, True]  # sums 5, 5, 15, 11: tie -> first
    keep_mha = head_mask(scores, HeadPlan.make(8, None, 0.25))  # multi-head attention: the two lowest heads
    assert keep_mha.tolist() == [True, False, True, False, True, True, True, True]
    hd = 3
    w = torch.randn(6, 8 * hd) * channel_weight_mask(keep.repeat_interleave(hd), (6, 8 * hd), "in")
    assert check_heads(w, HeadPlan.make(8, 2, 0.5)) and not check_heads(w, HeadPlan.make(8, 2, 0.75))
    w[:, 1 * hd] = 1.0  # head 1 no longer entirely zero: group 0 has only one zero head
    assert not check_heads(w, HeadPlan.make(8, 2, 0.5))


def test_structured_masks_are_deterministic_with_ties():
    ones = torch.ones(8, 16)
    assert torch.equal(block_mask(ones, 0.5, 2), block_mask(ones.clone(), 0.5, 2))
    assert not block_mask(ones, 0.5, 2)[:4].any()  # ties: earlier blocks (row-major) go first
    assert channel_mask(torch.ones(10), 0.3).tolist() == [False] * 3 + [True] * 7
    assert head_mask(torch.ones(8), HeadPlan.make(8, 2, 0.25)).tolist() == [False, True, True, True] * 2
