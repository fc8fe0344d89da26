"""Expert offloading (expert-offload): peak memory and decode speed against everything in memory, with and without
prefetch, for one or two cache sizes, on (a) the bundled MoE reference model and (b) a random-weight Mixtral with
larger experts, where the memory effect is clear.

Each variant runs in a fresh subprocess (kv_common.run_cell) that loads its artifact with `sparseforge.load`, so the
offload variants never build their experts (the loader leaves them to the stage), prefills a prompt of held-out text and
decodes through the cache one token per step, fed the next held-out token (teacher forcing: routing follows real
text; a random model's own greedy output repeats one token, which would make every cache hit). Reported per variant:
- peak RSS: VmHWM of the whole process, which counts file-backed pages too. The in-memory baseline loads through
  transformers' safetensors reader; the offload stage reads experts with positioned reads (no mmap), so its file
  pages are the kernel's page cache, outside the process. RssAnon and RssFile at the end of decoding are given as
  well, so a reader can see which kind each variant's memory is;
- expert bytes resident at the peak, exactly: every expert tensor for the baseline, the allocated cache slots for
  offloading (their buffers exist for the whole run, so they are resident at the peak whatever the peak's moment);
- decode tokens/s: median over steps after warm-up steps;
- cache and prefetch hit rates (prefetch: predicted experts that the next layer then routed to).
Disk reads come from the page cache here (the artifact was just written; this machine has RAM to spare), so
"disk" means page cache -> process memory, the best case for offloading. Each step's argmax token is compared
with the baseline's (they must be equal).

    python benchmarks/moe_offload.py                    # both models, CPU
    python benchmarks/moe_offload.py --device cuda      # storage cpu -> GPU, torch.cuda.max_memory_allocated
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kv_common  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
MOE_REFERENCE = [HERE.parent / "src" / "sparseforge" / "assets" / "reference-moe",
                 pathlib.Path("/work/wt-m2/src/sparseforge/assets/reference-moe")]
RANDOM_MIXTRAL = dict(hidden_size=1024, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      num_local_experts=8, num_experts_per_tok=2, vocab_size=4096, max_position_embeddings=2048,
                      tie_word_embeddings=True)


def _status(field: str) -> int:
    return kv_common._status_kib(field) * 1024


def _held_out_ids(n: int) -> list[int]:
    """The first `n` tokens of the bundled held-out text (the bundled models share one tokenizer): decoding feeds
    these one per step (teacher forcing), so routing follows real text, not a random model's repetitive greedy loop."""
    from transformers import AutoTokenizer

    from sparseforge.data import read_text

    tok = AutoTokenizer.from_pretrained(kv_common.REFERENCE_MODEL)
    ids = tok(read_text("heldout")[: 40 * n]).input_ids[:n]
    assert len(ids) == n
    return ids


