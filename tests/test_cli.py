"""The `sparseforge` command line, called in-process through `sparseforge.cli.main` (plus two real
subprocess calls). Every model here is tiny; the bundled reference model is never evaluated."""
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import uuid

import pytest
import torch
import transformers

import sparseforge
from sparseforge.cli import main
from sparseforge.errors import UserInputError

torch.set_num_threads(1)

SCHEMA_KEYS = {"model", "recipe", "metrics", "environment", "timestamp"}


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def shared_tiny_dir(tmp_path_factory, tokenizer):
    """A read-only tiny Llama directory shared by the tests of this module (never written to)."""
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("shared") / "tiny-llama"
    tiny_model("llama").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def bin_only_dir(tmp_path, tokenizer):
    """A model directory with config.json and pickled pytorch_model.bin weights, no safetensors."""
    from tiny_models import tiny_model

    path = tmp_path / "bin-only"
    model = tiny_model("llama")
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    assert not list(path.glob("*.safetensors"))
    return path


@pytest.fixture
def restore_global_switches():
    """`--quiet` flips process-wide switches (TQDM_DISABLE, transformers' progress bars); put them back."""
    old_env = os.environ.get("TQDM_DISABLE")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    yield
    if old_env is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = old_env
    if bars:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()


def strays(path: pathlib.Path) -> list[str]:
    """Temporary siblings sparseforge may leave next to `path` (temp dirs, backups, write probes)."""
    parent = path.parent
    if not parent.is_dir():
        return []
    patterns = (f".{path.name}.sparseforge-*", ".probe.sparseforge-*")
    return sorted(str(p) for pattern in patterns for p in parent.glob(pattern))


