"""Evaluate the bundled MoE reference model and write its model card (README.md + model_card.json).

The same protocol as the dense card (training/model_card.py): held-out perplexity, passkey and multi-key retrieval
through `sparseforge.eval`'s tasks with their default settings, so the two cards compare figure for figure; plus
total and per-token active parameters counted from the weights, and the expert load distribution: the share of
routed (token, slot) assignments each expert receives in each layer, over the held-out text.

Rerun: python training/moe_model_card.py   (after training/train_moe_reference.py; about 5 minutes on 1 CPU thread)
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "training"))
from model_card import grid_table  # noqa: E402
from sparseforge.data import read_text  # noqa: E402
from sparseforge.eval.perplexity import encode  # noqa: E402
from sparseforge.eval.tasks import EvalContext, environment, run_tasks  # noqa: E402
from sparseforge.formats.artifact import REFERENCE_MODEL_DIR, REFERENCE_MOE_DIR, load_model, load_tokenizer  # noqa: E402

LOAD_WINDOW = 1024


def parameter_counts(model) -> dict:
    """Total parameters (a tied embedding once) and those one token uses: everything outside the experts plus
    top_k experts' share of each layer's fused expert tensors."""
    top_k, n_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {
        "total": total,
        "active_per_token": total - experts + experts * top_k // n_experts,
        "experts_total": experts,
        "experts_active_per_token": experts * top_k // n_experts,
        "non_expert": total - experts,
        "per_expert": experts // (n_experts * model.config.num_hidden_layers),
    }


def expert_load(model, ids: list[int]) -> dict:
    """Share of routed assignments per expert per layer on non-overlapping windows of `ids`, from the routers'
    logits (top-k of them, as the model routes)."""
    import torch

    n_experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    counts = torch.zeros(model.config.num_hidden_layers, n_experts, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(ids) - LOAD_WINDOW + 1, LOAD_WINDOW):
            window = torch.tensor([ids[start : start + LOAD_WINDOW]])
            out = model(input_ids=window, output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                chosen = logits.topk(top_k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(chosen, minlength=n_experts)
    shares = counts.double() / counts.sum(1, keepdim=True)
    return {
        "window": LOAD_WINDOW,
        "tokens": int(counts[0].sum()) // top_k,
        "share": [[round(x, 4) for x in row] for row in shares.tolist()],
        "max_over_uniform": [round(float(row.max()) * n_experts, 3) for row in shares],
        "min_over_uniform": [round(float(row.min()) * n_experts, 3) for row in shares],
    }


def load_table(load: dict) -> str:
    n = len(load["share"][0])
    lines = ["| layer | " + " | ".join(f"e{e}" for e in range(n)) + " | max / uniform | min / uniform |",
             "|" + "---|" * (n + 3)]
    for i, row in enumerate(load["share"]):
        lines.append(f"| {i} | " + " | ".join(f"{x:.3f}" for x in row)
                     + f" | {load['max_over_uniform'][i]:.2f} | {load['min_over_uniform'][i]:.2f} |")
    return "\n".join(lines)


def runs_table(info: dict) -> str:
    runs = info.get("previous_runs", []) + [info]
    lines = ["| run | steps | tokens | minutes | peak lr | distillation weight | load-balance weight | lengths |",
             "|---|---|---|---|---|---|---|---|"]
    prev = {"steps": 0, "tokens_seen": 0, "train_seconds": 0.0}
    for i, run in enumerate(runs, 1):
        a = run.get("args", {})
        lines.append(f"| {i} | {run['steps'] - prev['steps']} | {run['tokens_seen'] - prev['tokens_seen']:,} | "
                     f"{(run['train_seconds'] - prev['train_seconds']) / 60:.1f} | {a.get('lr')} | {a.get('distill')} | "
                     f"{a.get('aux_coef')} | {a.get('length_mix') or 'curriculum'} |")
        prev = run
    return "\n".join(lines)


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", metavar="DIR", default=None,
                    help="check the script in seconds: a few held-out tokens and one episode per cell, card written to DIR")
    args = ap.parse_args()
    out_dir = pathlib.Path(args.smoke) if args.smoke else REFERENCE_MOE_DIR
    settings = {"max_tokens": 4096, "retrieval_per_cell": 1} if args.smoke else {}

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("reference-moe")
    model = load_model("reference-moe")
    config = model.config
    info = json.loads((REFERENCE_MOE_DIR / "training_info.json").read_text())
    dense_card = json.loads((REFERENCE_MODEL_DIR / "model_card.json").read_text())
    counts = parameter_counts(model)
    start = time.time()
    metrics = run_tasks(EvalContext(model, tokenizer, settings=settings), ["perplexity", "passkey", "multikey"])
    heldout_ids = encode(tokenizer, read_text("heldout"))
    load = expert_load(model, heldout_ids[: 4 * LOAD_WINDOW] if args.smoke else heldout_ids)
    eval_seconds = time.time() - start
    lengths = sorted({c["length"] for c in metrics["passkey_cells"]})
    depths = sorted({c["depth"] for c in metrics["passkey_cells"]})
    card = {
        "architecture": config.architectures[0] if config.architectures else type(model).__name__,
        "experts": config.num_local_experts,
        "top_k": config.num_experts_per_tok,
        "expert_width": config.intermediate_size,
        "parameters": counts,
        "heldout_tokens": len(heldout_ids),
        "perplexity": metrics["perplexity"],
        "perplexity_window": metrics["perplexity_window"],
        "perplexity_stride": metrics["perplexity_stride"],
        "passkey_accuracy": metrics["passkey_accuracy"],
        "passkey_by_length": metrics["passkey_by_length"],
        "passkey_cells": metrics["passkey_cells"],
        "multikey_accuracy": metrics["multikey_accuracy"],
        "multikey_by_length": metrics["multikey_by_length"],
        "multikey_cells": metrics["multikey_cells"],
        "expert_load": load,
        "dense_reference": {k: dense_card[k] for k in ("parameters", "perplexity", "ngram_trigram_kn_perplexity", "passkey_accuracy",
                                                      "passkey_by_length", "multikey_accuracy", "multikey_by_length")},
        "training": info,
        "eval_environment": environment(),
        "eval_seconds": round(eval_seconds, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    d, up = dense_card, info.get("upcycling", {})
    dense_config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    dense_inter = dense_config["intermediate_size"]
    slices = dense_inter // config.intermediate_size
    dense_mlp = 3 * dense_inter * dense_config["hidden_size"] * dense_config["num_hidden_layers"]
    size_mb = sum(p.stat().st_size for p in REFERENCE_MOE_DIR.iterdir() if p.is_file()) / 2**20
    by_len = lambda m, key: " / ".join(f"{m[key][str(L)]:.2f}" for L in lengths)  # noqa: E731
    text = f"""# sparseforge reference MoE model

