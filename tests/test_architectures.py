"""The architecture matrix: compress (magnitude, and the calibrated Wanda and SparseGPT), evaluate, save
and reload tiny random models of each (the ten dense-or-Mixtral ones and the fused-expert MoE ones: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE); the adapter's attention and MLP layouts of each."""
import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.calibration import CalibrationConfig
from sparseforge.core.masks import check_nm, check_unstructured, prune_count
from sparseforge.eval.tasks import EvalContext, run_tasks
from sparseforge.recipe import parse_recipe
from tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, tiny_model

CALIBRATED_MATRIX = sorted(set(ARCHITECTURES) | set(MOE_ARCHITECTURES))


def test_matrix_covers_the_ten_architectures():
    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "opt", "gpt2", "gpt_neox", "mixtral"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_adapter_finds_layers_projections_attention(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    assert adapter.num_layers == 2
    projections = adapter.projections()
    assert len(projections) >= 8  # at least attention in/out and MLP in/out in each of two layers
    assert len(adapter.attention_modules()) == 2
    for name, proj in projections.items():
        w = proj.weight()
        assert w.shape[-2:] == (proj.out_features, proj.in_features)
    if arch == "gpt2":
        assert {p.kind for p in projections.values()} == {"conv1d"}
    if arch == "mixtral":
        assert any(p.kind == "experts" for p in projections.values())
        assert not any(n.endswith(".gate") for n in projections)  # the router is never a target


# Per architecture: attention module, (q, k, v, o, fused qkv) relative to the decoder layer, (heads, KV heads,
# head_dim); MLP module, inputs with their roles, output, width. Written out by hand from the transformers
# modelling code, so a change in discovery (or in transformers) shows up here.
GQA = (4, 2, 16)
SEPARATE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", None)
GATED = ("mlp", {"mlp.gate_proj": "gate", "mlp.up_proj": "up"}, "mlp.down_proj", 128)
LAYOUTS = {
    "llama": ("self_attn", SEPARATE, GQA, GATED),
    "mistral": ("self_attn", SEPARATE, GQA, GATED),
    "qwen2": ("self_attn", SEPARATE, GQA, GATED),
    "qwen3": ("self_attn", SEPARATE, GQA, GATED),
    "gemma2": ("self_attn", SEPARATE, GQA, GATED),
    "mixtral": ("self_attn", SEPARATE, GQA, ("mlp", {"mlp.experts.gate_up_proj": "gate_up"}, "mlp.experts.down_proj", 128)),
    "phi3": ("self_attn", (None, None, None, "self_attn.o_proj", "self_attn.qkv_proj"), GQA,
             ("mlp", {"mlp.gate_up_proj": "gate_up"}, "mlp.down_proj", 128)),
    "opt": ("self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", None), (4, 4, 16),
            (None, {"fc1": "in"}, "fc2", 128)),
    "gpt2": ("attn", (None, None, None, "attn.c_proj", "attn.c_attn"), (4, 4, 16), ("mlp", {"mlp.c_fc": "in"}, "mlp.c_proj", 256)),
    "gpt_neox": ("attention", (None, None, None, "attention.dense", "attention.query_key_value"), (4, 4, 16),
                 ("mlp", {"mlp.dense_h_to_4h": "in"}, "mlp.dense_4h_to_h", 128)),
}


