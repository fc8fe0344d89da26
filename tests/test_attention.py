"""Sparse attention: kernels equal dense attention on their own blocks, patterns, the AttentionInterface hook
(routing, errors, bit-identical detach), Quest decoding alone and over a KV press's compressed cache."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparseforge.errors import UserInputError
from sparseforge.kernels.block_sparse_attention import (AttentionGate, BlockSelection, block_sparse_attention,
                                                         dense_reference, gather_attention)
from sparseforge.methods import get_method
from sparseforge.methods.attention.base import selection_coverage, with_diagonal
from sparseforge.methods.attention.flexprefill import FlexPrefill, cumulative_mask
from sparseforge.methods.attention.quest import page_bounds
from tiny_models import ARCHITECTURES, tiny_model


def make(name, **params):
    cls = get_method(name)
    if name == "quest":
        params.setdefault("gate", "always")  # Quest's CPU gate says dense (measured slower): force it to test it
    elif name != "snapkv":
        params.setdefault("kernel", "gather")  # no compile in the default run (flex: test_flex_* below)
    return cls(cls.parse_params(params))


def random_qkv(L, hq=4, hkv=2, d=16, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, L, d, generator=g), torch.randn(b, hkv, L, d, generator=g),
            torch.randn(b, hkv, L, d, generator=g))


def random_selection(b, h, L, block, p, seed=0):
    n = -(-L // block)
    mask = torch.rand(b, h, n, n, generator=torch.Generator().manual_seed(seed)) < p
    return BlockSelection.from_block_mask(mask, block, L)


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("L,hq,hkv,block", [(77, 4, 2, 8), (64, 4, 4, 16), (33, 6, 2, 8), (5, 2, 1, 8)])
def test_gather_equals_dense_on_its_blocks(L, hq, hkv, block):
    q, k, v = random_qkv(L, hq, hkv, b=2)
    sel = random_selection(2, hq, L, block, 0.4)
    assert 0 < sel.density() < 1 or L <= block
    out = gather_attention(q, k, v, sel, chunk_tokens=64)  # small chunks: several loop steps
    torch.testing.assert_close(out, dense_reference(q, k, v, sel), atol=2e-6, rtol=1e-5)


def test_masked_equals_dense_on_its_blocks():
    from sparseforge.kernels.block_sparse_attention import masked_attention

    q, k, v = random_qkv(77)
    sel = random_selection(1, 4, 77, 8, 0.4, seed=2)
    torch.testing.assert_close(masked_attention(q, k, v, sel), dense_reference(q, k, v, sel), atol=2e-6, rtol=1e-5)


def test_full_selection_equals_causal_sdpa():
    q, k, v = random_qkv(50)
    n = -(-50 // 8)
    sel = BlockSelection.from_block_mask(torch.ones(1, 4, n, n, dtype=torch.bool), 8, 50)
    assert sel.density() == 1.0
    out = block_sparse_attention(q, k, v, sel)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), atol=2e-6, rtol=1e-5)


def test_selection_round_trip_and_diagonal():
    sel = random_selection(1, 3, 70, 8, 0.3, seed=3)
    again = BlockSelection.from_block_mask(sel.block_mask(), 8, 70)
    assert torch.equal(again.block_mask(), sel.block_mask())
    mask = sel.block_mask()
    assert bool(torch.diagonal(mask, dim1=-2, dim2=-1).all())  # from_block_mask always adds the diagonal
    assert not bool(mask.triu(1).any())  # never above it
    bare = BlockSelection(torch.zeros(1, 1, 3, 1, dtype=torch.long), torch.ones(1, 1, 3, dtype=torch.long), 8, 24)
    fixed = with_diagonal(bare)
    assert fixed.block_mask()[0, 0].tolist() == [[True, False, False], [True, True, False], [True, False, True]]


@pytest.mark.slow
def test_flex_equals_dense_on_its_blocks():
    from sparseforge.kernels.block_sparse_attention import flex_attention

    q, k, v = random_qkv(77)
    sel = random_selection(1, 4, 77, 16, 0.4)
    torch.testing.assert_close(flex_attention(q, k, v, sel), dense_reference(q, k, v, sel), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_on_gpu_equals_dense_on_its_blocks():
    from sparseforge.kernels.block_sparse_attention import flex_attention

    q, k, v = (x.cuda() for x in random_qkv(300, 8, 2, d=64))
    sel = random_selection(1, 8, 300, 128, 0.5)
    sel = BlockSelection(sel.kv_index.cuda(), sel.kv_count.cuda(), sel.block, sel.length)
    ref = dense_reference(q.cpu(), k.cpu(), v.cpu(), BlockSelection(sel.kv_index.cpu(), sel.kv_count.cpu(), 128, 300))
    torch.testing.assert_close(flex_attention(q, k, v, sel).cpu(), ref, atol=2e-3, rtol=2e-3)


def test_gate():
    gate = AttentionGate({0.1: 4096, 0.3: 16384})
    assert gate.min_tokens() == 4096
    assert not gate.sparse_wins(2048, 0.05)
    assert gate.sparse_wins(4096, 0.05) and gate.sparse_wins(8192, 0.1)
    assert not gate.sparse_wins(8192, 0.2) and gate.sparse_wins(16384, 0.2)
    assert not gate.sparse_wins(1 << 20, 0.5)  # above every measured density: dense
    assert AttentionGate.from_json(gate.to_json()) == gate


def test_unknown_kernel_is_a_user_error():
    q, k, v = random_qkv(16)
    with pytest.raises(UserInputError, match="unknown block-sparse attention kernel"):
        block_sparse_attention(q, k, v, random_selection(1, 4, 16, 8, 1.0), kernel="nope")


# ----------------------------------------------------------------------------- patterns


PATTERNS = {
    "ashape": dict(block_size=8, sinks=8, window=16),
    "vertical-slash": dict(block_size=8, last_queries=8, vertical=16, slash=16),
    "flexprefill": dict(block_size=8, gamma=0.9),
    "minference-search": None,  # needs a calibrated state: below
}


@pytest.mark.parametrize("name", [n for n, p in PATTERNS.items() if p is not None])
def test_pattern_sparse_equals_dense_on_its_blocks(name):
    q, k, v = random_qkv(93, 4, 2, seed=5)
    method = make(name, **PATTERNS[name], gate="always")
    sel = method.selection(q, k, 16**-0.5)
    assert sel.kv_index.shape[:3] == (1, 4, 12)
    assert 0 < sel.density() < 1
    out = block_sparse_attention(q, k, v, sel, 16**-0.5)
    torch.testing.assert_close(out, dense_reference(q, k, v, sel, 16**-0.5), atol=2e-6, rtol=1e-5)


def test_ashape_blocks():
    sel = make("ashape", block_size=8, sinks=8, window=16).selection(*random_qkv(48)[:2], 0.25)
    assert sel.block_mask()[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]]


def test_vertical_slash_finds_planted_lines():
    # Every late query points strongly at key 20 (block 2): a vertical line the selection must keep in every
    # query block after it, while a tight budget drops other columns.
    L, d = 96, 16
    q, k, _ = random_qkv(L, 2, 2, d=d, seed=1)
    q, k = q * 0.1, k * 0.1
    k[:, :, 20] = 4.0
    q[:, :, :] = 4.0
    method = make("vertical-slash", block_size=8, last_queries=8, vertical=16, slash=8)
    mask = method.selection(q, k, d**-0.5).block_mask()[0, 0]
    assert bool(mask[3:, 2].all())
    assert mask[:, 0].all() and torch.diagonal(mask).all()  # sinks and local diagonal always
    assert int(mask[-1].sum()) == 3  # columns 0 and 2, and the diagonal


def test_cumulative_mask():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    assert cumulative_mask(probs, 0.8).tolist() == [[True, False, True, False]]
    assert cumulative_mask(probs, 0.81).tolist() == [[True, False, True, True]]
    assert cumulative_mask(probs, 0.1, minimum=2).tolist() == [[True, False, True, False]]


def test_flexprefill_divergence_picks_per_head():
    # Head 0: keys constant inside each block, so pooled keys are exact and the pooled estimate of the last block
    # matches its real attention (query-aware). Head 1: one sharp key inside a block of otherwise opposite keys;
    # pooling cancels it, the estimate is far from the real attention (fixed vertical-slash pattern).
    L, d, bs = 64, 16, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, L, d, generator=g) * 0.3
    k = torch.randn(1, 2, L, d, generator=g)
    k[:, 0] = k[:, 0].view(8, 8, d)[:, :1].expand(8, 8, d).reshape(L, d)
    q[:, :, -bs:] = torch.ones(d)
    k[:, 1] = torch.randn(L, d, generator=g) * 0.1
    k[:, 1, 16] = 3.0 * torch.ones(d)
    k[:, 1, 17:24] = -3.0 * torch.ones(d) / 7
    method = make("flexprefill", block_size=bs, gamma=0.9, tau=0.1)
    aware, _ = method.head_choice(q, k, d**-0.5, torch.arange(2))
    assert aware[0].tolist() == [True, False]
    sel = method.selection(q, k, d**-0.5)
    assert method.query_aware[0] == [True, False]
    assert bool(sel.block_mask()[0, 1, 7:, 2].all())  # the fixed pattern keeps the sharp key's column


def test_coverage_is_one_for_full_and_matches_brute_force():
    q, k, _ = random_qkv(40)
    n = 5
    full = BlockSelection.from_block_mask(torch.ones(1, 4, n, n, dtype=torch.bool), 8, 40)
    torch.testing.assert_close(selection_coverage(q, k, full, 0.25), torch.ones(1, 4))
    sel = random_selection(1, 4, 40, 8, 0.3)
    kk = k.repeat_interleave(2, 1)
    probs = (q @ kk.transpose(-1, -2) * 0.25).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    pos = torch.arange(40) // 8
    inside = sel.block_mask()[:, :, pos][:, :, :, pos]
    torch.testing.assert_close(selection_coverage(q, k, sel, 0.25), (probs * inside).sum(-1).mean(-1), atol=1e-5, rtol=1e-5)


def test_parameter_errors_are_one_line():
    with pytest.raises(UserInputError, match="block_size must be an integer >= 8"):
        get_method("ashape").parse_params({"block_size": 4})
    with pytest.raises(UserInputError, match="gamma must lie in"):
        get_method("flexprefill").parse_params({"gamma": 1.5})
    with pytest.raises(UserInputError, match="not a prefill attention pattern"):
        get_method("minference-search").parse_params({"candidates": ["quest:page_size=4"]})
    with pytest.raises(UserInputError, match="allowed: auto, always"):
        get_method("vertical-slash").parse_params({"gate": "sometimes"})


# ----------------------------------------------------------------------------- the hook


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


ROUTED = [a for a in ARCHITECTURES if a != "gemma2"]


@pytest.mark.parametrize("arch", ROUTED)
def test_hook_routes_every_architecture(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    full = make("ashape", block_size=8, sinks=8, window=4096, gate="always")
    full.attach(model)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)  # all blocks: dense
    assert all(s["path"] == "sparse" for s in full.stats.values()) and len(full.stats) == 2
    full.detach(model)
    sparse = make("ashape", block_size=8, sinks=8, window=8, gate="always")
    sparse.attach(model)
    assert not torch.allclose(_logits(model, ids), before, atol=1e-3)
    sparse.detach(model)
    assert torch.equal(_logits(model, ids), before)
    assert model.config._attn_implementation == "sdpa"


def test_eager_model_is_refused():
    model = tiny_model("gemma2")  # gemma2 defaults to eager (soft-capping)
    with pytest.raises(UserInputError, match="load it with attn_implementation='sdpa'"):
        make("ashape").attach(model)


def test_attention_that_skips_the_interface_is_an_error():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    method = make("ashape", block_size=8, gate="always")
    method.attach(model)
    # A model whose attention computes on its own (as custom code may): the hook must notice, not run dense.
    original = attn.forward
    attn.forward = lambda *a, **kw: (torch.zeros_like(kw.get("hidden_states", a[0] if a else None)), None)
    with pytest.raises(UserInputError, match="did not call transformers' AttentionInterface"):
        _logits(model, torch.ones(1, 16, dtype=torch.long))
    attn.forward = original
    method.detach(model)


def test_gate_auto_sends_short_prompts_to_sdpa_bit_identical():
    model = tiny_model("llama")
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    method = make("vertical-slash", block_size=8, vertical=8, slash=8)  # gate auto: crossover >> 64 tokens
    method.attach(model)
    assert torch.equal(_logits(model, ids), before)
    assert all(s["path"] == "sdpa" and s["density"] is None for s in method.stats.values())
    method.detach(model)


def test_padded_batch_runs_dense():
    model = tiny_model("llama")
    ids = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    method = make("ashape", block_size=8, window=8, gate="always")
    method.attach(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    method.detach(model)


def test_search_calibrates_and_dispatches_per_head(tokenizer):
    from sparseforge.core.calibration import CalibrationConfig
    from sparseforge.methods import RuntimeContext

    model = tiny_model("llama")
    method = make("minference-search", block_size=8, gate="always", target=0.5,
                  candidates=["ashape:sinks=8,window=8", "vertical-slash:last_queries=8,vertical=8,slash=8"])
    state = method.calibrate(model, RuntimeContext(tokenizer, CalibrationConfig(samples=2, seq_len=64)))
    choice = state.tensors["choice"]
    assert choice.shape == (2, 4) and choice.dtype == torch.int64
    assert bool(((choice >= -1) & (choice < 2)).all())
    assert len(state.data["head_coverage"]) == 2 and all(0 < c <= 1 for row in state.data["head_coverage"] for c in row)
    # Force one head per kind and check the layer's selection takes each head's own pattern.
    state.tensors["choice"] = torch.tensor([[0, 1, -1, 0], [1, 1, 0, -1]])
    method.attach(model, state)
    q, k, v = random_qkv(64)
    mask = method.selection(q, k, 0.25, index=0).block_mask()[0]
    ashape = make("ashape", block_size=8, sinks=8, window=8).selection(q, k, 0.25).block_mask()[0, 0]
    vs = make("vertical-slash", block_size=8, last_queries=8, vertical=8, slash=8).selection(q, k, 0.25).block_mask()[0, 1]
    assert torch.equal(mask[0], ashape) and torch.equal(mask[3], ashape)
    assert torch.equal(mask[1], vs)
    assert bool(mask[2].tril().eq(torch.ones(8, 8, dtype=torch.bool).tril()).all())  # dense head
    method.detach(model)


# ----------------------------------------------------------------------------- Quest


def test_page_bound_is_an_upper_bound():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 32, 8, generator=g)
    q = torch.randn(8, generator=g)
    mins, maxs = page_bounds(keys, 4)
    bound = torch.maximum(q * mins, q * maxs).sum(-1)  # [1, 2, 8]
    scores = (keys @ q).view(1, 2, 8, 4)
    assert bool((scores <= bound[..., None] + 1e-5).all())
    assert bool((scores.amax(-1) >= bound - 20).all())


def _quest_reference(q, k, v, chosen, page, scale):
    """Dense attention of one query over exactly the chosen pages' tokens."""
    b, hq, _, d = q.shape
    kk = k.repeat_interleave(hq // k.shape[1], 1)
    vv = v.repeat_interleave(hq // k.shape[1], 1)
    S = k.shape[2]
    allowed = torch.zeros(b, hq, S, dtype=torch.bool)
    for h in range(hq):
        for p in chosen[0, h].tolist():
            allowed[0, h, p * page:(p + 1) * page] = True
    s = (q @ kk.transpose(-1, -2) * scale).masked_fill(~allowed[:, :, None], float("-inf"))
    return s.softmax(-1) @ vv


def test_quest_decode_equals_dense_on_its_pages_and_reuses_pages():
    quest = make("quest", page_size=4, token_budget=12)
    q = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(1))
    k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    out = quest.run_decode(None, 0, q, k, v, 8**-0.5)
    chosen = quest.select_pages(0, q, k)
    assert chosen.shape == (1, 4, 3) and bool((chosen == 7).any(-1).all())  # the newest (partial) page always
    torch.testing.assert_close(out, _quest_reference(q, k, v, chosen, 4, 8**-0.5), atol=1e-6, rtol=1e-5)
    assert quest._pages[0].full == 7
    k2 = torch.cat([k, torch.randn(1, 2, 2, 8)], 2)  # one more full page: only it is summarised anew
    quest.run_decode(None, 0, q, k2, torch.cat([v, torch.randn(1, 2, 2, 8)], 2), 8**-0.5)
    mins, _ = page_bounds(k2, 4)
    assert quest._pages[0].full == 8 and torch.equal(quest._pages[0].mins, mins)
    evicted = k2[:, :, 1:29]  # a press dropped a token: the summaries no longer match and are rebuilt
    quest.run_decode(None, 0, q, evicted, torch.randn(1, 2, 28, 8), 8**-0.5)
    assert torch.equal(quest._pages[0].mins, page_bounds(evicted, 4)[0])
    assert quest.run_decode(None, 0, q, k[:, :, :12], v[:, :, :12], 1.0) is None  # within budget: dense


def _generate(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)


def test_quest_on_a_model_detaches_bit_identical():
    model = tiny_model("llama")
    ids = torch.randint(0, 4096, (1, 60), generator=torch.Generator().manual_seed(4))
    before = _generate(model, ids)
    quest = make("quest", page_size=4, token_budget=16)
    quest.attach(model)
    _generate(model, ids)
    assert quest.steps["sparse"] > 0
    quest.detach(model)
    assert torch.equal(_generate(model, ids), before)


@pytest.mark.parametrize("order", ["press-first", "attention-first"])
def test_quest_pages_a_compressed_cache(order):
    """Quest over SnapKV's compressed cache: with a budget covering the held cache it changes nothing; with a
    smaller one it pages the held (compressed) tokens; either attach order gives the same result."""
    model = tiny_model("llama")
    ids = torch.randint(0, 4096, (1, 80), generator=torch.Generator().manual_seed(5))
    press = make("snapkv", compression_ratio=0.5)
    press.attach(model)
    press_only = _generate(model, ids)
    press.detach(model)

    def run(budget):
        press, quest = make("snapkv", compression_ratio=0.5), make("quest", page_size=4, token_budget=budget)
        first, second = (press, quest) if order == "press-first" else (quest, press)
        first.attach(model)
        second.attach(model)
        seen = []
        original = quest.run_decode

        def spy(module, index, q, k, v, scale):
            seen.append(k.shape[2])
            return original(module, index, q, k, v, scale)

        quest.run_decode = spy
        out = _generate(model, ids)
        second.detach(model)
        first.detach(model)
        return out, seen, quest

    same, seen, _ = run(budget=128)
    assert torch.equal(same, press_only) and seen[0] == 41  # half of the 80 prompt tokens kept, plus the new one
    paged, seen, quest = run(budget=16)
    assert quest.steps["sparse"] > 0 and max(seen) <= 48
    assert model.config._attn_implementation == "sdpa"


def test_prefill_pattern_composes_with_press_and_quest():
    model = tiny_model("llama")
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(6))
    before = _generate(model, ids)
    stages = [make("ashape", block_size=8, window=16, gate="always"), make("snapkv", compression_ratio=0.5),
              make("quest", page_size=4, token_budget=16)]
    for s in stages:
        s.attach(model)
    _generate(model, ids)
    assert stages[0].stats[0]["path"] == "sparse" and stages[2].steps["sparse"] > 0
    with pytest.raises(UserInputError, match="already attached"):
        make("vertical-slash").attach(model)
    for s in reversed(stages):
        s.detach(model)
    assert torch.equal(_generate(model, ids), before)


