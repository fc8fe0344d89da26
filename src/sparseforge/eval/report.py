"""The results report: one self-contained HTML file (inline SVG plots, no script, nothing fetched at view time),
the same plots as PNG for a Markdown report, and exports of the store (kvpress-style leaderboard CSV,
MInference-style latency table by context length).

Plots are drawn with matplotlib: the plotting library this ecosystem's users know, with an SVG backend whose
output embeds inline (so the HTML needs no network and no JavaScript, and a browser test can count the drawn
points: every plotted point set is an SVG group with an id and the number of points it should hold), and a PNG
backend for the Markdown report. Generic over the results schema: the report draws whatever metrics the
records hold (any family), not a list of families.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import pathlib

from sparseforge.eval.store import machine_id

# Headline rows of the side-by-side table: (metric, label, format, better: "low"/"high"/None). Any other scalar
# metric a record holds goes into the "all metrics" table below it.
HEADLINE = (
    ("perplexity", "perplexity (held-out)", "{:.2f}", "low"),
    ("kv_perplexity", "perplexity through the KV cache", "{:.2f}", "low"),
    ("kl_to_reference", "KL to dense (nats/token)", "{:.4f}", "low"),
    ("top1_agreement", "top-1 agreement with dense", "{:.3f}", "high"),
    ("passkey_accuracy", "passkey accuracy", "{:.3f}", "high"),
    ("multikey_accuracy", "multi-key accuracy", "{:.3f}", "high"),
    ("sparsity", "weight sparsity", "{:.3f}", None),
    ("size_bytes", "size on disk (MB)", "mb", "low"),
    ("compression_rate_disk", "compression rate, disk (x)", "{:.2f}", "high"),
    ("model_memory_bytes", "model tensors in memory (MB)", "mb", "low"),
    ("compression_rate_memory", "compression rate, memory (x)", "{:.2f}", "high"),
    ("peak_memory_bytes", "peak memory, forward (MB)", "mb", "low"),
    ("mem_prefill_peak_bytes", "peak allocated, prefill (MB)", "mb", "low"),
    ("mem_decode_peak_bytes", "peak allocated, decode (MB)", "mb", "low"),
    ("memory_utilization", "memory utilization (decode RSS / total)", "{:.4f}", None),
    ("compute_utilization", "compute utilization (prefill / matmul peak)", "{:.3f}", "high"),
    ("latency_ttft_s", "TTFT (ms)", "ms", "low"),
    ("latency_tpot_s", "TPOT (ms)", "ms", "low"),
    ("prefill_tokens_per_s", "prefill tokens/s", "{:.0f}", "high"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.1f}", "high"),
    ("throughput_batch1_tokens_per_s", "throughput, batch 1 (tokens/s)", "{:.1f}", "high"),
    ("throughput_batch_tokens_per_s", "throughput, chosen batch (tokens/s)", "{:.1f}", "high"),
    ("throughput_batch", "chosen batch", "{}", None),
    ("energy_decode_joules_per_token", "energy, decode (J/token)", "{:.4f}", "low"),
    ("energy_source", "energy source", "{}", None),
    ("compress_seconds", "compress time (s)", "{:.1f}", None),
)
# Quality metrics the trade-off plots use, in order of preference, with their direction.
QUALITY = (("perplexity", "low"), ("kv_perplexity", "low"), ("passkey_accuracy", "high"), ("multikey_accuracy", "high"))
SIZE = ("size_bytes", "model_memory_bytes")
SPEED = ("decode_tokens_per_s", "throughput_batch1_tokens_per_s")
LM_EVAL_PREFIX = "lm_eval/"


# ----------------------------------------------------------------------------------------------- records


def label(record: dict) -> str:
    return record.get("recipe") or "dense"


def families(record: dict) -> list[str]:
    return sorted({s.get("family", "?") for s in record.get("stages") or []}) or ["dense"]


def method_of(record: dict) -> str:
    """The curve a record belongs to: its stages' methods joined by '+', each with its non-numeric parameters
    (a pattern such as 2:4 makes another curve; the numeric knobs, sparsity or ratio, move along it)."""
    parts = []
    spec = {i: s for i, s in enumerate((record.get("recipe_spec") or {}).get("stages") or [])}
    for i, stage in enumerate(record.get("stages") or []):
        params = (spec.get(i) or {}).get("params") or {}
        fixed = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if isinstance(v, str))
        parts.append(stage.get("method", "?") + (f"({fixed})" if fixed else ""))
    return "+".join(parts) or "dense"


def _group(record: dict) -> str:
    return json.dumps([record.get("model"), record.get("settings"), machine_id(record.get("environment") or {})], sort_keys=True, default=str)


def with_derived(records: list[dict]) -> list[dict]:
    """Copies of the records with compression rates against the dense record of the same model, settings and
    machine: dense bytes / compressed bytes, on disk and in memory (EfficientLLM's compression rate)."""
    dense = {_group(r): r for r in records if r.get("recipe") is None}
    out = []
    for r in records:
        r = {**r, "metrics": dict(r["metrics"])}
        base = dense.get(_group(r))
        if base is not None:
            for key, rate in (("size_bytes", "compression_rate_disk"), ("model_memory_bytes", "compression_rate_memory")):
                a, b = base["metrics"].get(key), r["metrics"].get(key)
                if _num(a) and _num(b) and b:
                    r["metrics"][rate] = a / b
        out.append(r)
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    if fmt == "ms":
        return f"{value * 1e3:.2f}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def scalar_metrics(records: list[dict]) -> list[str]:
    """Every scalar (number or short text) metric any record holds, headline ones first."""
    keys: dict[str, None] = {k: None for k, *_ in HEADLINE}
    for r in records:
        for k, v in r["metrics"].items():
            if _num(v) or (isinstance(v, str) and len(v) < 80):
                keys.setdefault(k, None)
    return [k for k in keys if any(k in r["metrics"] for r in records)]


# ----------------------------------------------------------------------------------------------- exports


def leaderboard_rows(records: list[dict]) -> list[dict]:
    """kvpress-style leaderboard rows: dataset, model, method, compression_ratio, score. One row per record and
    quality task. compression_ratio is the fraction of bytes removed: of the KV cache where the record measured
    it (kv_cache_bytes against the uncompressed kv_cache_full_bytes), else of the model's tensors in memory
    against dense."""
    rows = []
    for r in with_derived(records):
        m = r["metrics"]
        full, kept = m.get("mem_kv_cache_full_bytes", m.get("kv_cache_full_bytes")), m.get("mem_kv_cache_bytes", m.get("kv_cache_bytes"))
        if _num(full) and _num(kept) and full and kept != full:
            ratio = 1 - kept / full
        elif _num(m.get("compression_rate_memory")):
            ratio = 1 - 1 / m["compression_rate_memory"]
        else:
            ratio = 0.0 if r.get("recipe") is None else None
        scores = {k: m[k] for k, _ in QUALITY if _num(m.get(k))}
        scores.update({k[len(LM_EVAL_PREFIX):]: v for k, v in m.items() if k.startswith(LM_EVAL_PREFIX) and _num(v)})
        for dataset, score in scores.items():
            rows.append({"dataset": dataset, "model": r.get("model"), "method": label(r),
                         "compression_ratio": None if ratio is None else round(ratio, 6), "score": score})
    return rows


def latency_table(records: list[dict]) -> str:
    """MInference-style table: one row per record, one column per context length, TTFT in ms (TPOT beside)."""
    lengths = sorted({int(L) for r in records for L in (r["metrics"].get("latency_by_length") or {})})
    if not lengths:
        return ""
    lines = ["| method | " + " | ".join(f"{L}" for L in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    for r in records:
        table = r["metrics"].get("latency_by_length") or {}
        cells = []
        for L in lengths:
            cell = table.get(str(L))
            cells.append(f"{cell['ttft_s'] * 1e3:.1f} / {cell['tpot_s'] * 1e3:.2f}" if cell else "-")
        lines.append(f"| {label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots


class Plot:
    """One figure: its SVG text, its PNG bytes, and the point groups it drew (SVG id -> expected count)."""

    def __init__(self, name: str, title: str, svg: str, png: bytes, groups: dict[str, int]):
        self.name, self.title, self.svg, self.png, self.groups = name, title, svg, png, groups


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    return plt, fig, ax


def _finish(plt, fig, name: str, title: str, groups: dict[str, int]) -> Plot:
    import matplotlib

    fig.tight_layout()
    buffer = io.StringIO()
    # A per-figure salt keeps the ids matplotlib derives from hashes unique across the figures of one page;
    # fonttype none writes text as text (small, selectable) instead of glyph paths.
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG goes inline in HTML
    return Plot(name, title, svg, png.getvalue(), groups)


def pareto_front(points: list[tuple[float, float]], x_better: str, y_better: str) -> list[int]:
    """Indices of the points no other point beats on both axes (ties on both count as not beaten)."""
    sx = 1 if x_better == "low" else -1
    sy = 1 if y_better == "low" else -1
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(sx * a <= sx * x and sy * b <= sy * y and (a, b) != (x, y) for j, (a, b) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


def _pick(records, keys) -> str | None:
    for k in keys:
        if sum(_num(r["metrics"].get(k)) for r in records) >= 2:
            return k
    return None


def tradeoff_plot(records, name, x_key, x_label, x_better, y_key, y_better) -> Plot | None:
    rows = [r for r in records if _num(r["metrics"].get(x_key)) and _num(r["metrics"].get(y_key))]
    if len(rows) < 2:
        return None
    plt, fig, ax = _figure()
    scale = 1e6 if x_key.endswith("_bytes") else 1.0
    pts = [(r["metrics"][x_key] / scale, r["metrics"][y_key]) for r in rows]
    front = pareto_front(pts, x_better, y_better)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=36, color="#4c72b0", gid=f"{name}-points", zorder=3)
    fx = sorted((pts[i] for i in front))
    ax.plot([p[0] for p in fx], [p[1] for p in fx], "--", color="#dd8452", lw=1.2, zorder=2, label="Pareto front")
    ax.scatter([p[0] for p in fx], [p[1] for p in fx], s=110, facecolors="none", edgecolors="#dd8452", gid=f"{name}-front", zorder=4)
    for (x, y), r in zip(pts, rows):
        ax.annotate(label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_key.replace("_", " ") + (" (lower is better)" if y_better == "low" else " (higher is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = f"{y_key} vs. {x_label}"
    ax.set_title(title, fontsize=10)
    return _finish(plt, fig, name, title, {f"{name}-points": len(pts), f"{name}-front": len(fx)})


def curves_plot(records, name, x_key, x_label, y_key) -> Plot | None:
    """One line per method: y against x over the records of that method (the dense record anchors each curve)."""
    dense = [r for r in records if r.get("recipe") is None and _num(r["metrics"].get(y_key))]
    by_method: dict[str, list] = {}
    for r in records:
        x = r["metrics"].get(x_key)
        # A record at the dense x (a KV method's weight sparsity 0) has no place on this curve.
        if r.get("recipe") is not None and _num(x) and x != _dense_x(x_key) and _num(r["metrics"].get(y_key)):
            by_method.setdefault(method_of(r), []).append(r)
    if not by_method:
        return None
    plt, fig, ax = _figure()
    groups = {}
    for i, (method, rows) in enumerate(sorted(by_method.items())):
        rows = dense[:1] + sorted(rows, key=lambda r: r["metrics"][x_key])
        xs = [r["metrics"].get(x_key, 0.0) if r.get("recipe") else _dense_x(x_key) for r in rows]
        ys = [r["metrics"][y_key] for r in rows]
        gid = f"{name}-{i}"
        ax.plot(xs, ys, "-", lw=1.2, label=method)
        ax.scatter(xs, ys, s=24, gid=gid, zorder=3)
        groups[gid] = len(xs)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    title = f"{y_key} vs. {x_label}, per method"
    ax.set_title(title, fontsize=10)
    return _finish(plt, fig, name, title, groups)


def _dense_x(x_key: str) -> float:
    return 1.0 if x_key.startswith("compression_rate") else 0.0


def heatmap_plot(record, name, cells_key) -> Plot | None:
    """Retrieval accuracy by context length (columns) and needle depth (rows), one rectangle per cell."""
    cells = record["metrics"].get(cells_key)
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) and {"length", "depth", "accuracy"} <= set(c) for c in cells):
        return None
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    plt, fig, ax = _figure()
    fig.set_size_inches(4.6, 3.4)
    patches, values = [], []
    for c in cells:
        patches.append(Rectangle((lengths.index(c["length"]), depths.index(c["depth"])), 1, 1))
        values.append(c["accuracy"])
    coll = PatchCollection(patches, cmap="viridis", edgecolor="white", linewidth=0.5, gid=f"{name}-cells")
    coll.set_array(values)
    coll.set_clim(0, 1)
    ax.add_collection(coll)
    for p, v in zip(patches, values):
        ax.text(p.get_x() + 0.5, p.get_y() + 0.5, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xlim(0, len(lengths))
    ax.set_ylim(len(depths), 0)
    ax.set_xticks([i + 0.5 for i in range(len(lengths))], [str(L) for L in lengths])
    ax.set_yticks([i + 0.5 for i in range(len(depths))], [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    fig.colorbar(coll, ax=ax, label="accuracy")
    title = f"{cells_key.removesuffix('_cells')} accuracy: {label(record)}"
    ax.set_title(title, fontsize=9)
    return _finish(plt, fig, name, title, {f"{name}-cells": len(cells)})


def latency_plot(records, name) -> Plot | None:
    rows = [r for r in records if r["metrics"].get("latency_by_length")]
    if not rows:
        return None
    plt, fig, ax = _figure()
    groups = {}
    for i, r in enumerate(rows):
        table = r["metrics"]["latency_by_length"]
        xs = sorted(int(L) for L in table)
        ys = [table[str(L)]["ttft_s"] * 1e3 for L in xs]
        gid = f"{name}-{i}"
        ax.plot(xs, ys, "-", lw=1.2, label=label(r))
        ax.scatter(xs, ys, s=20, gid=gid, zorder=3)
        groups[gid] = len(xs)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    title = "time to first token by context length"
    ax.set_title(title, fontsize=10)
    return _finish(plt, fig, name, title, groups)


def all_plots(records: list[dict]) -> list[Plot]:
    plots: list[Plot | None] = []
    quality = next(((k, b) for k, b in QUALITY if sum(_num(r["metrics"].get(k)) for r in records) >= 2), None)
    if quality:
        y_key, y_better = quality
        size = _pick(records, SIZE)
        if size:
            plots.append(tradeoff_plot(records, "quality-size", size, f"{size.replace('_bytes', '')} (MB)", "low", y_key, y_better))
        speed = _pick(records, SPEED)
        if speed:
            plots.append(tradeoff_plot(records, "quality-speed", speed, speed.replace("_", " "), "high", y_key, y_better))
        plots.append(curves_plot(records, "curve-sparsity", "sparsity", "weight sparsity", y_key))
        plots.append(curves_plot(records, "curve-compression", "compression_rate_memory", "compression rate, memory (x)", y_key))
    plots.append(latency_plot(records, "latency"))
    n = 0
    for r in records:
        for key in sorted(k for k in r["metrics"] if k.endswith("_cells")):
            plots.append(heatmap_plot(r, f"heatmap-{n}", key))
            n += 1
    return [p for p in plots if p is not None]


# ----------------------------------------------------------------------------------------------- documents


def _table_html(records, keys) -> str:
    better = {k: b for k, _, _, b in HEADLINE}
    fmts = {k: f for k, _, f, _ in HEADLINE}
    labels = {k: lab for k, lab, _, _ in HEADLINE}
    head = "".join(f"<th>{html.escape(label(r))}<br><small>{html.escape(', '.join(families(r)))}</small></th>" for r in records)
    rows = []
    for k in keys:
        values = [r["metrics"].get(k) for r in records]
        nums = [v for v in values if _num(v)]
        distinct = len(set(nums)) > 1  # all equal: nothing is best
        best = (min(nums) if better.get(k) == "low" else max(nums)) if distinct and better.get(k) else None
        cells = []
        for v in values:
            text = html.escape(_fmt(v, fmts.get(k, "{:.4g}" if _num(v) else "{}")))
            cells.append(f"<td class=best>{text}</td>" if best is not None and v == best else f"<td>{text}</td>")
        rows.append(f"<tr><th scope=row title='{html.escape(k)}'>{html.escape(labels.get(k, k))}</th>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _environments(records) -> list[dict]:
    seen, out = set(), []
    for r in records:
        env = r.get("environment") or {}
        key = json.dumps(env, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(env)
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
thead th{background:#f2f2f2;text-align:center}tbody th{text-align:left;font-weight:normal}td.best{font-weight:bold;background:#e8f4e8}
figure{display:inline-block;margin:0.6em;vertical-align:top;width:560px}figure svg{width:100%;height:auto}figcaption{font-size:12px;color:#555}
details{margin:1em 0}code{background:#f4f4f4;padding:1px 4px}"""


def render_html(records: list[dict], plots: list[Plot], title: str) -> str:
    headline = [k for k, *_ in HEADLINE if any(k in r["metrics"] for r in records)]
    rest = [k for k in scalar_metrics(records) if k not in headline]
    figures = "\n".join(
        f"<figure class=plot id='plot-{p.name}' data-groups='{html.escape(json.dumps(p.groups))}'>{p.svg}"
        f"<figcaption>{html.escape(p.title)}</figcaption></figure>" for p in plots)
    envs = "".join(f"<li>{html.escape(', '.join(f'{k} {v}' for k, v in env.items()))}</li>" for env in _environments(records))
    latency = latency_table(records)
    latency_html = ""
    if latency:
        lines = [line.strip("|").split("|") for line in latency.splitlines() if not line.startswith("|---")]
        latency_html = "<h2>Latency by context length</h2><p>TTFT ms / TPOT ms at batch 1.</p><table>" + "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
            for i, row in enumerate(lines)) + "</table>"
    stamps = sorted(r.get("timestamp") or "" for r in records)
    return f"""<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(records)} record(s), measured {html.escape(stamps[0] if stamps else '?')} to {html.escape(stamps[-1] if stamps else '?')}.
Best value per row in bold where a direction is known. Compression rates: dense bytes / compressed bytes.</p>
<h2>Side by side</h2>{_table_html(records, headline)}
<details><summary>All scalar metrics ({len(rest)} more)</summary>{_table_html(records, rest)}</details>
<h2>Plots</h2>
{figures}
{latency_html}
<h2>Machine and versions</h2><ul>{envs}</ul>
</body></html>
"""


def render_markdown(records: list[dict], plots: list[Plot], title: str, png_dir: str = "plots") -> str:
    headline = [k for k, *_ in HEADLINE if any(k in r["metrics"] for r in records)]
    fmts = {k: f for k, _, f, _ in HEADLINE}
    labels = {k: lab for k, lab, _, _ in HEADLINE}
    lines = ["| metric | " + " | ".join(label(r) for r in records) + " |", "|" + "---|" * (len(records) + 1)]
    for k in headline:
        lines.append(f"| {labels[k]} | " + " | ".join(_fmt(r["metrics"].get(k), fmts[k]) for r in records) + " |")
    envs = "\n".join("- " + ", ".join(f"{k} {v}" for k, v in env.items()) for env in _environments(records))
    images = "\n\n".join(f"![{p.title}]({png_dir}/{p.name}.png)" for p in plots)
    latency = latency_table(records)
    latency = f"\n\n## Latency by context length (TTFT ms / TPOT ms, batch 1)\n\n{latency}" if latency else ""
    return f"# {title}\n\n{chr(10).join(lines)}\n\n## Plots\n\n{images}{latency}\n\n## Machine and versions\n\n{envs}\n"


def write_report(records: list[dict], directory: str | os.PathLike, title: str = "sparseforge results",
                 markdown: bool = True, exports: bool = True) -> dict:
    """Write report.html, plots/*.png and (unless turned off) report.md, leaderboard.csv and latency.md into
    `directory`, each file atomically. Returns {"html": path, "markdown": path or None, "plots": {name: {svg
    group id: points}}}."""
    from sparseforge.formats.output import write_text_atomic

    directory = pathlib.Path(directory)
    records = with_derived(records)
    plots = all_plots(records)
    png_dir = directory / "plots"
    png_dir.mkdir(parents=True, exist_ok=True)
    for p in plots:
        tmp = png_dir / f".{p.name}.png.tmp-{os.getpid()}"
        tmp.write_bytes(p.png)
        os.replace(tmp, png_dir / f"{p.name}.png")
    write_text_atomic(directory / "report.html", render_html(records, plots, title), flag="--out")
    if markdown:
        write_text_atomic(directory / "report.md", render_markdown(records, plots, title), flag="--out")
    if not exports:
        return {"html": directory / "report.html", "markdown": None, "plots": {p.name: p.groups for p in plots}}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["dataset", "model", "method", "compression_ratio", "score"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(leaderboard_rows(records))
    write_text_atomic(directory / "leaderboard.csv", buffer.getvalue(), flag="--out")
    latency = latency_table(records)
    if latency:
        write_text_atomic(directory / "latency.md", "# TTFT ms / TPOT ms by context length (batch 1)\n\n" + latency + "\n", flag="--out")
    return {"html": directory / "report.html", "markdown": directory / "report.md", "plots": {p.name: p.groups for p in plots}}
