"""Optimizers on the same fine-tuning run of the bundled model, and their state for a Llama-2-7B shape.

Part 1 (`small`): AdamW, 8-bit AdamW, GaLore, APOLLO and MeZO fine-tune the bundled 4 M-parameter Llama for the
same steps on the same calibration-text batches (never the held-out text; held-out loss is only measured).
Each run is a fresh subprocess, so its peak RSS is its own; an inference run (the same forward passes, no
gradients) gives the memory MeZO is compared with. Reported: final training loss (mean of the last 5 steps),
held-out loss after training, optimizer state bytes (exact, from the state tensors), peak RSS (whole process)
and its rise over the loaded model, tokens/s (median step after 3 warm-up steps).

Part 2 (`7b`): optimizer state bytes for Llama-2-7B (32 layers, hidden 4096, MLP 11008, vocab 32000, untied
embeddings), computed from the shapes; and measured after one real step on a random model with those shapes
and 2 layers (embeddings frozen there to fit the machine; their share is computed), checked against the same
formula for that model.

    python benchmarks/training_optimizers.py                # both parts (about 15 minutes on 2 busy cores)
    python benchmarks/training_optimizers.py --part small --steps 60
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kv_common import RESULTS, Phase, machine, machine_line, mib, run_cell, write  # noqa: E402

NAME = "training_optimizers"
LR = 1e-4
# One configuration per optimizer, the same steps and data for all. GaLore's update is scaled by 0.25, so its lr
# is 4x AdamW's (the same step size); targets "all" projects the embeddings too, which hold a quarter of this
# small model's weights (GaLore's and APOLLO's papers leave them to AdamW on 1B+ models, where they are a few %).
CONFIGS = {
    "adamw": {"lr": LR},
    "adamw-8bit": {"lr": LR},
    "galore": {"lr": 4 * LR, "rank": 32, "update_gap": 50, "scale": 0.25, "targets": "all"},
    "apollo": {"lr": LR, "rank": 32, "update_gap": 50, "targets": "all"},
    "mezo": {"lr": 1e-5, "eps": 1e-3},
}
# The papers' learning rates relative to AdamW's: GaLore and APOLLO pre-train at lr 0.01 where AdamW uses 0.001
# (GaLore with scale 0.25, APOLLO with scale 1). Run beside the same-lr rows above, on the same data and steps.
VARIANTS = {
    "galore (lr 10x)": ("galore", dict(CONFIGS["galore"], lr=10 * LR)),
    "apollo (lr 10x)": ("apollo", dict(CONFIGS["apollo"], lr=10 * LR)),
}
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 num_hidden_layers=32, tie_word_embeddings=False)
RANK_7B = 256


# ------------------------------------------------------------------------------------------- state formulas

def shapes_of(cfg: dict, layers: int, embeddings: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of every trainable tensor of a Llama: kind "linear" for decoder projections, "embedding"
    for the input embedding and the untied head, "norm" for the RMSNorm weights."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    out = []
    if embeddings:
        out.append(("embedding", (v, h)))
    for _ in range(layers):
        out += [("linear", (h, h)), ("linear", (kv, h)), ("linear", (kv, h)), ("linear", (h, h)),
                ("linear", (i, h)), ("linear", (i, h)), ("linear", (h, i)), ("norm", (h,)), ("norm", (h,))]
    out.append(("norm", (h,)))
    if embeddings and not cfg.get("tie_word_embeddings", False):
        out.append(("embedding", (v, h)))
    return out


def expected_state_bytes(name: str, params: dict, shapes) -> int:
    """Bytes of the state tensors `optimizer_state_tensors` writes, from shapes alone (fp32 weights)."""
    total = 0
    for kind, shape in shapes:
        n = math.prod(shape)
        if name == "adamw":
            total += 2 * 4 * n + 4  # two fp32 moments and the fp32 step
        elif name == "adamw-8bit":
            block = params.get("block_size", 256)
            if n >= 4096 and n % block == 0:  # torchao quantises these: 1-byte codes, one fp32 scale per block, a 256-entry map
                total += 2 * (n + 4 * (n // block) + 4 * 256) + 4
            else:
                total += 2 * 4 * n + 4
        elif name in ("galore", "apollo"):
            r = params["rank"]
            projected = len(shape) == 2 and min(shape) > r and (params.get("targets") == "all" or kind == "linear")
            if not projected:
                total += 2 * 4 * n
                continue
            m, k = shape
            if name == "galore":  # projection of the smaller side + two moments r wide along the larger side
                total += 4 * (min(m, k) * r + 2 * max(m, k) * r)
            else:  # two moments only; the projection is regenerated from its seed
                total += 4 * 2 * r * max(m, k)
        elif name in ("mezo", "sparse-mezo"):
            total += 0
    return total


# ------------------------------------------------------------------------------------------- cells

def _windows(tokenizer, text: str, seq: int):
    import torch

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq]).view(n, seq)


def cell_small(spec: dict) -> dict:
    import torch
    import transformers

    from sparseforge.data import read_text
    from sparseforge.formats.artifact import REFERENCE_MODEL_DIR
    from sparseforge.methods.training.optimizers import build_optimizer, state_bytes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32)
    train = _windows(tok, read_text("calibration"), spec["seq"])
    heldout = _windows(tok, read_text("heldout"), spec["seq"])[:8]
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
    steps, batch = spec["steps"], spec["batch"]

    def batch_at(s):
        idx = [(s * batch + j) % train.shape[0] for j in range(batch)]
        return train[order[idx]]

    def heldout_loss():
        with torch.no_grad():
            return float(sum(model(input_ids=heldout[i:i + 4], labels=heldout[i:i + 4]).loss for i in range(0, 8, 4)) / 2)

    name = spec["optimizer"]
    losses, times = [], []
    before = heldout_loss() if name != "inference" else None
    if name == "inference":
        model.eval()
        with Phase() as phase:
            for s in range(steps):
                ids = batch_at(s)
                t0 = time.perf_counter()
                with torch.no_grad():
                    losses.append(float(model(input_ids=ids, labels=ids).loss))
                times.append(time.perf_counter() - t0)
        state = 0
    else:
        model.train()
        opt = build_optimizer(name, model, spec["params"], [p for p in model.parameters()])
        with Phase() as phase:
            for s in range(steps):
                ids = batch_at(s)
                t0 = time.perf_counter()
                if opt.zeroth_order:
                    with torch.no_grad():
                        loss = float(opt.step(lambda: model(input_ids=ids, labels=ids).loss))
                else:
                    out = model(input_ids=ids, labels=ids).loss
                    out.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    loss = float(out.detach())
                times.append(time.perf_counter() - t0)
                losses.append(loss)
        state = state_bytes(opt)
        model.eval()
    after = heldout_loss() if name != "inference" else None
    return {"optimizer": name, "params": spec.get("params", {}), "losses": losses, "final_loss": statistics.mean(losses[-5:]),
            "heldout_before": before, "heldout_after": after, "state_bytes": state, "peak_rss": phase.peak,
            "peak_rise": phase.delta, "tokens_per_s": spec["batch"] * spec["seq"] / statistics.median(times[3:]),
            "seconds": phase.seconds}


def cell_7b(spec: dict) -> dict:
    import torch
    import transformers

    from sparseforge.methods.training.optimizers import build_optimizer, state_bytes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = dict(LLAMA2_7B, num_hidden_layers=spec["layers"])
    config = transformers.LlamaConfig(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights, drawn directly (the default init of 0.4 G values is slow on one core)
        for n, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=gen) * 0.02)
        for module in model.modules():  # to_empty left the rotary frequencies uninitialised
            if hasattr(module, "inv_freq") and hasattr(module, "rope_init_fn"):
                inv, _ = module.rope_init_fn(module.config, "cpu")
                module.inv_freq.copy_(inv)
    frozen = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    trainable = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    name = spec["optimizer"]
    opt = build_optimizer(name, model, spec["params"], trainable)
    ids = torch.randint(0, cfg["vocab_size"], (1, 16), generator=gen)
    t0 = time.perf_counter()
    if opt.zeroth_order:
        with torch.no_grad():
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    else:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return {"optimizer": name, "measured": state_bytes(opt), "trainable_params": sum(p.numel() for p in trainable),
            "step_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- report

def _plot(runs: list[dict], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if "losses" in r and r["optimizer"] != "inference":
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["optimizer"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (calibration text)")
    ax.set_title("Fine-tuning the bundled model: same steps and batches")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("small", "7b", "all"), default="all")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers-7b", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="rerun only these optimizers of part 'small', keeping the other runs")
    ap.add_argument("--cell")
    args = ap.parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(cell_7b(spec) if spec["part"] == "7b" else cell_small(spec)))
        return

    load = os.getloadavg()
    env = machine(threads=1)
    path = RESULTS / f"{NAME}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"machine": env, "machine_line": machine_line(env)})
    doc.setdefault("load_average", {})["start_" + args.part] = [round(x, 2) for x in load]
    if args.part in ("small", "all"):
        kept = {r["optimizer"]: r for r in doc.get("small", {}).get("runs", [])} if args.only else {}
        runs = []
        plan = {"inference": ("inference", {}), **{n: (n, c) for n, c in CONFIGS.items()}, **VARIANTS}
        for name, (optimizer, params) in plan.items():
            if args.only and name not in args.only and name in kept:
                runs.append(kept[name])
                continue
            spec = {"part": "small", "optimizer": optimizer, "params": params, "steps": args.steps, "batch": args.batch,
                    "seq": args.seq}
            out = run_cell(sys.executable, pathlib.Path(__file__), spec, timeout=1200)
            out["optimizer"] = name  # the row's label (a variant names its optimizer in "params" and here)
            print(name, {k: v for k, v in out.items() if k != "losses"}, flush=True)
            runs.append(out)
        doc["small"] = {"steps": args.steps, "batch": args.batch, "seq": args.seq, "runs": runs}
        doc["small"]["plot"] = _plot(runs, RESULTS / f"{NAME}_loss.png")
    if args.part in ("7b", "all"):
        cfg2 = dict(LLAMA2_7B, num_hidden_layers=args.layers_7b)
        rows = []
        for name in CONFIGS:
            params = dict(CONFIGS[name])
            if name in ("galore", "apollo"):
                params["rank"] = RANK_7B
            if name == "galore":
                params["svd"] = "randomized"  # an exact SVD of 11008 x 4096 takes minutes on one busy core
            spec = {"part": "7b", "optimizer": name, "params": params, "layers": args.layers_7b}
            out = run_cell(sys.executable, pathlib.Path(__file__), spec, timeout=1500)
            out["expected"] = expected_state_bytes(name, params, shapes_of(cfg2, args.layers_7b, embeddings=False))
            out["full_7b"] = expected_state_bytes(name, params, shapes_of(LLAMA2_7B, 32))
            out["optimizer"], out["params"] = name, params
            print(name, out, flush=True)
            rows.append(out)
        doc["7b"] = {"layers_measured": args.layers_7b, "rank": RANK_7B, "rows": rows,
                     "full_7b_params": sum(math.prod(s) for _, s in shapes_of(LLAMA2_7B, 32))}
    doc.setdefault("load_average", {})["end_" + args.part] = [round(x, 2) for x in os.getloadavg()]
    write(NAME, doc, report(doc))


def report(doc: dict) -> str:
    lines = [f"# Training optimizers: state, memory, speed and loss", "",
             f"Machine: {doc['machine_line']}; load average {doc.get('load_average')}.",
             "Produced by `python benchmarks/training_optimizers.py`.", ""]
    small = doc.get("small")
    if small:
        runs = {r["optimizer"]: r for r in small["runs"]}
        base = runs.get("adamw", {})
        inf = runs.get("inference", {})
        lines += [f"## Fine-tuning the bundled model ({small['steps']} steps, batch {small['batch']} x {small['seq']} tokens of the calibration text)", "",
                  "| optimizer | final train loss | vs AdamW | held-out loss before -> after | state MiB | state vs AdamW | peak RSS MiB | peak vs inference | rise over model MiB | tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][:120]} |")
                continue
            rel = (r["final_loss"] / base["final_loss"] - 1) * 100 if base.get("final_loss") and name != "inference" else None
            sv = r["state_bytes"] / base["state_bytes"] if base.get("state_bytes") and name != "inference" else None
            pv = (r["peak_rss"] / inf["peak_rss"] - 1) * 100 if inf.get("peak_rss") else None
            held = f"{r['heldout_before']:.4f} -> {r['heldout_after']:.4f}" if r.get("heldout_after") is not None else "-"
            lines.append(f"| {name} | {r['final_loss']:.4f} | {'' if rel is None else f'{rel:+.2f}%'} | {held} | {mib(r['state_bytes'])} | "
                         f"{'' if sv is None else f'{sv:.3f}x'} | {mib(r['peak_rss'])} | {'' if pv is None else f'{pv:+.1f}%'} | "
                         f"{mib(r['peak_rise'])} | {r['tokens_per_s']:.0f} |")
        lines += ["", "Inference row: the same batches, forward only without gradients (its 'loss' is the untrained model's).",
                  f"Loss curves: `{NAME}_loss.png`.", ""]
    seven = doc.get("7b")
    if seven:
        lines += [f"## State bytes for Llama-2-7B (rank {seven['rank']} for GaLore and APOLLO)", "",
                  f"Measured: one real step on a random model with Llama-2-7B layers, {seven['layers_measured']} of them "
                  "(embeddings frozen), against the formula for those tensors. Full 7B: the formula over all 32 layers "
                  f"and the untied embeddings ({seven['full_7b_params'] / 1e9:.2f} G parameters, all trainable).", "",
                  "| optimizer | measured (2 layers) MiB | formula (2 layers) MiB | equal | full 7B GiB | vs AdamW |", "|---|---|---|---|---|---|"]
        rows = {r["optimizer"]: r for r in seven["rows"]}
        adam = rows.get("adamw", {}).get("full_7b")
        for name, r in rows.items():
            measured = r.get("measured")
            lines.append(f"| {name} | {mib(measured) if measured is not None else 'error: ' + str(r.get('error', ''))[:80]} | {mib(r['expected'])} | "
                         f"{'yes' if measured == r['expected'] else 'no'} | {r['full_7b'] / 2**30:.2f} | "
                         f"{r['full_7b'] / adam:.3f}x |" if adam else "")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
