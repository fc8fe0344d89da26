"""Long-context retrieval accuracy on seeded synthetic episodes (passkey, multi-key), per length and depth."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from sparseforge.data import read_text
from sparseforge.data.synthetic import TASKS as EPISODE_TASKS
from sparseforge.data.synthetic import episodes
from sparseforge.errors import UserInputError
from sparseforge.eval.perplexity import accepts_argument, cache_argument, eval_mode, max_positions, model_device

MODES = ("aware", "agnostic")


def retrieval_accuracy(
    model,
    tokenizer,
    task: str = "passkey",
    lengths: Sequence[int] = (512, 1024, 2048),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    per_cell: int = 4,
    seed: int = 0,
    filler_text: str | None = None,
    mode: str = "aware",
) -> dict:
    """Exact-match accuracy of `model` on `per_cell` episodes for every (length, depth) of a retrieval task.

    Each episode is `length` tokens of filler (default: the bundled held-out text) with the needle planted at
    `depth` (0 = start, 1 = end), then the question and the answer. An episode is correct when every answer
    token is the model's argmax prediction given the true prefix. This teacher-forced check equals exact match of
    greedy decoding: greedy decoding reproduces the answer exactly when, and only when, each answer token is the
    argmax after the previous ones.

    The episode runs through the model's KV cache the way generation does, so a KV press attached to the model
    (`sparseforge.methods.kv`) is measured: a first forward prefills a prefix into the cache (the press compresses
    it there), a second forward feeds the rest and the answer is scored from its logits, which attend to the
    compressed prefix. `mode` "aware": the prefix is everything up to the question's last token, so the question
    is inside the compressed prompt (SnapKV's setting); "agnostic": the prefix ends before the question, so the
    context is compressed before the question is seen (a shared document, or a second turn).

    Returns {"accuracy": overall fraction, "by_length": {str(length): fraction},
    "by_depth": {str(depth): fraction}, "cells": [{"length", "depth", "accuracy", "n"}, ...]}.
    """
    if mode not in MODES:
        raise UserInputError(f"unknown retrieval mode '{mode}'; choose one of {', '.join(MODES)}")
    if task not in EPISODE_TASKS:
        raise UserInputError(f"unknown retrieval task '{task}'; choose one of {sorted(EPISODE_TASKS)}")
    # Deduplicate (keeping order) so each (length, depth) cell is built and reported once.
    lengths = list(dict.fromkeys(int(x) for x in lengths))
    depths = list(dict.fromkeys(float(d) for d in depths))
    if not lengths or not depths or per_cell < 1:
        raise UserInputError("retrieval needs at least one length, one depth and per_cell >= 1")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserInputError(f"retrieval depths must lie in [0, 1], got {depths}")
    limit = max_positions(model)
    if limit is not None and max(lengths) > limit:
        raise UserInputError(
            f"retrieval length {max(lengths)} exceeds the model's {limit} max position embeddings; "
            f"pass lengths <= {limit}"
        )

    try:
        eps = episodes(task, tokenizer, filler_text or read_text("heldout"), lengths, depths, per_cell, seed)
    except ValueError as exc:  # too short for the needle, or not enough filler text
        raise UserInputError(f"cannot build {task} episodes: {exc}; use longer lengths or a longer filler text") from exc

    device = model_device(model)
    key = cache_argument(model)
    last_only = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    hits: dict[tuple[int, float], list[bool]] = defaultdict(list)
    with torch.inference_mode(), eval_mode(model):
        for ep in eps:
            ids = torch.tensor([ep.input_ids], dtype=torch.long, device=device)
            split = ep.answer_start - 1 if mode == "aware" else ep.question_start
            prefill = model(input_ids=ids[:, :split], use_cache=True, **last_only)
            cache = getattr(prefill, "past_key_values", None)
            # The rest ends with the last answer token so its logits line up with the answer; theirs go unused.
            logits = model(input_ids=ids[:, split:], use_cache=True, **{key: cache}).logits[0]
            # Answer token at position t is predicted by the logits at t - 1.
            predicted = logits[ep.answer_start - 1 - split : ep.answer_end - 1 - split].argmax(-1)
            correct = bool((predicted == ids[0, ep.answer_start : ep.answer_end]).all())
            hits[(len(ep.input_ids), ep.depth)].append(correct)

    def fraction(values: list[bool]) -> float:
        return sum(values) / len(values)

    cells = [
        {"length": L, "depth": d, "accuracy": fraction(hits[(L, d)]), "n": len(hits[(L, d)])}
        for L in lengths
        for d in depths
    ]
    return {
        "accuracy": fraction([h for v in hits.values() for h in v]),
        "by_length": {str(L): fraction([h for (l, _), v in hits.items() if l == L for h in v]) for L in lengths},
        "by_depth": {str(d): fraction([h for (_, dd), v in hits.items() if dd == d for h in v]) for d in depths},
        "cells": cells,
    }
