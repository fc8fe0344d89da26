"""KV-cache speed and memory at scale (issue 10, item 6): a random-weight Llama with 8B-shaped attention (hidden
4096, 32 query heads, 8 KV heads, head size 128; 2 decoder layers, MLP width 1024, vocabulary 1024, float32) at 4K,
8K, 16K and 32K prompt tokens.

Per cell (one variant at one length), in a fresh subprocess: peak memory of the prefill and of the decode phase
(resident set, see kv_common.py: the peak counter is reset right before the phase and read right after it), the
cache's exact bytes after prefill and at its peak, time to first token (the whole prefill, all chunks, through the
first token's argmax) and time per output token (median over the decode steps).

Variants: `full` (plain DynamicCache), each sparseforge press at each ratio, each with and without chunked
prefill (`-chunked`: `--chunk` tokens per forward, the cache compressed to the prompt's budget after every chunk,
as `sparseforge.methods.kv.generate_with_press(chunk_size=...)` does), KIVI 4- and 2-bit, and kvpress (its own
environment, `--kvpress-python`) with the same press at 0.875: kvpress prefills the whole prompt, then prunes.

Usage (the sparseforge environment; every cell a fresh process, results written after each cell, so a long run
can be stopped and resumed: cells already in the JSON are skipped unless --redo):
    python benchmarks/kv_scale.py [--lengths 4096,8192] [--presses snapkv,streaming_llm] [--ratios 0.75,0.875]
        [--variants full,press,press-chunked,kivi,kvpress] [--chunk 1024] [--new-tokens 8] [--threads 1]
        [--kvpress-python /work/venv-kvpress/bin/python] [--device cuda]

On a GPU (`--device cuda`, results in kv_scale_gpu.json unless --name says otherwise) the model and cache live on
the device and the peak columns are torch.cuda.max_memory_allocated per phase (reset at the phase's start).

Cost model (why the defaults are what they are): per token and layer the projections cost 2 x 54.5 M FLOP
(q and o 4096x4096, k and v 4096x1024, MLP 3 x 4096x1024); causal attention over L tokens costs 32 heads x
2 x 2 x 128 x L/2 FLOP per token and layer. A full 32K prefill is about 7 TFLOP of projections plus 18 TFLOP of
attention, several minutes on one CPU thread; a chunked prefill at ratio 0.875 keeps the projections and cuts the
attention to the budget plus one chunk.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kv_common as kc  # noqa: E402

NAME = "kv_scale"
SCRIPT = pathlib.Path(__file__).resolve()
CONFIG = dict(hidden_size=4096, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
              head_dim=128, vocab_size=1024, max_position_embeddings=65536, tie_word_embeddings=True)
PRESSES = ("streaming_llm", "snapkv", "pyramidkv", "knorm", "tova", "h2o")
KVPRESS = {"snapkv": ("SnapKVPress", {"window_size": 64, "kernel_size": 5}), "streaming_llm": ("StreamingLLMPress", {"n_sink": 4}),
           "knorm": ("KnormPress", {}), "tova": ("TOVAPress", {}), "pyramidkv": ("PyramidKVPress", {"window_size": 64, "kernel_size": 5, "beta": 20})}
DEFAULT_KVPRESS_PYTHON = "/work/venv-kvpress/bin/python"


# ------------------------------------------------------------------------------------------------ one cell

def build_model(threads: int):
    """The random-weight model, identical in both environments (same config, same seed)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return model


