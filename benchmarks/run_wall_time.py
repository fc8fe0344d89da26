"""Wall time of the main job, `sparseforge run` on the bundled defaults, with one CPU core kept busy by another
process (as on a shared 2-core machine). Writes benchmarks/results/run_wall_time.json and run_wall_time.md.

Usage: python benchmarks/run_wall_time.py [--repeats 2] [--no-load] [--full]

Each repeat runs the installed `sparseforge run --out TMP` in a fresh subprocess (so imports, model loading and
saving count, as for a user) while a separate busy-loop process spins on one core for the whole measurement.
`run` picks its torch threads itself (`--threads auto`: the cores not kept busy by others, here 1).
`--full` times `run --full` (the complete evaluation) instead. The machine's load average before and after is
recorded, since other work on the machine lengthens the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

OUT = pathlib.Path(__file__).resolve().parent / "results"
BURNER = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-load", action="store_true", help="do not start the busy process on the second core")
    ap.add_argument("--full", action="store_true", help="time `run --full`")
    args = ap.parse_args()
    from sparseforge.eval.tasks import environment

    exe = shutil.which("sparseforge") or f"{sys.executable} -m sparseforge"
    burner = None if args.no_load else subprocess.Popen([sys.executable, "-c", BURNER])
    time.sleep(1.0)  # the busy loop is running before the first run looks at the machine
    times, load_before = [], os.getloadavg()
    try:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [*exe.split(), "--quiet", "run", "--out", str(pathlib.Path(tmp) / "run")] + (["--full"] if args.full else [])
                start = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                times.append(time.perf_counter() - start)
                print(f"run: {times[-1]:.1f} s", flush=True)
    finally:
        if burner is not None:
            burner.kill()
    env = environment()
    result = {
        "command": "sparseforge run" + (" --full" if args.full else ""),
        "one_core_busy": not args.no_load,
        "wall_seconds": times,
        "median_seconds": statistics.median(times),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "environment": env,
    }
    OUT.mkdir(exist_ok=True)
    name = "run_wall_time_full" if args.full else "run_wall_time"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"{name}.md").write_text(
        f"# Wall time of `{result['command']}` on the bundled defaults\n\n"
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, transformers {env['transformers']}; "
        f"{'one core kept busy by another process' if result['one_core_busy'] else 'no extra load'}; "
        f"load average before {load_before[0]:.2f}. Produced by `benchmarks/run_wall_time.py`.\n\n"
        "| repeat | wall s |\n|---|---|\n" + "".join(f"| {i + 1} | {t:.1f} |\n" for i, t in enumerate(times))
        + f"\nMedian: {result['median_seconds']:.1f} s.\n"
    )
    print(json.dumps({k: result[k] for k in ("wall_seconds", "median_seconds")}))


if __name__ == "__main__":
    main()
