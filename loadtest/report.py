"""Render a load-generator result (loadtest/load.py, --json/--report) as one self-contained HTML
page (inline CSS, plots as PNG data: URIs, nothing fetched) plus the same plots as PNG files.

Every key but "targets" is optional: a plot or section is left out when its data is missing.
matplotlib is used through Figure objects only (Agg canvas, no pyplot global state).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator, NullFormatter

Targets = dict[str, dict[str, Any]]
NAN = float("nan")
CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em}
td{text-align:right}td.text{text-align:left}th{background:#f3f3f3}.warn{color:#a40}
img.plot{display:block;max-width:100%;margin:1em 0}"""
PCT_TICKS = {1.0: "0%", 2.0: "50%", 10.0: "90%", 100.0: "99%", 1e3: "99.9%", 1e4: "99.99%", 1e5: "99.999%"}
CONFIG = {"agents": "{} agents", "rate_per_agent": "{}/s per agent", "duration_s": "{} s", "seed": "seed {}",
          "processes": "{} generator processes", "cores": "{} cores"}


def _num(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _timeline(t: dict[str, Any]) -> tuple[list[float], list[dict[str, Any]]]:
    rows = [r for r in _dicts(t.get("timeline")) if _num(r.get("t")) is not None]
    return [float(r["t"]) for r in rows], rows


def _throughput(targets: Targets, colors: dict[str, str]) -> Figure | None:
    fig, ax = _axes("Successful queries per second", "seconds since start", "ok queries/s")
    for name, t in targets.items():
        ts, rows = _timeline(t)
        if (end := _num(t.get("duration_s"))) is not None and any(x < end for x in ts):
            keep = [i for i, x in enumerate(ts) if x < end]  # answers after the end: a partial second
            ts, rows = [ts[i] for i in keep], [rows[i] for i in keep]
        if not rows:
            continue
        width = min((b - a for a, b in itertools.pairwise(ts) if b > a), default=1.0)  # bucket size
        ax.plot(ts, [(_num(r.get("ok")) or 0.0) / width for r in rows], ".-", color=colors[name], label=name)
    return fig if ax.lines else None


def _latency(targets: Targets, colors: dict[str, str]) -> Figure | None:
    fig, ax = _axes("Latency over time (p99 solid, p50 dashed)", "seconds since start", "latency (ms)")
    for name, t in targets.items():
        ts, rows = _timeline(t)
        for key, style in (("p99_ms", "-"), ("p50_ms", "--")):
            ys = [v if (v := _num(r.get(key))) is not None and v > 0 else NAN for r in rows]
            if any(not math.isnan(y) for y in ys):
                ax.plot(ts, ys, "." + style, color=colors[name], label=f"{name} {key[:3]}")  # .: lone points
    _logy(ax)
    return fig if ax.lines else None


def _cdf_points(t: dict[str, Any]) -> tuple[list[tuple[float, float]], bool]:
    """(percentile, ms) pairs below 100 with positive latency; True when from the full CDF."""
    raw = [(_num(p[0]), _num(p[1])) for p in t.get("cdf") or [] if isinstance(p, list) and len(p) == 2]
    full = [(p, ms) for p, ms in raw if p is not None and ms is not None and 0 <= p < 100 and ms > 0]
    if full:
        return full, True
    lat = _dict(t.get("latency_ms"))
    coarse = [(float(k[1:]), v) for k in ("p50", "p90", "p99", "p99.9") if (v := _num(lat.get(k)))]
    return coarse, False


def _cdf(targets: Targets, colors: dict[str, str]) -> Figure | None:
    fig, ax = _axes("Latency by percentile", "percentile", "latency (ms)")
    top = 0.0
    for name, t in targets.items():
        pts, full = _cdf_points(t)
        if pts:
            xs = [1 / (1 - p / 100) for p, _ in pts]
            label = name if full else f"{name} (summary percentiles only)"
            ax.plot(xs, [ms for _, ms in pts], "-" if full else "o--", color=colors[name], label=label)
            top = max(top, *xs)
    if not top:
        return None
    ax.set_xscale("log")
    _logy(ax)
    shown = {x: label for x, label in PCT_TICKS.items() if x <= max(top * 1.5, 100.0)}
    ax.set_xticks(list(shown), list(shown.values()))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return fig


def _reached(t: dict[str, Any]) -> tuple[float | None, str]:
    """Queries that reached Postgres and how that is known ("" counted, or "all (direct)")."""
    counters = t.get("pgsluice")
    if isinstance(counters, dict) and (up := _num(counters.get("upstream"))) is not None:
        return up, ""
    frac, sent = _num(t.get("reached_postgres")), _num(t.get("sent"))
    if t.get("kind") == "direct" and sent is not None:
        return sent, "all (direct)"
    return (frac * sent, "") if frac is not None and sent is not None else (None, "")


def _upstream(targets: Targets, colors: dict[str, str]) -> Figure | None:
    rows = [(name, _num(t.get("sent")) or 0.0, *_reached(t)) for name, t in targets.items()]
    known = [(name, sent, up, note) for name, sent, up, note in rows if up is not None]
    if not known:
        return None
    fig, ax = _axes("Queries that reached Postgres", "target", "queries")
    for i, (name, sent, up, note) in enumerate(known):
        ax.bar(i - 0.2, sent, 0.4, color=colors[name], alpha=0.3, label="sent" if i == 0 else None)
        ax.bar(i + 0.2, up, 0.4, color=colors[name], label="reached Postgres" if i == 0 else None)
        text = note or (f"{up / sent:.1%}" if sent else f"{up:.0f}")
        ax.text(i + 0.2, up, text, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(known)), [name for name, *_ in known])
    ax.set_ylim(top=max(sent for _, sent, *_ in known) * 1.2 or 1.0)  # room for the labels and legend
    return fig


