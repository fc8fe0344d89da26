"""The lm-evaluation-harness bridge, offline over the local YAML tasks in tests/data/lm_eval_task: lm-eval's
metrics land in the results document of a compressed model, agree with our own scoring of the same choices,
and see the runtime stages attached to the model."""
import json
import math
import pathlib

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'sparseforge[eval]')")

from sparseforge import api  # noqa: E402
from sparseforge.cli import main  # noqa: E402
from sparseforge.eval.tasks import EvalContext, run_tasks  # noqa: E402

torch.set_num_threads(1)
TASKS_DIR = pathlib.Path(__file__).parent / "data" / "lm_eval_task"
DOCS = [json.loads(line) for line in (TASKS_DIR / "docs.jsonl").read_text().splitlines() if line.strip()]


def _reference_accuracy(model, tokenizer) -> float:
    """Multiple-choice accuracy scored by hand: the summed log-probability of each choice's tokens after the
    context (tokens of context + ' ' + choice beyond those of the context), the highest one picked."""
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["context"] + " " + choice, add_special_tokens=False)["input_ids"]
                continuation = whole[len(context):]
                logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
                scores.append(sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
            correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(DOCS)


def test_lm_eval_task_on_a_compressed_model(tmp_path, capsys):
    artifact, out = tmp_path / "model", tmp_path / "results.json"
    assert main(["--quiet", "compress", "--recipe", "magnitude-50", "--out", str(artifact)]) == 0
    rc = main(["--quiet", "eval", "--model", str(artifact), "--tasks", "lm-eval:sparseforge_tiny_mc,sparsity",
               "--lm-eval-include", str(TASKS_DIR), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    metrics = doc["metrics"]
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)  # the compressed model, and sparseforge's own tasks beside
    assert metrics["lm_eval_samples"] == {"sparseforge_tiny_mc": len(DOCS)}
    model, tokenizer = api.load(artifact), api.load_tokenizer(artifact)
    assert metrics["lm_eval/sparseforge_tiny_mc/acc"] == pytest.approx(_reference_accuracy(model, tokenizer))


def test_lm_eval_sees_runtime_stages(tokenizer, tiny_llama_dir):
    from sparseforge.core.calibration import CalibrationConfig

    model = api.load(tiny_llama_dir)
    settings = {"lm_eval_include_path": str(TASKS_DIR)}
    task = ["lm-eval:sparseforge_tiny_ppl"]
    dense = run_tasks(EvalContext(model, tokenizer, settings=settings), task)
    # The reference kernel and a small calibration keep this test short; the stage acts in every forward.
    api.attach_method(model, "teal", {"sparsity": 0.5, "kernel": "reference"}, tokenizer=tokenizer,
                      calibration=CalibrationConfig(samples=2, seq_len=64))
    sparse = run_tasks(EvalContext(model, tokenizer, settings=settings), task)
    api.detach_runtime(model)
    again = run_tasks(EvalContext(model, tokenizer, settings=settings), task)
    key = "lm_eval/sparseforge_tiny_ppl/byte_perplexity"
    assert math.isfinite(dense[key]) and sparse[key] != dense[key]  # TEAL's activation sparsity acted inside lm-eval
    assert again[key] == dense[key]


def test_lm_eval_unknown_task_is_one_line(capsys):
    rc = main(["eval", "--tasks", "lm-eval:no_such_task", "--lm-eval-include", str(TASKS_DIR)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "no_such_task" in err, err
    rc = main(["eval", "--tasks", "lm-eval:", "--lm-eval-include", str(TASKS_DIR)])
    assert rc == 2 and "unknown eval task" in capsys.readouterr().err
