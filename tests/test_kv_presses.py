"""KV presses on tiny random models of five architectures: budgets, exact StreamingLLM contents, agreement with a
plain cache holding the kept tokens, bit-identical ratio 0 and detach, decode-time budgets, chunked prefill bounds,
the head-level press, and bad input."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_models import ARCHITECTURES, VOCAB  # noqa: E402

from sparseforge.errors import UserInputError  # noqa: E402
from sparseforge.methods import RuntimeContext, get_method  # noqa: E402
from sparseforge.methods.kv import attached_press, cache_bytes, generate_with_press  # noqa: E402
from sparseforge.methods.kv.base import PressLayer, cache_argument  # noqa: E402
from sparseforge.methods.kv.duo_attention import HeadSplitLayer  # noqa: E402

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[1] / "src" / "sparseforge" / "assets" / "reference-model"
ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt_neox"]
EVICTING = ["streaming_llm", "knorm", "snapkv", "pyramidkv", "tova", "h2o"]
UNIFORM = ["streaming_llm", "knorm", "snapkv", "tova", "h2o"]



_MODELS: dict = {}


def kv_model(arch: str):
    """Tiny model as in tiny_models, but Mistral without its sliding window (sliding layers are left unpressed)."""
    if arch not in _MODELS:
        base, _, impl = arch.partition(":")  # "llama:eager": the same model on eager attention
        kwargs = dict(ARCHITECTURES[base], vocab_size=VOCAB, max_position_embeddings=512)
        if base == "mistral":
            kwargs["sliding_window"] = None
        torch.manual_seed(0)
        config = transformers.CONFIG_MAPPING[base](**kwargs)
        extra = {"attn_implementation": impl} if impl else {}
        _MODELS[arch] = transformers.AutoModelForCausalLM.from_config(config, **extra).eval()
    return _MODELS[arch]


def press(name: str, **params):
    cls = get_method(name)
    return cls(cls.parse_params(params))


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def run(model, tokens, cache=None):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=True, **{cache_argument(model): cache})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EVICTING)
def test_press_keeps_its_budget_per_head(arch, name):
    model = kv_model(arch)
    p = press(name, compression_ratio=0.75)
    p.attach(model)
    try:
        cache = run(model, ids(64)).past_key_values
        held = [layer.held() for layer in cache.layers]
        assert all(isinstance(layer, PressLayer) for layer in cache.layers)
        assert all(layer.keys.shape[2] == layer.values.shape[2] == layer.held() for layer in cache.layers)
        assert cache.get_seq_length() == 64
        if name == "pyramidkv":
            assert held == [p.target(i, 64) for i in range(len(held))]
            assert held[0] > held[-1]
        else:
            assert held == [16] * len(held)  # round(64 * (1 - 0.75))
        # The next forward runs on the compressed cache: one more token per layer, positions continue at 64.
        cache = run(model, ids(3, 1), cache).past_key_values
        assert cache.get_seq_length() == 67
    finally:
        p.detach(model)


def test_streaming_llm_keeps_exactly_sinks_and_window():
    model = kv_model("llama")
    tokens = ids(40)
    dense = run(model, tokens).past_key_values
    p = press("streaming_llm", compression_ratio=0.75, n_sink=4)
    p.attach(model)
    try:
        cache = run(model, tokens).past_key_values
    finally:
        p.detach(model)
    for full, kept in zip(dense.layers, cache.layers):
        expected = torch.cat([full.keys[:, :, :4], full.keys[:, :, -6:]], dim=2)  # 10 = round(40 * 0.25)
        assert torch.equal(kept.keys, expected)
        assert torch.equal(kept.values, torch.cat([full.values[:, :, :4], full.values[:, :, -6:]], dim=2))


def _plain_cache_like(cache) -> DynamicCache:
    """A transformers DynamicCache holding the same kept tensors (what attention over the kept tokens means)."""
    plain = DynamicCache()
    for layer in cache.layers:
        new = DynamicLayer()
        new.lazy_initialization(layer.keys, layer.values)
        new.keys, new.values = layer.keys.clone(), layer.values.clone()
        plain.layers.append(new)
    return plain


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox", "llama:eager"])
@pytest.mark.parametrize("name", UNIFORM)
def test_compressed_cache_agrees_with_plain_cache_of_kept_tokens(arch, name):
    """Next forwards on the pressed cache equal a plain cache holding the kept tokens, with positions that
    continue after every token seen (so eviction does not shift the positions of new tokens)."""
    model = kv_model(arch)
    p = press(name, compression_ratio=0.5)
    p.attach(model)
    try:
        cache = run(model, ids(48)).past_key_values
        plain = _plain_cache_like(cache)
        follow = ids(5, 2)
        out = run(model, follow, cache)
    finally:
        p.detach(model)
    with torch.no_grad():
        ref = model(input_ids=follow, cache=plain, use_cache=True, position_ids=torch.arange(48, 53)[None])
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama:eager"])
def test_pyramid_layers_of_different_lengths_agree_with_per_layer_reference(arch):
    """Per-layer budgets: a one-token step on the pressed cache equals a plain cache of the kept tokens."""
    model = kv_model(arch)
    p = press("pyramidkv", compression_ratio=0.5, beta=4.0)
    p.attach(model)
    try:
        cache = run(model, ids(48)).past_key_values
        assert len({layer.held() for layer in cache.layers}) > 1
        plain = _plain_cache_like(cache)
        out = run(model, ids(1, 3), cache)
        more = run(model, ids(4, 4), cache)  # multi-token forward over layers of different lengths: masks rebuilt
    finally:
        p.detach(model)
    # The reference runs on sdpa (same weights): an eager model sizes one mask for all layers, which a plain cache
    # with layers of different lengths cannot satisfy; that is what the press's mask rebuild is for.
    with torch.no_grad():
        ref = kv_model("llama")(input_ids=ids(1, 3), cache=plain, use_cache=True, position_ids=torch.tensor([[48]]))
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(more.logits).all()


@pytest.mark.parametrize("arch", ARCHS + ["llama:eager"])
def test_ratio_zero_and_detach_are_bit_identical(arch):
    model = kv_model(arch)
    tokens, follow, step = ids(40), ids(6, 1), ids(1, 2)

    def outputs():
        out = run(model, tokens)
        cache = out.past_key_values
        a = run(model, follow, cache)
        b = run(model, step, cache)
        return out.logits, a.logits, b.logits

    before = outputs()
    for name in EVICTING + ["duo_attention"]:
        p = press(name, compression_ratio=0.0)
        p.attach(model)
        try:
            with_press = outputs()
        finally:
            p.detach(model)
        assert all(torch.equal(x, y) for x, y in zip(before, with_press)), name
        p = press(name, compression_ratio=0.75) if name != "duo_attention" else None
        if p is not None:
            p.attach(model)
            outputs()
            p.detach(model)
            assert all(torch.equal(x, y) for x, y in zip(before, outputs())), f"{name} after detach"
    assert attached_press(model) is None


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "tova", "knorm"])
def test_decoding_keeps_the_budget(name):
    model = kv_model("qwen2")
    p = press(name, compression_ratio=0.75)
    p.attach(model)
    try:
        cache = run(model, ids(64)).past_key_values
        token = ids(1, 5)
        for _ in range(6):
            out = run(model, token, cache)
            token = out.logits[:, -1:].argmax(-1)
        assert [layer.held() for layer in cache.layers] == [16, 16]
        assert cache.get_seq_length() == 70
    finally:
        p.detach(model)


def test_snapkv_does_not_compress_while_decoding_or_after_the_prompt():
    model = kv_model("llama")
    p = press("snapkv", compression_ratio=0.75, window_size=8)
    p.attach(model)
    try:
        cache = run(model, ids(64)).past_key_values
        run(model, ids(5, 1), cache)  # a question after a compressed document: kept whole
        run(model, ids(1, 2), cache)
        assert [layer.held() for layer in cache.layers] == [22, 22]
    finally:
        p.detach(model)


@pytest.mark.parametrize("name", EVICTING + ["duo_attention"])
def test_chunked_prefill_peak_is_bounded_by_budget_plus_chunk(name):
    model = kv_model("llama")
    n, chunk, ratio = 192, 16, 0.75
    params = {"compression_ratio": ratio}
    state = None
    if name == "duo_attention":
        params.update(window=16, calibration_episodes=2)
    p = press(name, **params)
    if name == "duo_attention":
        tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        state = p.calibrate(model, RuntimeContext(tokenizer=tok))
    whole = generate_with_press(model, ids(n), None, max_new_tokens=1)
    per_token = whole.final_cache_bytes // n  # all layers, keys and values
    r = generate_with_press(model, ids(n), p, max_new_tokens=4, chunk_size=chunk, state=state)
    if name == "duo_attention":
        heads = state.tensors["retrieval_heads"]
        assert r.peak_cache_bytes < whole.final_cache_bytes
        assert r.final_cache_bytes < 0.75 * r.full_cache_bytes
        assert heads.sum() == round(heads.numel() * (1 - ratio))
    else:
        layers = model.config.num_hidden_layers
        budgets = [p.target(i, n) for i in range(layers)]
        bound = per_token * (max(budgets) + chunk)  # every layer at its budget, plus one chunk, generously
        assert r.peak_cache_bytes <= bound
        assert r.peak_cache_bytes < whole.final_cache_bytes / 2
    assert len(r.tokens[0]) == 4 and r.ttft_s > 0 and r.tpot_s > 0
    assert attached_press(model) is None


def test_chunked_prefill_matches_plain_chunking_at_ratio_zero():
    model = kv_model("llama")
    tokens = ids(80)
    plain = generate_with_press(model, tokens, None, max_new_tokens=5)
    chunked = generate_with_press(model, tokens, press("snapkv", compression_ratio=0.0), max_new_tokens=5, chunk_size=16)
    assert chunked.tokens == plain.tokens
    assert chunked.final_cache_bytes == plain.final_cache_bytes


def test_hf_generate_runs_with_a_press_and_keeps_positions():
    model = kv_model("llama")
    p = press("streaming_llm", compression_ratio=0.5)
    tokens = ids(50)
    ours = generate_with_press(model, tokens, p, max_new_tokens=6)
    p.attach(model)
    try:
        with torch.no_grad():
            hf = model.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        p.detach(model)
    assert hf[0, 50:].tolist() == ours.tokens[0]


def test_cache_bytes_counts_every_tensor_exactly():
    model = kv_model("llama")
    cache = run(model, ids(10)).past_key_values
    layers, heads, dim = 2, 2, 16
    assert cache_bytes(cache) == 2 * layers * heads * 10 * dim * 4  # keys + values, float32
    view = DynamicCache()
    layer = DynamicLayer()
    big = torch.zeros(1, 2, 100, 16)
    layer.lazy_initialization(big, big)
    layer.keys, layer.values = big[:, :, :10], big[:, :, :10]  # a view keeps the whole buffer alive
    view.layers.append(layer)
    assert cache_bytes(view) == big.numel() * 4


def test_duo_attention_frees_streaming_heads_memory():
    model = kv_model("llama")
    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    p = press("duo_attention", compression_ratio=0.5, n_sink=4, window=12, calibration_episodes=2)
    state = p.calibrate(model, RuntimeContext(tokenizer=tok))
    flags = state.tensors["retrieval_heads"]
    assert flags.dtype == torch.bool and flags.shape == (2, 2) and int(flags.sum()) == 2
    assert len(state.data["needle_attention"]) == 2
    tokens = ids(100)
    dense = run(model, tokens).past_key_values
    p.attach(model, state)
    try:
        cache = run(model, tokens).past_key_values
    finally:
        p.detach(model)
    total = 0
    for i, (full, layer) in enumerate(zip(dense.layers, cache.layers)):
        assert isinstance(layer, HeadSplitLayer)
        r = flags[i].nonzero().flatten()
        s = (~flags[i]).nonzero().flatten()
        assert torch.equal(layer.keys, full.keys[:, r])
        expected = torch.cat([full.keys[:, s, :4], full.keys[:, s, -12:]], dim=2)
        assert torch.equal(layer.stream_keys, expected)
        total += 2 * 4 * 16 * (len(r) * 100 + len(s) * 16) + 8 * 2  # + the two int64 head-index tensors
    assert cache_bytes(cache) == total
    with pytest.raises(UserInputError, match="tokenizer"):
        p.calibrate(model, RuntimeContext())
    with pytest.raises(UserInputError, match="calibrate"):
        press("duo_attention", compression_ratio=0.5).attach(model)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("snapkv", {"compression_ratio": 1.0}, "compression_ratio"),
        ("streaming_llm", {"compression_ratio": -0.1}, "compression_ratio"),
        ("streaming_llm", {"n_sink": -1}, "n_sink"),
        ("snapkv", {"kernel_size": 4}, "odd"),
        ("snapkv", {"window_size": 0}, "window_size"),
        ("h2o", {"recent_fraction": 1.5}, "recent_fraction"),
        ("pyramidkv", {"beta": 0.5}, "beta"),
        ("duo_attention", {"window": 0}, "window"),
        ("snapkv", {"ratio": 0.5}, "unknown parameter"),
    ],
)
def test_bad_params_raise_one_line_user_errors(name, params, match):
    with pytest.raises(UserInputError, match=match) as info:
        get_method(name).parse_params(params)
    assert "\n" not in str(info.value)


def test_bad_runtime_input_raises():
    model = kv_model("llama")
    p = press("snapkv", compression_ratio=0.5)
    with pytest.raises(UserInputError, match="chunk_size"):
        generate_with_press(model, ids(10), p, chunk_size=0)
    p.attach(model)
    try:
        with pytest.raises(UserInputError, match="already attached"):
            press("knorm").attach(model)
    finally:
        p.detach(model)


def test_hybrid_model_presses_its_full_attention_layers_only():
    """Gemma-2 (eager attention, alternating sliding and full layers): sliding layers are left as they are."""
    from tiny_models import tiny_model

    model = tiny_model("gemma2")
    p = press("snapkv", compression_ratio=0.5)
    p.attach(model)
    try:
        cache = run(model, ids(64)).past_key_values
        out = run(model, ids(3, 1), cache)
    finally:
        p.detach(model)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "PressLayer"]
    assert cache.layers[1].held() == 32 + 3 and torch.isfinite(out.logits).all()


def test_head_split_attention_matches_per_head_reference():
    """Each query head attends to its own KV head's cache: every token for a retrieval head, sinks + window for
    a streaming head; new tokens causally (checked against softmax(q kᵀ / √d) v written out per head)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    layer = HeadSplitLayer(torch.tensor([1]), torch.tensor([0]), n_sink=2, window=5)
    k0, v0 = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    layer.update(k0, v0)
    layer.trim()
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    new_k, new_v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    keys, values = layer.update(new_k, new_v)
    query = torch.randn(1, 4, 3, 8)
    out, _ = layer.attend(sdpa_attention_forward, module, query, keys, values, None, scaling=8**-0.5)
    assert out.shape == (1, 3, 4, 8)
    kept = {0: torch.cat([torch.arange(2), torch.arange(25, 30)]), 1: torch.arange(30)}  # streaming head 0, retrieval 1
    for h in range(4):
        kv = h // 2
        k = torch.cat([k0[0, kv, kept[kv]], new_k[0, kv]])
        v = torch.cat([v0[0, kv, kept[kv]], new_v[0, kv]])
        scores = query[0, h] @ k.T * 8**-0.5
        past = len(kept[kv])
        causal = torch.arange(len(k))[None] <= past + torch.arange(3)[:, None]
        ref = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        torch.testing.assert_close(out[0, :, h], ref, rtol=1e-5, atol=1e-6)


