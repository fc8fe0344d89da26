"""Structured pruning: whole MLP channels and attention heads removed, config rewritten, artifacts reload."""
import copy
import json

import pytest
import torch
import transformers

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.masks import HeadPlan, check_channels, check_heads
from sparseforge.errors import UserInputError
from sparseforge.methods import get_method
from sparseforge.recipe import load_recipe, parse_recipe
from tiny_models import ARCHITECTURES, VOCAB, tiny_model

SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "opt", "gpt2", "gpt_neox", "mixtral"]
MLP_SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "opt", "gpt2", "gpt_neox"]  # mixtral: experts
# OPT derives head_dim from hidden / heads; GPT-2 and GPT-NeoX fuse q, k and v into one weight
HEADS_SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "mixtral"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def structured(model, tokenizer=None, **params):
    cls = get_method("structured")
    params.setdefault("score", "magnitude")
    return cls(cls.parse_params(params)).apply(model, tokenizer, progress=False)


def custom_llama(arch="llama", **overrides):
    """A tiny Llama-like model with other head counts (8 heads in 2 KV groups; or plain multi-head attention)."""
    kwargs = {**ARCHITECTURES[arch], "vocab_size": VOCAB, "max_position_embeddings": 512, **overrides}
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.CONFIG_MAPPING[arch](**kwargs)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 4000, (2, 16), generator=torch.Generator().manual_seed(0))


def masked_dense(dense, result):
    """The pure-PyTorch reference: the dense model with the removed channels' and heads' output-projection
    columns zeroed (what removal computes), found by name in the dense model."""
    ref = copy.deepcopy(dense)
    adapter = ModelAdapter(ref)
    removed = result.removed
    for i in range(adapter.num_layers):
        projs = adapter.projections(i)
        prefix = adapter.layer_name(i)
        if "mlp_channels" in removed:
            out = next(p for n, p in projs.items() if n.endswith((".down_proj", ".fc2", ".mlp.c_proj", ".dense_4h_to_h")))
            w = out.weight().clone()
            w[:, removed["mlp_channels"]["removed"][i]] = 0
            out.set_weight(w)
        if "attention_heads" in removed:
            o = projs[f"{prefix}.self_attn.o_proj"]
            hd = removed["attention_heads"]["head_dim"]
            w = o.weight().clone()
            for h in removed["attention_heads"]["removed"][i]:
                w[:, h * hd : (h + 1) * hd] = 0
            o.set_weight(w)
    return ref


def param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", SUPPORTED)
def test_equals_dense_model_with_channels_and_heads_zeroed(arch):
    dense = tiny_model(arch)
    model = copy.deepcopy(dense)
    heads = 0.5 if arch in HEADS_SUPPORTED else 0.0
    result = structured(model, mlp_sparsity=0.25 if arch in MLP_SUPPORTED else 0.0, head_sparsity=heads)
    ref = masked_dense(dense, result)
    torch.testing.assert_close(logits(model, IDS), logits(ref, IDS), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(model, IDS), logits(dense, IDS), atol=1e-3)  # something was removed
    # the reference's output projections satisfy the declared structured patterns
    for name, proj in ModelAdapter(ref).projections().items():
        if "mlp_channels" in result.removed and name.endswith((".down_proj", ".fc2", ".mlp.c_proj", ".dense_4h_to_h")):
            assert check_channels(proj.weight(), 0.25, "in"), name
        if name.endswith("o_proj") and heads:
            assert check_heads(proj.weight(), HeadPlan.make(4, 2, 0.5)), name


@pytest.mark.parametrize("arch,expected_drop", [("llama", 20480), ("qwen2", 20544), ("opt", 8256)])
def test_parameter_count_and_config(arch, expected_drop):
    # llama: per layer, 32 of 128 channels x 64 (gate, up rows; down columns) + 2 of 4 heads x 16 x 64 (q rows,
    # o columns); qwen2 adds the q bias; opt (MLP only) adds the fc1 bias.
    model = tiny_model(arch)
    before = param_count(model)
    heads = 0.0 if arch == "opt" else 0.5
    result = structured(model, mlp_sparsity=0.25, head_sparsity=heads)
    assert before - param_count(model) == expected_drop
    assert result.removed["params_before"] - result.removed["params_after"] == expected_drop
    width_key = "ffn_dim" if arch == "opt" else "intermediate_size"
    assert getattr(model.config, width_key) == 96
    if heads:
        assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, 16)
        attn = model.get_submodule(f"{ModelAdapter(model).layer_name(0)}.self_attn")
        assert attn.q_proj.out_features == 32 and attn.o_proj.in_features == 32 and attn.num_key_value_groups == 1
        assert type(attn.q_proj) is torch.nn.Linear


