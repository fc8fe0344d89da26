"""Train the bundled reference model: a small Llama (RMSNorm, SwiGLU, RoPE, grouped-query attention) on the
Shakespeare training split, with synthetic passkey and key-value retrieval episodes mixed in.

Rerun: pip install -e '.[reference-model]' && python training/prepare_data.py && python training/train_reference.py
Writes config.json, model.safetensors, generation_config.json and training_info.json into the bundled model
directory (checkpointing there every --save-every steps), and a loss log to training/work/train_log.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import random
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from sparseforge.data.synthetic import multikey_episode, passkey_episode  # noqa: E402

MODEL_DIR = ROOT / "src" / "sparseforge" / "assets" / "reference-model"
WORK_DIR = ROOT / "training" / "work"


def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        torch_dtype="float32",
    )


def length_mix(progress: float) -> dict[int, float]:
    """Short sequences first (retrieval is learned cheaply where attention is not diluted), then long
    ones up to 2048 so that retrieval holds at every length the model card reports."""
    if progress < 0.1:
        return {128: 0.5, 256: 0.5}
    if progress < 0.25:
        return {256: 0.3, 512: 0.4, 1024: 0.3}
    return {512: 0.3, 1024: 0.3, 2048: 0.4}


def parse_length_mix(text: str) -> dict[int, float]:
    """'1024:0.3,2048:0.7' -> {1024: 0.3, 2048: 0.7}"""
    try:
        mix = {int(k): float(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--length-mix {text!r}: expected LENGTH:WEIGHT pairs separated by commas, e.g. 1024:0.3,2048:0.7")
    if not mix or any(L < 64 or L > 2048 or w <= 0 for L, w in mix.items()):
        raise SystemExit(f"--length-mix {text!r}: lengths must lie in [64, 2048] and weights be positive")
    return mix


def sample_depth(rng, edge_frac: float) -> float:
    """Where the answer is planted. With probability `edge_frac` near either end of the context (the first or
    last 10%), where a long context's retrieval fails first; otherwise uniform."""
    if rng.random() < edge_frac:
        return rng.random() * 0.1 if rng.random() < 0.5 else 0.9 + rng.random() * 0.1
    return rng.random()


def make_batch(rng, tokenizer, train_ids, length, batch_size, episode_frac, copy_frac=0.1, edge_frac=0.0):
    rows, answer_mask = [], []
    for _ in range(batch_size):
        if rng.random() < episode_frac:
            kind = rng.random()
            if kind < copy_frac:
                # Tokens drawn independently from the training text, repeated after a gap: a copy signal with no
                # shortcut through text statistics, over tokens whose embeddings are well trained.
                span_len = rng.randint(8, 32)
                span = [train_ids[rng.randrange(len(train_ids))] for _ in range(span_len)]
                gap = rng.randint(0, length - 2 * span_len)
                t = rng.randrange(0, len(train_ids) - length)
                filler = train_ids[t : t + length - 2 * span_len]
                rows.append(filler[:gap] + span + filler[gap:] + span)
                answer_mask.append([0] * (length - span_len + 1) + [1] * (span_len - 1))
                continue
            if kind < copy_frac + 0.15:
                # A repeated span: the plainest induction signal, which bootstraps the copying heads
                # that passkey and key-value retrieval need.
                span_len = rng.randint(8, 24)
                s = rng.randrange(0, len(train_ids) - length)
                span = train_ids[s : s + span_len]
                gap = rng.randint(0, length - 2 * span_len)
                t = rng.randrange(0, len(train_ids) - length)
                filler = train_ids[t : t + length - 2 * span_len]
                row = filler[:gap] + span + filler[gap:] + span
                rows.append(row)
                answer_mask.append([0] * (length - span_len + 1) + [1] * (span_len - 1))
                continue
            if kind < copy_frac + 0.15 + 0.55 * (0.85 - copy_frac):
                ep = passkey_episode(rng, tokenizer, train_ids, length, sample_depth(rng, edge_frac))
            else:
                # Asking for every key multiplies the retrieval signal per episode; each extra question
                # takes about 25 tokens, reserved here; the row is then cut or padded to `length`.
                n_keys = 1 if length <= 64 else 2 if length <= 256 else 4
                ep = multikey_episode(rng, tokenizer, train_ids, length - 26 * (n_keys - 1), sample_depth(rng, edge_frac), n_keys, n_keys - 1)
            mask = [0] * len(ep.input_ids)
            for start, end in ((ep.answer_start, ep.answer_end), *ep.extra_answers):
                mask[start:end] = [1] * (end - start)
            rows.append(ep.input_ids[:length] + [0] * (length - len(ep.input_ids)))
            answer_mask.append((mask + [0] * length)[:length])
        else:
            s = rng.randrange(0, len(train_ids) - length)
            rows.append(train_ids[s : s + length])
            answer_mask.append([0] * length)
    return torch.tensor(rows), torch.tensor(answer_mask, dtype=torch.bool)