def test_layout_table_covers_the_matrix():
    assert set(LAYOUTS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_adapter_attention_and_mlp_layouts(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    module, (q, k, v, o, qkv), (heads, kv, head_dim), (mlp_module, inputs, output, width) = LAYOUTS[arch]
    projections = adapter.projections()
    for i in range(adapter.num_layers):
        attn = adapter.attention_layout(i)
        assert (attn.module, attn.q, attn.k, attn.v, attn.o, attn.qkv) == (module, q, k, v, o, qkv)
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.group_size) == (heads, kv, head_dim, heads // kv)
        assert attn.separate_qkv == (q is not None)
        assert attn.roles() == {r: n for r, n in zip(("q", "k", "v", "o", "qkv"), (q, k, v, o, qkv)) if n}
        prefix = adapter.layer_name(i)
        assert attn.prefix == prefix and attn.qualified(o) == f"{prefix}.{o}"
        assert model.get_submodule(f"{prefix}.{module}") is adapter.attention_modules()[f"{prefix}.{module}"]
        # the roles agree with the shapes the model computes with
        sizes = {r: projections[attn.qualified(n)] for r, n in attn.roles().items()}
        hidden = sizes["o"].out_features
        assert sizes["o"].in_features == heads * head_dim
        if attn.separate_qkv:
            assert (sizes["q"].out_features, sizes["k"].out_features, sizes["v"].out_features) == (heads * head_dim, kv * head_dim, kv * head_dim)
        else:
            assert (sizes["qkv"].in_features, sizes["qkv"].out_features) == (hidden, (heads + 2 * kv) * head_dim)
        assert set(attn.projections) == {n[len(prefix) + 1:] for n in projections if n.startswith(f"{prefix}.{module}.")}

        mlp = adapter.mlp_layout(i)
        assert (mlp.module, mlp.inputs, mlp.output, mlp.width, mlp.hidden) == (mlp_module, tuple(inputs), output, width, hidden)
        assert mlp.roles == {**inputs, output: "out"}
        assert mlp.experts == (arch in MOE_ARCHITECTURES)
        assert mlp.fused_inputs == tuple(n for n, r in inputs.items() if r == "gate_up")
        assert projections[mlp.qualified(output)].in_features == width
        # layer 1 is laid out like layer 0: the layouts compare equal, only their prefixes differ
        assert attn == adapter.attention_layout(0) and mlp == adapter.mlp_layout(0)


def test_layouts_of_a_layer_without_attention_or_mlp_names():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(8, 8)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    adapter = ModelAdapter(Toy())
    attn, mlp = adapter.attention_layout(0), adapter.mlp_layout(1)
    assert (attn.module, attn.roles(), attn.num_heads, attn.head_dim, attn.separate_qkv) == (None, {}, None, None, False)
    assert (mlp.module, mlp.inputs, mlp.output, mlp.width, mlp.experts) == (None, ("mix",), None, 0, False)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("preset,pattern", [("magnitude-50", "unstructured"), ("magnitude-2of4", "2:4")])
def test_compress_eval_save_load(arch, preset, pattern, tokenizer, tmp_path):
    torch.set_num_threads(1)
    dense = tiny_model(arch)
    model, report = sparseforge.compress(dense, preset, tokenizer, progress=False)
    assert report["stages"][0]["pattern"] in (pattern, "unstructured@0.5")
    for name, proj in ModelAdapter(model).projections().items():
        w = proj.weight()
        if pattern == "2:4":
            assert check_nm(w, 2, 4), name
        else:
            assert check_unstructured(w, 0.5, "matrix"), name
    # the dense model is untouched (compress copies unless inplace=True)
    assert all((p.weight() != 0).all() for p in ModelAdapter(dense).projections().values())

    out = tmp_path / "artifact"
    sparseforge.save(model, out, tokenizer, recipe=sparseforge.load_recipe(preset))
    ctx = EvalContext(model, tokenizer, reference=dense, model_dir=out,
                      settings={"max_tokens": 300, "retrieval_lengths": (128,), "retrieval_per_cell": 1, "speed_prompt_len": 16, "speed_new_tokens": 4, "speed_repeats": 1})
    metrics = run_tasks(ctx, ["perplexity", "fidelity", "passkey", "sparsity", "size"])
    assert metrics["perplexity"] > 1 and metrics["kl_to_reference"] > 0
    assert abs(metrics["sparsity"] - 0.5) < 1e-9
    assert metrics["size_bytes"] > 0 and 0 <= metrics["passkey_accuracy"] <= 1

    ids = torch.randint(0, 4000, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = sparseforge.load(out)
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert torch.equal(plain.eval()(input_ids=ids).logits, expected)
    assert reloaded.sparseforge_info["recipe"]["name"] == preset


def calibrated_recipe(method: str, pattern: str, ignore=()) -> str:
    params = "{sparsity: 0.5}" if pattern == "unstructured" else '{pattern: "2:4"}'
    ignore_line = f"    ignore: {list(ignore)}\n" if ignore else ""
    # Two short windows: enough for every statistic (SparseGPT's damped Hessian stays invertible) and fast.
    return f"name: {method}-test\nstages:\n  - method: {method}\n    params: {params}\n{ignore_line}calibration: {{samples: 2, seq_len: 32}}\n"


def zeros(w: torch.Tensor) -> torch.Tensor:
    return (w == 0).sum(-1)


def per_matrix(w: torch.Tensor) -> list[torch.Tensor]:
    """A weight, or each expert's matrix of a fused `[E, out, in]` stack: patterns hold per expert."""
    return list(w) if w.dim() == 3 else [w]


@pytest.mark.parametrize("arch", CALIBRATED_MATRIX)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_calibrated_methods_compress_every_architecture(arch, method, pattern, tokenizer, tmp_path):
    torch.set_num_threads(1)
    dense = tiny_model(arch)
    before = copy.deepcopy(dense.state_dict())
    recipe = parse_recipe(calibrated_recipe(method, pattern))
    model, report = sparseforge.compress(dense, recipe, tokenizer, progress=False)
    stage = report["stages"][0]
    projections = ModelAdapter(model).projections()
    assert sorted(stage["projections"]) == sorted(projections)  # every expert stack and attention projection
    assert ("routing" in stage) == (arch in MOE_ARCHITECTURES)
    for name, proj in projections.items():
        for w in per_matrix(proj.weight()):
            if pattern == "2:4":  # exactly two of every four consecutive inputs (random weights have no zeros)
                assert zeros(w.reshape(*w.shape[:-1], -1, 4)).eq(2).all(), name
            elif method == "wanda":  # exactly half of every output row
                assert zeros(w).eq(prune_count(w.shape[-1], 0.5)).all(), name
            else:  # SparseGPT: exactly floor(0.5 * numel) zeros over the whole matrix (each expert's own)
                assert (w == 0).sum().item() == prune_count(w.numel(), 0.5), name
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # compress copied
    if method == "sparsegpt":  # it also updates the surviving weights, which Wanda never does
        kept = [(proj.weight() != 0) for proj in projections.values()]
        dense_w = [p.weight() for p in ModelAdapter(dense).projections().values()]
        assert any(not torch.equal(p.weight()[k], d[k]) for p, k, d in zip(projections.values(), kept, dense_w))

    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, dense(input_ids=ids).logits, atol=1e-4)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # through the cache
        assert generated.shape == (1, 15)
        sparseforge.save(model, tmp_path / "a", tokenizer, recipe=recipe)
        assert torch.equal(sparseforge.load(tmp_path / "a")(input_ids=ids).logits, out)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()(input_ids=ids).logits, out)


def reloaded_recipe_name(directory) -> str:
    return json.loads((directory / "sparseforge.json").read_text())["recipe"]["name"]


@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
@pytest.mark.parametrize("preset", ["sparsegpt-50", "wanda-50"])
def test_moe_presets_end_to_end(arch, preset, tokenizer, tmp_path):
    """The shipped presets' stages, unchanged, on each MoE architecture: compress, evaluate, save, reload,
    generate (with fewer calibration windows than the preset's 32 x 512, to keep the default suite short)."""
    torch.set_num_threads(1)
    dense = tiny_model(arch)
    recipe = dataclasses.replace(sparseforge.load_recipe(preset), calibration=CalibrationConfig(samples=4, seq_len=128))
    model, report = sparseforge.compress(dense, recipe, tokenizer, progress=False)
    stage = report["stages"][0]
    assert sorted(stage["projections"]) == sorted(ModelAdapter(model).projections())
    assert set(stage["routing"]["blocks"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(sum(b["tokens"]) == 4 * 128 * 2 for b in stage["routing"]["blocks"].values())  # top-2 of every token
    out = tmp_path / "artifact"
    sparseforge.save(model, out, tokenizer, recipe=recipe)
    ctx = EvalContext(model, tokenizer, reference=dense, model_dir=out,
                      settings={"max_tokens": 300, "retrieval_lengths": (128,), "retrieval_per_cell": 1, "speed_prompt_len": 16, "speed_new_tokens": 4, "speed_repeats": 1})
    metrics = run_tasks(ctx, ["perplexity", "fidelity", "passkey", "sparsity", "size"])
    assert metrics["perplexity"] > 1 and metrics["kl_to_reference"] > 0
    assert abs(metrics["sparsity"] - 0.5) < 1e-9
    assert reloaded_recipe_name(out) == preset
    ids = torch.randint(0, 4000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = sparseforge.load(out)
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 15)
