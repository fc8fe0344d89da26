"""Peak memory of layer-by-layer compression with the model in memory vs. with its decoder layers offloaded
to disk (`sparseforge compress --offload-dir`), on a random Llama whose weights dominate memory.

Each variant runs in its own fresh process (`sparseforge compress` through the CLI entry point) so that its
peak resident set size (VmHWM) is its own; the outputs of the two must be bit-identical.

Writes benchmarks/results/offload_memory.json and .md.
Usage: python benchmarks/offload_memory.py [--layers 16] [--hidden 1024] [--intermediate 2816] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

OUT = pathlib.Path(__file__).resolve().parent / "results"

# The child reads its peak from /proc/self/status (VmHWM), which belongs to its own address space: getrusage's
# ru_maxrss would be wrong here, because Linux carries the forking parent's resident size across exec.
CHILD = r"""
import sys, time, json
from sparseforge.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start, "peak_rss_bytes": hwm * 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseforge.eval.tasks import environment
    from sparseforge.formats.artifact import load_tokenizer

    work = pathlib.Path(tempfile.mkdtemp(prefix="offload-bench-"))
    config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    model.save_pretrained(work / "src", safe_serialization=True)
    load_tokenizer(None).save_pretrained(work / "src")
    del model
    # Short calibration (8 x 256 tokens) keeps the run a few minutes on one CPU thread; activations are then a
    # few MB, so the peak is the weights.
    (work / "recipe.yaml").write_text("name: wanda-50-short\nstages:\n  - method: wanda\n    params: {sparsity: 0.5}\n"
                                      "calibration: {samples: 8, seq_len: 256}\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for variant, extra in (("in memory", []), ("offloaded to disk", ["--offload-dir", str(work / "scratch")])):
        argv = ["--quiet", "compress", "--model", str(work / "src"), "--recipe", str(work / "recipe.yaml"),
                "--out", str(work / variant.split()[0]), *extra]
        proc = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1]) | {"variant": variant}
        rows.append(row)
        print(row, flush=True)
    a = load_file(str(next((work / "in").glob("*.safetensors"))))
    b = {}
    for f in (work / "offloaded").glob("*.safetensors"):
        b.update(load_file(str(f)))
    identical = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    env_info = environment()
    weights_bytes = params * 4
    doc = {"environment": env_info, "threads": args.threads, "parameters": params, "layer_parameters": layer_params,
           "layers": args.layers, "weights_bytes": weights_bytes, "outputs_identical": identical, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "offload_memory.json").write_text(json.dumps(doc, indent=2) + "\n")
    base = rows[0]
    lines = ["| variant | peak RSS (MB) | vs. in memory | time (s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x | {r['seconds']:.1f} |")
    md = (f"# Disk offload: peak memory of `sparseforge compress` (Wanda 50%)\n\n"
          f"Machine: {env_info['cpu']} ({env_info['cpu_count']} cores), torch {env_info['torch']}, {args.threads} thread(s). "
          f"Model: random Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{params / 1e6:.0f} M parameters ({weights_bytes / 1e6:.0f} MB in float32, one layer {layer_params / args.layers * 4 / 1e6:.0f} MB). "
          f"Each variant in a fresh process; peak RSS is its VmHWM. Outputs bit-identical: {identical}. "
          f"Produced by `benchmarks/offload_memory.py`.\n\n" + "\n".join(lines) + "\n\n"
          "Peak RSS includes the Python interpreter, torch and transformers (a few hundred MB). Saving streams one "
          "layer at a time as well; the offloaded variant is slower by the time spent writing and re-reading the "
          "scratch files.\n")
    (OUT / "offload_memory.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
