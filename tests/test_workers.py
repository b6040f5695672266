"""--workers 2: two processes on one port; a write through one worker is never followed by a
stale read through the other (shared versions without Redis); SIGTERM stops them all."""

from __future__ import annotations

import signal

import psycopg2
import pytest

from proxy.embedded import EmbeddedPostgres
from tests import cachedb
from tests.util import ProxyFactory, ProxyHandle

DB = "workertest"


def _worker(conn: psycopg2.extensions.connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SHOW CACHE")
        return int(dict(cur.fetchall())["worker_pid"])


@pytest.fixture
def two_workers(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> ProxyHandle:
    cachedb.create(pg, DB)
    proxy = proxy_factory("--workers", "2")
    return proxy


def test_write_via_one_worker_read_via_the_other_is_fresh(two_workers: ProxyHandle) -> None:
    proxy = two_workers
    conns: dict[int, psycopg2.extensions.connection] = {}
    extra = []
    for _ in range(60):  # the kernel spreads connections over the workers
        conn = cachedb.connect(proxy, DB)
        pid = _worker(conn)
        if pid in conns:
            extra.append(conn)
        else:
            conns[pid] = conn
        if len(conns) == 2:
            break
    assert len(conns) == 2, "all connections landed on one worker"
    for c in extra:
        c.close()
    for conn in conns.values():
        cachedb.wait_feed_on(conn, DB)
    writer, reader = conns.values()
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
    for conn in conns.values():
        conn.close()


def test_sigterm_stops_every_worker(two_workers: ProxyHandle) -> None:
    conn = cachedb.connect(two_workers, DB)
    conn.close()
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(20) == 0
