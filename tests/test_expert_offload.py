"""expert-offload: outputs equal to the in-memory model on every tiny MoE architecture (disk and cpu storage, a cache
smaller than a prompt's working set), eviction within `cache_experts`, prefetch hits counted exactly on rigged
routers, a save -> load round trip whose experts stay out of memory until used, and one-line errors."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseforge
from sparseforge.core.moe import find_moe_blocks
from sparseforge.errors import UserInputError
from sparseforge.methods.base import AttachedStage, RuntimeContext, attach_stages, detach_stages, get_method
from sparseforge.methods.experts.offload import ExpertOffload
from tiny_models import MOE_ARCHITECTURES, tiny_model

IDS = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(0))


def _attach(model, **params):
    cls = get_method("expert-offload")
    method = cls(cls.parse_params(params))
    state = method.calibrate(model, RuntimeContext())
    attach_stages(model, [AttachedStage({"method": cls.name, "params": params, "targets": ["*"], "ignore": []}, method, state)])
    return method


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _expert_tensors(model):
    return {f"{b.experts_name}.{n}": getattr(b.experts, n) for b in find_moe_blocks(model) for n in ("gate_up_proj", "down_proj")}


@pytest.mark.parametrize("storage", ["disk", "cpu"])
@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_outputs_equal_the_in_memory_model_and_detach_restores_it(arch, storage, tmp_path):
    model = tiny_model(arch)
    dense = _logits(model)
    dense_tokens = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    method = _attach(model, storage=storage, cache_experts=2, offload_dir=str(tmp_path))
    assert all(t.numel() == 0 for t in _expert_tensors(model).values())  # nothing of the experts left in the model
    # 32 tokens over 4 experts: each layer's working set (4) is larger than the 2 slots, so calls run in groups.
    assert torch.equal(_logits(model), dense)
    assert torch.equal(model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0), dense_tokens)
    stats = method.stats()
    assert stats["cache_bytes"] == stats["expert_bytes"] // 2 and stats["cache_fraction"] == 0.5
    assert stats["host_expert_bytes"] == (stats["expert_bytes"] if storage == "cpu" else 0)
    detach_stages(model)
    assert torch.equal(_logits(model), dense)
    assert all(torch.equal(t, getattr(tiny_model(arch).get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]))
               for n, t in _expert_tensors(model).items())
    assert not list(tmp_path.iterdir())  # the scratch expert file went with the stage


def test_cache_never_holds_more_than_cache_experts_and_evicts_by_policy():
    model = tiny_model("mixtral")
    method = _attach(model, cache_experts=2, policy="lru", prefetch=False)
    cache = method.runtime.caches[0]
    cache.ensure([0])
    cache.ensure([1])
    cache.ensure([0])  # 0 used more recently than 1
    cache.ensure([2])
    assert cache.resident() == [0, 2]  # lru evicted 1
    assert cache.loads == 3
    for ids in IDS.split(1, dim=1):  # one token at a time, like decoding
        _logits(model, ids)
        assert all(len(c.resident()) <= 2 for c in method.runtime.caches.values())
    detach_stages(model)

    model = tiny_model("mixtral")
    method = _attach(model, cache_experts=2, policy="lfu", prefetch=False)
    cache = method.runtime.caches[0]
    cache.routed[:] = [5, 1, 0, 0]  # expert 0 routed often, expert 1 rarely
    cache.ensure([1])
    cache.ensure([0])
    cache.ensure([1])  # 1 is now the most recent, but the least often routed
    cache.ensure([3])
    assert cache.resident() == [0, 3]
    detach_stages(model)


class _Rigged(torch.nn.Module):
    """A router returning fixed experts per call: call n routes every token to `plan[n % len(plan)]`."""

    def __init__(self, real, plan):
        super().__init__()
        self.weight, self.top_k, self.plan, self.calls = real.weight, real.top_k, plan, 0

    def forward(self, hidden):
        hidden = hidden.reshape(-1, self.weight.shape[1])
        experts = self.plan[self.calls % len(self.plan)]
        self.calls += 1
        index = torch.tensor(experts).expand(hidden.shape[0], -1)
        weights = torch.full(index.shape, 1.0 / index.shape[1])
        return hidden @ self.weight.T, weights, index


def test_prefetch_hits_counted_on_a_rigged_router():
    model = tiny_model("mixtral")
    # Layer 1's router is called twice per forward: first as the prefetch prediction (from layer 0's MoE input),
    # then by layer 1 itself. Predicted {0, 1}, routed {1, 2}: one of two predictions hit.
    model.model.layers[1].mlp.gate = _Rigged(model.model.layers[1].mlp.gate, [[0, 1], [1, 2]])
    method = _attach(model, cache_experts=2, prefetch=True)
    _logits(model, IDS[:1, :3])
    stats = method.stats()
    assert (stats["prefetch_predicted"], stats["prefetch_hits"], stats["prefetch_loads"]) == (2, 1, 2)
    assert stats["prefetch_hit_rate"] == 0.5
    assert method.runtime.caches[1].resident() == [1, 2]  # expert 2 evicted predicted 0, never the routed 1
    detach_stages(model)

    model = tiny_model("mixtral")
    model.model.layers[1].mlp.gate = _Rigged(model.model.layers[1].mlp.gate, [[3, 1]])  # prediction = routing
    method = _attach(model, cache_experts=2, prefetch=True)
    _logits(model, IDS[:1, :3])
    stats = method.stats()
    assert stats["prefetch_hit_rate"] == 1.0 and stats["prefetch_hits"] == 2
    # Layer 1 found both its experts prefetched (loaded by the prefetcher only); layer 0's cold cache never hits.
    assert method.runtime.caches[1].loads == 2 and stats["hits"] == 2
    detach_stages(model)


def test_save_load_round_trip_reads_experts_lazily(tmp_path, tokenizer):
    model = tiny_model("mixtral")
    dense = _logits(model)
    _attach(model, cache_experts=2)
    sparseforge.save(model, tmp_path / "a", tokenizer)
    # The weights are stored under module names, which plain transformers loads as the full model.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert torch.equal(_logits(plain), dense)
    loaded = sparseforge.load(tmp_path / "a")
    (stage,) = sparseforge.runtime_stages(loaded)
    assert all(t.numel() == 0 for t in _expert_tensors(loaded).values())
    assert all(not c.resident() for c in stage.method.runtime.caches.values())  # nothing read before use
    assert torch.equal(_logits(loaded), dense)
    assert all(1 <= len(c.resident()) <= 2 for c in stage.method.runtime.caches.values())
    sparseforge.detach_runtime(loaded)
    assert torch.equal(_logits(loaded), dense)
    # runtime=False: the plain model, every expert loaded.
    assert torch.equal(_logits(sparseforge.load(tmp_path / "a", runtime=False)), dense)
    # Another dtype: experts are converted as they are read, as a plain load converts them (detached: bit-identical).
    # Attached, this 16-token prompt runs in two groups whose bfloat16 outputs are rounded before they are added.
    half, plain_half = sparseforge.load(tmp_path / "a", dtype=torch.bfloat16), sparseforge.load(tmp_path / "a", dtype=torch.bfloat16, runtime=False)
    torch.testing.assert_close(_logits(half), _logits(plain_half), rtol=0.02, atol=0.02)
    sparseforge.detach_runtime(half)
    assert torch.equal(_logits(half), _logits(plain_half))


@pytest.mark.parametrize("params, match", [
    ({"cache_experts": 0}, "cache_experts 0 must be >= 1"),
    ({"storage": "gpu"}, "allowed: disk, cpu"),
    ({"policy": "fifo"}, "allowed: lru, lfu"),
    ({"prefetch": "yes"}, "expected true or false"),
])
def test_bad_params_are_one_line_errors(params, match):
    with pytest.raises(UserInputError, match=match) as err:
        ExpertOffload.parse_params(params)
    assert "\n" not in str(err.value)


def test_model_without_moe_blocks_is_a_one_line_error():
    with pytest.raises(UserInputError, match="no mixture-of-experts blocks") as err:
        _attach(tiny_model("llama"))
    assert "\n" not in str(err.value)