def test_search_choice_rule():
    from sparseforge.methods.attention.search import choose

    # one layer, three candidates, three heads
    coverage = torch.tensor([[[0.96, 0.80, 0.70], [0.99, 0.97, 0.75], [0.90, 0.85, 0.80]]])
    density = torch.tensor([[[0.20, 0.20, 0.20], [0.60, 0.60, 0.60], [0.40, 0.40, 0.40]]])
    assert choose(coverage, density, 0.95).tolist() == [[0, 1, -1]]  # cheapest covering; none covers: dense
    # capped at 0.5: head 1's covering candidate is too dense, it takes the best-covering one that fits
    assert choose(coverage, density, 0.95, max_density=0.5).tolist() == [[0, 2, 2]]


def test_gate_tables_follow_the_measured_kernel():
    flex, gather = make("ashape", kernel="flex"), make("ashape", kernel="gather")
    assert flex.gate.sparse_wins(2048, 0.1) and not flex.gate.sparse_wins(512, 0.1)
    assert not flex.gate.sparse_wins(32768, 0.5)  # denser than anything measured: dense
    assert not any(gather.gate.sparse_wins(L, 0.05) for L in (1024, 32768))  # gather never beat SDPA: always dense
    assert make("ashape").params.kernel == "gather" and get_method("ashape").Params().kernel == "flex"


