"""A self-contained report: ``index.html`` with the charts embedded (PNG, base64) and the
comparison table, next to ``results.json`` (every run, with its environment), one CSV per
benchmark and the charts as separate PNG files."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from typing import Any, Dict, List

from .harness import BenchRun, BenchUsageError, _write_atomic
from .startup import fmt_time


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _by_kind(runs: List[BenchRun]) -> Dict[str, BenchRun]:
    out: Dict[str, BenchRun] = {}
    for r in runs:
        out[r.kind] = r  # the last of each kind wins
    return out


def _env_table(env: Dict[str, Any]) -> str:
    rows = []
    for k, v in env.items():
        if k == "tools":
            v = "; ".join(f"{t}: {ver or 'absent'}" for t, ver in v.items())
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    return "<table class=env>" + "".join(rows) + "</table>"


def _results_table(run: BenchRun) -> str:
    head = ("<tr><th>subject</th><th>status</th><th>median</th><th>IQR</th>"
            "<th>95% CI of median</th><th>n</th><th>note</th></tr>")
    rows = []
    for r in run.results:
        s = r.summary
        if s and r.status == "ok":
            cells = [fmt_time(s.median), f"{fmt_time(s.q1)} – {fmt_time(s.q3)}",
                     f"{fmt_time(s.ci_low)} – {fmt_time(s.ci_high)}", str(s.n)]
        else:
            cells = ["–", "–", "–", "0"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in
                                     [r.label, r.status, *cells, r.reason]) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%}.met{color:#080}.notmet{color:#b00}pre{background:#f6f6f6;padding:.6em;overflow:auto}
table.env{font-size:80%}"""


def render_html(runs: List[BenchRun], images: Dict[str, bytes]) -> str:
    from .charts import comparison_table
    kinds = _by_kind(runs)
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>pynsbook: containers "
             f"against virtual machines</title><style>{_CSS}</style></head><body>",
             "<h1>Containers against virtual machines, measured</h1>",
             f"<p>Generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S %z'))} by pynsbook. "
             "Every number below was measured on the host described at the end; medians of "
             "interleaved repeats after warm-up runs, with interquartile ranges and bootstrap "
             "confidence intervals. The raw samples are in <code>results.json</code>.</p>"]
    rows = comparison_table(kinds.get("startup"), kinds.get("density"), kinds.get("overhead"))
    parts.append("<h2>The classic comparison, measured</h2><table><tr><th>aspect</th>"
                 "<th>containers: claimed → measured</th><th>VMs: claimed → measured</th>"
                 "<th>does the claim hold?</th></tr>")
    for r in rows:
        parts.append(f"<tr><td>{html.escape(r['aspect'])}</td><td><i>{html.escape(r['containers_claim'])}</i>"
                     f" → {html.escape(r['containers'])}</td><td><i>{html.escape(r['vms_claim'])}</i>"
                     f" → {html.escape(r['vms'])}</td><td>{html.escape(r['verdict'])}</td></tr>")
    parts.append("</table>")
    for kind, title in (("startup", "Start time"), ("density", "Density"),
                        ("overhead", "Overhead")):
        run = kinds.get(kind)
        if run is None:
            parts.append(f"<h2>{title}</h2><p>Not run (<code>pynsbook bench {kind}</code>).</p>")
            continue
        parts.append(f"<h2>{title}</h2>")
        if kind in images:
            b64 = base64.b64encode(images[kind]).decode()
            parts.append(f'<img alt="{kind} chart" src="data:image/png;base64,{b64}">')
        if kind == "startup":
            _goal_list(parts, "Issue 7 goals (same run)", run.data.get("goals", []))
            _goal_list(parts, "Issue 17 goal: the command, process start to exit (same run)",
                       run.data.get("command_goals", []))
        if kind == "density":
            from .density import format_density
            parts.append(f"<pre>{html.escape(format_density(run))}</pre>")
        elif kind == "overhead":
            from .overhead import format_overhead
            parts.append(f"<pre>{html.escape(format_overhead(run))}</pre>")
        parts.append(_results_table(run))
        parts.append(f"<p>Configuration: <code>{html.escape(json.dumps(run.config))}</code>; "
                     f"took {run.seconds:.0f} s.</p>")
    env = next(iter(kinds.values())).env if kinds else {}
    parts.append("<h2>Host</h2>" + _env_table(env))
    parts.append("<p>Reproduce: <code>pynsbook bench startup --json startup.json; pynsbook bench "
                 "density --json density.json; pynsbook bench overhead --json overhead.json; "
                 "pynsbook bench report --out DIR --from startup.json density.json overhead.json"
                 "</code></p></body></html>")
    return "\n".join(parts)


def write_report(runs: List[BenchRun], out_dir: str) -> str:
    """Write the report into ``out_dir`` (created if needed); return the HTML's path."""
    if not runs:
        raise BenchUsageError("no benchmark results to report")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise BenchUsageError(f"cannot create {out_dir}: no such directory {parent}")
    os.makedirs(out_dir, exist_ok=True)
    from . import charts
    makers = {"startup": charts.startup_chart, "density": charts.density_chart,
              "overhead": charts.overhead_chart}
    images: Dict[str, bytes] = {}
    for kind, run in _by_kind(runs).items():
        if kind in makers:
            images[kind] = _png(makers[kind](run))
            with open(os.path.join(out_dir, f"{kind}.png"), "wb") as f:
                f.write(images[kind])
        run.write_csv(os.path.join(out_dir, f"{kind}.csv"))
    _write_atomic(os.path.join(out_dir, "results.json"),
                  json.dumps({"runs": [r.to_dict() for r in runs]}, indent=1) + "\n")
    path = os.path.join(out_dir, "index.html")
    _write_atomic(path, render_html(runs, images))
    return path


def _goal_list(parts: List[str], title: str, goals: List[Dict[str, Any]]) -> None:
    """Goals measured in a run, as a list: met, not met, or not measured and why."""
    if not goals:
        return
    parts.append(f"<h3>{html.escape(title)}</h3><ul>")
    for g in goals:
        if g.get("ratio") is None:
            parts.append(f"<li>{html.escape(g['subject'])} / {html.escape(g['reference'])}: "
                         f"not measured — {html.escape(str(g.get('why')))}</li>")
        else:
            cls = "met" if g["met"] else "notmet"
            parts.append(f"<li class={cls}>{html.escape(g['subject'])} / "
                         f"{html.escape(g['reference'])} = {fmt_time(g['ours_s'])} / "
                         f"{fmt_time(g['reference_s'])} = <b>{g['ratio']:.2f}×</b> "
                         f"(goal ≤ {g['goal']}×): {'met' if g['met'] else 'not met'}</li>")
    parts.append("</ul>")
