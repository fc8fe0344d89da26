"""Sliding-window perplexity of a causal LM over a text, plus small model helpers shared by the eval modules."""
from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.nn.functional as F

from sparseforge.errors import UserInputError

DEFAULT_WINDOW = 1024
# Config attributes that hold a model's longest supported sequence, across Hugging Face architectures.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_device(model) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less modules)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def max_positions(model) -> int | None:
    """The longest sequence the model supports according to its config, or None if it does not say."""
    config = getattr(model, "config", None)
    for key in _MAX_POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def eval_mode(model):
    """Evaluate without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def encode(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text` without special tokens (so every window is plain text), optionally truncated."""
    if max_tokens is not None and max_tokens < 1:
        raise UserInputError(f"max_tokens must be a positive integer, got {max_tokens}; pass e.g. 4096 or leave it unset")
    # verbose=False: the whole text is longer than the tokenizer's model_max_length on purpose.
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return ids[:max_tokens] if max_tokens is not None else ids


def accepts_argument(model, argument: str) -> bool:
    """Whether the model's forward takes `argument` by name (e.g. logits_to_keep, on most HF causal LMs)."""
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` from transformers 5.24, `past_key_values`
    before (and for models that only take **kwargs)."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window: the window covers ids[begin:end] and scores the targets
    ids[first_scored:end], i.e. the ones no earlier window has scored. A window's first token has no context
    inside it, so it is never a target there (this is what leaves one token per window unscored when
    stride == window)."""
    spans = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def perplexity(
    model,
    tokenizer,
    text: str,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> dict:
    """Perplexity of `model` on `text`: exp of the mean next-token negative log-likelihood, in the standard
    sliding-window way.

    The text is tokenized once (no special tokens) and truncated to `max_tokens` if given. Windows of
    `window` tokens (default: min(model max positions, 1024)) start every `stride` tokens (default
    `window // 2`) until one reaches the end of the text. The first window scores all its tokens except the
    first (which has no context); each later window scores only the tokens that no earlier window has scored,
    i.e. those past the previous window's end, each conditioned on everything before it inside this window.
    So with `stride < window` every token but the first is scored exactly once (`tokens_scored ==
    n_tokens - 1`), with between `window - stride` and `window - 1` tokens of context once the text is
    longer than one window. `stride == window` gives the non-overlapping chunked evaluation common in pruning
    papers: a window's first token has no context inside it, so each window scores all its tokens but its
    first. When the text fits in one window this is plain full-context perplexity.

    Windows of equal length are run `batch_size` at a time under `torch.inference_mode` on the model's
    device; log-probabilities are computed in float32.

    Returns {"perplexity", "tokens_scored", "window", "stride"}.
    """
    limit = max_positions(model)
    if window is None:
        window = min(limit, DEFAULT_WINDOW) if limit else DEFAULT_WINDOW
    if window < 2:
        raise UserInputError(f"perplexity window must be at least 2 tokens, got {window}; pass a larger window")
    if limit is not None and window > limit:
        raise UserInputError(
            f"perplexity window {window} exceeds the model's {limit} max positions; pass window <= {limit}"
        )
    if stride is None:
        stride = max(1, window // 2)
    if not 1 <= stride <= window:
        raise UserInputError(
            f"perplexity stride must be between 1 and the window ({window}), got {stride}; a larger stride would skip tokens"
        )
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")

    ids = encode(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise UserInputError("the text has fewer than 2 tokens, so there is nothing to score; pass a longer text")
    device = model_device(model)
    all_ids = torch.tensor(ids, dtype=torch.long)
    spans = _windows(len(ids), window, stride)
    # Scored targets are always the tail of a window, so the model only needs logits for that tail.
    trim_logits = accepts_argument(model, "logits_to_keep")

    total_nll = 0.0
    scored = 0
    with torch.inference_mode(), eval_mode(model):
        for i in range(0, len(spans), batch_size):
            chunk = spans[i : i + batch_size]
            # Only the last window can be shorter; run each length as its own batch so no padding is needed.
            for length in sorted({e - b for b, e, _ in chunk}, reverse=True):
                group = [s for s in chunk if s[1] - s[0] == length]
                batch = torch.stack([all_ids[b:e] for b, e, _ in group]).to(device)
                # Target at window offset t is predicted by the logits at offset t - 1.
                n_targets = [e - f for b, e, f in group]
                keep = max(n_targets) + 1  # +1: the last position's logits predict past the window
                kwargs = {"logits_to_keep": keep} if trim_logits else {}
                logits = model(input_ids=batch, use_cache=False, **kwargs).logits[:, -keep:-1].float()
                logprobs = F.log_softmax(logits, dim=-1)
                targets = batch[:, -keep + 1 :]
                token_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [batch, keep - 1]
                for row, n in enumerate(n_targets):
                    total_nll += token_nll[row, token_nll.shape[1] - n :].double().sum().item()
                    scored += n

    return {
        "perplexity": math.exp(total_nll / scored),
        "tokens_scored": scored,
        "window": window,
        "stride": stride,
    }
