"""`sparseforge finetune`: artifact + JSON log + loss curve written atomically, checkpoints, evaluation, and
`--resume` after a real SIGKILL giving bit-identical final weights; one-line errors for bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import sparseforge
from sparseforge import api, cli
from sparseforge.core.masks import check_nm

RECIPE = """
name: wanda-24-then-{method}
stages:
  - method: wanda
    params: {{pattern: "2:4"}}
  - method: {method}
    params: {{steps: 6, batch_size: 2, seq_len: 32, warmup_steps: 1, lr: 0.01{extra}}}
calibration: {{samples: 2, seq_len: 32}}
"""
EXTRA = {"spiel": ", update_every: 3, swap: 0.5, density: 0.05", "lora": ", rank: 4"}


def _recipe(tmp_path, method="spiel"):
    path = tmp_path / f"{method}.yaml"
    path.write_text(RECIPE.format(method=method, extra=EXTRA.get(method, "")))
    return str(path)


def _weights(path):
    return {k: v.clone() for k, v in sparseforge.load(path).state_dict().items()}


def _finetune(*args):
    return cli.main(["--quiet", "--threads", "1", "finetune", *[str(a) for a in args]])


def test_finetune_writes_artifact_log_and_plot(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert _finetune("--model", tiny_llama_dir, "--recipe", _recipe(tmp_path, "lora"), "--out", out, "--eval-every", 3,
                     "--eval-tokens", 64, "--save-every", 2) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in log["evals"]] == [3, 6] and all(e["perplexity"] > 1 for e in log["evals"])
    assert all(e["tokens_per_s"] > 0 for e in log["steps"])
    assert log["mask_report"]["changed"] == 0 and log["declared_patterns"] == {"checked": 14, "failed": []}
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "sparseforge.json").read_text())
    assert [s["method"] for s in info["stages"]] == ["wanda", "lora"] and info["metrics"]["training"]["training"]["mask_changed"] == 0
    model = sparseforge.load(out)
    assert all(check_nm(m.weight, 2, 4) for n, m in model.named_modules() if n.endswith("_proj"))
    assert not api.checkpoint_dir_for(out).exists()  # checkpoints go once the output is written


# perp takes the same path as masked-finetune (plain parameters + AdamW state); lora adds PEFT's seeded
# initialisation, spiel its own state (indices, accumulated gradients).
@pytest.mark.parametrize("method", ["masked-finetune", "lora", "spiel"])
def test_stopped_and_resumed_run_is_bit_identical(tiny_llama_dir, tmp_path, method):
    recipe = _recipe(tmp_path, method)
    api.finetune(str(tiny_llama_dir), recipe, tmp_path / "a", progress=False)
    with pytest.raises(Exception) as stopped:
        api.finetune(str(tiny_llama_dir), recipe, tmp_path / "b", save_every=2, progress=False, _stop_after=5)
    assert type(stopped.value).__name__ == "Stopped" and not (tmp_path / "b").exists()
    api.finetune(str(tiny_llama_dir), recipe, tmp_path / "b", save_every=2, resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((tmp_path / "a" / "training_log.json").read_text())
    log_b = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert log_b["resumed_from"] == 4 and [e["loss"] for e in log_b["steps"]] == [e["loss"] for e in log_a["steps"]]


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from sparseforge import cli
    from sparseforge.methods.training import trainer

    real_step = trainer._step

    def step(work, optimizer, data, index, p):
        if index == 4:  # the checkpoint of step 4 is on disk: wait here to be killed in the middle of step 5
            print("READY", flush=True)
            time.sleep(600)
        return real_step(work, optimizer, data, index, p)

    trainer._step = step
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_sigkill_then_resume_gives_bit_identical_weights(tiny_llama_dir, tmp_path):
    recipe = _recipe(tmp_path, "spiel")
    args = ["--model", tiny_llama_dir, "--recipe", recipe, "--save-every", 2]
    assert _finetune(*args, "--out", tmp_path / "uninterrupted") == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, "--quiet", "--threads", "1", "finetune", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoints = api.checkpoint_dir_for(killed)
    assert not killed.exists() and [d.name for d in checkpoints.iterdir() if not d.name.startswith(".")] == ["step-000004"]
    assert _finetune(*args, "--out", killed, "--resume") == 0
    a, b = _weights(tmp_path / "uninterrupted"), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoints.exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must be 0"),
    (["--save-every", "-2"], "--save-every must be 0"),
    (["--eval-tokens", "1"], "--eval-tokens must be at least 2"),
    (["--data", "/nonexistent/text.txt"], "neither a bundled split"),
    (["--data", "heldout"], "held-out"),
    (["--resume"], "no complete checkpoint"),
    (["--device", "nonsense"], "is not a device"),
])
def test_bad_finetune_input_is_one_line(tiny_llama_dir, tmp_path, capsys, extra, message):
    rc = _finetune("--model", tiny_llama_dir, "--recipe", _recipe(tmp_path, "perp"), "--out", tmp_path / "out", *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_finetune_refuses_recipes_without_one_training_stage_and_stale_checkpoints(tiny_llama_dir, tmp_path, capsys):
    assert _finetune("--model", tiny_llama_dir, "--recipe", "wanda-50", "--out", tmp_path / "out") == 2
    assert "0 training stages" in capsys.readouterr().err
    from sparseforge.data import HELDOUT_TEXT

    assert _finetune("--model", tiny_llama_dir, "--recipe", _recipe(tmp_path, "perp"), "--out", tmp_path / "o", "--data", HELDOUT_TEXT) == 2
    assert "held-out" in capsys.readouterr().err
    api.checkpoint_dir_for(tmp_path / "out").mkdir()
    (api.checkpoint_dir_for(tmp_path / "out") / "step-000002").mkdir()
    assert _finetune("--model", tiny_llama_dir, "--recipe", _recipe(tmp_path, "perp"), "--out", tmp_path / "out") == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tiny_llama_dir, tmp_path):
    recipe = _recipe(tmp_path, "perp")
    with pytest.raises(Exception):
        api.finetune(str(tiny_llama_dir), recipe, tmp_path / "b", save_every=2, progress=False, _stop_after=3)
    with pytest.raises(sparseforge.UserInputError, match="different run"):
        api.finetune(str(tiny_llama_dir), recipe, tmp_path / "b", steps=8, resume=True, progress=False)
