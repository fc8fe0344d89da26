"""Routing-aware calibration (issue 15): every calibrated weight method sees each MoE expert's own tokens.

The expected values are computed here by hand from the routing a RoutingRecorder sees on the dense model, with
the same per-batch accumulation the calibration walk uses, so equality is exact, not approximate."""
import copy
import json

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig, InputStats, calibration_batches
from sparseforge.core.masks import prune_count, unstructured_mask
from sparseforge.core.moe import RoutingRecorder, find_moe_blocks
from sparseforge.core.obs import obs_solve
from sparseforge.core.quantizer import QuantScheme
from sparseforge.errors import UserInputError
from sparseforge.methods.base import get_method
from sparseforge.recipe import parse_recipe
from tiny_models import MOE_ARCHITECTURES, tiny_model

CAL = CalibrationConfig(samples=2, seq_len=32)


def recipe(method: str, params: str = "{sparsity: 0.5}", calibration: str = "samples: 2, seq_len: 32") -> object:
    return parse_recipe(f"name: t\nstages:\n  - method: {method}\n    params: {params}\ncalibration: {{{calibration}}}\n")


def routed_calls(model, tokenizer, layer: int = 0):
    """(hidden, index) of every calibration batch entering layer `layer`'s MoE block of the (dense) model."""
    block = find_moe_blocks(model)[layer]
    with torch.no_grad(), RoutingRecorder([block], keep_calls=True) as rec:
        for ids in calibration_batches(tokenizer, CAL):
            model(input_ids=ids, use_cache=False)
    return block, [(h, i) for h, i, _ in rec.calls[block.layer_index]]


def col_norm(xs) -> torch.Tensor:
    """||x_j|| accumulated batch by batch, as InputStats does."""
    total = None
    for x in xs:
        part = (x.float() ** 2).sum(0)
        total = part if total is None else total + part
    return total.sqrt()


def hessian(xs) -> torch.Tensor:
    total = None
    for x in xs:
        x = x.float()
        total = x.t() @ x if total is None else total + x.t() @ x
    return total


def expert_inputs(calls, e, starved=False):
    return [h if starved else h[(i == e).any(-1)] for h, i in calls]


