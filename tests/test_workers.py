"""--workers 2: two processes on one port; a write through one worker is never followed by a
stale read through the other (shared versions without Redis); SIGTERM stops them all."""

from __future__ import annotations

import signal
import time

import psycopg2
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests import cachedb
from tests.util import ProxyFactory, ProxyHandle, wait_until

DB = "workertest"


@pytest.fixture
def two_workers(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> ProxyHandle:
    cachedb.create(pg, DB)
    proxy = proxy_factory("--workers", "2")
    return proxy


def test_write_via_one_worker_read_via_the_other_is_fresh(two_workers: ProxyHandle) -> None:
    proxy = two_workers
    conns = cachedb.on_every_worker(proxy, DB)
    for conn in conns:
        cachedb.wait_feed_on(conn, DB)
    writer, reader = conns
    wc, rc = writer.cursor(), reader.cursor()
    hits_seen = 0
    for i in range(300):
        rc.execute("SELECT n FROM counters WHERE id = 2")
        rc.execute("SELECT n FROM counters WHERE id = 2")  # cached in the reader's worker
        wc.execute("UPDATE counters SET n = %s WHERE id = 2", (1000 + i,))
        rc.execute("SELECT n FROM counters WHERE id = 2")
        assert rc.fetchone() == (1000 + i,), f"round {i}: stale read through the other worker"
        rc.execute("SHOW CACHE")
        hits_seen = int(dict(rc.fetchall())["hits"])
    assert hits_seen >= 250, "the reader's worker served almost nothing from cache"
    for conn in conns:
        conn.close()


def test_sigterm_stops_every_worker(two_workers: ProxyHandle) -> None:
    conn = cachedb.connect(two_workers, DB)
    conn.close()
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(20) == 0


def test_admin_and_metrics_sum_over_workers(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from proxy.ops.embedded import free_port
    cachedb.create(pg, DB)
    mport = free_port()
    proxy = proxy_factory("--workers", "2", "--metrics-listen", f"127.0.0.1:{mport}")
    pids = set()
    conns = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the kernel spreads connections once both workers listen
        conn = cachedb.connect(proxy, DB, application_name="summed-agent")
        pids.add(cachedb.worker_of(conn))
        conns.append(conn)
        if len(pids) == 2 and len(conns) >= 40:
            break
        if len(pids) == 1 and len(conns) % 20 == 0:
            time.sleep(0.5)  # the second worker may still be starting on a busy machine
    assert len(pids) == 2, "all connections landed on one worker"
    for conn in conns:
        conn.cursor().execute("SELECT 1")
        conn.close()
    def summed() -> tuple[object, object]:
        admin = psycopg2.connect(proxy.dsn(database="pgsluice"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SHOW STATS")
            stats = dict(cur.fetchall())
            cur.execute("SHOW AGENTS")
            agents = {row[0]: row for row in cur.fetchall()}
        admin.close()
        return stats["workers_reporting"], agents["summed-agent"][1]

    # the workers publish their counters every second; each admin connection lands on either
    # worker, and each must report the sum (SHOW CACHE + SELECT 1 on each connection)
    expected = 2 * len(conns)
    for _ in range(4):
        wait_until(lambda: summed() == (2, expected), timeout=10, message="sum over both workers")
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    assert families["pgsluice_workers_reporting"].samples[0].value == 2
    queries = {s.labels.get("agent"): s.value for s in families["pgsluice_queries"].samples
               if s.name == "pgsluice_queries_total"}
    assert queries["summed-agent"] == expected