def loss_fn(model, ids, answer_mask, answer_weight):
    logits = model(input_ids=ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    tok_loss = tok_loss.view_as(targets)
    lm = tok_loss.mean()
    am = answer_mask[:, 1:]
    ans = tok_loss[am].mean() if am.any() else torch.zeros((), device=ids.device)
    return lm + answer_weight * ans, lm.detach(), ans.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--tokens-per-step", type=int, default=6144)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--episode-frac", type=float, default=0.6)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bench", action="store_true", help="time a few steps per length and exit")
    ap.add_argument("--out", default=str(MODEL_DIR), help="where the weights go (default: the bundled model directory)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--init-from", default=None, help="continue from the weights in this model directory (fresh schedule)")
    ap.add_argument("--start-progress", type=float, default=0.0, help="curriculum position to start at, in [0, 1) (with --init-from)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="matmul precision under autocast (weights and optimizer state stay float32)")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between validation checks")
    ap.add_argument("--induction-minutes", type=float, default=15.0,
                    help="first phase: short sequences, mostly copy and retrieval episodes, so the copying (induction) "
                         "heads that retrieval needs form before long contexts dilute attention")
    ap.add_argument("--length-mix", default=None,
                    help="fixed sequence-length mix after the copying phase, e.g. 1024:0.3,2048:0.7 (default: the "
                         "growing curriculum of length_mix)")
    ap.add_argument("--edge-depth-frac", type=float, default=0.0,
                    help="fraction of retrieval episodes whose answer sits in the first or last 10%% of the context")
    args = ap.parse_args()
    fixed_mix = parse_length_mix(args.length_mix) if args.length_mix else None

    from transformers import AutoTokenizer, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    all_ids = tokenizer((WORK_DIR / "train.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    # The last 40k tokens of the training plays are a validation slice (never trained on): it tracks
    # language-model loss and passkey accuracy during training without touching the held-out plays.
    train_ids, val_ids = all_ids[:-40_000], all_ids[-40_000:]
    config = build_config(args, len(tokenizer))
    if args.init_from:
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).to(args.device)
        prior = json.loads((pathlib.Path(args.init_from) / "training_info.json").read_text())
    else:
        model = LlamaForCausalLM(config).to(args.device)
        prior = {"steps": 0, "tokens_seen": 0, "train_seconds": 0.0}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}; training tokens available: {len(train_ids):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    autocast = lambda: torch.autocast(  # noqa: E731
        "cuda" if args.device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"
    )

    if args.bench:
        for L in (256, 512, 1024, 2048):
            ids, am = make_batch(rng, tokenizer, train_ids, L, max(1, args.tokens_per_step // L), 0.5)
            ids, am = ids.to(args.device), am.to(args.device)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with autocast():
                    loss, _, _ = loss_fn(model, ids, am, 1.0)
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
            print(f"L={L}: {args.tokens_per_step / min(times):.0f} tokens/s", flush=True)
        return

    budget_s = args.minutes * 60
    warmup = 100
    log = open(WORK_DIR / f"train_log-{out_dir.name}.jsonl", "w")
    start = time.time()
    tokens_seen, step = 0, 0

    @torch.no_grad()
    def validate() -> dict:
        model.eval()
        with autocast():
            windows = torch.tensor([val_ids[i : i + 512] for i in range(0, 16 * 512, 512)], device=args.device)
            logits = model(input_ids=windows).logits[:, :-1].float()
            val_lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
            vrng = random.Random(1234)
            hits = {}
            for length in (512, 2048):
                ok = 0
                for i in range(12):
                    ep = passkey_episode(vrng, tokenizer, val_ids, length, i / 11)
                    x = torch.tensor([ep.input_ids], device=args.device)
                    pred = model(input_ids=x).logits[0, ep.answer_start - 1 : ep.answer_end - 1].argmax(-1)
                    ok += int(pred.tolist() == ep.input_ids[ep.answer_start : ep.answer_end])
                hits[f"passkey_{length}"] = ok / 12
        model.train()
        return {"val_lm": round(val_lm, 4), **hits}

    def save(final: bool) -> None:
        elapsed = time.time() - start
        model.save_pretrained(out_dir, safe_serialization=True)
        info = {
            "parameters": n_params,
            "steps": prior["steps"] + step,
            "tokens_seen": prior["tokens_seen"] + tokens_seen,
            "train_seconds": round(prior["train_seconds"] + elapsed, 1),
            "hardware": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
            + (torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU only"),
            "device": args.device,
            "torch": torch.__version__,
            "args": vars(args),
            "training_tokens_available": len(train_ids),
            "validation_tokens": len(val_ids),
            "previous_runs": prior.get("previous_runs", []) + ([{k: prior[k] for k in ("steps", "tokens_seen", "train_seconds", "args") if k in prior}] if args.init_from else []),
            "final": final,
        }
        (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")

    while step < args.max_steps:
        elapsed = time.time() - start
        progress = min(1.0, args.start_progress + (1 - args.start_progress) * elapsed / budget_s)
        if progress >= 1.0:
            break
        induction_phase = elapsed < args.induction_minutes * 60
        mix = {64: 0.5, 128: 0.5} if induction_phase else fixed_mix or length_mix(progress)
        L = rng.choices(list(mix), weights=list(mix.values()))[0]
        ids, am = make_batch(rng, tokenizer, train_ids, L, max(1, args.tokens_per_step // L),
                             0.9 if induction_phase else args.episode_frac, 0.4 if induction_phase else 0.1,
                             args.edge_depth_frac)
        ids, am = ids.to(args.device), am.to(args.device)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        # The copying phase runs in float32: it is cheap at these lengths, and attention patterns that must
        # become sharp are where reduced precision is most likely to slow learning.
        with autocast() if not induction_phase else contextlib.nullcontext():
            loss, lm, ans = loss_fn(model, ids, am, args.answer_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += ids.numel()
        step += 1
        rec = {"step": step, "t": round(elapsed, 1), "L": L, "lr": lr, "lm": round(lm.item(), 4), "answer": round(ans.item(), 4)}
        log.write(json.dumps(rec) + "\n")
        if step % 20 == 0:
            log.flush()
            print(rec, flush=True)
        if step % args.eval_every == 0:
            rec = {"step": step, "t": round(time.time() - start, 1), **validate()}
            log.write(json.dumps(rec) + "\n")
            print(rec, flush=True)
        if step % args.save_every == 0:
            save(final=False)
    final = {"step": step, "t": round(time.time() - start, 1), **validate()}
    log.write(json.dumps(final) + "\n")
    print(final, flush=True)
    save(final=True)
    print(f"done: {step} steps, {tokens_seen:,} tokens, {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
