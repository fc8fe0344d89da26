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


def test_kv_speed_variant_leaves_the_model_as_it_was(monkeypatch):
    """kv_speed.py runs every variant on one model instance: each press must be gone after its run, so the next
    variant (the full cache included) runs on the model as it was."""
    import kv_scale
    import kv_speed

    monkeypatch.setattr(kv_scale, "CONFIG", dict(kv_scale.CONFIG, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=16, intermediate_size=64, vocab_size=128))
    model = kv_scale.build_model(1)
    ids = kv_scale.prompt(96)

    def logits():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    before = logits()
    args = type("A", (), {"presses": list(kv_scale.PRESSES), "chunked": ["snapkv"], "chunk": 32, "kivi_bits": [4, 2],
                          "ratio": 0.875})()
    labels = [v["label"] for v in kv_speed.variants(args)]
    assert labels[0] == "full cache" and "snapkv 0.875, chunked 32" in labels and "kivi 2-bit" in labels
    for v in kv_speed.variants(args):
        ttft, tpot = kv_speed.run_variant(model, ids, v, new_tokens=2)
        assert ttft > 0 and tpot > 0
        assert getattr(model, "_sparseforge_kv_press", None) is None
        assert torch.equal(logits(), before), v["label"]


def test_kv_scale_cpu_cells_keep_their_keys_and_gpu_cells_differ():
    """Existing CPU results are resumed by key, so adding --device must not change a CPU cell's key."""
    import kv_scale

    base = dict(lengths=[4096], threads=1, new_tokens=8, variants=["full", "press"], presses=["snapkv"], ratios=[0.875],
                chunk=1024, kivi_bits=[4], kvpress_presses=["snapkv"], kvpress_ratio=0.875)
    cpu = kv_scale.plan(type("A", (), base | {"device": "cpu"})())
    gpu = kv_scale.plan(type("A", (), base | {"device": "cuda"})())
    assert [kv_scale.cell_key(c) for c in cpu] == ["sparseforge|full|-|0|chunk0|4096", "sparseforge|press|snapkv|0.875|chunk0|4096"]
    assert all("device" not in c for c in cpu) and all(c["device"] == "cuda" for c in gpu)
    assert not {kv_scale.cell_key(c) for c in cpu} & {kv_scale.cell_key(c) for c in gpu}