def wanda_expected(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return w * unstructured_mask(w.abs() * norm, 0.5, "row")


@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_wanda_prunes_each_expert_with_the_statistics_of_its_routed_tokens(arch, tokenizer):
    torch.set_num_threads(1)
    dense = tiny_model(arch)
    block, calls = routed_calls(dense, tokenizer)
    model, report = sparseforge.compress(dense, recipe("wanda"), tokenizer, progress=False)
    pruned = find_moe_blocks(model)[0]
    routing = report["stages"][0]["routing"]["blocks"]["model.layers.0.mlp"]
    assert routing["tokens"] == [sum(int((i == e).any(-1).sum()) for _, i in calls) for e in range(block.num_experts)]
    differs_from_all_tokens = False
    for e in range(block.num_experts):
        xs = expert_inputs(calls, e, starved=e in routing["fallback"])
        dense_w, got = block.expert_weights(e), pruned.expert_weights(e)
        for role in ("gate", "up"):
            assert torch.equal(got[role], wanda_expected(dense_w[role], col_norm(xs))), (e, role)
        # The down projection sees act(gate x) * up x through the expert's gate/up as the method left them.
        mids = [pruned.expert_intermediate(e, x) for x in xs if len(x)]
        assert torch.equal(got["down"], wanda_expected(dense_w["down"], col_norm(mids))), (e, "down")
        everyone = wanda_expected(dense_w["gate"], col_norm(expert_inputs(calls, e, starved=True)))
        differs_from_all_tokens |= not torch.equal(got["gate"], everyone)
    assert differs_from_all_tokens  # per-expert statistics really differ from the block's whole input


def test_routing_weighted_statistics_scale_each_routed_row_by_its_routing_weight(tokenizer):
    torch.set_num_threads(1)
    dense = tiny_model("mixtral")
    block = find_moe_blocks(dense)[0]
    with torch.no_grad(), RoutingRecorder([block], keep_calls=True) as rec:
        for ids in calibration_batches(tokenizer, CAL):
            dense(input_ids=ids, use_cache=False)
    model, report = sparseforge.compress(dense, recipe("wanda", calibration="samples: 2, seq_len: 32, routing_weighted: true, min_expert_tokens: 1"),
                                         tokenizer, progress=False)
    assert report["stages"][0]["routing"]["routing_weighted"] is True
    got = find_moe_blocks(model)[0]
    for e in range(block.num_experts):
        rows = [h[(i == e).any(-1)] * (w * (i == e)).sum(-1)[(i == e).any(-1), None] for h, i, w in rec.calls[0]]
        assert torch.equal(got.expert_weights(e)["gate"], wanda_expected(block.expert_weights(e)["gate"], col_norm(rows))), e
        unweighted = wanda_expected(block.expert_weights(e)["gate"], col_norm(expert_inputs([(h, i) for h, i, _ in rec.calls[0]], e)))
        assert not torch.equal(got.expert_weights(e)["gate"], unweighted), e


def test_gptq_quantizes_each_expert_against_its_own_hessian(tokenizer):
    torch.set_num_threads(1)
    dense = tiny_model("mixtral")
    block, calls = routed_calls(dense, tokenizer)
    model, report = sparseforge.compress(dense, recipe("gptq", "{bits: 4, group_size: 32}"), tokenizer, progress=False)
    routing = report["stages"][0]["routing"]["blocks"]["model.layers.0.mlp"]
    got = find_moe_blocks(model)[0].experts.gate_up_proj
    scheme = QuantScheme(4, True, 32)
    for e in range(block.num_experts):
        H = hessian(expert_inputs(calls, e, starved=e in routing["fallback"]))
        expected = obs_solve(block.experts.gate_up_proj[e], H, quant=scheme).weight
        assert torch.equal(got[e], expected), e
    assert "model.layers.0.mlp.experts.gate_up_proj" in report["stages"][0]["projections"]


def starve_expert(model, layer: int, expert: int):
    """Make layer `layer`'s router never pick `expert` (transformers 5 routers return (logits, weights, index))."""
    router = find_moe_blocks(model)[layer].router

    def hook(module, args, out):
        logits = out[0].clone()
        logits[:, expert] = -torch.inf
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = probs.topk(out[2].shape[-1], dim=-1)
        return out[0], (weights / weights.sum(-1, keepdim=True)).to(out[1].dtype), index

    router.register_forward_hook(hook)


def test_a_starved_expert_falls_back_to_every_token_of_its_block_and_is_reported(tokenizer):
    torch.set_num_threads(1)
    dense = tiny_model("mixtral")
    starve_expert(dense, 0, 3)
    block, calls = routed_calls(dense, tokenizer)
    model, report = sparseforge.compress(dense, recipe("wanda", calibration="samples: 2, seq_len: 32, min_expert_tokens: 8"),
                                         tokenizer, progress=False)
    routing = report["stages"][0]["routing"]
    assert routing["min_expert_tokens"] == 8
    layer0 = routing["blocks"]["model.layers.0.mlp"]
    assert layer0["tokens"][3] == 0 and layer0["fallback"] == [3]
    assert sum(layer0["tokens"]) == 2 * 32 * block.top_k
    pruned = find_moe_blocks(model)[0]
    everyone = [h for h, _ in calls]
    assert torch.equal(pruned.expert_weights(3)["gate"], wanda_expected(block.expert_weights(3)["gate"], col_norm(everyone)))
    mids = [pruned.expert_intermediate(3, x) for x in everyone]
    assert torch.equal(pruned.expert_weights(3)["down"], wanda_expected(block.expert_weights(3)["down"], col_norm(mids)))
    # every expert still gets exactly half of each row, the starved one included
    for e in range(4):
        assert (pruned.experts.gate_up_proj[e] == 0).sum(-1).eq(32).all()


def test_min_expert_tokens_above_every_count_sends_all_experts_to_the_fallback_and_bad_values_are_refused(tokenizer):
    torch.set_num_threads(1)
    _, report = sparseforge.compress(tiny_model("olmoe"), recipe("wanda", calibration="samples: 2, seq_len: 32, min_expert_tokens: 1000"),
                                     tokenizer, progress=False)
    assert all(b["fallback"] == [0, 1, 2, 3] for b in report["stages"][0]["routing"]["blocks"].values())
    with pytest.raises(UserInputError, match="min_expert_tokens") as info:
        recipe("wanda", calibration="min_expert_tokens: 0")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method,params", [
    ("sparsegpt", '{pattern: "2:4"}'),
    ("dsnot", "{sparsity: 0.5, repair: all}"),
    ("owl", "{sparsity: 0.5, spread: 0.05}"),
    ("owl", "{base: sparsegpt, sparsity: 0.5, spread: 0.05}"),
    ("sparsegpt-gptq", '{pattern: "2:4", bits: 4, group_size: 32}'),
])
def test_every_calibrated_pruner_keeps_its_pattern_in_each_expert(method, params, tokenizer):
    torch.set_num_threads(1)
    dense = tiny_model("qwen3_moe")
    model, report = sparseforge.compress(dense, recipe(method, params), tokenizer, progress=False)
    stage = report["stages"][0]
    layer_sparsity = stage.get("layer_sparsity") or {}
    for name, proj in ModelAdapter(model).projections().items():
        w = proj.weight()
        for e in range(w.shape[0]) if w.dim() == 3 else [None]:
            m = w if e is None else w[e]
            if "2:4" in params:  # exactly 2 zeros of every 4 (at least 2 once rounding may also hit 0)
                z = (m == 0).reshape(*m.shape[:-1], -1, 4).sum(-1)
                assert (z.ge(2) if "bits" in params else z.eq(2)).all(), (name, e)
            elif "sparsegpt" in params:  # OWL over SparseGPT: its count over each (expert) matrix
                s = layer_sparsity[name.split(".")[2]]
                assert (m == 0).sum().item() == prune_count(m.numel(), s), (name, e)
            else:  # Wanda-based (OWL's default base, DSnoT's): the count in every row of every expert
                s = layer_sparsity.get(name.split(".")[2], 0.5)
                assert (m == 0).sum(-1).eq(prune_count(m.shape[-1], s)).all(), (name, e)
    assert "routing" in stage
    if method == "owl":  # per-layer sparsities were measured over the experts' own scores and differ
        assert len(set(layer_sparsity.values())) == 2


