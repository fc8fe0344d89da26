"""Tests of sparseforge.eval on tiny random models and hand-built mechanisms with known answers."""
from __future__ import annotations

import copy
import math
import pathlib
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_models import VOCAB, tiny_model  # noqa: E402

from sparseforge.data import read_text  # noqa: E402
from sparseforge.errors import UserInputError  # noqa: E402
from sparseforge.eval import (  # noqa: E402
    DEFAULT_TASKS,
    TASKS,
    EvalContext,
    environment,
    fidelity,
    measure_peak_memory,
    perplexity,
    retrieval_accuracy,
    run_tasks,
    size_on_disk,
    speed,
    weight_sparsity,
)
from sparseforge.eval.perplexity import encode  # noqa: E402

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[1] / "src" / "sparseforge" / "assets" / "reference-model"



@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def text():
    return read_text("heldout")[:20000]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


class Oracle(torch.nn.Module):
    """Outputs one-hot logits for the token `shift` places ahead: shift=1 always predicts the true next
    token (it peeks), shift=0 repeats the current token (always wrong unless tokens repeat)."""

    def __init__(self, shift: int = 1, max_positions: int = 512):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=max_positions, vocab_size=VOCAB)
        self.shift = shift

    def forward(self, input_ids, **kwargs):
        target = torch.roll(input_ids, -self.shift, dims=1)
        return SimpleNamespace(logits=F.one_hot(target, VOCAB).float())


# ---------------------------------------------------------------- perplexity


