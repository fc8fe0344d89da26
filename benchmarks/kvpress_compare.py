"""sparseforge's KV presses vs. NVIDIA kvpress (PyPI `kvpress`) on the bundled model (issue 10, item 7): the same
prompts, the same token ids, the same ratios, the same greedy scoring; accuracy in one table, peak prefill memory
in another.

Usage (the sparseforge environment):
    python benchmarks/kvpress_compare.py [--kvpress-python /work/venv-kvpress/bin/python] [--lengths 2048]
        [--per-depth 4] [--presses streaming_llm,snapkv,knorm,tova,pyramidkv] [--no-memory] [--threads 1]
kvpress pins transformers below what sparseforge uses, so it lives in its own environment (default
$KVPRESS_PYTHON, else /work/venv-kvpress/bin/python: `python3 -m venv`, `pip install torch==2.13.0`, then
`pip install kvpress`, which brought kvpress 0.5.5 with transformers 5.2.0). This file is run by that interpreter
with `--worker SPEC` (accuracy) and `--cell SPEC` (memory); it then imports only torch, transformers and kvpress.
Writes benchmarks/results/kvpress_compare.json and .md.

Prompts: `sparseforge.data.synthetic` passkey and multi-key (4 keys) episodes of exactly L tokens (default 2048,
the model's context) over the bundled held-out text, needle depths 0, 0.25, 0.5, 0.75, 1 with `--per-depth`
episodes each (20 per cell by default), seed 0. The token ids are built once here and written to JSON; the
kvpress worker reads them, so both tools see identical ids.

Protocol, identical code for both tools (`answer_tokens` below, run under each tool's transformers):
  * question-aware: the prompt up to the answer (document + question) is prefilled in one forward with the press
    active, compressed, and the answer decoded from the compressed cache;
  * question-agnostic: the document alone (up to the question's leading newline) is prefilled and compressed,
    then the question is fed through the compressed cache uncompressed, then the answer is decoded; this is
    kvpress's own pipeline (`KVPressTextGenerationPipeline` compresses the context, then feeds the question).
  Greedy decoding of as many tokens as the answer has, with explicit position ids (the next position after
  everything seen, whatever the cache holds); an episode is correct when the decoded ids equal the answer's ids.
  The main process scores both tools' decoded ids the same way.
  sparseforge: `press.attach(model)` for the episode, `press.detach(model)` after; its default schedule
  compresses the prompt's prefill (the first forward into an empty cache) and not the question; presses that
  also evict while decoding (StreamingLLM, TOVA) keep the cache at its budget for the answer's few tokens.
  kvpress: `with press(model):` around the prefill forward only (its presses act in prefill only).

Press settings, matched: StreamingLLM n_sink 4; SnapKV window 64, pooling kernel 5; PyramidKV the same plus
beta 20; key-norm and TOVA have no parameters. Differences that remain (see the docstrings of both tools):
kvpress's SnapKV averages the window's attention weights and pads the pooling with zeros, ours sums them and
excludes the padding; kvpress's TOVA never evicts the last token, ours keeps it by its score; budgets are
round() in ours, int() in kvpress's `compute_n_kept`.

Reference rows (kvpress only): KVzip (question-agnostic by design: it scores each cached token by how much
attention it gets while the model reconstructs the context; costs 2-3 prefills) and ExpectedAttention
(kvpress's own query-agnostic press, scores from the statistics of future queries).

Memory: for every tool x press x ratio, a fresh process loads the model, resets its peak-RSS counter, prefills one
question-aware passkey episode of the longest length with the press active and reads the peak (kv_common.py);
the cache's exact bytes after prefill are beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kv_common as kc  # noqa: E402

NAME = "kvpress_compare"
SCRIPT = pathlib.Path(__file__).resolve()
DEFAULT_KVPRESS_PYTHON = os.environ.get("KVPRESS_PYTHON", "/work/venv-kvpress/bin/python")
RATIOS = (0.5, 0.75, 0.875)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASKS = ("passkey", "multikey")
MODES = ("aware", "agnostic")
# name -> (sparseforge method and params, kvpress class and kwargs); None on one side: that tool lacks it.
PRESSES = {
    "streaming_llm": (("streaming_llm", {"n_sink": 4}), ("StreamingLLMPress", {"n_sink": 4})),
    "snapkv": (("snapkv", {"window_size": 64, "kernel_size": 5}), ("SnapKVPress", {"window_size": 64, "kernel_size": 5})),
    "pyramidkv": (("pyramidkv", {"window_size": 64, "kernel_size": 5, "beta": 20}), ("PyramidKVPress", {"window_size": 64, "kernel_size": 5, "beta": 20})),
    "knorm": (("knorm", {}), ("KnormPress", {})),
    "tova": (("tova", {}), ("TOVAPress", {})),
    "kvzip": (None, ("KVzipPress", {})),
    "expected_attention": (None, ("ExpectedAttentionPress", {})),
}


# ------------------------------------------------------------------------------------------------ shared protocol

def answer_tokens(model, ids: list[int], split: int, answer_start: int, n_answer: int, compressing) -> tuple[list[int], list[int]]:
    """Prefill `ids[:split]` inside `compressing()`, feed `ids[split:answer_start]` (the question, when the
    document was compressed alone), then decode `n_answer` tokens greedily. Returns (decoded ids, tokens held per
    layer after the prefill). Runs under either tool's transformers."""
    import torch
    from transformers import DynamicCache

    x = torch.tensor([ids[:answer_start]])
    cache = DynamicCache()
    with torch.inference_mode():
        with compressing():
            out = model(input_ids=x[:, :split], past_key_values=cache, use_cache=True, logits_to_keep=1)
        held = kc.cache_tokens(cache)
        if split < answer_start:
            pos = torch.arange(split, answer_start).unsqueeze(0)
            out = model(input_ids=x[:, split:], past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        decoded = [int(token)]
        for i in range(n_answer - 1):
            out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=torch.tensor([[answer_start + i]]), use_cache=True)
            token = out.logits[0, -1].argmax()
            decoded.append(int(token))
    return decoded, held


