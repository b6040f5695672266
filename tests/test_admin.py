"""The admin console (virtual database `pgsluice`) through psql and asyncpg, and /metrics
scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator

import asyncpg
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.embedded import EmbeddedPostgres, free_port
from tests import cachedb
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

DB = "admintest"


@pytest.fixture(scope="module")
def proxy(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    cachedb.create(pg, DB)
    metrics_port = free_port()
    handle = proxy_factory_module("--metrics-listen", f"127.0.0.1:{metrics_port}",
                                  "--admin-users", "postgres,alice")
    handle.metrics_port = metrics_port  # type: ignore[attr-defined]
    cachedb.start_feed(handle, DB)
    yield handle


def _psql(pg: EmbeddedPostgres, proxy: ProxyHandle, sql: str, user: str = "postgres",
          database: str = "pgsluice") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(pg.bin_dir / "psql"), "-X", "-A", "-F", "|", "-h", proxy.host, "-p", str(proxy.port),
         "-U", user, "-d", database, "-c", sql],
        env={"PGPASSWORD": PASSWORDS[user], "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=30)


def _table(out: str) -> list[dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("(")]
    head = lines[0].split("|")
    return [dict(zip(head, ln.split("|"), strict=True)) for ln in lines[1:]]


def test_psql_shows_every_table(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    agent = cachedb.connect(proxy, DB, application_name="agent-007")
    cur = agent.cursor()
    for _ in range(5):
        cur.execute("SELECT v FROM items WHERE id = 3")
    for command in ("SHOW HELP", "SHOW STATS", "SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW CACHE",
                    "SHOW AGENTS", "SHOW CONFIG", "SHOW PLAN 'SELECT v FROM items WHERE id = 3'"):
        res = _psql(pg, proxy, command)
        assert res.returncode == 0, (command, res.stderr)
        assert _table(res.stdout), command
    agents = {r["agent"]: r for r in _table(_psql(pg, proxy, "SHOW AGENTS").stdout)}
    row = agents["agent-007"]
    assert int(row["queries"]) == 5 and int(row["hits"]) >= 3
    assert float(row["p50_ms"]) > 0 and float(row["p99_ms"]) >= float(row["p50_ms"])
    clients = _table(_psql(pg, proxy, "SHOW CLIENTS").stdout)
    assert any(c["agent"] == "agent-007" and c["database"] == DB for c in clients)
    pools = _table(_psql(pg, proxy, "SHOW POOLS").stdout)
    assert any(p["database"] == DB and int(p["server_conns"]) >= 1 for p in pools)
    config = dict((r["setting"], r["value"]) for r in _table(_psql(pg, proxy, "SHOW CONFIG").stdout))
    assert "postgres:***@" in config["upstream"]
    agent.close()


def test_errors_and_refusals(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    res = _psql(pg, proxy, "SHOW NONSENSE")
    assert res.returncode != 0 and "unknown admin command" in res.stderr
    res = _psql(pg, proxy, "SHOW STATS", user="bob")
    assert res.returncode != 0 and "may not use the admin console" in res.stderr
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(proxy.dsn(user="bob", password=PASSWORDS["bob"], database="pgsluice"))
    assert "42501" in str(info.value) or "may not use the admin console" in str(info.value)
    res = _psql(pg, proxy, "SHOW STATS", user="alice")  # listed in admin_users
    assert res.returncode == 0, res.stderr
    bad = subprocess.run([str(pg.bin_dir / "psql"), "-X", "-h", proxy.host, "-p", str(proxy.port),
                          "-U", "postgres", "-d", "pgsluice", "-c", "SHOW STATS"],
                         env={"PGPASSWORD": "wrong", "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr


async def test_asyncpg_reads_typed_rows(proxy: ProxyHandle) -> None:
    conn = await asyncpg.connect(proxy.dsn(database="pgsluice"))
    try:
        pools = await conn.fetch("SHOW POOLS")
        assert pools and isinstance(pools[0]["server_conns"], int)
        stats = dict(await conn.fetch("SHOW STATS"))
        assert stats["clients_total"] >= 1
    finally:
        await conn.close()


def test_pause_holds_new_transactions_and_resume_releases_them(pg: EmbeddedPostgres,
                                                               proxy: ProxyHandle) -> None:
    conn = cachedb.connect(proxy, DB)
    cur = conn.cursor()
    cur.execute("SELECT v FROM items WHERE id = 9")
    cur.execute("SELECT v FROM items WHERE id = 9")  # cached
    assert _psql(pg, proxy, "PAUSE").returncode == 0
    try:
        cur.execute("SELECT v FROM items WHERE id = 9")  # a hit needs no server: still served
        assert cur.fetchone() == ("v9",)
        import threading
        done = threading.Event()

        def write() -> None:
            c2 = cachedb.connect(proxy, DB)
            c2.cursor().execute("UPDATE counters SET n = n + 1 WHERE id = 20")
            c2.close()
            done.set()

        t = threading.Thread(target=write)
        t.start()
        assert not done.wait(0.5), "a write went through while paused"
    finally:
        assert _psql(pg, proxy, "RESUME").returncode == 0
    assert done.wait(10), "RESUME did not release the waiting client"
    t.join()
    conn.close()


def _scrape(proxy: ProxyHandle) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    port = proxy.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_move_as_queries_run(proxy: ProxyHandle) -> None:
    before = _scrape(proxy)
    conn = cachedb.connect(proxy, DB, application_name="metrics-agent")
    cur = conn.cursor()
    for _ in range(10):
        cur.execute("SELECT v FROM items WHERE id = 42")
    with pytest.raises(psycopg2.errors.DivisionByZero):
        cur.execute("SELECT 1/0")
    conn.close()
    time.sleep(0.1)
    after = _scrape(proxy)
    key = (("agent", "metrics-agent"),)
    assert after["pgsluice_queries_total"][key] - before.get("pgsluice_queries_total", {}).get(key, 0) == 11
    assert after["pgsluice_cache_hits_total"][key] >= 8
    assert after["pgsluice_request_duration_seconds_count"][key] >= 10
    assert after["pgsluice_errors_total"][(("sqlstate_class", "22"),)] >= 1
    assert after["pgsluice_upstream_queries_total"][()] > before["pgsluice_upstream_queries_total"][()]
    assert after["pgsluice_cache_entries"][()] >= 1
    assert any(k == (("database", DB), ("state", "idle"), ("user", "postgres"))
               for k in after["pgsluice_pool_server_connections"])
    assert after["pgsluice_change_feed_up"][(("database", DB),)] == 1


def test_agent_series_are_bounded(proxy: ProxyHandle) -> None:
    for i in range(30):
        conn = cachedb.connect(proxy, DB, application_name=f"flood-{i}")
        conn.cursor().execute("SELECT 1")
        conn.close()
    agents = {dict(k).get("agent") for k in _scrape(proxy)["pgsluice_queries_total"]}
    assert "other" in agents and len(agents) <= 21


def test_pause_replies_once_running_transactions_end(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    import threading
    conn = cachedb.connect(proxy, DB)
    cur = conn.cursor()
    cur.execute("BEGIN")
    cur.execute("UPDATE counters SET n = n + 1 WHERE id = 19")
    replied: list[str] = []
    t = threading.Thread(target=lambda: replied.append(_psql(pg, proxy, "PAUSE").stdout))
    t.start()
    try:
        time.sleep(0.5)
        assert not replied, "PAUSE replied while a transaction was running"
        cur.execute("COMMIT")
        t.join(10)
        assert replied and "all transactions finished" in replied[0]
    finally:
        assert _psql(pg, proxy, "RESUME").returncode == 0
        conn.close()
