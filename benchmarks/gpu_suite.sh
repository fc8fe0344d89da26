#!/usr/bin/env bash
# Everything issue 3 still needs from an NVIDIA GPU (compute capability >= 8.0), in one call, so a session that
# has one spends its device time measuring rather than typing. Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_suite.sh            # results land in benchmarks/results/ (copied to $OUT/results if set)
# What it does, in order: install (keeps the machine's CUDA torch), the GPU tests, 2:4 vs. dense products with
# the speed gate's choices (Llama-2-7B shapes, 1-8192 tokens), one 7B-shaped layer pruned on the GPU, and
# structured-pruning prefill speed on the GPU (into benchmarks/results/gpu/), then issue 12's Triton row-skipping kernel
# (its tests and benchmarks/activation_triton.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
pip install --quiet -e '.[test]'
tests_ok=0
python -m pytest -q tests/test_sparse_kernels.py || tests_ok=1  # measure anyway; the exit status reports it
python benchmarks/semi_structured_speed.py
python benchmarks/prune_7b_layer.py --device cuda
python benchmarks/structured_speed.py --devices cuda --out-dir benchmarks/results/gpu  # keeps the CPU table of this repo
# Issue 12: the Triton row-skipping kernel (tests, then sparse vs. dense on the three 7B shapes, float16/bfloat16).
python -c "import triton" 2>/dev/null || pip install --quiet 'triton>=3.0'
python -m pytest -q tests/test_activation_triton.py || tests_ok=1
python benchmarks/activation_triton.py
# Sparse attention (issue 13): GPU tests of the FlexAttention path, then one Llama-3-8B attention layer 4K-64K.
python -m pytest -q tests/test_attention.py || tests_ok=1
python benchmarks/attention_speed.py --device cuda --lengths 4096 8192 16384 32768 65536 --out attention_speed_gpu
python benchmarks/moe_offload.py --device cuda  # issue 15: expert offload, storage cpu (pinned) -> CUDA cache, max_memory_allocated; skips without CUDA
# Issue 10: the KV scale grid on the GPU (max_memory_allocated per phase; kvpress is not installed there) and the
# press-vs-full time ratios, into kv_scale_gpu.json and kv_speed_gpu.json.
python benchmarks/kv_scale.py --device cuda --variants full,full-chunked,press,press-chunked,kivi --timeout 900
python benchmarks/kv_speed.py --device cuda --lengths 4096,16384,32768
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r benchmarks/results "$OUT/"; fi
exit $tests_ok