def prompt(length: int):
    import torch

    return torch.randint(0, CONFIG["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))


def _decode(model, cache, first, start_pos: int, steps: int):
    """Greedy decode `steps` tokens after `first`; returns per-step seconds and the last cache."""
    import torch

    token, times = first, []
    for i in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[start_pos + i]], device=token.device),
                    use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if token.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def cell(spec: dict) -> dict:
    """Run one variant at one length; prints nothing itself, returns the measurements."""
    import torch

    device = spec.get("device", "cpu")
    model = build_model(spec["threads"]).to(device)
    ids = prompt(spec["length"]).to(device)
    Phase = kc.CudaPhase if device == "cuda" else kc.Phase
    tool, variant = spec["tool"], spec["variant"]
    press = None
    chunk = spec.get("chunk")
    cache_bytes = kc.tensor_bytes
    if tool == "kvpress":
        import kvpress

        cls, kw = KVPRESS[spec["press"]]
        press = getattr(kvpress, cls)(compression_ratio=spec["ratio"], **kw)
        compressing = lambda: press(model)  # noqa: E731
    else:
        import contextlib

        from sparseforge.methods import get_method
        from sparseforge.methods.kv import cache_bytes as sf_cache_bytes

        cache_bytes = sf_cache_bytes
        compressing = contextlib.nullcontext
        if variant != "full":
            method = get_method(spec["press"])
            press = method(method.parse_params(spec.get("params") or {"compression_ratio": spec["ratio"]}))
            press.attach(model, press.calibrate(model, None) if spec["press"] == "kivi" else None)
    from transformers import DynamicCache

    n = ids.shape[1]
    with torch.inference_mode():
        cache = DynamicCache()
        peak_cache = 0
        with Phase() as pre:
            chunks = [ids] if not chunk else list(ids.split(chunk, dim=1))
            import contextlib

            sched = press.schedule(prompt_len=n) if (press is not None and tool != "kvpress" and chunk) else contextlib.nullcontext()
            with compressing(), sched:
                for c in chunks:
                    out = model(input_ids=c, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    if chunk:
                        peak_cache = max(peak_cache, cache_bytes(cache))
            first = out.logits[:, -1:].argmax(-1)
        after_prefill = cache_bytes(cache)
        peak_cache = max(peak_cache, after_prefill, getattr(press, "peak_cache_bytes", 0) or 0)
        held = kc.cache_tokens(cache)
        with Phase() as dec:
            steps = _decode(model, cache, first, n, spec["new_tokens"])
        after_decode = cache_bytes(cache)
    full_f16 = 2 * CONFIG["num_hidden_layers"] * CONFIG["num_key_value_heads"] * CONFIG["head_dim"] * n * 2
    return {"prefill_peak_bytes": pre.peak, "prefill_delta_bytes": pre.delta, "rss_before_prefill": pre.start_rss,
            "decode_peak_bytes": dec.peak, "decode_delta_bytes": dec.delta, "ttft_s": pre.seconds,
            "tpot_s": statistics.median(steps) if steps else None, "decode_steps": len(steps),
            "cache_bytes_after_prefill": after_prefill, "cache_bytes_peak": peak_cache, "cache_bytes_after_decode": after_decode,
            "cache_tokens_per_layer": held, "full_cache_fp16_bytes": full_f16, "env": kc.machine(spec["threads"]) | {"device": device},
            "memory": "cuda max_memory_allocated" if device == "cuda" else "resident set"}


# ------------------------------------------------------------------------------------------------ driver

def cell_key(c: dict) -> str:
    parts = [c["tool"], c["variant"], c.get("press") or "-", f"{c.get('ratio') or 0:g}", f"chunk{c.get('chunk') or 0}",
             str(c["length"])]
    if c.get("params"):
        parts.append(json.dumps(c["params"], sort_keys=True))
    if c.get("device"):
        parts.append(c["device"])
    return "|".join(parts)


def plan(args) -> list[dict]:
    cells = []
    for L in args.lengths:
        base = {"length": L, "threads": args.threads, "new_tokens": args.new_tokens}
        if args.device != "cpu":
            base["device"] = args.device  # cpu cells keep their old keys
        for v in args.variants:
            if v == "full":
                cells.append(base | {"tool": "sparseforge", "variant": "full"})
            elif v == "full-chunked":
                cells.append(base | {"tool": "sparseforge", "variant": "full", "chunk": args.chunk})
            elif v in ("press", "press-chunked"):
                for p in args.presses:
                    for r in args.ratios:
                        cells.append(base | {"tool": "sparseforge", "variant": "press", "press": p, "ratio": r,
                                             "chunk": args.chunk if v == "press-chunked" else None})
            elif v in ("kivi", "kivi-chunked"):
                for bits in args.kivi_bits:
                    cells.append(base | {"tool": "sparseforge", "variant": "kivi", "press": "kivi", "ratio": None,
                                         "params": {"bits": bits}, "chunk": args.chunk if v == "kivi-chunked" else None})
            elif v == "kvpress":
                for p in args.kvpress_presses:
                    cells.append(base | {"tool": "kvpress", "variant": "press", "press": p, "ratio": args.kvpress_ratio})
    return cells


def label(c: dict) -> str:
    if c["variant"] == "full":
        name = "full cache"
    elif c["variant"] == "kivi":
        name = f"kivi {c['params']['bits']}-bit"
    else:
        name = f"{c['press']} {c['ratio']:g}"
    if c["tool"] == "kvpress":
        name = "kvpress " + name
    return name + (f", chunked {c['chunk']}" if c.get("chunk") else "")


def markdown(doc: dict) -> str:
    rows = doc["cells"]
    env = next((r["result"]["env"] for r in rows if "env" in r.get("result", {})), kc.machine())
    gpu = env.get("device") == "cuda"
    memory = "torch.cuda.max_memory_allocated" if gpu else "the process's resident set"
    lines = ["# KV cache at scale: 8B-shaped attention, random weights\n",
             f"Machine: {kc.machine_line(env)}. Produced by `benchmarks/kv_scale.py` (command in the JSON). Model: Llama, "
             f"hidden 4096, 32 query heads, 8 KV heads, head size 128, {CONFIG['num_hidden_layers']} layers, MLP 1024, "
             f"vocabulary 1024, float32 weights and cache, sdpa attention, batch 1. Peak memory is {memory} during the phase "
             f"(fresh process per cell; the 'peak' columns are absolute, 'prefill +' is the rise over what was "
             f"{'allocated' if gpu else 'resident'} before the prefill: model weights included in the first, not the second). "
             f"Cache MiB: the cache's exact bytes after prefill; fp16-equiv.: what the full cache would take in float16. "
             f"TTFT: the whole prefill through the first token; TPOT: median of {doc['args']['new_tokens']} decode steps.\n",
             "| length | variant | prefill peak MiB | prefill + MiB | decode peak MiB | cache MiB | cache peak MiB | cache / fp16 full | TTFT s | TPOT ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["cell"]["length"], r["cell"]["tool"] != "sparseforge", label(r["cell"]))):
        c, m = r["cell"], r["result"]
        if "error" in m:
            lines.append(f"| {c['length']} | {label(c)} | error: {m['error'][:120]} |||||||")
            continue
        lines.append(f"| {c['length']} | {label(c)} | {kc.mib(m['prefill_peak_bytes'])} | {kc.mib(m['prefill_delta_bytes'])} | "
                     f"{kc.mib(m['decode_peak_bytes'])} | {kc.mib(m['cache_bytes_after_prefill'])} | {kc.mib(m['cache_bytes_peak'])} | "
                     f"{m['cache_bytes_after_prefill'] / m['full_cache_fp16_bytes']:.3f} | {m['ttft_s']:.1f} | "
                     f"{1000 * m['tpot_s']:.0f} |")
    lines += ["", *criteria(rows)]
    return "\n".join(lines) + "\n"


def criteria(rows) -> list[str]:
    """The issue's targets, from the measured cells (only those that ran)."""
    ok = {cell_key(r["cell"]): r for r in rows if "error" not in r["result"]}
    out = ["## Targets of issue 10", ""]
    for L in sorted({r["cell"]["length"] for r in rows}):
        full = ok.get(f"sparseforge|full|-|0|chunk0|{L}")
        for key, r in ok.items():
            c = r["cell"]
            if c["length"] != L or c["tool"] != "sparseforge" or c["variant"] != "press" or c.get("ratio") != 0.875 or not c.get("chunk"):
                continue
            m = r["result"]
            parts = []
            if full:
                parts.append(f"{m['prefill_peak_bytes'] / full['result']['prefill_peak_bytes']:.2f}x of full-cache prefill peak "
                             f"(rise over the loaded model: {m['prefill_delta_bytes'] / max(1, full['result']['prefill_delta_bytes']):.2f}x)")
            kvp = ok.get(f"kvpress|press|{c['press']}|0.875|chunk0|{L}") or next(
                (v for k, v in ok.items() if k.startswith("kvpress|press|") and k.endswith(f"|0.875|chunk0|{L}")), None)
            if kvp:
                parts.append(f"{m['prefill_peak_bytes'] / kvp['result']['prefill_peak_bytes']:.2f}x of kvpress {kvp['cell']['press']} 0.875 "
                             f"(rise: {m['prefill_delta_bytes'] / max(1, kvp['result']['prefill_delta_bytes']):.2f}x)")
            if parts:
                out.append(f"- {L} tokens, {label(c)}: prefill peak " + "; ".join(parts) + ".")
        for key, r in ok.items():
            c = r["cell"]
            if c["length"] == L and c["variant"] == "kivi":
                m = r["result"]
                out.append(f"- {L} tokens, {label(c)}: cache {m['cache_bytes_after_prefill'] / m['full_cache_fp16_bytes']:.3f}x of the "
                           f"float16-equivalent full cache (target {'0.3' if c['params']['bits'] == 4 else '0.2'}x).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=ints, default=[4096, 8192, 16384, 32768])
    ap.add_argument("--presses", type=names, default=list(PRESSES))
    ap.add_argument("--ratios", type=floats, default=[0.75, 0.875])
    ap.add_argument("--variants", type=names, default=["full", "full-chunked", "press", "press-chunked", "kivi", "kvpress"])
    ap.add_argument("--kivi-bits", type=ints, default=[4, 2])
    ap.add_argument("--kvpress-presses", type=names, default=["snapkv"])
    ap.add_argument("--kvpress-ratio", type=float, default=0.875)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kvpress-python", default=DEFAULT_KVPRESS_PYTHON)
    ap.add_argument("--redo", action="store_true", help="rerun cells already in the results")
    ap.add_argument("--timeout", type=float, default=3000, help="seconds per cell")
    ap.add_argument("--name", default=None, help="results file stem (a smoke run should not overwrite the real one); "
                    "default kv_scale, or kv_scale_gpu with --device cuda")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--merge", default="", help="results file stems whose cells are copied in (runs made in parallel); then exit")
    args = ap.parse_args()
    if args.device == "cuda" and not args.cell:
        import torch

        if not torch.cuda.is_available():
            sys.exit("kv_scale.py: --device cuda but torch sees no CUDA GPU; run on a GPU machine or drop --device")
    if args.name is None:
        args.name = NAME if args.device == "cpu" else f"{NAME}_gpu"
    if args.cell:
        print(json.dumps(cell(json.loads(args.cell))))
        return

    path = kc.RESULTS / f"{args.name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"cells": []}
    doc["args"] = vars(args) | {"command": " ".join(sys.argv)}
    doc.setdefault("commands", []).append(" ".join(sys.argv))  # every invocation that wrote into this file
    doc["config"] = CONFIG
    done = {cell_key(r["cell"]): i for i, r in enumerate(doc["cells"])}
    if args.merge:
        for other in args.merge.split(","):
            for r in json.loads((kc.RESULTS / f"{other}.json").read_text())["cells"]:
                key = cell_key(r["cell"])
                if key in done:
                    doc["cells"][done[key]] = r
                else:
                    done[key] = len(doc["cells"])
                    doc["cells"].append(r)
        kc.write(args.name, doc, markdown(doc))
        return
    for c in plan(args):
        key = cell_key(c)
        if key in done and not args.redo and "error" not in doc["cells"][done[key]]["result"]:
            continue
        python = args.kvpress_python if c["tool"] == "kvpress" else sys.executable
        t0 = time.strftime("%H:%M:%S")
        result = kc.run_cell(python, SCRIPT, c, timeout=args.timeout)
        entry = {"cell": c, "result": result, "started": t0}
        if key in done:
            doc["cells"][done[key]] = entry
        else:
            done[key] = len(doc["cells"])
            doc["cells"].append(entry)
        print(label(c), c["length"], {k: v for k, v in result.items() if k != "env"}, flush=True)
        kc.write(args.name, doc, markdown(doc))
    kc.write(args.name, doc, markdown(doc))


if __name__ == "__main__":
    main()
