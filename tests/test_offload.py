"""Disk offload: compressing with one decoder layer in memory gives exactly what in-memory compression gives."""
import gc
import json

import pytest
import torch

import sparseforge
from sparseforge import api
from sparseforge.cli import main
from sparseforge.core import calibration as calibration_module
from sparseforge.errors import UserInputError
from sparseforge.formats.artifact import load_model, save
from tiny_models import tiny_model


def _save_tiny(arch, path, tokenizer, **overrides):
    model = tiny_model(arch)
    if overrides:
        from transformers import AutoModelForCausalLM

        config = model.config
        for k, v in overrides.items():
            setattr(config, k, v)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _compress_both(src, tokenizer, recipe, tmp_path):
    dense = load_model(src)
    in_memory, _ = api.compress(dense, recipe, tokenizer, progress=False, inplace=True)
    save(in_memory, tmp_path / "in-memory", tokenizer)
    offloaded = sparseforge.load(src, offload=tmp_path / "scratch")
    offloaded, _ = api.compress(offloaded, recipe, tokenizer, progress=False)
    save(offloaded, tmp_path / "offloaded", tokenizer)
    return offloaded


@pytest.mark.parametrize("arch,recipe", [("llama", "sparsegpt-2of4"), ("gpt2", "wanda-50"), ("llama", "owl-wanda-70")])
def test_offloaded_compression_matches_in_memory(arch, recipe, tmp_path, tokenizer):
    src = _save_tiny(arch, tmp_path / "src", tokenizer)
    _compress_both(src, tokenizer, recipe, tmp_path)
    a, b = load_model(tmp_path / "in-memory"), load_model(tmp_path / "offloaded")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The offloaded save is sharded one layer per file and loads with plain transformers too.
    index = json.loads((tmp_path / "offloaded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == a.config.num_hidden_layers + 1
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    ids = torch.randint(0, 4000, (1, 16))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, a(ids).logits)


def test_at_most_one_layer_in_memory_during_the_walk(tmp_path, tokenizer, monkeypatch):
    src = _save_tiny("llama", tmp_path / "src", tokenizer, num_hidden_layers=4)
    model = sparseforge.load(src, offload=True)
    store = model.sparseforge_offload
    assert not any(store.is_resident(i) for i in range(4))  # nothing of the layers loaded up front
    resident_counts = []
    real_fn = calibration_module._run_layer

    def spy(layer, inputs, *args, **kwargs):
        resident_counts.append(sum(store.is_resident(i) for i in range(4)))
        return real_fn(layer, inputs, *args, **kwargs)

    monkeypatch.setattr(calibration_module, "_run_layer", spy)
    api.compress(model, "wanda-50", tokenizer, progress=False)
    assert resident_counts and max(resident_counts) == 1
    assert not any(store.is_resident(i) for i in range(4))
    # Weight sparsity reads the layers one at a time from the scratch files.
    from sparseforge.eval.efficiency import weight_sparsity

    assert weight_sparsity(model)["sparsity"] == pytest.approx(0.5)


def test_tied_embeddings_and_scratch_cleanup(tmp_path, tokenizer):
    src = _save_tiny("llama", tmp_path / "src", tokenizer, tie_word_embeddings=True)
    model = sparseforge.load(src, offload=tmp_path / "scratch")
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.device.type == "cpu"
    api.compress(model, "magnitude-50", tokenizer, progress=False)
    scratch = model.sparseforge_offload.scratch
    assert len(list(scratch.glob("layer-*.safetensors"))) == 2
    del model
    gc.collect()
    assert not scratch.exists()


def test_offloaded_model_refuses_what_it_cannot_do(tmp_path, tokenizer):
    src = _save_tiny("llama", tmp_path / "src", tokenizer)
    model = sparseforge.load(src, offload=True)
    with pytest.raises(UserInputError, match="offloaded to disk"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UserInputError, match="storage 'dense'"):
        save(model, tmp_path / "out", tokenizer, storage="compact")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserInputError, match="structured"):
        api.compress(model, "structured-25", tokenizer, progress=False)
    with pytest.raises(UserInputError, match="local"):
        sparseforge.load("org/some-model", offload=True)


def test_cli_compress_with_offload_dir(tmp_path, tokenizer, capsys):
    src = _save_tiny("llama", tmp_path / "src", tokenizer)
    out_plain, out_off = tmp_path / "plain", tmp_path / "off"
    assert main(["--quiet", "compress", "--model", str(src), "--recipe", "wanda-2of4", "--out", str(out_plain)]) == 0
    assert main(["--quiet", "compress", "--model", str(src), "--recipe", "wanda-2of4", "--out", str(out_off), "--offload-dir", str(tmp_path / "scratch")]) == 0
    a, b = load_model(out_plain), load_model(out_off)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert json.loads((out_off / "sparseforge.json").read_text())["metrics"]["sparsity"] == pytest.approx(0.5)
    assert not (tmp_path / "scratch").exists()  # scratch files, and the folder the run created for them, removed
    capsys.readouterr()
    rc = main(["compress", "--model", str(src), "--recipe", "wanda-50", "--out", str(tmp_path / "c"), "--offload-dir", str(tmp_path / "s2"), "--storage", "compact"])
    err = capsys.readouterr().err
    assert rc == 2 and "offload-dir" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
