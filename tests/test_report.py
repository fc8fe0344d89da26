"""The results report: Pareto fronts, plot point counts against the records, exports, the `report` command, and
the HTML rendered in headless Chromium with every plot drawn and no console error (skipped where Chromium is
absent, with the reason). The browser test keeps a screenshot in build/test-artifacts/."""
import csv
import json
import pathlib
import shutil
import subprocess

import pytest

from sparseforge.cli import main
from sparseforge.eval.report import leaderboard_rows, pareto_front, write_report
from sparseforge.eval.store import append_record

ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
ENV = {"cpu": "test cpu", "cpu_count": 2, "device": "cpu", "torch": "2.13.0", "platform": "linux"}


def _cells(acc):
    return [{"length": L, "depth": d, "accuracy": acc, "n": 1} for L in (512, 1024) for d in (0.0, 0.5, 1.0)]


def _record(recipe, family, method, ppl, size, decode, sparsity=0.0, kv=None, params=None):
    metrics = {"perplexity": ppl, "size_bytes": size, "model_memory_bytes": size, "decode_tokens_per_s": decode,
               "sparsity": sparsity, "passkey_accuracy": 0.5, "passkey_cells": _cells(0.5),
               "latency_by_length": {"128": {"ttft_s": 0.01, "tpot_s": 0.002}, "512": {"ttft_s": 0.04, "tpot_s": 0.003}},
               "energy_source": "unavailable: no RAPL domains under /sys/class/powercap", "energy_decode_joules_per_token": None}
    if kv:
        metrics.update(mem_kv_cache_bytes=kv[0], mem_kv_cache_full_bytes=kv[1])
    stages = [{"method": method, "family": family, "lifetime": "transform"}] if recipe else []
    spec = {"name": recipe, "stages": [{"method": method, "params": params or {}}]} if recipe else None
    return {"record_key": recipe or "dense", "model": "m", "recipe": recipe, "metrics": metrics, "environment": ENV,
            "settings": {"tasks": ["x"]}, "stages": stages, "recipe_spec": spec, "timestamp": "2026-12-01T00:00:00+00:00"}


RECORDS = [
    _record(None, None, None, 10.0, 100e6, 50.0),
    _record("wanda-50", "weights", "wanda", 12.0, 100e6, 55.0, 0.5, params={"sparsity": 0.5}),
    _record("wanda-70", "weights", "wanda", 20.0, 100e6, 60.0, 0.7, params={"sparsity": 0.7}),
    _record("rtn-w4", "quantization", "rtn", 11.0, 30e6, 40.0, 0.0),
    _record("snapkv-75", "kv", "snapkv", 10.5, 100e6, 52.0, 0.0, kv=(25e6, 100e6)),
]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    for r in RECORDS:
        append_record(directory, r)
    assert main(["report", str(directory)]) == 0
    return directory


def test_pareto_front_exact():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (0.5, 9.0), (2.0, 4.0)]
    assert pareto_front(pts, "low", "low") == [0, 1, 3, 4]  # (3, 4.5) is beaten by (2, 4); ties both stay
    assert pareto_front([(1, 1), (2, 2)], "high", "high") == [1]


def test_plots_hold_one_point_per_record(report_dir):
    html = (report_dir / "report.html").read_text()
    groups = {}
    for chunk in html.split("data-groups='")[1:]:
        groups.update(json.loads(chunk.split("'", 1)[0].replace("&quot;", '"')))
    # Quality vs size and vs speed: every record once. Fronts by hand: size: dense (100 MB, 10) and rtn (30 MB, 11),
    # the others tie dense's size at a worse perplexity; speed: all but rtn (40 tok/s, 11), which dense beats.
    assert groups["quality-size-points"] == 5 and groups["quality-size-front"] == 2
    assert groups["quality-speed-points"] == 5 and groups["quality-speed-front"] == 4
    # Per-method curves anchored at dense: wanda at two sparsities; rtn by memory compression (3.3x); methods
    # at dense's x (snapkv's weight sparsity 0, wanda's dense storage) are not on those curves.
    assert groups["curve-sparsity-0"] == 3 and "curve-sparsity-1" not in groups
    assert groups["curve-compression-0"] == 2 and "curve-compression-1" not in groups
    assert [groups[f"heatmap-{i}-cells"] for i in range(5)] == [6] * 5
    assert [groups[f"latency-{i}"] for i in range(5)] == [2] * 5
    for name in ("quality-size", "quality-speed", "curve-sparsity", "latency", "heatmap-0"):
        assert (report_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import re

    # Nothing fetched at view time: every resource is in the page (#ids, the colour bars' data: PNGs); namespace
    # URIs are names, not fetched.
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?(?!#|data:)[a-z]+:|url\((?!#)""", html)
    assert "<script" not in html
    assert "unavailable: no RAPL domains" in html  # energy is said to be unavailable, not left blank or estimated


def test_exports(report_dir):
    rows = list(csv.DictReader((report_dir / "leaderboard.csv").open()))
    assert list(rows[0]) == ["dataset", "model", "method", "compression_ratio", "score"]
    ratio = {(r["method"], r["dataset"]): float(r["compression_ratio"]) for r in rows}
    assert ratio[("snapkv-75", "perplexity")] == pytest.approx(0.75)  # 1 - KV cache bytes / uncompressed
    assert ratio[("rtn-w4", "passkey_accuracy")] == pytest.approx(0.7)  # 1 - 30 MB / 100 MB in memory
    assert ratio[("dense", "perplexity")] == 0.0 and ratio[("wanda-50", "perplexity")] == 0.0
    assert len(rows) == 2 * len(RECORDS) == len(leaderboard_rows(RECORDS))
    latency = (report_dir / "latency.md").read_text()
    assert "| method | 128 | 512 |" in latency and "| rtn-w4 | 10.0 / 2.00 | 40.0 / 3.00 |" in latency
    md = (report_dir / "report.md").read_text()
    assert "![" in md and "plots/quality-size.png" in md and "| compression rate, memory (x) |" in md


def test_report_command_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no results store" in err


# ------------------------------------------------------------------------------------------ browser

PROBE_HEAD = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push("error: " + (e.message || (e.target && (e.target.src || e.target.href)) || "?")); }, true);
window.addEventListener("unhandledrejection", function (e) { window.__errors.push("rejection: " + e.reason); });
["error", "warn"].forEach(function (level) { var original = console[level];
  console[level] = function () { window.__errors.push(level + ": " + Array.from(arguments).join(" ")); original.apply(console, arguments); }; });