@pytest.mark.parametrize("method,params", [("rtn", "{bits: 4, group_size: 32}"), ("spqr", "{bits: 3, group_size: 16}"),
                                           ("easyquant", "{bits: 4, group_size: 32}")])
def test_quantizers_round_every_expert_on_its_own(method, params, tokenizer):
    torch.set_num_threads(1)
    dense = tiny_model("mixtral")
    block, calls = routed_calls(dense, tokenizer)
    r = recipe(method, params)
    model, report = sparseforge.compress(dense, r, tokenizer, progress=False)
    quantizer = get_method(method)(r.stages[0].params)
    fallback = (report["stages"][0].get("routing") or {"blocks": {"model.layers.0.mlp": {"fallback": []}}})["blocks"]["model.layers.0.mlp"]["fallback"]
    got = find_moe_blocks(model)[0].experts.gate_up_proj
    for e in range(4):
        stats = InputStats(64, "cpu", hessian=True)
        for x in expert_inputs(calls, e, starved=e in fallback):
            stats.add_batch(x)
        expected = quantizer.quantize_projection(block.experts.gate_up_proj[e].float(), stats).weight
        assert torch.equal(got[e], expected) and not torch.equal(got[e], block.experts.gate_up_proj[e]), e


def test_structured_pruning_refuses_expert_mlps_in_one_line(tokenizer):
    with pytest.raises(UserInputError, match="mixture of experts") as info:
        sparseforge.compress(tiny_model("mixtral"), recipe("structured", "{mlp_sparsity: 0.25}"), tokenizer, progress=False)
    assert "\n" not in str(info.value)


# --- experts as a ModuleList of nn.Linear MLPs ------------------------------------------------------------
# No causal LM in transformers 5.24 keeps its experts this way any more (all fused), so the test builds the
# older form (Mixtral before transformers 5) from a fused model's weights.