A small mixture-of-experts causal LM in the Mixtral architecture (`MixtralForCausalLM`), bundled with sparseforge
beside the dense reference model so that the expert-level methods (pruning, merging, offloading, routing-aware
calibration) have an offline test subject. Load it with `sparseforge.load("reference-moe")`, `--model reference-moe`
on the command line, or plain `transformers.AutoModelForCausalLM.from_pretrained` on this directory. It is a test
subject for compression methods, not a useful language model.

## Architecture
Mixtral: Llama's attention (RMSNorm, rotary embeddings, grouped-query attention) and a sparse MoE block in place of
each MLP. transformers stores the experts fused: `mlp.experts.gate_up_proj [{config.num_local_experts}, {2 * config.intermediate_size}, {config.hidden_size}]`,
`mlp.experts.down_proj [{config.num_local_experts}, {config.hidden_size}, {config.intermediate_size}]`, router `mlp.gate.weight [{config.num_local_experts}, {config.hidden_size}]`
(softmax over the experts, top-{config.num_experts_per_tok}, the chosen weights renormalised). Tied embeddings, float32 weights,
{size_mb:.1f} MB on disk with the tokenizer.

| | MoE (this model) | dense reference |
|---|---|---|
| parameters, total | {counts['total']:,} | {d['parameters']:,} |
| parameters active per token | {counts['active_per_token']:,} | {d['parameters']:,} |
| of which experts: total / active | {counts['experts_total']:,} / {counts['experts_active_per_token']:,} | (MLPs) {dense_mlp:,} |
| experts per layer, top-k | {config.num_local_experts}, top-{config.num_experts_per_tok} | - |
| expert width (SwiGLU intermediate) | {config.intermediate_size} | {dense_inter} (one MLP) |
| layers / hidden / heads / kv heads | {config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads} / {config.num_key_value_heads} | same |
| context length, vocabulary | {config.max_position_embeddings}, {config.vocab_size} | same (same tokenizer) |