</script>"""
# After load: for each figure, each point group it declares, the SVG elements drawn with a non-empty box inside
# the figure.
PROBE_TAIL = """<script>window.addEventListener("load", function () { var plots = [];
  document.querySelectorAll("figure.plot").forEach(function (fig) {
    var groups = JSON.parse(fig.getAttribute("data-groups")); var svg = fig.querySelector("svg");
    var box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0, left: 0, right: 0, top: 0, bottom: 0};
    var result = {id: fig.id, width: box.width, height: box.height, groups: {}};
    Object.keys(groups).forEach(function (gid) {
      var g = svg && svg.querySelector('[id="' + gid + '"]'); var drawn = 0, total = 0;
      if (g) g.querySelectorAll("use, path").forEach(function (el) { if (el.closest("defs")) return; total += 1;
        var r = el.getBoundingClientRect();
        if (r.width > 0 && r.height > 0 && r.right > box.left && r.left < box.right && r.bottom > box.top && r.top < box.bottom) drawn += 1; });
      result.groups[gid] = {expected: groups[gid], elements: total, drawn: drawn}; });
    plots.push(result); });
  var pre = document.createElement("pre"); pre.id = "sparseforge-probe";
  pre.textContent = JSON.stringify({plots: plots, errors: window.__errors}); document.body.appendChild(pre); });
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it where it can)")


def _render(browser, page: pathlib.Path) -> tuple[dict, list[str]]:
    """The probe's findings and the console lines Chromium logged while loading `page`."""
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    start = dom.index('<pre id="sparseforge-probe">') + len('<pre id="sparseforge-probe">')
    import html

    probe = json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return probe, console


def _probed(source: pathlib.Path, target: pathlib.Path, extra: str = "") -> pathlib.Path:
    text = source.read_text().replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", extra + PROBE_TAIL + "</body>", 1)
    target.write_text(text)
    return target


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    browser = _chromium()
    probe, console = _render(browser, _probed(report_dir / "report.html", tmp_path / "probed.html"))
    assert probe["errors"] == [] and console == [], (probe["errors"], console)
    figures = {p["id"] for p in probe["plots"]}
    assert {"plot-quality-size", "plot-quality-speed", "plot-curve-sparsity", "plot-curve-compression", "plot-latency"} <= figures
    assert len(probe["plots"]) == 5 + len(RECORDS)  # and one heat map per record
    for plot in probe["plots"]:
        assert plot["width"] > 100 and plot["height"] > 100, plot
        for gid, found in plot["groups"].items():
            assert found["expected"] == found["elements"] == found["drawn"] > 0, (plot["id"], gid, found)
    # The screenshot, kept as a test artifact.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000",
                    f"--screenshot={shot}", (report_dir / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20000


def test_browser_probe_catches_errors_and_missing_points(report_dir, tmp_path):
    """The check above can fail: a console error, a failed script and a plot group whose points are gone."""
    browser = _chromium()
    broken = report_dir / "report.html"
    text = broken.read_text().replace('id="quality-size-points"', 'id="quality-size-points-gone"', 1)
    (tmp_path / "broken.html").write_text(text)
    probe, console = _render(browser, _probed(tmp_path / "broken.html", tmp_path / "probed.html",
                                              "<script>console.error('boom'); no_such_function();</script>"))
    assert any("boom" in e for e in probe["errors"]) and any("no_such_function" in e for e in probe["errors"])
    assert any("boom" in line for line in console)
    size = next(p for p in probe["plots"] if p["id"] == "plot-quality-size")
    assert size["groups"]["quality-size-points"]["elements"] == 0