# ------------------------------------------------------------------------------------------------ one cell
def cell(spec: dict) -> dict:
    import statistics
    import threading

    import torch

    torch.set_num_threads(spec.get("threads", 1))
    import sparseforge

    device = spec["device"]
    peak_anon = [0]
    stop = threading.Event()

    def sample():  # /proc has no peak of RssAnon alone: sample it (every 2 ms)
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = sparseforge.load(spec["path"], device=device)
    load_s = time.perf_counter() - t0
    stages = sparseforge.runtime_stages(model)
    method = stages[0].method if stages else None
    after_load = {"rss": _status("VmRSS"), "anon": _status("RssAnon"), "file": _status("RssFile")}
    from sparseforge.core.moe import find_moe_blocks

    blocks = find_moe_blocks(model)
    expert_bytes = sum(getattr(b.experts, n).numel() * getattr(b.experts, n).element_size()
                       for b in blocks for n in ("gate_up_proj", "down_proj"))
    ids = torch.tensor([_held_out_ids(spec["prompt"] + spec["warmup"] + spec["decode"])], device=device)
    prompt = ids[:, : spec["prompt"]]
    from transformers import DynamicCache

    times, tokens = [], []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        if method is not None:
            method.reset_stats()  # decode statistics only (the prompt loads every expert)
        for step in range(spec["warmup"] + spec["decode"]):
            pos = spec["prompt"] + step
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=ids[:, pos:pos + 1], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - t)
            tokens.append(int(nxt))
    stop.set()
    sampler.join()
    res = {"variant": spec["variant"], "load_s": round(load_s, 2), "peak_rss": _status("VmHWM"), "peak_anon_sampled": peak_anon[0],
           "end_rss_anon": _status("RssAnon"), "end_rss_file": _status("RssFile"), "after_load": after_load,
           "decode_tokens_per_s": 1.0 / statistics.median(times), "decode_steps": len(times), "tokens": tokens}
    if method is not None:
        stats = method.stats()
        res |= {"expert_bytes": stats["expert_bytes"], "expert_bytes_resident": stats["cache_bytes"], "stats": stats}
    else:
        res |= {"expert_bytes": expert_bytes, "expert_bytes_resident": expert_bytes}
    if device == "cuda":
        res["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return res


def speed_cell(spec: dict) -> dict:
    """Decode speed of every variant of one model in one process, alternating one step of each per round (so load
    changes on this shared machine hit all variants alike); medians after warm-up rounds."""
    import statistics

    import torch

    torch.set_num_threads(spec.get("threads", 1))
    import sparseforge
    from transformers import DynamicCache

    device = spec["device"]
    runs = []
    ids = torch.tensor([_held_out_ids(spec["prompt"] + spec["warmup"] + spec["decode"])], device=device)
    for label, path in spec["variants"]:
        model = sparseforge.load(path, device=device)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, : spec["prompt"]], past_key_values=cache, use_cache=True)
        runs.append({"label": label, "model": model, "cache": cache, "times": []})
    for step in range(spec["warmup"] + spec["decode"]):
        pos = spec["prompt"] + step
        for r in runs:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                r["model"](input_ids=ids[:, pos:pos + 1], past_key_values=r["cache"], use_cache=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= spec["warmup"]:
                r["times"].append(time.perf_counter() - t)
    return {r["label"]: {"tokens_per_s": 1.0 / statistics.median(r["times"]), "median_ms": 1e3 * statistics.median(r["times"]),
                         "steps": len(r["times"])} for r in runs}


# ------------------------------------------------------------------------------------------------ artifacts
def _artifact(src: pathlib.Path, out: pathlib.Path, stage: dict | None) -> pathlib.Path:
    """`src` loaded and saved with sparseforge (with the offload stage attached when `stage` is given)."""
    import torch

    import sparseforge

    if out.exists():
        return out
    model = sparseforge.load(src)
    tokenizer = None
    if stage is not None:
        sparseforge.attach_method(model, "expert-offload", stage)
    sparseforge.save(model, out, tokenizer)
    del model
    return out


def _variant(base: pathlib.Path, out: pathlib.Path, params: dict) -> pathlib.Path:
    """A copy of the offload artifact `base` (weights hard-linked, not copied) whose stage has `params`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, out / f.name)
        elif f.is_file():
            shutil.copyfile(f, out / f.name)
    info = json.loads((out / "sparseforge.json").read_text())
    info["runtime"]["stages"][0]["params"].update(params)
    (out / "sparseforge.json").write_text(json.dumps(info, indent=2))
    return out


def _random_mixtral(out: pathlib.Path) -> pathlib.Path:
    import torch
    import transformers

    if out.exists():
        return out
    config = transformers.MixtralConfig(**RANDOM_MIXTRAL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out)
    tok_src = next((p for p in MOE_REFERENCE if p.is_dir()), kv_common.REFERENCE_MODEL)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tok_src / f).is_file():
            shutil.copyfile(tok_src / f, out / f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["reference-moe", "random-mixtral"])
    ap.add_argument("--caches", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--work", default=None, help="scratch directory for the artifacts (default: a temporary one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(speed_cell(spec) if "variants" in spec else cell(spec)))
        return
    import torch

    torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("moe_offload: no CUDA device; skipping the GPU variant")
        return
    storage = "cpu" if args.device == "cuda" else "disk"
    work = pathlib.Path(args.work) if args.work else pathlib.Path(tempfile.mkdtemp(prefix="moe-offload-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    doc = {"machine": kv_common.machine(1), "load_average": load, "device": args.device, "storage": storage,
           "prompt_tokens": args.prompt, "decode_steps": args.decode, "warmup_steps": args.warmup, "models": {}}
    for name in args.models:
        if name == "reference-moe":
            src = next((p for p in MOE_REFERENCE if (p / "config.json").is_file()), None)
            if src is None:
                print("moe_offload: no bundled MoE reference model yet; skipping it")
                continue
        else:
            src = _random_mixtral(work / "random-mixtral-src")
        plain = _artifact(src, work / f"{name}-plain", None)
        base = _artifact(src, work / f"{name}-offload", {"storage": storage, "cache_experts": max(args.caches), "prefetch": True})
        specs = [("in memory", plain)]
        for c in args.caches:
            for prefetch in (False, True):
                label = f"offload cache {c}" + (" + prefetch" if prefetch else "")
                specs.append((label, _variant(base, work / f"{name}-c{c}-p{int(prefetch)}",
                                              {"cache_experts": c, "prefetch": prefetch, "storage": storage})))
        rows = []
        for label, path in specs:
            spec = {"variant": label, "path": str(path), "device": args.device, "prompt": args.prompt, "decode": args.decode,
                    "warmup": args.warmup, "threads": 1}
            res = kv_common.run_cell(sys.executable, pathlib.Path(__file__).resolve(), spec, timeout=900)
            print(json.dumps({k: v for k, v in res.items() if k != "tokens"})[:400], flush=True)
            rows.append(res)
        speed = kv_common.run_cell(sys.executable, pathlib.Path(__file__).resolve(),
                                   {"variants": [[label, str(path)] for label, path in specs], "device": args.device, "prompt": args.prompt,
                                    "decode": args.decode, "warmup": args.warmup, "threads": 1}, timeout=1200)
        print(json.dumps(speed)[:400], flush=True)
        for r in rows:
            r["alternating"] = speed.get(r["variant"]) if "error" not in speed else None
        base_tokens = rows[0].get("tokens")
        for r in rows:
            r["tokens_equal_in_memory"] = r.get("tokens") == base_tokens
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(src)
        doc["models"][name] = {"source": str(src), "config": {k: getattr(cfg, k, None) for k in
                               ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok")},
                               "rows": rows}
    doc["load_average_end"] = os.getloadavg()
    out = args.out or ("moe_offload" if args.device == "cpu" else "moe_offload_gpu")
    kv_common.write(out, doc, markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Expert offloading: memory and decode speed ({doc['device']}, storage {doc['storage']})", "",
             f"Machine: {kv_common.machine_line(m)}; load average {doc['load_average'][0]:.2f} at the start, "
             f"{doc['load_average_end'][0]:.2f} at the end. Produced by `benchmarks/moe_offload.py`.", "",
             f"Prompt {doc['prompt_tokens']} held-out tokens, then {doc['decode_steps']} decode steps fed the next held-out token (after {doc['warmup_steps']} "
             "warm-up steps), batch 1. Memory: one fresh process per row; peak RSS is VmHWM (counts file-backed pages); "
             "peak RssAnon is sampled every 2 ms (anonymous memory only: the in-memory baseline also keeps its checkpoint mapped, "
             "counted in RssFile); RssAnon/RssFile are read at the end of decoding; expert bytes resident are exact tensor bytes. Speed: "
             "'alternating' runs every variant of a model in one process, one decode step of each per round, median step "
             "(the comparable number on this shared machine); 'own process' is the median step in the row's memory process. "
             "Disk reads are served from the page cache. Cache and prefetch hit rates count decode steps only.", ""]
    for name, model in doc["models"].items():
        c = model["config"]
        lines += [f"## {name}", "", f"hidden {c['hidden_size']}, expert intermediate {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
                  f"{c['num_local_experts']} experts, top-{c['num_experts_per_tok']}.", "",
                  "| variant | peak RSS MiB | peak RssAnon MiB (sampled) | RssAnon MiB | RssFile MiB | expert MiB resident (of all) | decode tok/s (alternating) | vs in memory | decode tok/s (own process) | cache hit | prefetch hit | argmax = in memory | CUDA max allocated MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        alt0 = (model["rows"][0].get("alternating") or {}).get("tokens_per_s")
        for r in model["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | error: {r['error'][:120]} |||||||||")
                continue
            s = r.get("stats", {})
            rate = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            frac = r["expert_bytes_resident"] / r["expert_bytes"]
            alt = (r.get("alternating") or {}).get("tokens_per_s")
            alt_cols = f"{alt:.1f} | {alt / alt0:.2f}x" if alt and alt0 else "- | -"
            lines.append(f"| {r['variant']} | {kv_common.mib(r['peak_rss'])} | {kv_common.mib(r['peak_anon_sampled'])} | {kv_common.mib(r['end_rss_anon'])} | {kv_common.mib(r['end_rss_file'])} | "
                         f"{kv_common.mib(r['expert_bytes_resident'])} of {kv_common.mib(r['expert_bytes'])} ({frac:.2f}x) | "
                         f"{alt_cols} | {r['decode_tokens_per_s']:.1f} | {rate(s.get('cache_hit_rate'))} | "
                         f"{rate(s.get('prefetch_hit_rate'))} | {'yes' if r['tokens_equal_in_memory'] else 'NO'} | "
                         f"{kv_common.mib(r.get('cuda_max_allocated'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
