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


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # The test machine is small and shared; one intra-op thread avoids oversubscription stalls.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    assert set(DEFAULT_TASKS) == set(TASKS)
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
