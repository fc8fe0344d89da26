"""The measuring helpers the KV benchmarks rely on (benchmarks/kv_common.py, kvpress_compare.answer_tokens)."""
from __future__ import annotations

import contextlib
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import kv_common as kc  # noqa: E402
import kvpress_compare  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

torch.set_num_threads(1)


def _greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation without any cache: one full forward per new token."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("split_back", [0, 7])
def test_answer_tokens_without_press_equals_greedy_decoding(split_back):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (60,), generator=g).tolist()
    answer_start, n = 56, 4
    decoded, held = kvpress_compare.answer_tokens(model, ids, answer_start - split_back, answer_start, n, contextlib.nullcontext)
    assert decoded == _greedy_reference(model, ids[:answer_start], n)
    assert held == [answer_start - split_back] * 2


def test_tensor_bytes_counts_a_dynamic_cache_exactly():
    model = tiny_model("llama")  # 2 layers, 2 KV heads of 16 dims
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 10, dtype=torch.long), past_key_values=cache, use_cache=True)
    assert kc.tensor_bytes(cache) == 2 * 2 * 2 * 10 * 16 * 4  # layers x (k, v) x heads x tokens x dim x float32
    assert kc.cache_tokens(cache) == [10, 10]


def test_phase_sees_an_allocation_made_and_freed_inside_it():
    if not pathlib.Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    with kc.Phase() as p:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert p.delta >= 60 * 2**20
    assert p.peak >= p.start_rss + p.delta - 1
