"""Data safety and bad-input hardening (issue 9): every case a hostile or unlucky user can cause ends in exit 2
(bad input) or 3 (the machine: disk full, memory) with one stderr line, the input untouched and nothing left
behind. Each test snapshots the files it cares about before and compares after."""
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparseforge.cli import main
from sparseforge.errors import EXIT_ENVIRONMENT, EXIT_USER_ERROR

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tokenizer):
    """A tiny Llama directory (weights, tokenizer); tests copy it, never write to it."""
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("pristine") / "tiny-llama"
    tiny_model("llama").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path, pristine):
    """A private copy of the tiny model, with a user's notes file beside the weights."""
    path = tmp_path / "user-model"
    shutil.copytree(pristine, path)
    (path / "notes.txt").write_text("my notes\n")
    return path


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """Every file below root (hidden ones too) with a hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys, argv, code=EXIT_USER_ERROR, *phrases) -> str:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("sparseforge: error: "), lines[0]
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), f"{phrase!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------ 1. inputs are never destroyed


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
@pytest.mark.parametrize("command", ["compress", "export", "run"])
def test_out_may_not_be_inside_or_contain_the_input(capsys, tmp_path, model_dir, command, where, overwrite):
    (tmp_path / "sibling.txt").write_text("a sibling\n")
    out = {"same": model_dir, "inside": model_dir / "sub", "parent": tmp_path}[where]
    before = snapshot(tmp_path)
    flag = "--dense" if command == "export" else "--out"
    argv = [command, "--model", model_dir, flag, out] + (["--recipe", "magnitude-50"] if command != "export" else [])
    argv += ["--overwrite"] if overwrite and command != "run" else []
    line = one_error_line(capsys, argv, EXIT_USER_ERROR, "input model", str(model_dir), flag)
    assert str(out) in line  # the error names both paths
    assert snapshot(tmp_path) == before  # nothing changed, nothing added (no stray temporary folders either)


@pytest.mark.parametrize("where", ["out-is-scratch", "out-contains-scratch", "scratch-inside-model"])
def test_offload_dir_may_not_overlap(capsys, tmp_path, model_dir, where):
    scratch = {"out-is-scratch": tmp_path / "scratch", "out-contains-scratch": tmp_path / "work" / "scratch",
               "scratch-inside-model": model_dir / "scratch"}[where]
    out = {"out-is-scratch": scratch, "out-contains-scratch": tmp_path / "work", "scratch-inside-model": tmp_path / "out"}[where]
    scratch.mkdir(parents=True)
    (scratch / "keep.bin").write_bytes(b"x" * 10)
    before = snapshot(tmp_path)
    one_error_line(capsys, ["compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", out, "--overwrite",
                            "--offload-dir", scratch], EXIT_USER_ERROR, str(scratch))
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_earlier_outputs(capsys, tmp_path, model_dir):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work\n")
    one_error_line(capsys, ["compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", precious, "--overwrite"],
                   EXIT_USER_ERROR, "not an earlier sparseforge output", "--overwrite")
    assert (precious / "thesis.tex").read_text() == "years of work\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "magnitude-50", "--out", str(empty), "--overwrite"]) == 0
    assert (empty / "sparseforge.json").is_file()
    # ...and an earlier artifact is replaced as before.
    assert main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "magnitude-2of4", "--out", str(empty), "--overwrite"]) == 0
    assert json.loads((empty / "sparseforge.json").read_text())["recipe"]["name"] == "magnitude-2of4"
    capsys.readouterr()


def test_api_save_refuses_the_models_own_directory(tmp_path, model_dir):
    import sparseforge
    from sparseforge.errors import UserInputError

    model = sparseforge.load(model_dir)
    before = snapshot(model_dir)
    with pytest.raises(UserInputError, match="input model"):
        sparseforge.save(model, model_dir, overwrite=True)
    with pytest.raises(UserInputError, match="contains the input model"):
        sparseforge.save(model, tmp_path, overwrite=True)
    assert snapshot(model_dir) == before


# ------------------------------------------------------ 2. temporary folders clean up after themselves


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folder_of_a_dead_process_is_removed_with_one_line(capsys, tmp_path, model_dir):
    out = tmp_path / "art"
    stale = tmp_path / f".art.sparseforge-tmp-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    alive = tmp_path / f".art.sparseforge-tmp-{os.getpid()}-live00"  # a live process's folder is left alone
    alive.mkdir()
    unrelated = tmp_path / ".art.backup"
    unrelated.mkdir()
    assert main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "magnitude-50", "--out", str(out)]) == 0
    _, err = capsys.readouterr()
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert err.count("\n") == 1 and "removed 1 temporary folder" in err and stale.name in err


def test_sigkill_leaves_a_recognisable_folder_that_the_next_run_removes(tmp_path, model_dir):
    out = tmp_path / "art"
    slow = (
        "import sys, time, sparseforge.formats.artifact as a\n"
        "orig = a._compact_weights\n"
        "def stall(*args, **kw):\n"
        "    print('inside', flush=True); time.sleep(60)\n"
        "a._compact_weights = stall\n"
        "from sparseforge.cli import main\n"
        f"main(['--quiet', 'compress', '--model', {str(model_dir)!r}, '--recipe', 'magnitude-50', '--out', {str(out)!r}, '--storage', 'compact'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "inside"  # the temporary folder exists now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")]
    assert len(left) == 1 and left[0].startswith(f".art.sparseforge-tmp-{proc.pid}-")
    done = subprocess.run([sys.executable, "-m", "sparseforge", "--quiet", "compress", "--model", str(model_dir), "--recipe",
                           "magnitude-50", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")] == []
    assert "removed 1 temporary folder" in done.stderr and left[0] in done.stderr
    assert (out / "sparseforge.json").is_file()


# ------------------------------------------------------------------- 3. corrupt weights, one line


def _corrupt(path: pathlib.Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "header-bitflip":
        flipped = bytearray(data)
        flipped[8] ^= 0x40  # the JSON header's opening brace
        path.write_bytes(bytes(flipped))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "random", "header-bitflip", "empty"])
@pytest.mark.parametrize("command", ["compress", "eval", "offload"])
def test_corrupt_safetensors_is_one_line_naming_the_file(capsys, tmp_path, model_dir, command, how):
    weights = model_dir / "model.safetensors"
    _corrupt(weights, how)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    argv = {"compress": ["compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", out],
            "eval": ["eval", "--model", model_dir, "--tasks", "sparsity"],
            "offload": ["compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", out, "--offload-dir", tmp_path / "scratch"]}[command]
    one_error_line(capsys, argv, EXIT_USER_ERROR, str(weights), "safetensors", "again")
    assert snapshot(tmp_path) == before
    assert not out.exists() and not (tmp_path / "scratch").exists()


@pytest.mark.parametrize("how", ["truncated", "random"])
def test_corrupt_compact_artifact_is_one_line(capsys, tmp_path, model_dir, how):
    art = tmp_path / "compact"
    assert main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "magnitude-50", "--out", str(art), "--storage", "compact"]) == 0
    capsys.readouterr()
    _corrupt(art / "sparseforge-weights.safetensors", how)
    one_error_line(capsys, ["eval", "--model", art, "--tasks", "sparsity"], EXIT_USER_ERROR, "sparseforge-weights.safetensors")
    one_error_line(capsys, ["export", "--model", art, "--dense", tmp_path / "plain"], EXIT_USER_ERROR, "sparseforge-weights.safetensors")
    assert not (tmp_path / "plain").exists()


# ------------------------------------------------------------------------------- 3. a full disk


@contextlib.contextmanager
def small_filesystem(path: pathlib.Path, size_kb: int):
    """A real tmpfs of `size_kb` at `path` (root only); skip where mounting is not allowed."""
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_is_refused_before_writing_with_the_bytes_needed(capsys, tmp_path, model_dir):
    with small_filesystem(tmp_path / "small", 256) as small:
        line = one_error_line(capsys, ["compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", small / "art"],
                              EXIT_ENVIRONMENT, "not enough space", str(small), "MB needed", "MB free")
        assert "nothing was written" in line
        assert list(small.iterdir()) == []


def test_disk_full_while_writing_leaves_nothing(capsys, tmp_path, model_dir, monkeypatch):
    import sparseforge.formats.output as output

    # The free-space check passes (as it can when another process fills the disk meanwhile), the write fails.
    monkeypatch.setattr(output, "free_bytes", lambda directory: 1 << 40)
    with small_filesystem(tmp_path / "small", 512) as small:
        one_error_line(capsys, ["--quiet", "compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", small / "art"],
                       EXIT_ENVIRONMENT, "not enough space", "nothing was written")
        assert list(small.iterdir()) == []


def test_disk_full_in_the_offload_scratch_leaves_nothing(capsys, tmp_path, model_dir, monkeypatch):
    with small_filesystem(tmp_path / "small", 128) as small:
        out = tmp_path / "out"
        one_error_line(capsys, ["--quiet", "compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", out,
                                "--offload-dir", small / "scratch"], EXIT_ENVIRONMENT, "not enough space")
        assert list(small.iterdir()) == []  # the scratch folder the run created is gone too
        assert not out.exists()


# --------------------------------------------------------------------- 3. memory, custom code, tasks


def test_calibration_that_cannot_fit_in_memory_is_refused_with_the_number(capsys, tmp_path, model_dir):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("stages:\n  - method: wanda\ncalibration: {samples: 1000000000}\n")
    start = time.perf_counter()
    line = one_error_line(capsys, ["compress", "--model", model_dir, "--recipe", recipe, "--out", tmp_path / "out"],
                          EXIT_USER_ERROR, "GB of activations", "samples=1000000000", "available", "lower calibration samples")
    assert time.perf_counter() - start < 30  # refused up front, not after filling memory
    assert "266240.00 GB" in line  # 1e9 x 512 tokens x (64 hidden x 4 bytes x 2 copies + 8 bytes of token id) = 520 B each
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("command", ["compress", "eval", "run"])
def test_custom_code_is_refused_without_trust_remote_code_and_never_run(capsys, tmp_path, model_dir, command, config_file):
    marker = tmp_path / "CODE-WAS-RUN"
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((model_dir / config_file).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel", "AutoTokenizer": ["evil.Tok", None]}
    (model_dir / config_file).write_text(json.dumps(cfg))
    argv = {"compress": ["compress", "--model", model_dir, "--recipe", "magnitude-50", "--out", tmp_path / "out"],
            "eval": ["eval", "--model", model_dir, "--tasks", "sparsity"],
            "run": ["run", "--model", model_dir, "--out", tmp_path / "out"]}[command]
    one_error_line(capsys, argv, EXIT_USER_ERROR, "custom python code", "--trust-remote-code", config_file)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("tasks", ["", ",", " , "])
def test_empty_task_list_is_refused(capsys, pristine, tasks):
    one_error_line(capsys, ["eval", "--model", pristine, "--tasks", tasks], EXIT_USER_ERROR, "--tasks is empty")


def test_internal_error_is_one_line_and_debug_shows_the_traceback(capsys, pristine, monkeypatch):
    import sparseforge.api

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(sparseforge.api, "evaluate", broken)
    assert main(["eval", "--model", str(pristine), "--tasks", "sparsity"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["sparseforge: internal error: RuntimeError: something inside broke; rerun with --debug for the traceback and report it"]
    assert main(["--debug", "eval", "--model", str(pristine), "--tasks", "sparsity"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("sparseforge: internal error:")


# ------------------------------------------------------------ 5. quiet, modes, compact, tokenizer


def test_quiet_eval_still_prints_the_results_table(capsys, pristine):
    assert main(["--quiet", "eval", "--model", str(pristine), "--tasks", "sparsity"]) == 0
    out, err = capsys.readouterr()
    assert "| weight sparsity (targeted) | 0.000 |" in out and err == ""


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_artifact_files_follow_the_umask(tmp_path, model_dir, mask, capsys):
    old = os.umask(mask)
    try:
        out = tmp_path / "art"
        assert main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "magnitude-50", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and all(m == 0o666 & ~mask for m in modes.values()), modes
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_plain_transformers_on_a_compact_artifact_says_what_it_is(tmp_path, model_dir, capsys):
    from transformers import AutoModelForCausalLM

    art = tmp_path / "compact"
    assert main(["--quiet", "compress", "--model", str(model_dir), "--recipe", "magnitude-50", "--out", str(art), "--storage", "compact"]) == 0
    with pytest.raises(OSError) as info:
        AutoModelForCausalLM.from_pretrained(art)
    assert "SPARSEFORGE-COMPACT-ARTIFACT" in str(info.value) and "sparseforge-export" in str(info.value)
    assert "sparseforge export" in (art / "README.md").read_text()
    import sparseforge

    assert sparseforge.load(art) is not None  # sparseforge itself still loads it


def test_save_without_a_tokenizer_copies_the_sources(tmp_path, model_dir, capsys):
    import sparseforge

    model = sparseforge.load(model_dir)
    sparseforge.save(model, tmp_path / "art")  # no tokenizer given
    assert (tmp_path / "art" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert main(["--quiet", "eval", "--model", str(tmp_path / "art"), "--tasks", "perplexity", "--max-tokens", "256"]) == 0


def test_eval_of_an_artifact_without_any_tokenizer(tmp_path, model_dir, capsys):
    import sparseforge

    model = sparseforge.load(model_dir)
    model.sparseforge_source = None  # the source is unknown: nothing to copy
    sparseforge.save(model, tmp_path / "art")
    assert not (tmp_path / "art" / "tokenizer.json").exists()
    assert main(["--quiet", "eval", "--model", str(tmp_path / "art"), "--tasks", "sparsity,size"]) == 0  # needs none
    capsys.readouterr()
    one_error_line(capsys, ["eval", "--model", tmp_path / "art", "--tasks", "perplexity"], EXIT_USER_ERROR, "no tokenizer files", "--tokenizer")
    assert main(["--quiet", "eval", "--model", str(tmp_path / "art"), "--tokenizer", str(model_dir), "--tasks", "perplexity", "--max-tokens", "256"]) == 0


def test_speed_ratios_inside_the_spread_are_not_called_a_difference():
    from sparseforge.cli import side_by_side, speed_note

    dense = {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 100.0, "speed_prefill_spread": 0.10, "speed_decode_spread": 0.02,
             "speed_repeats": 3, "speed_warmup": 1}
    comp = {"prefill_tokens_per_s": 1150.0, "decode_tokens_per_s": 150.0, "speed_prefill_spread": 0.10, "speed_decode_spread": 0.02}
    table = side_by_side({"dense": dense, "c": comp})
    assert "| prefill tokens/s | 1000 | 1150 | 1.15x (no measurable difference) |" in table
    assert "| decode tokens/s | 100.0 | 150.0 | 1.50x |" in table
    assert "medians of 3 repeats" in speed_note(dense)


def test_auto_threads_leaves_busy_cores_alone(capsys):
    from sparseforge.cli import auto_threads

    from sparseforge.cli import busy_cores

    assert auto_threads(cores=2, busy=0.1) == 2
    assert auto_threads(cores=2, busy=1.0) == 1  # one core kept busy by another process
    assert auto_threads(cores=2, busy=7.0) == 1  # never fewer than one
    assert auto_threads(cores=16, busy=3.4) == 13
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = busy_cores(0.5)
    finally:
        burner.kill()
    assert busy is None or busy >= 0.8  # the busy loop shows up as (at least) one busy core
    one_error_line(capsys, ["--threads", "zero", "methods"], EXIT_USER_ERROR, "--threads must be a positive integer")
