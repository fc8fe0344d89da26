"""The main job on the bundled model for each preset: wall time of `sparseforge run` and its dense vs.
compressed metrics. Writes benchmarks/results/main_job.json and main_job.md.

Usage: python benchmarks/main_job.py [--presets magnitude-50,magnitude-2of4,wanda-50]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import sparseforge
from sparseforge.cli import main as cli_main
from sparseforge.eval.efficiency import size_on_disk
from sparseforge.eval.tasks import environment

OUT = pathlib.Path(__file__).resolve().parent / "results"
COLUMNS = [
    ("perplexity", "ppl", "{:.2f}"),
    ("kl_to_reference", "KL to dense", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
    ("passkey_accuracy", "passkey", "{:.3f}"),
    ("multikey_accuracy", "multi-key", "{:.3f}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("size_bytes", "size MB", "mb"),
    ("compact_size_bytes", "compact MB", "mb"),
    ("peak_memory_bytes", "peak RSS MB", "mb"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("compress_seconds", "compress s", "{:.1f}"),
]


def fmt(v, f):
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}" if f == "mb" else f.format(v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="sparsegpt-50,magnitude-50,magnitude-2of4,wanda-50,sparsegpt-2of4")
    args = ap.parse_args()
    rows, dense = [], None
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            code = cli_main(["--quiet", "run", "--recipe", preset, "--out", f"{tmp}/run"])
            wall = time.perf_counter() - start
            if code:
                sys.exit(f"sparseforge run --recipe {preset} failed with exit code {code}")
            docs = json.loads(pathlib.Path(f"{tmp}/run/results.json").read_text())
            # The same artifact in compact storage (run writes the plain, transformers-loadable one).
            artifact = sparseforge.load(f"{tmp}/run/model")
            sparseforge.save(artifact, f"{tmp}/compact", sparseforge.load_tokenizer(f"{tmp}/run/model"), storage="compact")
            docs[1]["metrics"]["compact_size_bytes"] = size_on_disk(f"{tmp}/compact")
        dense = dense or docs[0]
        rows.append({"preset": preset, "run_wall_seconds": round(wall, 1), "dense": docs[0]["metrics"], "compressed": docs[1]["metrics"]})
        print(f"{preset}: sparseforge run took {wall:.1f} s", flush=True)
    env = environment()
    OUT.mkdir(exist_ok=True)
    (OUT / "main_job.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    header = "| model | " + " | ".join(c[1] for c in COLUMNS) + " | `run` wall s |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    lines.append("| dense | " + " | ".join(fmt(rows[0]["dense"].get(k), f) for k, _, f in COLUMNS) + " | - |")
    for r in rows:
        lines.append(f"| {r['preset']} | " + " | ".join(fmt(r["compressed"].get(k), f) for k, _, f in COLUMNS) + f" | {r['run_wall_seconds']} |")
    md = (
        f"# Main job on the bundled model\n\nMachine: {env['cpu']} ({env['cpu_count']} cores), {env['device']}, "
        f"torch {env['torch']}, transformers {env['transformers']}. Produced by `benchmarks/main_job.py`.\n\n"
        + "\n".join(lines)
        + "\n\nDense speed and memory are from each preset's own run; the dense row shows the first run's.\n"
    )
    (OUT / "main_job.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