## How it was made
`training/train_moe_reference.py`: sparse upcycling of the dense reference model, then training.
Attention, embeddings and norms copy over exactly ({up.get('tensors_copied_exactly', '?')} tensors). Each dense MLP is
cut into {slices} slices of {config.intermediate_size} neurons; slice s seeds experts s and s + {slices}
(expert origin slices {up.get('expert_origin_slice')}), each copy with {up.get('noise')} relative Gaussian noise so the copies
can drift apart. The router starts random (std {up.get('router_std')}), so the first routing is near uniform. Top-{config.num_experts_per_tok}
of {config.num_local_experts} experts holds half of the dense MLP's neurons per token, so the upcycled model cannot equal the dense
function; the down projections were scaled by {up.get('down_scale')} (chosen from {list(up.get('val_lm_by_down_scale', {}))} by the validation loss of
the untrained model: {up.get('val_lm_by_down_scale')}; dense {up.get('dense_val_lm')}), which makes the expected output over random routing equal the
dense MLP's. Training then used the dense model's data (Shakespeare training split + synthetic passkey, multi-key
and copy episodes, `make_batch` of training/train_reference.py, same 40k-token validation slice), a loss of
(1 - w) cross-entropy + w KL divergence to the dense model's next-token distribution (w = distillation weight below;
the dense teacher's full distribution recovers the upcycled model faster than labels alone in a CPU-minutes budget),
+ 2 x cross-entropy on retrieval answers, + Mixtral's load-balancing loss (`load_balancing_loss_func`, via
`output_router_logits`). AdamW (0.9/0.95, weight decay 0.1), warm-up then cosine to 10%, bfloat16 autocast
(weights and optimiser state float32), 256-512-token rows for the first 15% of the time, then 512/1024/2048.

| | |
|---|---|
| tokens seen | {info['tokens_seen']:,} ({info['steps']} steps of {info['args']['tokens_per_step']} tokens) |
| wall time | {info['train_seconds'] / 60:.1f} min |
| hardware | {info['hardware']} |

{runs_table(info)}

This is a short training budget (the dense model saw {d['training']['tokens_seen']:,} tokens); the MoE has not caught up
with the dense model it came from. `training/train_moe_reference.py --minutes N` (or `--init-from` this directory)
trains it longer.

## Evaluation
Produced by `training/moe_model_card.py` with the same tasks and default settings as `sparseforge eval` and the dense
card ({environment()['cpu']}, 1 torch thread, shared machine; evaluation took {eval_seconds:.0f} s).

| metric | MoE | dense reference |
|---|---|---|
| held-out perplexity (window {metrics['perplexity_window']}, stride {metrics['perplexity_stride']}) | {metrics['perplexity']:.2f} | {d['perplexity']:.2f} |
| interpolated Kneser-Ney trigram on the same tokens | {d['ngram_trigram_kn_perplexity']:.2f} | {d['ngram_trigram_kn_perplexity']:.2f} |
| passkey accuracy, all cells | {metrics['passkey_accuracy']:.3f} | {d['passkey_accuracy']:.3f} |
| passkey by length {' / '.join(map(str, lengths))} | {by_len(metrics, 'passkey_by_length')} | {by_len(d, 'passkey_by_length')} |
| multi-key (4 pairs) accuracy, all cells | {metrics['multikey_accuracy']:.3f} | {d['multikey_accuracy']:.3f} |
| multi-key by length {' / '.join(map(str, lengths))} | {by_len(metrics, 'multikey_by_length')} | {by_len(d, 'multikey_by_length')} |

Passkey accuracy by context length (tokens) and depth:

{grid_table(metrics['passkey_cells'], lengths, depths)}

Multi-key retrieval (4 key-value pairs, the asked one at the given depth):

{grid_table(metrics['multikey_cells'], lengths, depths)}

## Expert load
Share of routed (token, slot) assignments per expert on the held-out plays ({load['tokens']:,} tokens in
{LOAD_WINDOW}-token windows, top-{config.num_experts_per_tok} so each token counts {config.num_experts_per_tok} times; uniform is {1 / config.num_local_experts:.3f}):

{load_table(load)}
"""
    (out_dir / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