class _Expert(nn.Module):
    def __init__(self, gate, up, down):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (nn.Linear(w.shape[1], w.shape[0], bias=False) for w in (gate, up, down))
        for lin, w in zip((self.gate_proj, self.up_proj, self.down_proj), (gate, up, down)):
            lin.weight.data.copy_(w)
        self.act_fn = nn.functional.silu

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _UnfusedMoE(nn.Module):
    """Top-k softmax routing over a ModuleList of experts, each called only on its routed tokens."""

    def __init__(self, fused_block):
        super().__init__()
        self.top_k = fused_block.top_k
        self.gate = nn.Linear(fused_block.hidden_size, fused_block.num_experts, bias=False)
        self.gate.weight.data.copy_(fused_block.router.weight)
        self.experts = nn.ModuleList(_Expert(**{k: v.detach().clone() for k, v in fused_block.expert_weights(e).items()})
                                     for e in range(fused_block.num_experts))

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if len(token):
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(shape)


def unfused_copy(model):
    twin = copy.deepcopy(model)
    for block in find_moe_blocks(model):
        twin.model.layers[block.layer_index].mlp = _UnfusedMoE(block)
    return twin.eval()


# SparseGPT unstructured compares weights over the whole matrix it is handed: the fused gate_up_proj[e] is one
# [2I, H] matrix, the per-expert form two [I, H] ones, so their selections differ by design. Under 2:4 (per-row
# groups) and Wanda (per-row) the selection is per row, and both forms must agree bit for bit.
@pytest.mark.parametrize("method,params", [("wanda", "{sparsity: 0.5}"), ("sparsegpt", '{pattern: "2:4"}')])
def test_per_expert_linears_get_the_same_statistics_as_the_fused_stack(method, params, tokenizer):
    torch.set_num_threads(1)
    fused = tiny_model("mixtral")
    unfused = unfused_copy(fused)
    ids = torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(unfused(input_ids=ids).logits, fused(input_ids=ids).logits)
    blocks = find_moe_blocks(unfused)
    assert [b.fused for b in blocks] == [False, False]
    a, report_a = sparseforge.compress(fused, recipe(method, params), tokenizer, progress=False)
    b, report_b = sparseforge.compress(unfused, recipe(method, params), tokenizer, progress=False)
    assert report_a["stages"][0]["routing"] == report_b["stages"][0]["routing"]
    names = report_b["stages"][0]["projections"]
    assert "model.layers.0.mlp.experts.3.down_proj" in names and "model.layers.0.mlp.gate" not in names
    fa, fb = find_moe_blocks(a)[0], find_moe_blocks(b)[0]  # layer 0: identical inputs, so identical results
    for e in range(4):
        for role in ("gate", "up", "down"):
            assert torch.equal(fa.expert_weights(e)[role], fb.expert_weights(e)[role]), (e, role)
    for block in find_moe_blocks(b):  # and the pattern holds in each expert matrix of every layer
        for e in range(4):
            for w in block.expert_weights(e).values():
                z = (w == 0).reshape(w.shape[0], -1, 4).sum(-1) if method == "sparsegpt" else (w == 0).sum(-1)
                assert z.eq(2 if method == "sparsegpt" else w.shape[-1] // 2).all()


@pytest.mark.slow  # the whole run (dense and compressed evaluation, speed and memory): minutes on 2 shared cores
def test_cli_run_with_the_default_recipe_compresses_every_expert_and_attention_projection(tmp_path, tokenizer, capsys):
    from sparseforge.cli import main

    model_dir = tmp_path / "tiny-moe"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--model", str(model_dir), "--out", str(out), "--max-tokens", "100"]) == 0
    capsys.readouterr()
    info = json.loads((out / "model" / "sparseforge.json").read_text())
    (stage,) = info["stages"]
    assert (info["recipe"]["name"], stage["method"]) == ("sparsegpt-50", "sparsegpt")
    projections = ModelAdapter(sparseforge.load(out / "model")).projections()
    assert sorted(stage["projections"]) == sorted(projections)
    assert {n.rsplit(".", 1)[-1] for n in projections} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    for name, proj in projections.items():
        for m in (list(proj.weight()) if proj.weight().dim() == 3 else [proj.weight()]):
            assert (m == 0).sum().item() == prune_count(m.numel(), 0.5), name
    assert set(stage["routing"]["blocks"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
