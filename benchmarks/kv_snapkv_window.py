"""Why SnapKV's defaults here are window_size 16 and kernel_size 21 (kvpress: 64 and 5; the paper: 32 and 7).

Passkey retrieval at 2048 tokens on the bundled reference model, question-aware, compression_ratio 0.875 (256 of
2048 tokens kept per head), 20 episodes per setting (depths 0, 0.25, 0.5, 0.75, 1; 4 each), on two episode seeds.
Writes benchmarks/results/kv_snapkv_window.{json,md}.

    python benchmarks/kv_snapkv_window.py [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kv_common import machine, machine_line  # noqa: E402

SETTINGS = [(64, 5), (32, 7), (16, 5), (16, 15), (16, 21), (8, 21)]
SEEDS = (0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.875)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import sparseforge
    from sparseforge.eval import retrieval_accuracy
    from sparseforge.methods import get_method

    model = sparseforge.load()
    tok = transformers.AutoTokenizer.from_pretrained(HERE.parent / "src" / "sparseforge" / "assets" / "reference-model")
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    rows = []
    for window, kernel in SETTINGS:
        row = {"window_size": window, "kernel_size": kernel}
        for seed in SEEDS:
            cls = get_method("snapkv")
            press = cls(cls.parse_params({"compression_ratio": args.ratio, "window_size": window, "kernel_size": kernel}))
            press.attach(model)
            t = time.time()
            try:
                r = retrieval_accuracy(model, tok, "passkey", (2048,), depths, 4, seed, mode="aware")
            finally:
                press.detach(model)
            row[f"seed{seed}"] = r["accuracy"]
            print(window, kernel, seed, r["accuracy"], f"{time.time() - t:.1f}s", flush=True)
        rows.append(row)
    env = machine(args.threads)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "kv_snapkv_window.json").write_text(json.dumps({"machine": env, "ratio": args.ratio, "length": 2048,
                                                            "episodes_per_seed": 20, "rows": rows}, indent=2))
    lines = [
        "# SnapKV window and pooling on the bundled model",
        "",
        f"Passkey at 2048 tokens, question-aware, compression_ratio {args.ratio}, 20 episodes per seed. "
        f"Machine: {machine_line(env)}. Script: benchmarks/kv_snapkv_window.py.",
        "",
        "| window_size | kernel_size | " + " | ".join(f"seed {s}" for s in SEEDS) + " |",
        "|---:|---:|" + "---:|" * len(SEEDS),
    ]
    for row in rows:
        lines.append(f"| {row['window_size']} | {row['kernel_size']} | " + " | ".join(f"{row[f'seed{s}']:.2f}" for s in SEEDS) + " |")
    (out / "kv_snapkv_window.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
