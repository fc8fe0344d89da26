"""Runtime stages end to end: one recipe with a transform and a runtime stage, saved with the model, re-attached
by `sparseforge.load`, run by `sparseforge generate`; malformed runtime artifacts fail with one line; the
registries behind the choices users see."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import sparseforge
from sparseforge.cli import build_parser, main
from sparseforge.errors import UserInputError
from sparseforge.formats.runtime_state import RUNTIME_TENSORS_FILE
from sparseforge.methods.base import REGISTRY, RuntimeMethod, RuntimeState, param, register
from sparseforge.recipe import parse_recipe
from tiny_models import tiny_model

KERNEL_STAGE = "  - method: sparse-kernel\n    params: {kernel: csr, token_counts: [1, 8], repeats: 1, warmup: 0}\n"
RECIPE = "name: mag-csr\ncalibration: {samples: 2, seq_len: 32}\nstages:\n  - method: magnitude\n    params: {sparsity: 0.5}\n" + KERNEL_STAGE



@dataclasses.dataclass
class OffsetParams:
    scale: float = param(0.5, "size of the offset added to the final norm's output")


class FinalOffset(RuntimeMethod):
    """Test-only runtime method whose state has a tensor: adds a calibrated vector after the final norm."""

    name = "test-final-offset"
    family = "test"
    Params = OffsetParams

    def calibrate(self, model, context):
        hidden = model.config.hidden_size
        return RuntimeState(tensors={"offset": self.params.scale * torch.randn(hidden, generator=torch.Generator().manual_seed(0))},
                            data={"hidden": hidden})

    def attach(self, model, state):
        offset = state.tensors["offset"]
        if offset.shape != (state.data["hidden"],):
            raise ValueError(f"offset has shape {tuple(offset.shape)}")
        # A persistent buffer on purpose: it would show up in the saved weights unless save detaches first.
        model.model.norm.register_buffer("test_offset", offset.clone())
        self.handle = model.model.norm.register_forward_hook(lambda mod, args, out: out + mod.test_offset)

    def detach(self, model):
        self.handle.remove()
        del model.model.norm.test_offset

    def report(self, state):
        return {"norm_of_offset": float(state.tensors["offset"].norm())}


@pytest.fixture
def offset_method():
    register(FinalOffset)
    yield FinalOffset
    REGISTRY.pop(FinalOffset.name)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def artifact(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "art"
    assert main(["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_transform_then_runtime_stage_compresses_saves_reloads_and_generates(artifact, tiny_llama_dir, tokenizer, capsys):
    info = json.loads((artifact / "sparseforge.json").read_text())
    assert [(s["method"], s["family"], s["lifetime"]) for s in info["stages"]] == [
        ("magnitude", "weights", "transform"), ("sparse-kernel", "kernels", "runtime")]
    (saved,) = info["runtime"]["stages"]
    assert saved["method"] == "sparse-kernel" and saved["params"]["kernel"] == "csr" and saved["tensors"] == []
    assert set(saved["data"]["gate"]["timings"]) == {"64x64@0.50", "32x64@0.50", "128x64@0.50", "64x128@0.50"}
    assert not (artifact / RUNTIME_TENSORS_FILE).exists()  # no stage has tensors

    model = sparseforge.load(artifact)
    assert [s.stage["method"] for s in sparseforge.runtime_stages(model)] == ["sparse-kernel"]
    routed = [n for n, m in model.named_modules() if type(m).__name__ == "SparseLinear"]
    assert len(routed) == 14
    plain = sparseforge.load(artifact, runtime=False)
    assert not sparseforge.runtime_stages(plain) and not any(type(m).__name__ == "SparseLinear" for m in plain.modules())
    assert torch.allclose(_logits(model, IDS), _logits(plain, IDS), atol=1e-4)  # CSR products agree with dense

    prompt = "The quick brown fox"
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert main(["--quiet", "generate", "--model", str(artifact), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"
    assert printed.strip()

    # Sampling is seeded: the same seed, the same text.
    args = ["--quiet", "generate", "--model", str(artifact), "--prompt", prompt, "--max-new-tokens", "6", "--do-sample", "--temperature", "0.8", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_saved_weights_are_plain_and_load_without_sparseforge(artifact, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    assert set(load_file(str(artifact / "model.safetensors"))) == set(load_file(str(tiny_llama_dir / "model.safetensors")))
    hf = AutoModelForCausalLM.from_pretrained(artifact).eval()
    assert not any(type(m).__name__ == "SparseLinear" for m in hf.modules())
    plain = sparseforge.load(artifact, runtime=False)
    assert torch.equal(_logits(hf, IDS), _logits(plain, IDS))


def test_save_detaches_around_the_weights_and_reattaches(tmp_path, tokenizer, offset_method):
    recipe = parse_recipe("stages:\n  - method: magnitude\n  - method: test-final-offset\n    params: {scale: 2.0}\n")
    model, report = sparseforge.compress(tiny_model("llama"), recipe, tokenizer, progress=False)
    assert report["stages"][1]["norm_of_offset"] > 0
    with_offset = _logits(model, IDS)
    stages = sparseforge.detach_runtime(model)
    without = _logits(model, IDS)
    assert not torch.equal(with_offset, without)
    sparseforge.attach_runtime(model, stages)
    assert torch.equal(_logits(model, IDS), with_offset)

    assert "model.norm.test_offset" in model.state_dict()
    sparseforge.save(model, tmp_path / "a", tokenizer)
    assert torch.equal(_logits(model, IDS), with_offset)  # attached again after saving
    assert "model.norm.test_offset" not in load_file(str(tmp_path / "a" / "model.safetensors"))
    tensors = load_file(str(tmp_path / "a" / RUNTIME_TENSORS_FILE))
    assert set(tensors) == {"0.offset"} and torch.equal(tensors["0.offset"], stages[0].state.tensors["offset"])
    loaded = sparseforge.load(tmp_path / "a")
    assert torch.equal(_logits(loaded, IDS), with_offset)
    assert torch.equal(_logits(sparseforge.load(tmp_path / "a", runtime=False), IDS), without)
    # Saving a model loaded without its runtime stages writes an artifact without them.
    sparseforge.save(sparseforge.load(tmp_path / "a", runtime=False), tmp_path / "b", tokenizer)
    assert json.loads((tmp_path / "b" / "sparseforge.json").read_text())["runtime"] == {"stages": []}
    assert not (tmp_path / "b" / RUNTIME_TENSORS_FILE).exists()


def _corrupt(directory, edit):
    path = directory / "sparseforge.json"
    info = json.loads(path.read_text())
    edit(info["runtime"]["stages"], info)
    path.write_text(json.dumps(info))


BAD_RUNTIME = {
    "runtime-not-object": (lambda st, info: info.update(runtime=[1]), "'runtime' must be an object"),
    "stage-not-object": (lambda st, info: st.__setitem__(0, "sparse-kernel"), "runtime stage 1 is a str"),
    "missing-method": (lambda st, info: st[0].pop("method"), "field 'method' is missing"),
    "params-wrong-type": (lambda st, info: st[0].__setitem__("params", [1]), "field 'params' is a list, expected a dict"),
    "unknown-method": (lambda st, info: st[0].__setitem__("method", "no-such-press"), "unknown method 'no-such-press'"),
    "transform-method": (lambda st, info: st[0].__setitem__("method", "magnitude"), "'magnitude' is a transform method"),
    "bad-param-value": (lambda st, info: st[0]["params"].__setitem__("kernel", "dense-ish"), "allowed: 2:4, csr"),
    "unknown-param": (lambda st, info: st[0]["params"].__setitem__("speed", 1), "unknown parameter 'speed'"),
    "targets-not-strings": (lambda st, info: st[0].__setitem__("targets", [3]), "must list strings"),
    "gate-malformed": (lambda st, info: st[0]["data"].__setitem__("gate", {"timings": 3}), "speed gate data is malformed"),
    "gate-missing": (lambda st, info: st[0]["data"].pop("gate"), "needs 'gate'"),
    "tensor-listed-not-stored": (lambda st, info: st[0].__setitem__("tensors", ["scores"]), "is missing but sparseforge.json lists"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNTIME))
def test_malformed_runtime_json_is_one_line(case, artifact):
    edit, expected = BAD_RUNTIME[case]
    _corrupt(artifact, edit)
    with pytest.raises(UserInputError) as err:
        sparseforge.load(artifact)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    sparseforge.load(artifact, runtime=False)  # the weights still load


@pytest.fixture
def offset_artifact(tmp_path, tokenizer, offset_method):
    recipe = parse_recipe("stages:\n  - method: magnitude\n  - method: test-final-offset\n")
    model, _ = sparseforge.compress(tiny_model("llama"), recipe, tokenizer, progress=False)
    sparseforge.save(model, tmp_path / "a", tokenizer)
    return tmp_path / "a"


def _rewrite_tensors(directory, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(directory / RUNTIME_TENSORS_FILE))


BAD_TENSORS = {
    "truncated": (lambda d: (d / RUNTIME_TENSORS_FILE).write_bytes((d / RUNTIME_TENSORS_FILE).read_bytes()[:40]), "not a valid safetensors file"),
    "not-safetensors": (lambda d: (d / RUNTIME_TENSORS_FILE).write_text("{}"), "not a valid safetensors file"),
    "missing-file": (lambda d: (d / RUNTIME_TENSORS_FILE).unlink(), "is missing but sparseforge.json lists runtime tensors"),
    "missing-key": (lambda d: _rewrite_tensors(d, {"0.other": torch.zeros(3)}), "missing ['0.offset'], unexpected ['0.other']"),
    "wrong-shape": (lambda d: _rewrite_tensors(d, {"0.offset": torch.zeros(3)}), "its saved state does not fit this model (ValueError"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_malformed_runtime_tensors_are_one_line(case, offset_artifact):
    edit, expected = BAD_TENSORS[case]
    edit(offset_artifact)
    with pytest.raises(UserInputError) as err:
        sparseforge.load(offset_artifact)
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def test_a_failed_attach_leaves_no_stage_attached(offset_artifact, tmp_path, tokenizer):
    # Two runtime stages, the second one broken: the first must not stay attached.
    path = offset_artifact / "sparseforge.json"
    info = json.loads(path.read_text())
    good = info["runtime"]["stages"][0]
    info["runtime"]["stages"] = [good, dict(good, tensors=[])]
    path.write_text(json.dumps(info))
    model = sparseforge.load(offset_artifact, runtime=False)
    with pytest.raises(UserInputError, match="runtime stage 2"):
        sparseforge.formats.runtime_state.attach_saved(model)
    assert not sparseforge.runtime_stages(model)
    assert torch.equal(_logits(model, IDS), _logits(sparseforge.load(offset_artifact, runtime=False), IDS))


def test_runtime_stages_come_after_transforms():
    with pytest.raises(UserInputError, match="stage 2 \\(magnitude\\) changes weights after runtime stage 1 \\(sparse-kernel\\)"):
        parse_recipe("stages:\n" + KERNEL_STAGE + "  - method: magnitude\n")


def test_compress_drops_runtime_stages_the_model_carried(artifact, tokenizer):
    model = sparseforge.load(artifact)
    again, report = sparseforge.compress(model, parse_recipe("stages:\n  - method: magnitude\n    params: {sparsity: 0.6}\n"), tokenizer, progress=False)
    assert not sparseforge.runtime_stages(again)
    assert [s["method"] for s in report["stages"]] == ["magnitude"]
    assert sparseforge.runtime_stages(model)  # the original (copied, not changed) keeps its stages


def test_attach_method_refuses_a_transform_and_a_second_kernel_stage(artifact):
    model = sparseforge.load(artifact)
    with pytest.raises(UserInputError, match="'magnitude' is a transform method"):
        sparseforge.attach_method(model, "magnitude")
    with pytest.raises(UserInputError, match="one sparse-kernel stage per model"):
        sparseforge.attach_method(model, "sparse-kernel", {"kernel": "csr", "token_counts": [1], "repeats": 1, "warmup": 0})


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparseforge: error: "), captured.err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_generate_bad_input_exits_2_with_one_line_before_loading(capsys, tmp_path, tiny_llama_dir, monkeypatch):
    from sparseforge import api

    def refuse(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(api, "load", refuse)
    model = ["generate", "--model", str(tiny_llama_dir)]
    _one_line_error(capsys, model + ["--prompt", "hi", "--prompt-file", "x.txt"], "exactly one of --prompt")
    _one_line_error(capsys, model, "exactly one of --prompt")
    _one_line_error(capsys, model + ["--prompt-file", str(tmp_path / "missing.txt")], "cannot read --prompt-file", "missing.txt")
    (tmp_path / "blank.txt").write_text("  \n")
    _one_line_error(capsys, model + ["--prompt-file", str(tmp_path / "blank.txt")], "the prompt is empty")
    _one_line_error(capsys, model + ["--prompt", ""], "the prompt is empty")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    _one_line_error(capsys, model + ["--prompt-file", str(tmp_path / "binary.txt")], "not UTF-8")
    _one_line_error(capsys, model + ["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1")
    _one_line_error(capsys, model + ["--prompt", "hi", "--do-sample", "--temperature", "0"], "--temperature must be positive")
    _one_line_error(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist")


def test_generate_refuses_more_tokens_than_the_model_has_positions(capsys, tiny_llama_dir):
    _one_line_error(capsys, ["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "600"],
                    "exceeds the model's 512 positions")


def test_generate_on_a_plain_checkpoint(capsys, tiny_llama_dir):
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "Once upon", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "runtime stages none" in captured.err


def test_kernel_choices_come_from_the_kernel_registry(monkeypatch):
    from sparseforge.kernels import base

    class Fake(base.SparseKernel):
        name = "fake-kernel"

    monkeypatch.setitem(base.KERNELS, "fake-kernel", Fake())
    for command in ("eval", "run"):
        args = build_parser().parse_args([command, "--kernel", "fake-kernel"])
        assert args.kernel == "fake-kernel"
    assert sparseforge.methods.get_method("sparse-kernel").parse_params({"kernel": "fake-kernel"}).kernel == "fake-kernel"
    with pytest.raises(UserInputError, match="unknown sparse kernel 'nope'; choose one of 2:4, csr, fake-kernel"):
        base.get_kernel("nope")


def test_owl_and_dsnot_bases_come_from_the_method_registry():
    from sparseforge.methods import get_method
    from sparseforge.methods.weights.base import WeightPruner

    for name in ("owl", "dsnot"):
        choices = {row["name"]: row["choices"] for row in get_method(name).describe()}["base"]
        assert set(choices) == {"magnitude", "sparsegpt", "wanda"}  # dsnot wraps a pruner, so it is no base

    class Random(WeightPruner):
        name = "test-random-pruner"

        def score(self, weight, stats):
            return torch.rand_like(weight)

    register(Random)
    try:
        assert get_method("owl").parse_params({"base": "test-random-pruner"}).base == "test-random-pruner"
        assert get_method("dsnot").parse_params({"base": "test-random-pruner"}).base == "test-random-pruner"
    finally:
        REGISTRY.pop(Random.name)
    with pytest.raises(UserInputError, match="allowed: magnitude, sparsegpt, wanda"):
        get_method("owl").parse_params({"base": "test-random-pruner"})


def test_eval_runs_an_artifact_through_its_saved_kernel_stage_and_refuses_a_second(capsys, artifact, tmp_path):
    out = tmp_path / "m.json"
    assert main(["--quiet", "eval", "--model", str(artifact), "--tasks", "sparsity", "--json", str(out)]) == 0
    _one_line_error(capsys, ["eval", "--model", str(artifact), "--tasks", "sparsity", "--kernel", "csr"],
                    "one sparse-kernel stage per model")


def test_methods_lists_lifetimes_and_registry_choices(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "sparse-kernel  [kernels, runtime]" in out and "magnitude  [weights, transform]" in out
    assert "kernel: str = 'csr'" in out and "(one of 2:4, csr)" in out


@pytest.mark.parametrize("params, expected", [
    ("{kernel: dense}", "parameter 'kernel' of 'sparse-kernel' got 'dense'; allowed: 2:4, csr"),
    ("{token_counts: 5}", "got 5; expected a list"),
    ("{token_counts: [0, 8]}", "token_counts must be a non-empty list of positive integers"),
    ("{repeats: 0}", "repeats must be >= 1"),
    ("{margin: 1.5}", "margin 1.5 must be in [0, 1)"),
])
def test_sparse_kernel_params_are_checked_with_the_recipe_line(params, expected):
    with pytest.raises(UserInputError) as err:
        parse_recipe(f"stages:\n  - method: sparse-kernel\n    params: {params}\n", "r.yaml")
    assert str(err.value).startswith("r.yaml:3: ") and expected in str(err.value)


def test_compress_copies_a_model_with_hooks_attached_without_touching_it(tokenizer, offset_method):
    # compress copies the model with its runtime stages detached: a hook's closure is not deep-copied, so a
    # copied hook could still act on (or through) the original's modules.
    recipe = parse_recipe("stages:\n  - method: test-final-offset\n")
    model, _ = sparseforge.compress(tiny_model("llama"), recipe, tokenizer, progress=False)
    with_offset = _logits(model, IDS)
    magnitude = parse_recipe("stages:\n  - method: magnitude\n")
    again, _ = sparseforge.compress(model, magnitude, tokenizer, progress=False)
    assert torch.equal(_logits(model, IDS), with_offset) and len(sparseforge.runtime_stages(model)) == 1
    assert not again.model.norm._forward_hooks and not hasattr(again.model.norm, "test_offset")
    sparseforge.detach_runtime(model)
    magnitude_only, _ = sparseforge.compress(model, magnitude, tokenizer, progress=False)
    assert torch.equal(_logits(again, IDS), _logits(magnitude_only, IDS))


def test_state_tensors_that_share_storage_are_saved(tmp_path, tokenizer, offset_method, monkeypatch):
    base = torch.arange(12.0)

    def calibrate(self, model, context):
        return RuntimeState(tensors={"offset": torch.zeros(model.config.hidden_size), "a": base[:6], "b": base[6:]},
                            data={"hidden": model.config.hidden_size})

    monkeypatch.setattr(FinalOffset, "calibrate", calibrate)
    model, _ = sparseforge.compress(tiny_model("llama"), parse_recipe("stages:\n  - method: test-final-offset\n"), tokenizer, progress=False)
    sparseforge.save(model, tmp_path / "a", tokenizer)
    state = sparseforge.runtime_stages(sparseforge.load(tmp_path / "a"))[0].state
    assert torch.equal(state.tensors["a"], base[:6]) and torch.equal(state.tensors["b"], base[6:])