def _findmax(find_max: Targets, colors: dict[str, str]) -> Figure | None:
    fig, ax = _axes("Find-max: p99 by number of agents (x: step failed)", "agents", "p99 latency (ms)")
    slos: set[float] = set()
    marked = False
    for name, fm in find_max.items():
        steps = sorted((s for s in _dicts(fm.get("steps")) if _num(s.get("agents")) is not None),
                       key=lambda s: float(s["agents"]))  # a curve over agents, not the search order
        p99 = [v if (v := _num(s.get("p99_ms"))) is not None and v > 0 else NAN for s in steps]
        if all(math.isnan(v) for v in p99):
            continue
        agents = [float(s["agents"]) for s in steps]
        ax.plot(agents, p99, "o-", color=colors[name], label=f"{name}: max {_most(fm)} agents")
        bad = [(a, v) for a, v, s in zip(agents, p99, steps, strict=True)
               if not s.get("passed") and not math.isnan(v)]
        if bad:
            ax.scatter([a for a, _ in bad], [v for _, v in bad], marker="x", s=120, color="black", zorder=3,
                       label=None if marked else "failed step")
            marked = True
        if (slo := _num(fm.get("slo_p99_ms"))) is not None:
            slos.add(slo)
    if not ax.lines:
        return None
    for slo in sorted(slos):
        ax.axhline(slo, linestyle="--", color="grey", label=f"SLO p99 {slo:g} ms")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _logy(ax)
    return fig


def _logy(ax: Axes) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())  # plain 20, 50 rather than 2x10^1
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


def _f(value: object, fmt: str = ",.0f", suffix: str = "") -> str:
    v = _num(value)
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _most(fm: dict[str, Any]) -> str:
    return _f(fm.get("max_agents")) + ("+" if fm.get("limit_reached") else "")  # +: never failed