def test_uniform_model_perplexity_is_vocab_size(tokenizer, text):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: uniform over the vocabulary
    r = perplexity(model, tokenizer, text, window=64, stride=16, max_tokens=200)
    assert r["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert r["tokens_scored"] == 199


def test_single_window_equals_full_context_loss(llama, tokenizer, text):
    ids = encode(tokenizer, text, 100)
    with torch.no_grad():
        expected = math.exp(llama(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())
    full = perplexity(llama, tokenizer, text, max_tokens=100)  # default window (512) holds all 100 tokens
    assert full["window"] == 512 and full["stride"] == 256
    assert full["perplexity"] == pytest.approx(expected, rel=1e-5)
    for stride in (7, 64, 128):
        r = perplexity(llama, tokenizer, text, window=128, stride=stride, max_tokens=100)
        assert r["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)


def test_sliding_window_matches_brute_force(llama, tokenizer, text):
    n, window, stride = 40, 16, 5
    ids = torch.tensor([encode(tokenizer, text, n)])
    # Token t is scored once, by the first window that ends past it, with context from that window's start.
    nll = 0.0
    with torch.no_grad():
        for t in range(1, n):
            begin = next(b for b in range(0, n, stride) if min(b + window, n) > t)
            logits = llama(input_ids=ids[:, begin:t]).logits[0, -1]  # predicts ids[t] from ids[begin:t]
            nll -= F.log_softmax(logits.float(), -1)[ids[0, t]].item()
    expected = math.exp(nll / (n - 1))
    for batch_size in (1, 3):
        r = perplexity(llama, tokenizer, text, window=window, stride=stride, max_tokens=n, batch_size=batch_size)
        assert r["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_tokens_scored_is_n_minus_one_for_any_stride(llama, tokenizer, text):
    for stride in (1, 3, 16, 31):
        r = perplexity(llama, tokenizer, text, window=32, stride=stride, max_tokens=101)
        assert r["tokens_scored"] == 100, stride
    # stride == window: non-overlapping chunks [0,32) [32,64) [64,96) [96,101), each losing its first token.
    chunked = perplexity(llama, tokenizer, text, window=32, stride=32, max_tokens=101)
    assert chunked["tokens_scored"] == 101 - 4


def test_perplexity_rejects_bad_settings(llama, tokenizer, text):
    with pytest.raises(UserInputError, match="stride"):
        perplexity(llama, tokenizer, text, window=32, stride=33, max_tokens=64)
    with pytest.raises(UserInputError, match="512"):
        perplexity(llama, tokenizer, text, window=1024, max_tokens=64)
    with pytest.raises(UserInputError, match="fewer than 2 tokens"):
        perplexity(llama, tokenizer, "hello", max_tokens=1)


# ---------------------------------------------------------------- fidelity


def test_fidelity_to_itself_and_after_perturbation(llama, tokenizer, text):
    same = fidelity(llama, llama, tokenizer, text, seq_len=64, max_windows=3)
    assert same["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    assert same["positions"] == 192

    perturbed = copy.deepcopy(llama)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = fidelity(perturbed, llama, tokenizer, text, seq_len=64, max_windows=3)
    assert r["kl_to_reference"] > 1e-3
    assert r["top1_agreement"] < 1.0

    # Direction: KL(reference || model), checked against torch's kl_div on the first window.
    ids = torch.tensor([encode(tokenizer, text, 64)])
    with torch.no_grad():
        logp = F.log_softmax(perturbed(input_ids=ids).logits.float(), -1)
        ref_logp = F.log_softmax(llama(input_ids=ids).logits.float(), -1)
    expected = F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item() / 64
    one = fidelity(perturbed, llama, tokenizer, text, seq_len=64, max_windows=1)
    assert one["kl_to_reference"] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- retrieval

RETRIEVAL = dict(lengths=(128, 256), depths=(0.0, 0.5, 1.0), per_cell=2)


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_retrieval_oracle_scores_one_and_wrong_mechanism_zero(tokenizer, text, task):
    r = retrieval_accuracy(Oracle(shift=1), tokenizer, task, filler_text=text, **RETRIEVAL)
    assert r["accuracy"] == 1.0
    assert r["by_length"] == {"128": 1.0, "256": 1.0}
    assert r["by_depth"] == {"0.0": 1.0, "0.5": 1.0, "1.0": 1.0}
    assert len(r["cells"]) == 6 and all(c["n"] == 2 and c["accuracy"] == 1.0 for c in r["cells"])
    wrong = retrieval_accuracy(Oracle(shift=0), tokenizer, task, filler_text=text, **RETRIEVAL)
    assert wrong["accuracy"] == 0.0


def test_retrieval_of_random_model_is_low(llama, tokenizer, text):
    r = retrieval_accuracy(llama, tokenizer, "passkey", filler_text=text, **RETRIEVAL)
    assert r["accuracy"] < 0.25


def test_retrieval_length_beyond_max_positions_raises(tokenizer, text):
    with pytest.raises(UserInputError, match="512"):
        retrieval_accuracy(Oracle(max_positions=512), tokenizer, lengths=(256, 1024), filler_text=text)
    with pytest.raises(UserInputError, match="unknown retrieval task"):
        retrieval_accuracy(Oracle(), tokenizer, task="needle", filler_text=text)


# ---------------------------------------------------------------- efficiency


def test_weight_sparsity_counts_exact_zeros_linear():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q.view(-1)[:10] = 0.0
    r = weight_sparsity(model)
    total = sum(m.weight.numel() for name, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    assert r["params_targeted"] == total
    assert r["sparsity"] == pytest.approx(10 / total)
    assert r["sparsity_per_layer"]["model.layers.0.self_attn.q_proj"] == pytest.approx(10 / q.numel())
    assert r["sparsity_per_layer"]["model.layers.0.self_attn.k_proj"] == 0.0

    only_q = weight_sparsity(model, targets=("*q_proj",), ignore=("model.layers.1.*",))
    assert list(only_q["sparsity_per_layer"]) == ["model.layers.0.self_attn.q_proj"]
    assert only_q["sparsity"] == pytest.approx(10 / q.numel())
    with pytest.raises(UserInputError):
        weight_sparsity(model, targets=("nothing*",))


def test_weight_sparsity_gpt2_conv1d():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[1].attn.c_attn.weight  # Conv1D stores [in=64, out=192]
    with torch.no_grad():
        c_attn[:, :5] = 0.0  # 5 output features, all inputs: 320 zeros
    r = weight_sparsity(model)
    assert r["sparsity_per_layer"]["transformer.h.1.attn.c_attn"] == pytest.approx(320 / c_attn.numel())
    assert r["sparsity"] == pytest.approx(320 / r["params_targeted"])


def test_weight_sparsity_mixtral_expert_stacks():
    model = tiny_model("mixtral")
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj  # [experts, out, in]
    with torch.no_grad():
        gate_up[0] = 0.0
        gate_up[2, :3] = 0.0
    expected = gate_up[0].numel() + 3 * gate_up.shape[-1]
    r = weight_sparsity(model)
    assert r["sparsity_per_layer"]["model.layers.0.mlp.experts.gate_up_proj"] == pytest.approx(expected / gate_up.numel())
    assert r["sparsity"] == pytest.approx(expected / r["params_targeted"])
    assert r["params_targeted"] > sum(p.numel() for n, p in model.named_parameters() if "experts" in n)


def test_size_on_disk(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    sizes = {"a.bin": 1000, "sub/b.json": 17, "sub/deeper/c.safetensors": 4096, "empty": 0}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    assert size_on_disk(tmp_path) == sum(sizes.values())
    assert size_on_disk(tmp_path / "a.bin") == 1000
    with pytest.raises(UserInputError):
        size_on_disk(tmp_path / "missing")


def test_measure_peak_memory_cpu_sees_allocation():
    def allocate():
        x = torch.ones(16 * 2**20)  # 64 MiB, touched so it is resident
        time.sleep(0.02)
        return x

    from sparseforge.eval.efficiency import _rss_bytes

    before = _rss_bytes()
    result, peak = measure_peak_memory(allocate, device="cpu")
    assert result.numel() == 16 * 2**20
    assert peak >= before + 60 * 2**20


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_speed_reports_positive_throughput(arch, tokenizer):
    r = speed(tiny_model(arch), tokenizer, prompt_len=32, new_tokens=8, repeats=2, warmup=1)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_median_s", "decode_median_s"):
        assert r[key] > 0 and math.isfinite(r[key]), key
    assert r["prompt_len"] == 32 and r["new_tokens"] == 8 and r["device"] == "cpu"
    with pytest.raises(UserInputError, match="max positions"):
        speed(tiny_model(arch), tokenizer, prompt_len=500, new_tokens=64)


# ---------------------------------------------------------------- tasks

FAST_SETTINGS = dict(
    max_tokens=128,
    window=64,
    retrieval_lengths=(128,),
    retrieval_depths=(0.5,),
    retrieval_per_cell=1,
    speed_prompt_len=16,
    speed_new_tokens=4,
    speed_repeats=1,
    memory_prompt_len=64,
    fidelity_seq_len=64,
)


def test_run_tasks_unknown_name_lists_known(llama, tokenizer, text):
    ctx = EvalContext(llama, tokenizer, text=text)
    with pytest.raises(UserInputError, match="perplexity") as info:
        run_tasks(ctx, "perplexity,bogus")
    assert "bogus" in str(info.value) and all(name in str(info.value) for name in TASKS)
    with pytest.raises(UserInputError, match="unknown eval settings"):
        EvalContext(llama, tokenizer, text=text, settings={"max_tokenz": 5})


def test_run_tasks_merges_flat_metrics(llama, tokenizer, text, tmp_path):
    # Changed with issue 10: the KV-cache tasks are registered but opt-in, so DEFAULT_TASKS is a subset.
    assert set(DEFAULT_TASKS) < set(TASKS)
    # Issue 16 adds the opt-in EfficientLLM metrics task.
    assert set(TASKS) - set(DEFAULT_TASKS) == {"passkey_agnostic", "multikey_agnostic", "kv_perplexity", "kv_efficiency", "efficiency"}
    ctx = EvalContext(llama, tokenizer, text=text, settings=FAST_SETTINGS)
    m = run_tasks(ctx, DEFAULT_TASKS)
    for key in ("perplexity", "passkey_accuracy", "passkey_by_length", "passkey_by_depth", "multikey_accuracy",
                "sparsity", "sparsity_per_layer", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in m, key
    assert "kl_to_reference" not in m and "size_bytes" not in m  # skipped: no reference, no directory
    assert m["perplexity_tokens_scored"] == 127 and m["peak_memory_bytes"] > 0 and m["sparsity"] == 0.0

    llama.save_pretrained(tmp_path)
    ctx = EvalContext(llama, tokenizer, reference=llama, model_dir=tmp_path, text=text, settings=FAST_SETTINGS)
    m = run_tasks(ctx, "fidelity, size")
    assert m["kl_to_reference"] == pytest.approx(0.0, abs=1e-6) and m["top1_agreement"] == 1.0
    assert m["size_bytes"] == sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert m["fidelity_positions"] == 128


def test_environment_fields(llama):
    env = environment(llama)
    assert set(env) == {"python", "torch", "transformers", "platform", "cpu", "cpu_count", "device"}
    assert env["device"] == "cpu" and env["torch"] == torch.__version__


# ---------------------------------------------------------------- through the KV cache (issue 10)


class RecordingOracle(Oracle):
    """The peeking oracle, recording the length of every forward (to see where the cache split falls)."""

    def __init__(self):
        super().__init__(shift=1)
        self.lengths = []

    def forward(self, input_ids, **kwargs):
        self.lengths.append(input_ids.shape[1])
        return super().forward(input_ids, **kwargs)


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_retrieval_runs_through_the_cache_in_both_modes(tokenizer, text, task):
    from sparseforge.data.synthetic import episodes

    one = dict(lengths=(128,), depths=(0.5,), per_cell=1)
    ep = episodes(task, tokenizer, text, [128], [0.5], 1, 0)[0]
    for mode, split in (("aware", ep.answer_start - 1), ("agnostic", ep.question_start)):
        oracle = RecordingOracle()
        r = retrieval_accuracy(oracle, tokenizer, task, filler_text=text, mode=mode, **one)
        assert r["accuracy"] == 1.0
        assert oracle.lengths == [split, 128 - split]  # prefill into the cache, then the rest from it
    assert 0 < ep.question_start < ep.answer_start - 1
    with pytest.raises(UserInputError, match="mode"):
        retrieval_accuracy(Oracle(), tokenizer, task, filler_text=text, mode="both", **one)


def test_cached_retrieval_predicts_like_a_full_forward(llama, tokenizer, text):
    """Through the cache, each answer prediction equals the one of a single no-cache forward pass."""
    from sparseforge.data.synthetic import episodes

    eps = episodes("passkey", tokenizer, text, [128], [0.0, 1.0], 2, 0)
    r = retrieval_accuracy(llama, tokenizer, "passkey", (128,), (0.0, 1.0), 2, 0, filler_text=text, mode="agnostic")
    hits = []
    with torch.no_grad():
        for ep in eps:
            ids = torch.tensor([ep.input_ids])
            pred = llama(input_ids=ids, use_cache=False).logits[0, ep.answer_start - 1 : -1].argmax(-1)
            hits.append(bool((pred == ids[0, ep.answer_start :]).all()))
    assert r["accuracy"] == sum(hits) / len(hits)


def test_an_attached_press_is_measured_by_retrieval(tokenizer, text):
    from sparseforge.methods import get_method

    model = tiny_model("llama")
    cls = get_method("streaming_llm")
    press = cls(cls.parse_params({"compression_ratio": 0.9}))
    press.attach(model)
    try:
        retrieval_accuracy(model, tokenizer, "passkey", (128,), (0.5,), 1, 0, filler_text=text, mode="agnostic")
        assert press.peak_cache_bytes > 0  # set when a layer is compressed
    finally:
        press.detach(model)


def test_kv_perplexity_without_press_is_full_context_perplexity(llama, tokenizer, text):
    from sparseforge.eval import kv_perplexity

    full = perplexity(llama, tokenizer, text, window=200, max_tokens=200)
    for chunk in (1, 37, 64, 500):
        r = kv_perplexity(llama, tokenizer, text, chunk=chunk, max_tokens=200)
        assert r["kv_perplexity_tokens_scored"] == 199
        assert r["kv_perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    with pytest.raises(UserInputError, match="chunk"):
        kv_perplexity(llama, tokenizer, text, chunk=0)


def test_kv_perplexity_compresses_as_it_goes(tokenizer, text):
    from sparseforge.eval import kv_perplexity
    from sparseforge.methods import get_method

    model = tiny_model("llama")
    dense = kv_perplexity(model, tokenizer, text, chunk=32, max_tokens=256)
    cls = get_method("streaming_llm")
    press = cls(cls.parse_params({"compression_ratio": 0.75, "n_sink": 4}))
    press.attach(model)
    try:
        press.peak_cache_bytes = 10**9  # left over from an earlier run: must not leak into this one
        r = kv_perplexity(model, tokenizer, text, chunk=32, max_tokens=256)
    finally:
        press.detach(model)
    assert r["kv_perplexity_tokens_scored"] == 255
    assert r["kv_perplexity"] != pytest.approx(dense["kv_perplexity"], rel=1e-6)
    # After the last chunk the cache holds round(256 * 0.25) tokens; before it, at most that of 224 plus a chunk.
    per_token = dense["kv_perplexity_peak_cache_bytes"] // 256
    assert r["kv_perplexity_peak_cache_bytes"] <= per_token * (56 + 32)


def test_peak_allocated_counts_live_operator_outputs():
    from sparseforge.eval import peak_allocated

    def work():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 21)  # 8 MiB
        del a
        c = torch.ones(1 << 20)  # reuses a's share of the peak
        return b + 0 if c is not None else b  # a fourth 8 MiB: peak b + c + result

    result, peak = peak_allocated(work, "cpu")
    assert peak == (8 + 4 + 8) * 2**20
    assert result.numel() == 1 << 21


def test_kv_efficiency_reports_both_phases_and_a_smaller_cache_with_a_press(tokenizer, text):
    from sparseforge.eval import kv_efficiency
    from sparseforge.methods import get_method

    model = tiny_model("llama")
    prompt = torch.tensor([encode(tokenizer, text, 400)])
    dense = kv_efficiency(model, prompt, new_tokens=4)
    cls = get_method("snapkv")
    press = cls(cls.parse_params({"compression_ratio": 0.75, "window_size": 16}))
    press.attach(model)
    try:
        one = kv_efficiency(model, prompt, new_tokens=4)
        chunked = kv_efficiency(model, prompt, new_tokens=4, chunk_size=50)
    finally:
        press.detach(model)
    for r in (dense, one, chunked):
        assert r["kv_prefill_peak_bytes"] > 0 and r["kv_decode_peak_bytes"] > 0
        assert r["kv_prefill_peak_rss_bytes"] > 0 and r["kv_ttft_s"] > 0 and r["kv_tpot_s"] > 0
    assert dense["kv_cache_bytes"] == dense["kv_cache_full_bytes"] == dense["kv_cache_peak_bytes"]
    assert one["kv_cache_bytes"] < 0.3 * one["kv_cache_full_bytes"]
    # One-shot prefill: each layer is pruned right after its attention, so the peak is the last layer holding the
    # whole prompt (400 tokens) while the first holds its budget (100): half of 400 tokens' bytes, plus an eighth.
    layer_400 = dense["kv_cache_bytes"] * 400 // 403 // 2
    assert one["kv_cache_peak_bytes"] == layer_400 + layer_400 // 4
    assert chunked["kv_cache_peak_bytes"] < 0.5 * dense["kv_cache_peak_bytes"]
    assert chunked["kv_prefill_peak_bytes"] < dense["kv_prefill_peak_bytes"]
    assert chunked["kv_decode_peak_bytes"] < dense["kv_decode_peak_bytes"]


def test_kv_tasks_through_run_tasks(llama, tokenizer, text):
    settings = dict(FAST_SETTINGS, kv_chunk=32, kv_max_tokens=128, kv_prompt_len=100, kv_new_tokens=3)
    m = run_tasks(EvalContext(llama, tokenizer, text=text, settings=settings), "passkey_agnostic,multikey_agnostic,kv_perplexity,kv_efficiency")
    for key in ("passkey_agnostic_accuracy", "multikey_agnostic_by_depth", "kv_perplexity", "kv_prefill_peak_bytes",
                "kv_decode_peak_bytes", "kv_cache_peak_bytes", "kv_ttft_s", "kv_tpot_s"):
        assert key in m, key
    assert m["kv_prompt_len"] == 100 and m["kv_stage"] is None
