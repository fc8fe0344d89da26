"""How closely a compressed model's next-token distributions follow a reference model's on the same text."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseforge.errors import UserInputError
from sparseforge.eval.perplexity import encode, eval_mode, max_positions, model_device


def fidelity(model, reference, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None) -> dict:
    """KL divergence and top-1 agreement of `model` against `reference`.

    The text is tokenized once (no special tokens) and cut into non-overlapping windows of `seq_len` tokens
    (the last one may be shorter); `max_windows` keeps only the first windows. Both models see each window
    with full in-window context, and every position's next-token distribution counts, weighted equally.

    Returns {"kl_to_reference": mean over positions of KL(reference || model) in nats, computed in float32
    from log_softmax of both models' logits; "top1_agreement": fraction of positions where both argmaxes
    agree; "positions": how many positions were compared; "seq_len"}.
    """
    if seq_len < 1:
        raise UserInputError(f"fidelity seq_len must be a positive integer, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserInputError(f"max_windows must be a positive integer, got {max_windows}; or leave it unset")
    for who, m in (("model", model), ("reference", reference)):
        limit = max_positions(m)
        if limit is not None and seq_len > limit:
            raise UserInputError(
                f"fidelity seq_len {seq_len} exceeds the {who}'s {limit} max positions; pass seq_len <= {limit}"
            )

    ids = encode(tokenizer, text, max_tokens=seq_len * max_windows if max_windows else None)
    if not ids:
        raise UserInputError("the text is empty after tokenization; pass a non-empty text")
    all_ids = torch.tensor(ids, dtype=torch.long)
    model_dev, ref_dev = model_device(model), model_device(reference)

    kl_sum = 0.0
    agree = 0
    positions = 0
    with torch.inference_mode(), eval_mode(model), eval_mode(reference):
        for begin in range(0, len(ids), seq_len):
            window = all_ids[begin : begin + seq_len].unsqueeze(0)
            logp = F.log_softmax(model(input_ids=window.to(model_dev), use_cache=False).logits.float(), dim=-1)
            ref_logp = F.log_softmax(reference(input_ids=window.to(ref_dev), use_cache=False).logits.float(), dim=-1)
            ref_logp = ref_logp.to(logp.device)
            if logp.shape[-1] != ref_logp.shape[-1]:
                raise UserInputError(
                    f"model and reference have different vocabularies ({logp.shape[-1]} vs {ref_logp.shape[-1]} "
                    "logits); compare a model only with the reference it was compressed from"
                )
            # KL(ref || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v)), per position.
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            kl_sum += kl.double().sum().item()
            agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
            positions += kl.numel()

    return {
        "kl_to_reference": kl_sum / positions,
        "top1_agreement": agree / positions,
        "positions": positions,
        "seq_len": seq_len,
    }
