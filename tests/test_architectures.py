"""The ten-architecture matrix: compress, evaluate, save and reload tiny random models of each."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseforge
from sparseforge.core.adapter import ModelAdapter
from sparseforge.core.masks import check_nm, check_unstructured
from sparseforge.eval.tasks import EvalContext, run_tasks
from tiny_models import ARCHITECTURES, tiny_model


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