def test_keep_same_index_for_every_head_equals_gather():
    layer = PressLayer()
    k = torch.randn(2, 3, 20, 4)
    layer.update(k, k + 1)
    index = torch.tensor([0, 3, 7, 19]).expand(2, 3, 4)
    layer.keep(index)
    assert torch.equal(layer.keys, k[:, :, [0, 3, 7, 19]]) and torch.equal(layer.values, k[:, :, [0, 3, 7, 19]] + 1)
    other = PressLayer()
    other.update(k, k)
    per_head = torch.tensor([[[0, 1], [2, 3], [4, 5]]]).expand(2, 3, 2)
    other.keep(per_head)
    assert torch.equal(other.keys[:, 1], k[:, 1, 2:4]) and torch.equal(other.keys[:, 2], k[:, 2, 4:6])


def test_a_cache_the_caller_creates_without_config_is_pressed_too():
    model = kv_model("qwen2")
    p = press("streaming_llm", compression_ratio=0.5)
    p.attach(model)
    try:
        cache = DynamicCache()  # layers appear lazily, one per layer on first use
        run(model, ids(40), cache)
    finally:
        p.detach(model)
    assert [type(layer).__name__ for layer in cache.layers] == ["PressLayer", "PressLayer"]
    assert [layer.held() for layer in cache.layers] == [20, 20] and cache.get_seq_length() == 40
