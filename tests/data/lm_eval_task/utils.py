"""Datasets of the tiny local lm-eval tasks, read from docs.jsonl beside this file (no hub access)."""
import json
import pathlib

import datasets

_DOCS = pathlib.Path(__file__).with_name("docs.jsonl")


def _rows():
    return [json.loads(line) for line in _DOCS.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_mc(**kwargs):
    rows = [{"context": r["context"], "choices": r["choices"], "answer": r["answer"]} for r in _rows()]
    return {"test": datasets.Dataset.from_list(rows)}


def load_ppl(**kwargs):
    return {"test": datasets.Dataset.from_list([{"passage": r["context"] + " " + r["choices"][r["answer"]]} for r in _rows()])}