def assert_user_error(capsys, argv, *phrases) -> str:
    """Exit status 2 and exactly one stderr line 'sparseforge: error: ...' containing every phrase."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert err.endswith("\n")
    line = lines[0]
    assert line.startswith("sparseforge: error: "), line
    for phrase in phrases:
        assert phrase.lower() in line.lower(), f"{phrase!r} not in {line!r}"
    return line


def assert_nothing_written(out: pathlib.Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert strays(out) == []


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


# ------------------------------------------------------------------------------------------ bad input

BAD_RECIPES = {
    "malformed-yaml": ("stages:\n  - method: magnitude\n    params: {sparsity: 0.5\n", ["malformed yaml"]),
    "unknown-method": ("stages:\n  - method: magnitud\n    params: {sparsity: 0.5}\n", ["unknown method 'magnitud'", "magnitude", "wanda", ":2:"]),
    "unknown-field": ("stages:\n  - method: magnitude\n    parms: {sparsity: 0.5}\n", ["unknown field 'parms'", ":3:"]),
    "unknown-param": ("stages:\n  - method: magnitude\n    params: {spars: 0.5}\n", ["unknown parameter 'spars'", "sparsity"]),
    "sparsity-1.0": ("stages:\n  - method: magnitude\n    params: {sparsity: 1.0}\n", ["sparsity 1.0", "outside [0, 1)"]),
    "sparsity-negative": ("stages:\n  - method: wanda\n    params: {sparsity: -0.1}\n", ["sparsity -0.1", "outside [0, 1)"]),
    "nm-4of4": ("stages:\n  - method: magnitude\n    params: {pattern: '4:4'}\n", ["pattern 4:4", "n < m"]),
}


@pytest.mark.parametrize("command", ["compress", "run"])
@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2_and_writes_nothing(capsys, tmp_path, shared_tiny_dir, command, case):
    text, phrases = BAD_RECIPES[case]
    recipe = tmp_path / "bad-recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    line = assert_user_error(capsys, [command, "--model", shared_tiny_dir, "--recipe", recipe, "--out", out], *phrases)
    assert "bad-recipe.yaml" in line  # the error names the file
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["compress", "run"])
def test_unknown_recipe_name(capsys, tmp_path, shared_tiny_dir, command):
    out = tmp_path / "out"
    assert_user_error(capsys, [command, "--model", shared_tiny_dir, "--recipe", "magnitude-60", "--out", out], "neither a yaml file nor a preset", "magnitude-50")
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["compress", "run"])
def test_missing_model_path(capsys, tmp_path, command):
    missing, out = tmp_path / "no-such-model", tmp_path / "out"
    assert_user_error(capsys, [command, "--model", missing, "--recipe", "magnitude-50", "--out", out], str(missing), "does not exist")
    assert_nothing_written(out)


def test_eval_missing_model(capsys, tmp_path):
    report = tmp_path / "R.json"
    assert_user_error(capsys, ["eval", "--model", tmp_path / "nope", "--tasks", "sparsity", "--json", report], "does not exist")
    assert not report.exists()
    assert list(tmp_path.glob(".R.json.*")) == []


def test_eval_missing_reference(capsys, tmp_path, shared_tiny_dir):
    report = tmp_path / "R.json"
    assert_user_error(capsys, ["eval", "--model", shared_tiny_dir, "--reference", tmp_path / "nope", "--tasks", "sparsity", "--json", report], "does not exist")
    assert not report.exists()


def test_eval_unknown_task(capsys, tmp_path, shared_tiny_dir):
    report = tmp_path / "R.json"
    assert_user_error(capsys, ["eval", "--model", shared_tiny_dir, "--tasks", "perplexity,perplexty", "--json", report], "unknown eval task", "perplexty")
    assert not report.exists()


def test_model_dir_without_config(capsys, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "out"
    assert_user_error(capsys, ["compress", "--model", empty, "--recipe", "magnitude-50", "--out", out], "config.json")
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["compress", "run"])
def test_out_under_a_regular_file(capsys, tmp_path, shared_tiny_dir, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    out = blocker / "out"
    assert_user_error(capsys, [command, "--model", shared_tiny_dir, "--recipe", "magnitude-50", "--out", out], "cannot write", "a-file")
    assert blocker.read_text() == "not a directory\n"
    assert_nothing_written(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("command", ["compress", "run"])
def test_out_under_proc(capsys, shared_tiny_dir, command):
    out = pathlib.Path("/proc") / f"sparseforge-test-{uuid.uuid4().hex[:8]}"
    if not pathlib.Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    assert_user_error(capsys, [command, "--model", shared_tiny_dir, "--recipe", "magnitude-50", "--out", out], "cannot write", "/proc")
    assert_nothing_written(out)


def test_existing_out_without_overwrite(capsys, tmp_path, shared_tiny_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    assert_user_error(capsys, ["compress", "--model", shared_tiny_dir, "--recipe", "magnitude-50", "--out", out], "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious\n"
    assert strays(out) == []


def test_existing_file_as_out_with_overwrite(capsys, tmp_path, shared_tiny_dir):
    out = tmp_path / "out"
    out.write_text("a file\n")
    assert_user_error(capsys, ["compress", "--model", shared_tiny_dir, "--recipe", "magnitude-50", "--out", out, "--overwrite"], "is a file")
    assert out.read_text() == "a file\n"
    assert strays(out) == []


@pytest.mark.parametrize("command", ["compress", "run"])
def test_pickled_weights_are_refused(capsys, tmp_path, bin_only_dir, monkeypatch, command):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a user path")

    monkeypatch.setattr(torch, "load", no_unpickling)
    out = tmp_path / "out"
    assert_user_error(capsys, [command, "--model", bin_only_dir, "--recipe", "magnitude-50", "--out", out], "no .safetensors weights", "unpickle")
    assert_nothing_written(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin-only"]


def test_model_without_linear_layers_is_refused(tokenizer):
    import sparseforge
    from tiny_models import tiny_model

    class NotLinear(torch.nn.Module):
        """Keeps a 2-D parameter like a projection would, but is not nn.Linear/Conv1D."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.detach().clone())
            self.out_features = linear.out_features

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.out_features)

    model = tiny_model("llama")
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent_name, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, leaf, NotLinear(mod))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    before = [p.detach().clone() for p in model.parameters()]

    with pytest.raises(UserInputError) as info:
        sparseforge.compress(model, "magnitude-50", tokenizer)
    message = str(info.value)
    assert "no linear layers" in message
    assert "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched


