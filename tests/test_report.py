"""The load report: rendered from real runs against the embedded Postgres, it is one
self-contained HTML page (plots inline as PNG data: URIs, nothing external), its tables say
what the JSON says, the PNGs are written alongside, and a real browser shows every plot."""

from __future__ import annotations

import base64
import html
import re
import subprocess
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from loadtest.findmax import Slo, find_max
from loadtest.load import Plan, Target, measure
from loadtest.report import write_report
from loadtest.sample import schema_sql
from proxy.ops.embedded import EmbeddedPostgres

DB = "loadreport"
CHROMIUM = Path("/usr/bin/chromium")
PNG = b"\x89PNG\r\n\x1a\n"
SLO_MS = 50.0


@pytest.fixture(scope="module")
def sample(pg: EmbeddedPostgres) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE); CREATE DATABASE {DB}")
    pg.psql(schema_sql(1), db=DB)
    return pg.dsn(database=DB)


class Page(HTMLParser):
    """The parts of the report the tests check: images, every URL-ish attribute, table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.rows: list[dict[str, str]] = []  # data-key -> cell text
        self.tags: set[str] = set()
        self._key: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.urls += [v for k, v in a.items() if k in ("src", "href", "action", "poster", "srcset")]
        if tag == "img":
            self.imgs.append(a)
        elif tag == "tr":
            self.rows.append({})
        elif tag == "td" and "data-key" in a:
            self._key = a["data-key"]
            self.rows[-1][self._key] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._key = None

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self.rows[-1][self._key] += data

    def row(self, table_key: str, target: str) -> dict[str, str]:
        rows = [r for r in self.rows if r.get("target") == target and table_key in r]
        assert len(rows) == 1, (table_key, target, self.rows)
        return rows[0]


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def check_report(result: dict[str, Any], html_path: Path, expect: set[str]) -> Page:
    written = write_report(result, html_path)
    assert written[0] == html_path
    text = html_path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)

    # self-contained: no URL but data: URIs, no stylesheet or script fetched
    assert not re.search(r"https?://|src=\"/|url\(", text)
    assert all(u.startswith("data:") for u in page.urls), page.urls
    assert "link" not in page.tags
    plots = [img for img in page.imgs if "plot" in img.get("class", "").split()]
    assert {img["id"].removeprefix("plot-") for img in plots} == expect
    for img in plots:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        data = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert data.startswith(PNG) and 5_000 < len(data) < 2_000_000, len(data)

    # the same plots as files next to the page
    assert written[1:] == [html_path.with_name(f"{html_path.stem}-{p}.png") for p in
                           ("throughput", "latency", "cdf", "upstream", "findmax") if p in expect]
    for png in written[1:]:
        assert png.read_bytes().startswith(PNG)

    # the summary says what the JSON says
    for name, out in result["targets"].items():
        row = page.row("sent", name)
        for key in ("sent", "ok", "errors"):
            assert _int(row[key]) == out[key], (key, row)
        for key in ("p50", "p99", "p99.9", "max"):
            assert float(row[key]) == pytest.approx(out["latency_ms"][key], abs=0.006), (key, row)
        assert float(row["offered_qps"].replace(",", "")) == pytest.approx(out["offered_qps"], abs=0.06)
    for warning in result.get("warnings", []):
        assert warning not in text and f"<li>{html.escape(warning)}</li>" in text  # escaped, shown

    # a real browser loads every plot (the page's script counts them into data-plots)
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: scripts/test installs it (Debian package chromium)"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={html_path.parent / 'chromium-profile'}", "--virtual-time-budget=5000",
         "--dump-dom", html_path.resolve().as_uri()],
        capture_output=True, text=True, timeout=90, check=False)
    shown = re.search(r'<body[^>]*\bdata-plots="(\d+)"', proc.stdout)
    assert shown, (proc.returncode, proc.stdout[:500], proc.stderr[-2000:])
    assert int(shown.group(1)) == len(expect)
    return page


def _expected(out: dict[str, Any]) -> set[str]:
    """Plots the report must draw for one real run of the direct target."""
    expect = {"cdf", "upstream"}  # cdf: the full curve, or the summary percentiles without one
    if out.get("timeline"):
        expect |= {"throughput", "latency"}
    return expect


async def test_report_of_a_short_run(sample: str, tmp_path: Path) -> None:
    plan = Plan(sample, "agent-explore", agents=4, rate=50, duration=2, seed=3)
    out = await measure(Target("direct", sample), plan)  # kind "direct": every query reaches Postgres
    assert out["ok"] > 0 and out["latency_ms"]["p99"] > 0 and out["kind"] == "direct"
    result = {"profile": "agent-explore", "warnings": ["a <b>warning</b> & more"], "targets": {"direct": out}}
    page = check_report(result, tmp_path / "report.html", _expected(out))
    assert page.row("sent", "direct")["reached_postgres"] == "all (direct)"
    # a saved result renders again from the command line; a file that is not one is refused
    import json

    from loadtest.report import main as report_main
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(result))
    assert report_main([str(saved), str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text().count('class="plot"') == len(_expected(out))
    saved.write_text("[1, 2]")
    assert report_main([str(saved), str(tmp_path / "bad.html")]) == 2
    assert not (tmp_path / "bad.html").exists()


async def test_report_with_find_max(sample: str, tmp_path: Path) -> None:
    target = Target("direct", sample)
    plan = Plan(sample, "agent-explore", agents=1, rate=50, duration=1, seed=5)

    async def runner(step: Plan) -> dict[str, Any]:
        return await measure(target, step)

    capacity = await find_max(plan, runner, Slo(SLO_MS, 0.001), start=1, limit=2, settle=0.1)
    steps = capacity["steps"]
    assert [s["agents"] for s in steps][:1] == [1] and all(s["p99_ms"] for s in steps)
    out = await measure(target, replace(plan, agents=max(1, capacity["max_agents"])))
    result = {"profile": "agent-explore",
              "config": {"agents": 1, "rate_per_agent": 50.0, "duration_s": 1.0, "seed": 5},
              "targets": {"direct": out}, "find_max": {"direct": capacity}}
    page = check_report(result, tmp_path / "findmax.html", _expected(out) | {"findmax"})
    row = page.row("max_agents", "direct")
    assert _int(row["max_agents"].rstrip("+")) == capacity["max_agents"]
    assert row["max_agents"].endswith("+") == capacity["limit_reached"]
    assert row["steps"].count("agents:") == len(steps) and "p99 ≤ 50 ms" in row["slo"]
