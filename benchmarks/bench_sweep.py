"""`sparseforge bench` on the bundled model over eight recipes of four families (weights, activations,
quantization, KV cache): the sweep finishes, and its store, report and exports are the figures of docs/report.md.
Writes benchmarks/results/bench_sweep/ (results.jsonl, report.html, report.md, plots/, leaderboard.csv,
latency.md) and benchmarks/results/bench_sweep.json + .md (wall time, machine, load average).

Usage: python benchmarks/bench_sweep.py [--recipes a,b,...] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

from sparseforge.cli import main as cli_main
from sparseforge.eval.tasks import environment

OUT = pathlib.Path(__file__).resolve().parent / "results"
RECIPES = "wanda-50,sparsegpt-50,magnitude-2of4,rtn-w4g128,teal-50,snapkv-75,streamingllm-75,kivi-4bit"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    load_before = os.getloadavg()
    start = time.perf_counter()
    argv = ["--threads", "1", "--quiet", "bench", "--recipes", args.recipes, "--out", str(OUT / "bench_sweep")]
    code = cli_main(argv + (["--force"] if args.force else []))
    wall = time.perf_counter() - start
    if code:
        sys.exit(f"sparseforge bench failed with exit code {code}")
    shutil.rmtree(OUT / "bench_sweep" / "__pycache__", ignore_errors=True)
    env = environment()
    machine = (f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, shared machine, load average "
               f"{load_before[0]:.1f} before and {os.getloadavg()[0]:.1f} after, 1 torch thread")
    records = [json.loads(line) for line in (OUT / "bench_sweep" / "results.jsonl").read_text().splitlines() if line.strip()]
    per_record = {r["recipe"] or "dense": r["wall_seconds"] for r in records}
    summary = {"command": "sparseforge " + " ".join(argv), "wall_seconds": round(wall, 1), "machine": machine, "environment": env,
               "record_wall_seconds": per_record, "records_total_seconds": round(sum(per_record.values()), 1)}
    (OUT / "bench_sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (OUT / "bench_sweep.md").write_text(
        f"# `sparseforge bench` on the bundled model\n\nMachine: {machine}. Produced by `benchmarks/bench_sweep.py`.\n\n"
        f"`{summary['command']}` took {wall:.0f} s this time (records already in the store are skipped). The store's "
        f"{len(per_record)} records took {summary['records_total_seconds']:.0f} s in all to compute: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in per_record.items())
        + ". Report: `bench_sweep/report.md` (and `report.html`).\n")
    print(f"bench took {wall:.0f} s; {machine}")


if __name__ == "__main__":
    main()