def test_quest_gate_runs_dense_where_it_was_measured_slower():
    quest = make("quest", page_size=4, token_budget=12, gate="auto")
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 64, 8)
    assert quest.run_decode(None, 0, q, k, k, 1.0) is None and quest.steps["dense"] == 1


# ----------------------------------------------------------------------------- the gate decides before the index


def _search_with_state(choice):
    method = make("minference-search", block_size=8, kernel="flex",
                  candidates=["ashape:sinks=8,window=8", "vertical-slash:last_queries=8,vertical=8,slash=8", "flexprefill:gamma=0.9"])
    from sparseforge.methods.base import RuntimeState

    method.load_state(RuntimeState(tensors={"choice": torch.tensor(choice)}, data={"gate": {"0.3": 64}}))
    return method


def test_predicted_density_matches_the_selection():
    q, k, _ = random_qkv(256, 4, 2, seed=7)
    heads = torch.arange(4)
    # A-shape is static: exact, at several lengths and budgets (odd lengths included).
    for L, window in ((256, 24), (203, 8), (64, 200)):
        m = make("ashape", block_size=8, sinks=8, window=window)
        pred = m.predicted_density(q[:, :, :L], k[:, :, :L], 0.25, heads, 0)
        assert float(pred.mean()) == pytest.approx(m.selection(q[:, :, :L], k[:, :, :L], 0.25).density(), abs=1e-12)
    # Vertical-slash: exactly dense when the slash budget covers every diagonal; otherwise the pooled query picks
    # lines whose union is as dense as the real selection's on random inputs.
    full = make("vertical-slash", block_size=8, last_queries=8, vertical=8, slash=256)
    assert full.predicted_density(q, k, 0.25, heads, 0).tolist() == [1.0] * 4 == [full.selection(q, k, 0.25).density()] * 4
    vs = make("vertical-slash", block_size=8, last_queries=8, vertical=32, slash=48)
    assert float(vs.predicted_density(q, k, 0.25, heads, 0).mean()) == pytest.approx(vs.selection(q, k, 0.25).density(), abs=0.05)
    fp = make("flexprefill", block_size=8, gamma=0.9)
    assert float(fp.predicted_density(q, k, 0.25, heads, 0).mean()) == pytest.approx(fp.selection(q, k, 0.25).density(), abs=0.05)
    # The search: each head predicted by its own pattern, dense heads 1.
    search = _search_with_state([[0, -1, 2, 1]])
    pred = search.predicted_density(q, k, 0.25, heads, 0)
    assert pred[1] == 1.0
    assert float(pred[0]) == float(make("ashape", block_size=8, sinks=8, window=8).predicted_density(q, k, 0.25, heads[:1], 0)[0])