def split_of(ep: dict, mode: str) -> int:
    return ep["answer_start"] if mode == "aware" else ep["question_start"]


def kvpress_press(name: str, ratio: float):
    import kvpress

    cls, kwargs = PRESSES[name][1]
    return getattr(kvpress, cls)(compression_ratio=ratio, **kwargs)


PREFILL_ONLY = False  # --prefill-only: sparseforge presses do not evict while decoding (kvpress's behaviour)


def sparseforge_press(name: str, ratio: float):
    from sparseforge.methods import get_method

    method_name, params = PRESSES[name][0]
    method = get_method(method_name)
    press = method(method.parse_params({"compression_ratio": ratio, **params}))
    if PREFILL_ONLY:
        press.decodes = False  # the instance attribute shadows the class's: compress the prefill only
    return press


def load_model(tool: str, model_dir: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    if tool == "kvpress":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    import sparseforge

    return sparseforge.load(model_dir).eval()


@contextlib.contextmanager
def attached(model, press):
    """sparseforge: the press attached for one episode (its default schedule compresses the prefill only)."""
    if press is None:
        yield
        return
    press.attach(model, None)
    try:
        yield
    finally:
        press.detach(model)


def grid_key(g: dict) -> str:
    return f"{g['press']}|{g['ratio']:g}|{g['mode']}|{g['task']}|{g['length']}"


def run_grid(tool: str, model, episodes: list[dict], grid: list[dict], on_cell=None) -> list[dict]:
    """Decoded answer ids for every (press, ratio, mode, episode) of `grid` with one tool; `on_cell(entry)` is
    called after each cell (the callers save partial results there)."""
    out = []
    for g in grid:
        entry = dict(g)
        decoded, held, secs = [], [], []
        try:
            for ep in episodes:
                if ep["task"] != g["task"] or ep["length"] != g["length"]:
                    continue
                if g["press"] == "none":
                    press, ctx, compressing = None, contextlib.nullcontext(), contextlib.nullcontext
                elif tool == "kvpress":
                    press = kvpress_press(g["press"], g["ratio"])
                    ctx, compressing = contextlib.nullcontext(), (lambda p=press: p(model))
                else:
                    press = sparseforge_press(g["press"], g["ratio"])
                    ctx, compressing = attached(model, press), contextlib.nullcontext
                t0 = time.perf_counter()
                with ctx:
                    d, h = answer_tokens(model, ep["input_ids"], split_of(ep, g["mode"]), ep["answer_start"],
                                         ep["answer_end"] - ep["answer_start"], compressing)
                secs.append(time.perf_counter() - t0)
                decoded.append(d)
                held.append(h)
            entry.update(decoded=decoded, held_first=held[0] if held else None, median_episode_s=statistics.median(secs) if secs else None)
        except Exception as exc:  # one failing press must not sink the others
            import traceback

            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        out.append(entry)
        if on_cell is not None:
            on_cell(entry)
        print(tool, g["press"], g["ratio"], g["mode"], g["task"], g["length"], entry.get("error", "ok"), flush=True)
    return out


# ------------------------------------------------------------------------------------------------ kvpress side

def worker(spec_path: str) -> None:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    result = {"environment": None, "runs": [], "settings": spec.get("settings")}
    try:
        model = load_model("kvpress", spec["model_dir"], spec["threads"])
        env = kc.machine(spec["threads"])
        from importlib import metadata

        env["kvpress"] = metadata.version("kvpress")
        result["environment"] = env
        episodes = json.loads(pathlib.Path(spec["episodes"]).read_text())

        def save(entry):
            result["runs"].append(entry)
            pathlib.Path(spec["result"]).write_text(json.dumps(result))

        run_grid("kvpress", model, episodes, spec["grid"], on_cell=save)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        pathlib.Path(spec["result"]).write_text(json.dumps(result))


def memory_cell(spec: dict) -> dict:
    """One fresh process: load, reset the peak counter, prefill one episode with the press, read the peak."""
    model = load_model(spec["tool"], spec["model_dir"], spec["threads"])
    ep = json.loads(pathlib.Path(spec["episodes"]).read_text())[spec["episode"]]
    import torch
    from transformers import DynamicCache

    x = torch.tensor([ep["input_ids"][: ep["answer_start"]]])
    press, ctx, compressing = None, contextlib.nullcontext(), contextlib.nullcontext
    if spec["press"] != "none":
        if spec["tool"] == "kvpress":
            press = kvpress_press(spec["press"], spec["ratio"])
            compressing = lambda: press(model)  # noqa: E731
        else:
            press = sparseforge_press(spec["press"], spec["ratio"])
            ctx = attached(model, press)
    if spec["tool"] == "kvpress":
        count = kc.tensor_bytes
    else:
        from sparseforge.methods.kv import cache_bytes as count
    cache = DynamicCache()
    with ctx, torch.inference_mode():
        with kc.Phase() as p:
            with compressing():
                model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        held = kc.cache_tokens(cache)
        nbytes = count(cache)
    return {"prefill_peak_bytes": p.peak, "prefill_delta_bytes": p.delta, "rss_before": p.start_rss, "seconds": p.seconds,
            "cache_bytes": nbytes, "held": held, "env": kc.machine(spec["threads"])}


# ------------------------------------------------------------------------------------------------ main side

def build_episodes(lengths, per_depth: int, seed: int) -> list[dict]:
    from sparseforge.data import read_text
    from sparseforge.data.synthetic import episodes
    from sparseforge.formats.artifact import load_tokenizer

    tok = load_tokenizer(None)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1, "the question is found by its leading newline token"
    out = []
    for task in TASKS:
        for ep in episodes(task, tok, read_text("heldout"), lengths, DEPTHS, per_depth, seed):
            ids = list(ep.input_ids)
            # The question is the text after the last newline before the answer (the synthetic question starts
            # with one and contains no other).
            q = max(i for i in range(ep.answer_start) if ids[i] == newline[0])
            out.append({"task": task, "length": len(ids), "depth": ep.depth, "input_ids": ids, "question_start": q,
                        "answer_start": ep.answer_start, "answer_end": ep.answer_end, "answer": ep.answer})
    return out


def build_grid(presses, lengths, tool: str, modes: list[tuple[str, str]]) -> list[dict]:
    """Column by column (the first column first for every press), the presses both tools have before the
    kvpress-only reference rows, so a run cut short has the comparable cells."""
    grid, refs = [], []
    for L in lengths:
        for mode, task in modes:
            grid.append({"press": "none", "ratio": 0.0, "mode": mode, "task": task, "length": L})
            for p in presses:
                if PRESSES[p][0 if tool == "sparseforge" else 1] is None:
                    continue
                for r in RATIOS:
                    (refs if PRESSES[p][0] is None else grid).append({"press": p, "ratio": r, "mode": mode, "task": task, "length": L})
    return grid + refs


def score(runs: list[dict], episodes: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        eps = [e for e in episodes if e["task"] == r["task"] and e["length"] == r["length"]]
        row = {k: r[k] for k in ("press", "ratio", "mode", "task", "length")}
        if "error" in r:
            row["error"] = r["error"]
        else:
            hits = [d == e["input_ids"][e["answer_start"]: e["answer_end"]] for d, e in zip(r["decoded"], eps)]
            row.update(accuracy=sum(hits) / len(hits), correct=sum(hits), n=len(hits), hits=hits, held_first=r.get("held_first"),
                       median_episode_s=r.get("median_episode_s"))
        rows.append(row)
    return rows


def start_kvpress_worker(python: str, spec: dict, work: pathlib.Path):
    """Start the kvpress worker (it runs while this process runs sparseforge's grid); None if no interpreter."""
    import subprocess

    if not pathlib.Path(python).exists():
        return None
    spec_path = work / "kvpress_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | kc.CELL_ENV
    log = open(work / "kvpress_worker.log", "w")
    return subprocess.Popen([python, str(SCRIPT), "--worker", str(spec_path)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(work))


def finish_kvpress_worker(proc, python: str, spec: dict, work: pathlib.Path) -> tuple[dict | None, str | None]:
    if proc is None:
        return None, f"no kvpress interpreter at {python} (pass --kvpress-python)"
    rc = proc.wait()
    res = json.loads(pathlib.Path(spec["result"]).read_text()) if pathlib.Path(spec["result"]).is_file() else None
    if rc != 0:
        tail = (work / "kvpress_worker.log").read_text().strip().splitlines() or ["?"]
        return res, (res or {}).get("error") or tail[-1]
    return res, None


def fmt_acc(row) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    return f"{row['accuracy']:.2f}"


def markdown(doc: dict) -> str:
    env, kenv = doc["environment"]["sparseforge"], doc["environment"].get("kvpress") or {}
    acc = {(r["tool"], r["press"], r["ratio"], r["mode"], r["task"], r["length"]): r for r in doc["accuracy"]}
    lengths = sorted({r["length"] for r in doc["accuracy"]})
    lines = ["# sparseforge vs. kvpress on the bundled model\n",
             f"Machine: {kc.machine_line(env)}; kvpress side: kvpress {kenv.get('kvpress')}, transformers {kenv.get('transformers')}, "
             f"torch {kenv.get('torch')}. Produced by `benchmarks/kvpress_compare.py` (protocol and settings in its docstring). "
             f"Bundled 4 M-parameter Llama (4 layers, 2 KV heads of 32 dims), float32, sdpa attention. "
             f"{doc['per_cell']} episodes per cell (needle depths 0-1), seed 0; exact-match greedy answers; ratio = fraction "
             f"of the cache removed. aware: document + question compressed together; agnostic: document compressed, then "
             f"the question. Cells where sparseforge is more than one episode below kvpress are marked **.\n"]
    if doc.get("kvpress_unavailable"):
        lines.append(f"kvpress unavailable: {doc['kvpress_unavailable']}\n")
    cols = [(m, t) for m in MODES for t in TASKS if any(r["mode"] == m and r["task"] == t for r in doc["accuracy"])]
    for L in lengths:
        lines += [f"## Accuracy at {L} tokens (sparseforge / kvpress)\n",
                  "| press | ratio | " + " | ".join(f"{t} {m}" for m, t in cols) + " |", "|---|---|" + "---|" * len(cols)]
        names = ["none"] + [p for p in PRESSES if any(k[1] == p for k in acc)]
        for p in names:
            for r in ([0.0] if p == "none" else RATIOS):
                cells = []
                for m, t in cols:
                    ours, theirs = acc.get(("sparseforge", p, r, m, t, L)), acc.get(("kvpress", p, r, m, t, L))
                    mark = ""
                    if ours and theirs and "error" not in ours and "error" not in theirs and ours["correct"] < theirs["correct"] - 1:
                        mark = " **"
                    cells.append(f"{fmt_acc(ours)} / {fmt_acc(theirs)}{mark}")
                if any(c != "- / -" for c in cells):
                    lines.append(f"| {p} | {r:g} | " + " | ".join(cells) + " |")
        lines.append("")
    errors = [r for r in doc["accuracy"] if "error" in r]
    if errors:
        lines += ["Errors:", ""] + [f"- {r['tool']} {r['press']} {r['ratio']:g} {r['mode']} {r['task']}: {r['error'][:200]}" for r in errors] + [""]
    mem = doc.get("memory") or []
    if mem:
        lines += [f"## Peak prefill memory ({mem[0]['length']}-token question-aware passkey prompt, fresh process per cell)\n",
                  "Resident set: 'peak' is the process's peak during the prefill (model, runtime and libraries included; "
                  "kvpress's environment imports more, so its resident size before the prefill is larger); 'rise' is the "
                  "peak minus the resident size just before the prefill. Cache: exact bytes the cache holds after prefill.\n",
                  "| press | ratio | sparseforge peak MiB | sparseforge rise MiB | sparseforge cache KiB | kvpress peak MiB | kvpress rise MiB | kvpress cache KiB |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(m["tool"], m["press"], m["ratio"]): m for m in mem}
        for p, r in dict.fromkeys((m["press"], m["ratio"]) for m in mem):
            o, k = by.get(("sparseforge", p, r), {}), by.get(("kvpress", p, r), {})
            f = lambda d, key, div: "-" if key not in d else f"{d[key] / div:.1f}"  # noqa: E731
            lines.append(f"| {p} | {r:g} | {f(o, 'prefill_peak_bytes', 2**20)} | {f(o, 'prefill_delta_bytes', 2**20)} | {f(o, 'cache_bytes', 1024)} | "
                         f"{f(k, 'prefill_peak_bytes', 2**20)} | {f(k, 'prefill_delta_bytes', 2**20)} | {f(k, 'cache_bytes', 1024)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--kvpress-python", default=DEFAULT_KVPRESS_PYTHON)
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--per-depth", type=int, default=4, help="episodes per needle depth (5 depths)")
    ap.add_argument("--presses", default="streaming_llm,snapkv,pyramidkv,knorm,tova,kvzip,expected_attention")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--columns", default="aware:passkey,aware:multikey,agnostic:passkey,agnostic:multikey",
                    help="mode:task pairs to run (modes aware, agnostic; tasks passkey, multikey)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--report-only", action="store_true", help="write the report from the cells measured so far, run nothing")
    ap.add_argument("--prefill-only", action="store_true",
                    help="diagnostic: sparseforge presses that evict while decoding (StreamingLLM, TOVA) compress the prefill only, as kvpress does")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.cell:
        print(json.dumps(memory_cell(json.loads(args.cell))))
        return

    import torch

    global PREFILL_ONLY
    PREFILL_ONLY = args.prefill_only
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    presses = [p for p in args.presses.split(",") if p]
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        raise SystemExit(f"unknown presses {unknown}; known: {', '.join(PRESSES)}")
    modes = [tuple(c.split(":")) for c in args.columns.split(",") if c]
    if any(m not in MODES or t not in TASKS for m, t in modes):
        raise SystemExit(f"--columns takes mode:task pairs with modes {MODES} and tasks {TASKS}")
    episodes = build_episodes(lengths, args.per_depth, seed=0)
    # Partial results survive a stopped run: cells already measured (same settings) are not run again.
    partial_path = kc.RESULTS / f".{args.name}.partial.json"
    settings = {"lengths": lengths, "per_depth": args.per_depth, "presses": presses, "columns": args.columns}
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    if partial.get("settings") != settings:
        partial = {"settings": settings, "sparseforge": {}, "kvpress": {}, "memory": {}, "kvpress_env": None}
    # The worker writes its cells here as it goes; a stopped run's cells are taken over when the settings match.
    worker_path = kc.RESULTS / f".{args.name}.worker.json"
    if worker_path.is_file():
        old = json.loads(worker_path.read_text())
        if old.get("settings") == settings:
            partial["kvpress"].update({grid_key(e): e for e in old.get("runs", [])})
            partial["kvpress_env"] = old.get("environment") or partial.get("kvpress_env")
    lock = threading.Lock()

    def save_partial():
        with lock:
            kc.RESULTS.mkdir(exist_ok=True)
            partial_path.write_text(json.dumps(partial))

    reason = None
    with tempfile.TemporaryDirectory(prefix="kvpress-compare-") as tmp:
        work = pathlib.Path(tmp)
        if args.report_only:
            modes, args.no_memory = [], True  # nothing to run: fall through to the report
        model_dir = work / "reference-model"
        shutil.copytree(kc.REFERENCE_MODEL, model_dir)
        (work / "episodes.json").write_text(json.dumps(episodes))
        t0 = time.perf_counter()
        todo_k = [g for g in build_grid(presses, lengths, "kvpress", modes) if grid_key(g) not in partial["kvpress"]]
        spec = {"model_dir": str(model_dir), "episodes": str(work / "episodes.json"), "result": str(worker_path),
                "threads": args.threads, "grid": todo_k, "settings": settings}
        save_partial()
        proc = start_kvpress_worker(args.kvpress_python, spec, work) if todo_k else None

        def memory_cells():
            L = max(lengths)
            first = next(i for i, e in enumerate(episodes) if e["task"] == "passkey" and e["length"] == L)
            for p in ["none"] + presses:
                for r in ([0.0] if p == "none" else RATIOS):
                    for tool in ("sparseforge", "kvpress"):
                        key = f"{tool}|{p}|{r:g}"
                        if (p != "none" and PRESSES[p][0 if tool == "sparseforge" else 1] is None) or key in partial["memory"]:
                            continue
                        python = args.kvpress_python if tool == "kvpress" else sys.executable
                        cell = {"tool": tool, "press": p, "ratio": r, "model_dir": str(model_dir), "episodes": str(work / "episodes.json"),
                                "episode": first, "threads": args.threads}
                        m = kc.run_cell(python, SCRIPT, cell, timeout=900)
                        partial["memory"][key] = {"tool": tool, "press": p, "ratio": r, "length": L} | m
                        save_partial()
                        print("memory", tool, p, r, {k: v for k, v in m.items() if k not in ("env", "held")}, flush=True)

        mem_thread = threading.Thread(target=memory_cells, daemon=True)
        if not args.no_memory:
            mem_thread.start()
        model = load_model("sparseforge", str(model_dir), args.threads)

        def keep_ours(entry):
            partial["sparseforge"][grid_key(entry)] = entry
            save_partial()

        todo_o = [g for g in build_grid(presses, lengths, "sparseforge", modes) if grid_key(g) not in partial["sparseforge"]]
        run_grid("sparseforge", model, episodes, todo_o, on_cell=keep_ours)
        if todo_k:
            kres, reason = finish_kvpress_worker(proc, args.kvpress_python, spec, work)
            for entry in (kres or {}).get("runs", []):
                partial["kvpress"][grid_key(entry)] = entry
            partial["kvpress_env"] = (kres or {}).get("environment") or partial.get("kvpress_env")
            save_partial()
            log = work / "kvpress_worker.log"
            if reason and log.is_file():
                print(log.read_text()[-3000:])
        if mem_thread.is_alive():
            mem_thread.join()
        print(f"done in {time.perf_counter() - t0:.0f} s, kvpress {reason or 'ok'}", flush=True)
    rows = [r | {"tool": "sparseforge"} for r in score(list(partial["sparseforge"].values()), episodes)]
    rows += [r | {"tool": "kvpress"} for r in score(list(partial["kvpress"].values()), episodes)]
    memory = list(partial["memory"].values())
    doc = {"environment": {"sparseforge": kc.machine(args.threads), "kvpress": partial.get("kvpress_env")},
           "kvpress_unavailable": reason, "command": " ".join(sys.argv), "per_cell": args.per_depth * len(DEPTHS),
           "presses": {p: {"sparseforge": v[0], "kvpress": v[1]} for p, v in PRESSES.items() if p in presses},
           "accuracy": rows, "memory": memory,
           "episodes": [{k: e[k] for k in ("task", "length", "depth", "answer", "question_start", "answer_start")} for e in episodes]}
    kc.write(args.name, doc, markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