def test_real_entry_point_exit_status(tmp_path):
    script = pathlib.Path(sysconfig.get_path("scripts")) / "sparseforge"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "sparseforge"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [*cmd, "compress", "--model", str(tmp_path / "missing"), "--recipe", "magnitude-50", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sparseforge: error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "does not exist" in proc.stderr
    assert_nothing_written(out)

    ok = subprocess.run([sys.executable, "-m", "sparseforge", "methods"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "magnitude" in ok.stdout and "presets:" in ok.stdout


# ---------------------------------------------------------------------------------------------- methods


def test_methods_lists_methods_parameters_defaults_and_presets(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    blocks = {}
    current = None
    for line in lines:
        if line and not line.startswith(" ") and "[" in line:
            current = line.split()[0]
            blocks[current] = []
        elif current and line.startswith("    "):
            blocks[current].append(line.strip())
    assert {"magnitude", "wanda"} <= set(blocks)
    for name in ("magnitude", "wanda"):
        params = {row.split(":")[0]: row for row in blocks[name]}
        assert set(params) == {"sparsity", "pattern", "compare"}
        assert "= None" in params["sparsity"]
        assert "= 'unstructured'" in params["pattern"]
    assert "= 'matrix'" in {r.split(":")[0]: r for r in blocks["magnitude"]}["compare"]
    assert "= 'row'" in {r.split(":")[0]: r for r in blocks["wanda"]}["compare"]
    preset_line = [line for line in lines if line.startswith("presets:")]
    assert len(preset_line) == 1
    assert {"magnitude-50", "magnitude-2of4", "wanda-50"} <= {p.strip() for p in preset_line[0].split(":", 1)[1].split(",")}


# ------------------------------------------------------------------------------------- happy paths


def test_compress_then_eval_writes_schema_document(capsys, tmp_path, tiny_llama_dir):
    art, report = tmp_path / "X", tmp_path / "R.json"
    assert main(["compress", "--model", str(tiny_llama_dir), "--recipe", "magnitude-2of4", "--out", str(art)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "sparsity 0.500" in out
    assert (art / "sparseforge.json").is_file() and list(art.glob("*.safetensors"))
    assert strays(art) == []
    info = read_json(art / "sparseforge.json")
    assert info["recipe"]["name"] == "magnitude-2of4"
    assert info["metrics"]["sparsity"] == 0.5

    rc = main([
        "eval", "--model", str(art), "--reference", str(tiny_llama_dir),
        "--tasks", "perplexity,fidelity,sparsity,size", "--json", str(report), "--max-tokens", "200",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| metric |" in printed and "perplexity (held-out)" in printed

    doc = read_json(report)
    assert set(doc) == SCHEMA_KEYS
    assert doc["recipe"] == "magnitude-2of4"
    assert doc["model"] == str(art)
    metrics = doc["metrics"]
    for key in ("perplexity", "kl_to_reference", "top1_agreement", "sparsity", "size_bytes"):
        assert key in metrics, key
    assert metrics["sparsity"] == 0.5
    assert metrics["perplexity"] > 1 and metrics["kl_to_reference"] >= 0 and 0 <= metrics["top1_agreement"] <= 1
    assert metrics["perplexity_tokens_scored"] <= 200
    weights = sum(p.stat().st_size for p in art.glob("*.safetensors"))
    assert weights <= metrics["size_bytes"] <= sum(p.stat().st_size for p in art.iterdir())
    assert {"python", "torch", "transformers", "device"} <= set(doc["environment"])
    assert list(tmp_path.glob(".R.json.*")) == []

    # the written weights really satisfy 2:4 (two zeros in every four consecutive inputs)
    from safetensors.torch import load_file

    tensors = {}
    for f in art.glob("*.safetensors"):
        tensors.update(load_file(f))
    projections = {k: v for k, v in tensors.items() if k.startswith("model.layers.") and k.endswith("proj.weight")}
    assert len(projections) == 14
    for name, w in projections.items():
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros >= 2).all()), name


def test_overwrite_replaces_existing_artifact(capsys, tmp_path, shared_tiny_dir):
    art = tmp_path / "X"
    base = ["compress", "--model", str(shared_tiny_dir), "--out", str(art)]
    assert main([*base, "--recipe", "magnitude-50"]) == 0
    assert read_json(art / "sparseforge.json")["recipe"]["name"] == "magnitude-50"
    (art / "stale.txt").write_text("from before\n")

    assert main([*base, "--recipe", "magnitude-2of4"]) == 2  # no --overwrite: refused, untouched
    assert (art / "stale.txt").exists()
    assert read_json(art / "sparseforge.json")["recipe"]["name"] == "magnitude-50"

    assert main([*base, "--recipe", "magnitude-2of4", "--overwrite"]) == 0
    assert read_json(art / "sparseforge.json")["recipe"]["name"] == "magnitude-2of4"
    assert not (art / "stale.txt").exists()  # replaced, not merged
    assert strays(art) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]
    capsys.readouterr()


def test_run_writes_artifact_results_and_report(capsys, tmp_path, tiny_llama_dir):
    out = tmp_path / "D"
    assert main(["run", "--model", str(tiny_llama_dir), "--out", str(out), "--max-tokens", "200"]) == 0
    printed = capsys.readouterr().out

    assert sorted(p.name for p in out.iterdir()) == ["model", "plots", "report.html", "report.md", "results.json"]
    assert (out / "model" / "sparseforge.json").is_file()
    assert list((out / "model").glob("*.safetensors"))
    assert strays(out) == []

    docs = read_json(out / "results.json")
    assert isinstance(docs, list) and len(docs) == 2
    dense, comp = docs
    for doc in docs:
        assert set(doc) == SCHEMA_KEYS
        assert doc["metrics"]["perplexity_tokens_scored"] <= 200
        # tiny model with 512 positions: retrieval only at length 512, fidelity/memory windows capped at 512
        assert set(doc["metrics"]["passkey_by_length"]) == {"512"}
        assert set(doc["metrics"]["multikey_by_length"]) == {"512"}
        assert doc["metrics"]["memory_prompt_len"] <= 512
    assert dense["recipe"] is None and comp["recipe"] == "sparsegpt-50"
    assert dense["metrics"]["sparsity"] == 0.0 and comp["metrics"]["sparsity"] == 0.5
    assert "kl_to_reference" not in dense["metrics"] and "kl_to_reference" in comp["metrics"]
    assert comp["metrics"]["fidelity_seq_len"] <= 512

    report = (out / "report.md").read_text()
    assert "| metric | dense | sparsegpt-50 | ratio |" in report
    assert "| perplexity (held-out) |" in report
    assert "|---|" in report
    assert "| metric | dense | sparsegpt-50 | ratio |" in printed
    assert "| perplexity (held-out) |" in printed


def test_run_replaces_its_previous_output(capsys, tmp_path, shared_tiny_dir):
    out = tmp_path / "D"
    out.mkdir()
    (out / "old.txt").write_text("old run\n")
    (out / "results.json").write_text("[]\n")  # marks it as an earlier run's output
    assert main(["--quiet", "run", "--model", str(shared_tiny_dir), "--out", str(out), "--max-tokens", "100"]) == 0
    assert not (out / "old.txt").exists()
    assert len(json.loads((out / "results.json").read_text())) == 2
    assert strays(out) == []
    capsys.readouterr()


def test_run_refuses_to_replace_a_directory_that_is_not_a_run(capsys, tmp_path, shared_tiny_dir):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert_user_error(capsys, ["run", "--model", str(shared_tiny_dir), "--out", str(out)], "not the output of an earlier")
    assert (out / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("position", ["before", "after"])
def test_quiet_compress_prints_only_its_result(capsys, tmp_path, shared_tiny_dir, restore_global_switches, position):
    art = tmp_path / "X"
    args = ["compress", "--model", str(shared_tiny_dir), "--recipe", "magnitude-50", "--out", str(art)]
    argv = ["--quiet", *args] if position == "before" else [*args, "-q"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    # --quiet silences status lines and progress, not the result: one line saying what was written.
    assert len(out.splitlines()) == 1 and out.startswith(f"wrote {art}  (sparsity 0.500,"), out
    assert "compressing" not in out
    assert err == ""  # no progress bars either
    assert (art / "sparseforge.json").is_file()


# ------------------------------------------------------------------------- known bugs (see report)


def test_max_tokens_zero_is_rejected(capsys, shared_tiny_dir, monkeypatch):
    import sparseforge.eval.tasks as tasks

    real = tasks.perplexity

    def guarded(model, tokenizer, text, window, stride, max_tokens, batch_size):
        if max_tokens is None:  # the bug: 0 was silently turned into "no limit" (a ~75 s evaluation here)
            raise AssertionError("--max-tokens 0 was ignored")
        return real(model, tokenizer, text, window, stride, max_tokens, batch_size)

    monkeypatch.setattr(tasks, "perplexity", guarded)
    assert_user_error(capsys, ["eval", "--model", shared_tiny_dir, "--tasks", "perplexity", "--max-tokens", "0"], "max_tokens")


def test_retrieval_per_cell_flag(capsys, tmp_path, shared_tiny_dir):
    assert_user_error(capsys, ["eval", "--model", shared_tiny_dir, "--tasks", "passkey", "--retrieval-per-cell", "0"], "retrieval-per-cell")
    report = tmp_path / "r.json"
    assert main(["--quiet", "eval", "--model", str(shared_tiny_dir), "--tasks", "passkey", "--retrieval-per-cell", "3", "--json", str(report)]) == 0
    cells = read_json(report)["metrics"]["passkey_cells"]
    assert len(cells) == 5 and all(c["n"] == 3 for c in cells)  # one length (512 positions) x five depths


def test_eval_json_path_is_checked_before_evaluating(capsys, tmp_path, shared_tiny_dir, monkeypatch):
    import sparseforge.api

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking --json")

    monkeypatch.setattr(sparseforge.api, "evaluate", no_evaluation)
    assert_user_error(capsys, ["eval", "--model", shared_tiny_dir, "--tasks", "sparsity", "--json", tmp_path / "missing" / "R.json"], "cannot write")


def test_compact_compress_then_export_to_plain_checkpoint(capsys, tmp_path, shared_tiny_dir):
    compact, plain = tmp_path / "compact", tmp_path / "plain"
    assert main(["--quiet", "compress", "--model", str(shared_tiny_dir), "--recipe", "magnitude-2of4", "--out", str(compact), "--storage", "compact"]) == 0
    assert (compact / "sparseforge-weights.safetensors").is_file()
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(compact)  # plain transformers refuses, loudly
    assert main(["--quiet", "export", "--model", str(compact), "--dense", str(plain)]) == 0
    ids = torch.randint(0, 4000, (1, 8))
    a, b = sparseforge.load(compact), transformers.AutoModelForCausalLM.from_pretrained(plain).eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert json.loads((plain / "sparseforge.json").read_text())["recipe"]["name"] == "magnitude-2of4"
    assert_user_error(capsys, ["export", "--model", str(compact), "--dense", str(plain)], "already exists")


def test_eval_with_the_csr_kernel_routes_projections_and_keeps_perplexity(capsys, tmp_path, shared_tiny_dir):
    art = tmp_path / "m50"
    assert main(["--quiet", "compress", "--model", str(shared_tiny_dir), "--recipe", "magnitude-50", "--out", str(art)]) == 0
    plain, routed = tmp_path / "plain.json", tmp_path / "csr.json"
    assert main(["--quiet", "eval", "--model", str(art), "--tasks", "perplexity", "--max-tokens", "300", "--json", str(plain)]) == 0
    assert main(["--quiet", "eval", "--model", str(art), "--tasks", "perplexity", "--max-tokens", "300", "--kernel", "csr", "--json", str(routed)]) == 0
    a, b = read_json(plain)["metrics"], read_json(routed)["metrics"]
    assert "kernel" not in a and b["kernel"] == "csr" and b["kernel_projections"] == 14
    assert set(b["kernel_gate"]["timings"]) == {"64x64@0.50", "32x64@0.50", "128x64@0.50", "64x128@0.50"}
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-4)


def test_kernel_that_cannot_run_here_fails_before_loading(capsys, tmp_path, shared_tiny_dir, monkeypatch):
    import sparseforge.api
    from sparseforge.kernels.semi_structured import semi_structured_supported

    if semi_structured_supported():
        pytest.skip("2:4 kernels can run on this machine's GPU")

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking --kernel")

    monkeypatch.setattr(sparseforge.api, "load", no_loading)
    assert_user_error(capsys, ["eval", "--model", shared_tiny_dir, "--kernel", "2:4"], "--kernel 2:4 cannot run on cpu", "CUDA")
    out = tmp_path / "run"
    assert_user_error(capsys, ["run", "--model", shared_tiny_dir, "--out", out, "--kernel", "2:4"], "--kernel 2:4 cannot run on cpu")
    assert_nothing_written(out)


def test_run_with_the_csr_kernel_routes_only_the_compressed_model(capsys, tmp_path, shared_tiny_dir):
    out = tmp_path / "K"
    assert main(["--quiet", "run", "--model", str(shared_tiny_dir), "--recipe", "magnitude-50", "--out", str(out),
                 "--max-tokens", "100", "--kernel", "csr"]) == 0
    dense, comp = read_json(out / "results.json")
    assert "kernel" not in dense["metrics"]
    assert comp["metrics"]["kernel"] == "csr" and comp["metrics"]["kernel_projections"] == 14
    assert "through the 'csr' kernel" in (out / "report.md").read_text()
    saved = sparseforge.load(out / "model")  # the artifact holds plain nn.Linear weights
    assert all(type(m) is torch.nn.Linear for n, m in saved.named_modules() if n.endswith("_proj"))