def _count_index_calls(monkeypatch, method):
    calls = {"select": 0}
    original = method.select

    def counting(*args, **kwargs):
        calls["select"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(method, "select", counting)
    return calls


@pytest.mark.parametrize("name", ["ashape", "vertical-slash", "flexprefill", "minference-search"])
def test_gate_says_dense_without_building_the_index(monkeypatch, name):
    from sparseforge.methods.attention import base

    q, k, v = random_qkv(256, 4, 2, seed=8)
    dense_params = {"ashape": dict(sinks=8, window=256), "vertical-slash": dict(last_queries=8, vertical=8, slash=256),
                    "flexprefill": dict(gamma=0.99)}
    method = _search_with_state([[-1, -1, -1, 0]]) if name == "minference-search" else make(name, block_size=8, kernel="flex", **dense_params[name])
    method.gate = AttentionGate({0.3: 64})  # sparse from 64 tokens at densities up to 0.3
    calls = _count_index_calls(monkeypatch, method)
    monkeypatch.setattr(base, "last_query_probs", lambda *a, **kw: pytest.fail("the index's attention was computed"))
    assert method.run_prefill(None, 0, q, k, v, 0.25) is None  # the model's SDPA runs
    stat = method.stats[0]
    assert calls["select"] == 0 and stat["path"] == "sdpa" and stat["density"] is None and stat["predicted"] > 0.3
    # Below the crossover length nothing is predicted either.
    monkeypatch.setattr(method, "predicted_density", lambda *a: pytest.fail("predicted below the crossover"))
    assert method.run_prefill(None, 0, q[:, :, :32], k[:, :, :32], v[:, :, :32], 0.25) is None
    assert calls["select"] == 0 and method.stats[0]["predicted"] is None


def test_gate_builds_the_index_once_when_the_prediction_is_sparse(monkeypatch):
    q, k, v = random_qkv(256, 4, 2, seed=8)
    method = make("ashape", block_size=8, sinks=8, window=8)  # density 0.12
    method.gate = AttentionGate({0.3: 64})
    calls = _count_index_calls(monkeypatch, method)
    out = method.run_prefill(None, 0, q, k, v, 0.25)
    assert calls["select"] == 1 and method.stats[0]["path"] == "sparse"
    torch.testing.assert_close(out, dense_reference(q, k, v, method.selection(q, k, 0.25), 0.25), atol=2e-6, rtol=1e-5)


def test_quest_gated_off_computes_and_keeps_no_page_summaries(monkeypatch):
    from sparseforge.methods.attention import quest as quest_module

    quest = make("quest", page_size=4, token_budget=12, gate="auto")
    monkeypatch.setattr(quest_module, "page_bounds", lambda *a: pytest.fail("page summaries computed while gated off"))
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 640, 8)
    for step in range(3):
        assert quest.run_decode(None, 0, q, k[:, :, :600 + step], k[:, :, :600 + step], 1.0) is None
    assert quest.steps == {"sparse": 0, "dense": 3} and quest._pages == {}