def _table(header: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """rows of (key, text) cells; the key goes in data-key for tests and scripts."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td data-key="{html.escape(k)}"{" class=text" * (k in ("target", "slo", "steps"))}>'
        f"{html.escape(v)}</td>" for k, v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(targets: Targets) -> str:
    rows = []
    for name, t in targets.items():
        lat = _dict(t.get("latency_ms"))
        up, note = _reached(t)
        sent = _num(t.get("sent"))
        pct = note or ("-" if up is None or not sent else f"{up / sent:.1%}")
        rows.append([("target", name), ("agents", _f(t.get("agents"))), ("sent", _f(t.get("sent"))),
                     ("ok", _f(t.get("ok"))), ("errors", _f(t.get("errors"))),
                     ("unsent", _f(t.get("unsent"))),
                     ("achieved_qps", _f(t.get("achieved_qps"), ",.1f")),
                     ("offered_qps", _f(t.get("offered_qps"), ",.1f")),
                     *[(k, _f(lat.get(k), ",.2f")) for k in ("p50", "p99", "p99.9", "max")],
                     ("reached_postgres", pct)])
    return _table(["target", "agents", "sent", "ok", "errors", "unsent", "achieved q/s", "offered q/s",
                   "p50 ms", "p99 ms", "p99.9 ms", "max ms", "reached Postgres"], rows)


def _findmax_table(find_max: Targets) -> str:
    rows = []
    for name, fm in find_max.items():
        steps = "; ".join(
            f"{_f(s.get('agents'))} agents: p99 {_f(s.get('p99_ms'), ',.2f', ' ms')}, "
            f"errors {_f(s.get('error_rate'), '.2%')}, {_f(s.get('achieved_qps'), ',.0f')}/"
            f"{_f(s.get('offered_qps'), ',.0f')} q/s, upstream {_f(s.get('upstream_qps'), ',.0f')} q/s, "
            f"{'pass' if s.get('passed') else 'FAIL'}" for s in _dicts(fm.get("steps")))
        rows.append([("target", name), ("max_agents", _most(fm)),
                     ("slo", f"p99 ≤ {_f(fm.get('slo_p99_ms'), 'g')} ms, errors ≤ "
                             f"{_f(fm.get('max_error_rate'), '.2%')}"), ("steps", steps or "-")])
    return _table(["target", "max agents", "SLO", "steps"], rows)


def write_report(result: dict[str, Any], html_path: Path) -> list[Path]:
    """Write the HTML report and its plots as <stem>-<plot>.png; returns the paths, HTML first."""
    targets: Targets = {k: v for k, v in _dict(result.get("targets")).items() if isinstance(v, dict)}
    find_max: Targets = {k: v for k, v in _dict(result.get("find_max")).items() if isinstance(v, dict)}
    names = list(dict.fromkeys([*targets, *find_max]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    figures = {"throughput": _throughput(targets, colors), "latency": _latency(targets, colors),
               "cdf": _cdf(targets, colors), "upstream": _upstream(targets, colors),
               "findmax": _findmax(find_max, colors)}
    first = next(iter(targets.values()), {})
    profile = str(result.get("profile") or first.get("profile") or "?")
    config = _dict(result.get("config"))  # or what a bare run's output says of itself
    config_line = ", ".join(fmt.format(f"{v:g}" if isinstance(v, float) else v) for k, fmt in CONFIG.items()
                            if (v := config.get(k, first.get(k))) is not None
                            and not (k == "agents" and find_max))  # find-max: agents vary per step
    html_path.parent.mkdir(parents=True, exist_ok=True)
    written, imgs = [html_path], []
    for plot, fig in figures.items():
        if fig is None:
            continue
        fig.axes[0].legend(fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        data = buf.getvalue()
        png = html_path.with_name(f"{html_path.stem}-{plot}.png")
        png.write_bytes(data)
        written.append(png)
        imgs.append(f'<img class="plot" id="plot-{plot}" alt="{html.escape(plot)} plot" '
                    f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">')
    warnings = [str(w) for w in result.get("warnings") or [] if w]
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>Load report: {html.escape(profile)}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Load report: {html.escape(profile)}</h1><p>{html.escape(config_line or '-')}; latency "
             "from each query's intended start</p>",
             "<h2>Summary</h2>",
             "<p>Each target at the most agents that held the SLO (the find-max step's own run); "
             "the plots over time show the same runs.</p>" if find_max else "", _summary(targets)]
    if find_max:
        parts += ["<h2>Find max</h2>", _findmax_table(find_max)]
    if warnings:
        parts += ['<h2 class=warn>Warnings</h2><ul class="warn" id="warnings">',
                  *[f"<li>{html.escape(w)}</li>" for w in warnings], "</ul>"]
    parts += ["<h2>Plots</h2>", *imgs, """<script>window.addEventListener("load", () => {  // plots shown
  document.body.dataset.plots = String([...document.querySelectorAll("img.plot")]
    .filter((img) => img.complete && img.naturalWidth > 0).length);
});</script></body></html>"""]
    html_path.write_text("\n".join(parts), encoding="utf-8")
    return written



def main(argv: list[str] | None = None) -> int:
    """`python -m loadtest.report RESULT.json REPORT.html`: render a saved --json result again."""
    import argparse
    import json
    import sys
    p = argparse.ArgumentParser(prog="python -m loadtest.report", description=main.__doc__)
    p.add_argument("result", type=Path, help="a file written by pgsluice load --json")
    p.add_argument("html", type=Path, help="the report to write (PNG plots go beside it)")
    args = p.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as exc:
        print(f"report: {args.result}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(result, dict) or not isinstance(result.get("targets"), dict):
        print(f"report: {args.result}: not a pgsluice load result (no \"targets\")", file=sys.stderr)
        return 2
    print("report: " + ", ".join(str(path) for path in write_report(result, args.html)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
