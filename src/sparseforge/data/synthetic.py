"""Seeded synthetic long-context retrieval episodes: a passkey, or RULER-style key-value pairs, planted at a
chosen depth in filler text and asked for at the end.

Episodes are built from token ids so that their length in tokens is exact. Each piece that is tokenized on
its own starts with a newline, which is where BPE splits anyway, so training and evaluation see the same ids.
The model is scored on the answer tokens only.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

_KEY_WORDS_A = (
    "amber", "bitter", "crimson", "distant", "gentle", "hollow", "ivory", "jolly", "silver", "lonely", "merry",
    "noble", "olive", "proud", "quiet", "rusty", "swift", "tawny", "velvet", "wicked", "golden", "pale",
)
_KEY_WORDS_B = (
    "falcon", "castle", "dagger", "lantern", "meadow", "raven", "tower", "willow", "crown", "harbor", "garden",
    "bridge", "candle", "forest", "mirror", "oak", "river", "sparrow", "thistle", "violet", "anchor", "bell",
)


@dataclasses.dataclass(frozen=True)
class Episode:
    """One retrieval episode. The answer to score is `input_ids[answer_start:answer_end]`; evaluation
    episodes end with it. Training episodes may ask further questions, whose answer spans are `extra_answers`."""

    input_ids: list[int]
    answer_start: int
    answer_end: int
    answer: str
    kind: str
    depth: float
    extra_answers: tuple[tuple[int, int], ...] = ()
    question_start: int = -1  # where the question begins (question-agnostic evaluation compresses what precedes it)
    needle_span: tuple[int, int] = (-1, -1)  # the asked-for insert's tokens (head calibration looks for attention there)

    @property
    def answer_len(self) -> int:
        return self.answer_end - self.answer_start


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def _assemble(rng, tokenizer, filler_ids, length, inserts, question_ids, answer_ids, depths, kind, answer, depth):
    """Filler of the right size, with each insert at its depth, then the question and answer."""
    fixed = sum(len(x) for x in inserts) + len(question_ids) + len(answer_ids)
    n_filler = length - fixed
    if n_filler < 0:
        raise ValueError(f"episode length {length} is too short for its {fixed} fixed tokens")
    if len(filler_ids) <= n_filler:
        raise ValueError("filler text is shorter than the requested episode length")
    start = rng.randrange(0, len(filler_ids) - n_filler)
    filler = list(filler_ids[start : start + n_filler])
    # Insert from the deepest position backwards so earlier cut points stay valid.
    out = filler
    for insert, d in sorted(zip(inserts, depths), key=lambda p: -p[1]):
        cut = int(round(d * n_filler))
        out = out[:cut] + list(insert) + out[cut:]
    needle = _find(out, list(inserts[0]))
    question_start = len(out)
    ids = out + list(question_ids)
    answer_start = len(ids)
    ids += list(answer_ids)
    return Episode(ids, answer_start, len(ids), answer, kind, depth, (), question_start, (needle, needle + len(inserts[0])))


def _find(haystack: list[int], needle: list[int]) -> int:
    """First index of `needle` in `haystack` (the insert is there by construction)."""
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1


def passkey_episode(
    rng: random.Random, tokenizer, filler_ids: Sequence[int], length: int, depth: float, digits: int = 5
) -> Episode:
    """A passkey of `digits` digits planted at `depth` (0 = start of the filler, 1 = end)."""
    key = _digits(rng, digits)
    needle = _encode(tokenizer, f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
    question = _encode(tokenizer, "\nWhat is the pass key? The pass key is")
    answer = _encode(tokenizer, f" {key}")
    return _assemble(rng, tokenizer, filler_ids, length, [needle], question, answer, [depth], "passkey", key, depth)


def multikey_episode(
    rng: random.Random, tokenizer, filler_ids: Sequence[int], length: int, depth: float, n_keys: int = 4,
    extra_questions: int = 0,
) -> Episode:
    """`n_keys` key-value pairs spread through the filler; the one asked for sits at `depth`, the
    distractors at random depths. `extra_questions` > 0 (training only) also asks for that many of the
    distractors after the main answer; the episode is then longer than `length` by those questions."""
    keys: list[str] = []
    while len(keys) < n_keys:
        k = f"{rng.choice(_KEY_WORDS_A)}-{rng.choice(_KEY_WORDS_B)}"
        if k not in keys:
            keys.append(k)
    values = [_digits(rng, 4) for _ in keys]
    inserts = [_encode(tokenizer, f"\nThe value for key {k} is {v}.\n") for k, v in zip(keys, values)]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    question = _encode(tokenizer, f"\nWhat is the value for key {keys[0]}? The value for key {keys[0]} is")
    answer = _encode(tokenizer, f" {values[0]}")
    ep = _assemble(rng, tokenizer, filler_ids, length, inserts, question, answer, depths, "multikey", values[0], depth)
    ids, spans = list(ep.input_ids), []
    for k, v in list(zip(keys, values))[1 : 1 + extra_questions]:
        ids += _encode(tokenizer, f"\nWhat is the value for key {k}? The value for key {k} is")
        start = len(ids)
        ids += _encode(tokenizer, f" {v}")
        spans.append((start, len(ids)))
    return dataclasses.replace(ep, input_ids=ids, extra_answers=tuple(spans))


TASKS = {"passkey": passkey_episode, "multikey": multikey_episode}


def episodes(
    task: str,
    tokenizer,
    filler_text: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int,
    seed: int = 0,
) -> list[Episode]:
    """A seeded grid of episodes: `per_cell` for every (length, depth)."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task '{task}'; choose from {sorted(TASKS)}")
    rng = random.Random(seed)
    filler_ids = _encode(tokenizer, filler_text)
    make = TASKS[task]
    return [make(rng, tokenizer, filler_ids, L, d) for L in lengths for d in depths for _ in range(per_cell)]
