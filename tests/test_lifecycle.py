"""Operating pgsluice: SIGHUP reloads what can change safely, SIGTERM drains transactions,
check-config names file and line."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import ProxyFactory, wait_until


def _pools(proxy_dsn: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(proxy_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SHOW POOLS")
        rows = cur.fetchall()
    conn.close()
    return rows


def test_sighup_reloads_pool_size(pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    config = tmp_path / "pgsluice.toml"
    config.write_text("[pgsluice]\npool_max_size = 4\n")
    proxy = proxy_factory("--config", str(config))
    conn = psycopg2.connect(proxy.dsn())
    conn.autocommit = True
    conn.cursor().execute("SELECT 1")
    admin = proxy.dsn(database="pgsluice")
    assert [r[6] for r in _pools(admin)] == [4]
    config.write_text("[pgsluice]\npool_max_size = 9\n")
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: [r[6] for r in _pools(admin)] == [9], timeout=5)
    conn.cursor().execute("SELECT 1")  # the client connection survived the reload
    config.write_text("[pgsluice]\npool_max_size = -1\n")  # a bad file: refused, nothing changes
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded" in proxy.log_text(), timeout=5)
    assert [r[6] for r in _pools(admin)] == [9]
    conn.close()


def test_sigterm_lets_a_running_transaction_commit(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    pg.psql("DROP TABLE IF EXISTS drain_t; CREATE TABLE drain_t (a int)")
    proxy = proxy_factory()
    conn = psycopg2.connect(proxy.dsn())
    cur = conn.cursor()
    cur.execute("INSERT INTO drain_t VALUES (1)")  # psycopg2: inside BEGIN
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    result: list[object] = []

    def finish() -> None:
        cur.execute("INSERT INTO drain_t VALUES (2)")
        conn.commit()
        result.append("committed")

    t = threading.Thread(target=finish)
    t.start()
    t.join(10)
    assert result == ["committed"]
    assert pg.psql("SELECT count(*) FROM drain_t").strip() == "2"
    # a new connection is refused while draining, and the process exits once idle
    assert proxy.proc.wait(15) == 0
    conn.close()


def test_check_config_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pgsluice]\nlisten = \"127.0.0.1:6543\"\npool_max_size = \"many\"\n")
    res = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and f"{bad}:3: invalid value for pool_max_size" in res.stderr
    good = tmp_path / "good.toml"
    good.write_text("[pgsluice]\npool_max_size = 5\n")
    res = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(good)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and "ok" in res.stdout


def test_json_logs_one_line_per_event(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    import json
    proxy = proxy_factory("--log-format", "json", "--slow-query-ms", "50")
    conn = psycopg2.connect(proxy.dsn(), application_name="log-agent")
    conn.autocommit = True
    cur = conn.cursor()
    for _ in range(5):
        cur.execute("SELECT 1")
    cur.execute("SELECT pg_sleep(0.1)")
    with contextlib.suppress(psycopg2.errors.UndefinedTable):
        cur.execute("SELECT * FROM no_such_table")
    conn.close()
    with contextlib.suppress(psycopg2.OperationalError):
        psycopg2.connect(proxy.dsn(password="wrong")).close()

    def events() -> list[dict[str, object]]:
        lines = [ln for ln in proxy.log_text().splitlines() if ln.startswith("{")]
        return [json.loads(ln) for ln in lines]

    wait_until(lambda: any(e["msg"] == "client disconnected" for e in events()), timeout=5)
    by_msg: dict[object, list[dict[str, object]]] = {}
    for e in events():
        by_msg.setdefault(e["msg"], []).append(e)
    assert by_msg["client connected"][0]["agent"] == "log-agent"
    assert by_msg["client disconnected"][0]["queries"] == 7
    assert by_msg["query failed"][0]["sqlstate"] == "42P01"
    assert "no_such_table" in str(by_msg["query failed"][0]["sql"])
    assert any("pg_sleep" in str(e["sql"]) for e in by_msg["slow query"])
    assert by_msg["login refused"][0]["sqlstate"] == "28P01"
    assert not any(e.get("sql") == "SELECT 1" for e in events()), "a successful query was logged"
