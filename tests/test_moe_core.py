"""core.moe: MoE blocks found structurally in every fused-expert architecture, routing recorded exactly, the
per-expert reference forward equal to the fused one, and expert removal producing a smaller model transformers loads."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from sparseforge.core.moe import RoutingRecorder, find_moe_blocks, keep_experts
from tiny_models import MOE_ARCHITECTURES, tiny_model

IDS = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_blocks_found_with_router_experts_and_top_k(arch):
    model = tiny_model(arch)
    blocks = find_moe_blocks(model)
    assert [b.layer_index for b in blocks] == [0, 1]
    for b in blocks:
        assert b.fused and b.num_experts == 4 and b.top_k == 2 and b.hidden_size == 64
        assert b.router_name == f"model.layers.{b.layer_index}.mlp.gate"
        w = b.expert_weights(3)
        assert w["gate"].shape == w["up"].shape == (b.intermediate_size, 64) and w["down"].shape == (64, b.intermediate_size)
    assert bool(blocks[0].shared_expert_names) == (arch == "qwen2_moe")


def test_dense_model_has_no_moe_blocks():
    assert find_moe_blocks(tiny_model("llama")) == []


@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_recorder_counts_every_routed_slot_and_reference_forward_matches(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    blocks = find_moe_blocks(model)
    with torch.no_grad(), RoutingRecorder(blocks, keep_calls=True) as rec:
        model(input_ids=IDS)
    for b in blocks:
        assert int(rec.counts[b.layer_index].sum()) == IDS.numel() * b.top_k
        assert torch.isclose(rec.frequencies()[b.layer_index].sum(), torch.tensor(1.0, dtype=torch.float64))
        hidden, index, weights = rec.calls[b.layer_index][0]
        # The fused module's output equals the sum over routed experts of weight x expert_forward.
        with torch.no_grad():
            fused = b.experts(hidden, index, weights)
            ref = torch.zeros_like(hidden)
            for e in range(b.num_experts):
                x, w = rec.expert_tokens(b.layer_index, e)
                token, _ = torch.where(index == e)
                if len(token):
                    ref.index_add_(0, token, b.expert_forward(e, x) * w[:, None])
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
        assert sum(len(rec.expert_tokens(b.layer_index, e)[0]) for e in range(b.num_experts)) == IDS.numel() * b.top_k


@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_keeping_every_expert_is_identity_and_removing_gives_a_loadable_smaller_model(arch, tmp_path):
    model = tiny_model(arch)
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    keep_experts(model, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, dense)
    keep_experts(model, {0: [3, 1, 0], 1: [0, 2, 3]})
    blocks = find_moe_blocks(model)
    assert all(b.num_experts == 3 for b in blocks)
    assert torch.equal(blocks[0].router.weight, tiny_model(arch).model.layers[0].mlp.gate.weight[[3, 1, 0]])
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in tiny_model(arch).parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, out)


def test_keep_experts_refuses_uneven_counts_and_bad_indices():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="same number"):
        keep_experts(model, {0: [0, 1], 1: [0, 1, 2]})
    with pytest.raises(ValueError, match="distinct"):
        keep_experts(tiny_model("mixtral"), {0: [0, 0], 1: [0, 1]})
    with pytest.raises(ValueError, match="fewer than the 2"):
        keep_experts(tiny_model("mixtral"), {0: [0], 1: [1]})