def test_grouped_query_attention_removes_the_same_count_per_group(tokenizer, tmp_path):
    dense = custom_llama("mistral", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    model = copy.deepcopy(dense)
    result = structured(model, mlp_sparsity=0.25, head_sparsity=0.25)
    heads = result.removed["attention_heads"]
    assert (heads["after"], heads["kv_heads_after"], heads["mode"]) == (6, 2, "per_group")
    for removed in heads["removed"]:
        assert sorted(h // 4 for h in removed) == [0, 1]  # one query head from each KV group
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (6, 2, 8)
    expected = logits(model, IDS)
    torch.testing.assert_close(expected, logits(masked_dense(dense, result), IDS), atol=1e-5, rtol=1e-4)
    sparseforge.save(model, tmp_path / "a", tokenizer)  # 6 heads x 8 = 48 != hidden 64: head_dim is explicit
    torch.testing.assert_close(logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a"), IDS), expected, atol=0, rtol=0)


def test_llama_refuses_head_counts_its_config_rejects_and_suggests_others():
    # transformers 5 checks hidden_size % num_attention_heads for Llama (and Gemma2): 64 % 6 != 0
    model = custom_llama(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with pytest.raises(UserInputError, match=r"LlamaForCausalLM.*not a multiple.*accepts: 0.5 \(4 heads\)"):
        structured(model, head_sparsity=0.25)
    assert model.config.num_attention_heads == 8 and model.config.intermediate_size == 128  # untouched


def test_multi_head_attention_removes_whole_heads_with_their_kv():
    dense = custom_llama(num_key_value_heads=4)
    model = copy.deepcopy(dense)
    result = structured(model, mlp_sparsity=0.25, head_sparsity=0.5)
    heads = result.removed["attention_heads"]
    assert (heads["after"], heads["kv_heads_after"], heads["mode"]) == (2, 2, "whole_groups")
    assert model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(model, IDS), logits(masked_dense(dense, result), IDS), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_save_and_reload_with_both_loaders(arch, tokenizer, tmp_path):
    model = tiny_model(arch)
    mlp = 0.25 if arch in MLP_SUPPORTED else 0.0
    structured(model, mlp_sparsity=mlp, head_sparsity=0.5 if arch in HEADS_SUPPORTED else 0.0)
    expected = logits(model, IDS)
    sparseforge.save(model, tmp_path / "a", tokenizer)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    if mlp:  # GPT-2's width is 4 x 64 (n_inner was None), the others' 128
        assert next(saved[k] for k in ("intermediate_size", "ffn_dim", "n_inner") if k in saved) == (192 if arch == "gpt2" else 96)
    if arch in HEADS_SUPPORTED:
        assert (saved["num_attention_heads"], saved["head_dim"]) == (2, 16)
    for loaded in (sparseforge.load(tmp_path / "a"), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")):
        assert param_count(loaded) == param_count(model)
        torch.testing.assert_close(logits(loaded.eval(), IDS), expected, atol=0, rtol=0)


def test_recipe_compress_save_records_what_was_removed(tokenizer, tmp_path):
    recipe = parse_recipe(
        "name: s\nstages:\n  - method: structured\n    params: {mlp_sparsity: 0.5, head_sparsity: 0.5}\n"
        "calibration: {samples: 2, seq_len: 32}\n"
    )
    dense = tiny_model("llama")
    model, report = sparseforge.compress(dense, recipe, tokenizer, progress=False)
    stage = report["stages"][0]
    assert stage["method"] == "structured" and stage["pattern"] == "channels@0.5+heads@0.5"
    assert stage["removed"]["score"] == "activation"
    assert stage["removed"]["mlp_channels"]["after"] == 64 and len(stage["removed"]["mlp_channels"]["removed"][0]) == 64
    assert param_count(dense) == stage["removed"]["params_before"] > param_count(model) == stage["removed"]["params_after"]
    sparseforge.save(model, tmp_path / "art", tokenizer, recipe=recipe)
    info = json.loads((tmp_path / "art" / "sparseforge.json").read_text())
    assert info["stages"][0]["removed"]["config"]["intermediate_size"] == [128, 64]
    loaded = sparseforge.load(tmp_path / "art")
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), atol=0, rtol=0)
    # the compact storage path takes a structured model too (nothing sparse to pack)
    sparseforge.save(model, tmp_path / "compact", tokenizer, storage="compact")
    torch.testing.assert_close(logits(sparseforge.load(tmp_path / "compact"), IDS), logits(model, IDS), atol=0, rtol=0)


def test_activation_score_differs_from_magnitude_and_is_deterministic(tokenizer):
    recipe = "stages:\n  - method: structured\n    params: {mlp_sparsity: 0.25, score: %s}\ncalibration: {samples: 2, seq_len: 32}\n"
    runs = [sparseforge.compress(tiny_model("llama"), parse_recipe(recipe % s), tokenizer, progress=False)[1] for s in ("activation", "activation", "magnitude")]
    removed = [r["stages"][0]["removed"]["mlp_channels"]["removed"] for r in runs]
    assert removed[0] == removed[1]
    assert removed[0] != removed[2]


def test_preset_structured_25(tokenizer):
    recipe = load_recipe("structured-25")
    assert (recipe.stages[0].params.mlp_sparsity, recipe.stages[0].params.head_sparsity) == (0.25, 0.0)
    recipe.calibration.samples, recipe.calibration.seq_len = 2, 32
    model, report = sparseforge.compress(tiny_model("llama"), recipe, tokenizer, progress=False)
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (96, 4, 2)
    assert report["stages"][0]["pattern"] == "channels@0.25"


@pytest.mark.parametrize("arch,heads,match", [
    ("phi3", 0.0, "Phi3ForCausalLM.*fused gate/up"),
    ("mixtral", 0.0, "MixtralForCausalLM.*mixture of experts"),
    ("gpt2", 0.5, "GPT2LMHeadModel.*fused qkv"),
    ("gpt_neox", 0.5, "GPTNeoXForCausalLM.*fused qkv"),
    ("opt", 0.5, "OPTForCausalLM.*cannot express"),
])
def test_unsupported_architectures_say_so_and_suggest_unstructured(arch, heads, match):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserInputError, match=match) as info:
        structured(model, mlp_sparsity=0.25, head_sparsity=heads)
    assert "unstructured or N:M" in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change


@pytest.mark.parametrize("params,match", [
    ({"mlp_sparsity": 1.0}, "outside \\[0, 1\\).*every"),
    ({"mlp_sparsity": -0.1}, "outside \\[0, 1\\)"),
    ({"head_sparsity": 1.0}, "head_sparsity 1 is outside .*every channel or head"),
    ({"mlp_sparsity": 0.0}, "removes nothing"),
    ({"channel_multiple": 0}, "channel_multiple"),
    ({"score": "random"}, "allowed: activation, magnitude"),
])
def test_bad_params(params, match):
    with pytest.raises(UserInputError, match=match):
        get_method("structured").parse_params(params)


def test_bad_settings_for_the_model():
    with pytest.raises(UserInputError, match="removes no head"):  # 4 heads in groups of 2: 25% is less than one
        structured(tiny_model("llama"), head_sparsity=0.25)
    with pytest.raises(UserInputError, match="keeps no channel"):
        structured(tiny_model("llama"), mlp_sparsity=0.5, channel_multiple=128)
    cls = get_method("structured")
    with pytest.raises(UserInputError, match="targets"):
        cls(cls.parse_params({})).apply(tiny_model("llama"), None, targets=["*.mlp.*"], progress=False)
    with pytest.raises(UserInputError, match="tokenizer"):
        cls(cls.parse_params({})).apply(tiny_model("llama"), None, progress=False)


def test_channel_multiple_rounds_the_kept_width():
    model = tiny_model("llama")
    structured(model, mlp_sparsity=0.1, channel_multiple=32)  # 128 - 12 = 116 kept -> 96
    assert model.config.intermediate_size == 96
