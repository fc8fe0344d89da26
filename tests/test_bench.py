"""`sparseforge bench`: one store, resumable after a real SIGKILL, bad input refused in one line; the store's
torn-line handling; the EfficientLLM metrics' energy and FLOP counters."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparseforge.cli import main
from sparseforge.errors import EXIT_USER_ERROR, UserInputError
from sparseforge.eval.store import STORE_FILE, append_record, read_records

torch.set_num_threads(1)

RECIPES = "magnitude-50,magnitude-2of4,snapkv-75"
# Tiny evaluation settings: every task's code path runs, in seconds.
TINY = ["--tasks", "perplexity,passkey,sparsity,size,speed,efficiency", "--max-tokens", "256", "--retrieval-per-cell", "1",
        "--set", "retrieval_lengths=[64,128]", "--set", "retrieval_depths=[0.0,1.0]", "--set", "efficiency_lengths=[32,64]",
        "--set", "efficiency_new_tokens=4", "--set", "efficiency_repeats=1", "--set", "efficiency_max_batch=2",
        "--set", "speed_prompt_len=32", "--set", "speed_new_tokens=4", "--set", "speed_repeats=1"]


def _lines(path):
    return [line for line in path.read_bytes().split(b"\n") if line.strip()]


def test_bench_resumes_after_sigkill(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "sweep"
    argv = ["--threads", "1", "--quiet", "bench", "--model", str(tiny_llama_dir), "--recipes", RECIPES, "--out", str(out), *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparseforge", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = out / STORE_FILE
    deadline = time.time() + 240
    try:
        # Kill once two records (dense and the first recipe) are on disk and the sweep is still going.
        while time.time() < deadline and proc.poll() is None and not (store.is_file() and len(_lines(store)) >= 2):
            time.sleep(0.05)
        assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = store.read_bytes()
    done = [json.loads(line) for line in _lines(store) if line.endswith(b"}")]
    done = [r for r in done if isinstance(r, dict)]
    assert 2 <= len(done) < 4
    finished = {r["recipe"] or "dense" for r in done}

    assert main(argv) == 0
    printed = capsys.readouterr().out
    records = read_records(out)
    labels = sorted(r["recipe"] or "dense" for r in records)
    assert labels == sorted(["dense", *RECIPES.split(",")])
    assert len({r["record_key"] for r in records}) == 4
    # Only the missing recipes were computed: the finished records are byte for byte where they were.
    complete = before[: before.rfind(b"\n") + 1]
    assert store.read_bytes().startswith(complete)
    assert f"{len(finished)} skipped" in printed and f"{4 - len(finished)} computed" in printed
    assert (out / "report.html").is_file() and (out / "leaderboard.csv").is_file()
    # No scratch artifact of the killed run is left behind.
    assert not [p for p in out.iterdir() if ".sparseforge-" in p.name]

    # A third run recomputes nothing; --force recomputes one (the store keeps one record per key).
    assert main(argv) == 0
    assert "0 computed, 4 skipped" in capsys.readouterr().out
    snapkv = next(r for r in records if r["recipe"] == "snapkv-75")
    assert snapkv["metrics"]["mem_kv_cache_bytes"] < snapkv["metrics"]["mem_kv_cache_full_bytes"]
    assert snapkv["stages"][0]["family"] == "kv"
    assert snapkv["settings"]["eval"]["efficiency_lengths"] == [32, 64]
    assert set(snapkv["metrics"]["latency_by_length"]) == {"32", "64"}


@pytest.mark.parametrize("extra, phrase", [
    (["--recipes", "no-such-preset"], "neither a YAML file nor a preset"),
    (["--recipes", ""], "--recipes is empty"),
    (["--recipes", "magnitude-50", "--set", "nonsense"], "--set takes KEY=VALUE"),
    (["--recipes", "magnitude-50", "--set", "no_such_setting=1"], "unknown eval settings"),
    (["--recipes", "magnitude-50", "--tasks", "perplexity,bogus"], "unknown eval task"),
    (["--recipes", "magnitude-50,magnitude-50"], "repeat"),
])
def test_bench_bad_input_one_line(tmp_path, capsys, extra, phrase):
    rc = main(["bench", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR, err
    assert len(err.splitlines()) == 1 and phrase in err, err
    assert not (tmp_path / "o").exists()


def test_bench_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc = main(["bench", "--recipes", "magnitude-50", "--out", str(tmp_path / "mine")])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and "holds no results.jsonl" in err
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_store_skips_a_torn_last_line_and_appends_after_it(tmp_path):
    append_record(tmp_path, {"record_key": "a", "metrics": {"x": 1}})
    with open(tmp_path / STORE_FILE, "ab") as f:
        f.write(b'{"record_key": "b", "metr')  # what SIGKILL in the middle of a write can leave
    assert [r["record_key"] for r in read_records(tmp_path)] == ["a"]
    append_record(tmp_path, {"record_key": "c", "metrics": {"x": 3}})
    assert [r["record_key"] for r in read_records(tmp_path)] == ["a", "c"]
    assert (tmp_path / STORE_FILE).read_text().count("\n") == 2
    (tmp_path / STORE_FILE).write_text('{"record_key": "a", "metrics": {}}\nnot json\n{"record_key": "c", "metrics": {}}\n')
    with pytest.raises(UserInputError, match="line 2 is not a JSON record"):
        read_records(tmp_path)


def test_energy_meter_reads_rapl_and_undoes_a_wrap(tmp_path):
    from sparseforge.eval.efficientllm import EnergyMeter

    assert EnergyMeter(root=str(tmp_path)).source.startswith("unavailable: no RAPL domains")
    domain = tmp_path / "intel-rapl:0"
    sub = tmp_path / "intel-rapl:0:0"  # a subdomain: part of the package's total, not added again
    for d in (domain, sub):
        d.mkdir()
        (d / "name").write_text("package-0\n" if d == domain else "core\n")
        (d / "max_energy_range_uj").write_text("1000000\n")
        (d / "energy_uj").write_text("999000\n")
    meter = EnergyMeter(root=str(tmp_path))
    assert meter.source == "rapl:package-0"
    def work():
        (domain / "energy_uj").write_text("4000\n")
        return "ran"

    result, joules = meter.measure(work)
    assert result == "ran" and joules == pytest.approx(0.005)  # 999000 -> wrap at 1e6 -> 4000: 5000 uJ
    unavailable = EnergyMeter(root=str(tmp_path / "none"))
    assert unavailable.measure(lambda: 1) == (1, None)


def test_forward_flops_and_memory_bytes_are_exact():
    from sparseforge.eval.efficientllm import forward_flops, model_memory_bytes

    layer = torch.nn.Linear(64, 32)
    _, flops = forward_flops(lambda: layer(torch.randn(5, 64)))
    assert flops == 2 * 5 * 64 * 32
    tied = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert model_memory_bytes(tied) == 8 * 8 * 4
