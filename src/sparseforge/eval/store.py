"""One results store per sweep directory: `results.jsonl`, one results document per line.

Why JSON lines and not SQLite: a record is the nested results document every command already writes (metrics
with per-length tables, environment, stages), which SQLite would hold as JSON text anyway; appending one line
is a single write() of a complete record, so a sweep killed with SIGKILL leaves every finished record intact and
at most one torn last line, which `read_records` skips (and `append_record` cuts off before writing); and the
file reads with `jq`, pandas (`read_json(lines=True)`) or a text editor.

A record's identity is (model, recipe, task settings, machine), hashed into `record_key`: the same sweep run
again on the same machine finds its records and skips them; other settings or another machine add records
beside them.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

from sparseforge.errors import UserInputError

STORE_FILE = "results.jsonl"
SCHEMA = "sparseforge.results/1"
# The environment fields that name the machine a number was measured on.
MACHINE_FIELDS = ("cpu", "cpu_count", "device", "torch", "platform")


def machine_id(environment: dict) -> dict:
    return {k: environment.get(k) for k in MACHINE_FIELDS}


def record_key(model: str, recipe: str | None, settings: dict, environment: dict) -> str:
    """A stable hash of what a record measured: model, recipe, task settings (tasks included), machine."""
    identity = {"model": model, "recipe": recipe, "settings": settings, "machine": machine_id(environment)}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def store_path(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory) / STORE_FILE


def read_records(directory_or_file: str | os.PathLike) -> list[dict]:
    """Every complete record of a store (a sweep directory or the .jsonl file itself); a torn last line, which a
    killed writer can leave, is skipped. Later records with the same key replace earlier ones (--force)."""
    path = pathlib.Path(directory_or_file)
    if path.is_dir():
        path = path / STORE_FILE
    if not path.is_file():
        raise UserInputError(f"no results store at '{path}'; run `sparseforge bench --out DIR` first, or pass a DIR that has {STORE_FILE}")
    by_key: dict[str, dict] = {}
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a torn last line (no newline yet): an interrupted append
                continue
            raise UserInputError(f"'{path}' line {number} is not a JSON record; the store is damaged (edit or remove that line)") from None
        if not isinstance(record, dict) or "metrics" not in record:
            raise UserInputError(f"'{path}' line {number} is not a results record (no 'metrics'); is this a sparseforge store?")
        by_key[record.get("record_key") or f"line-{number}"] = record
    return list(by_key.values())


def append_record(directory: str | os.PathLike, record: dict) -> None:
    """Append one record as one line, flushed to disk before returning. A torn line left by a killed writer is
    cut off first, so the new record starts on a line of its own."""
    path = store_path(directory)
    line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
                f.seek(0, os.SEEK_END)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
