"""idle_transaction_timeout (PgBouncer's): a client idle inside a transaction longer than that
is disconnected and its transaction rolled back, so a stopped client cannot keep row locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

USER, DB = "alice", "app"

# A client that takes a row lock, says so, and then sits (the test stops it with SIGSTOP).
CLIENT = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("UPDATE it_rows SET v = v + 1 WHERE id = 1")
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def table(pg: EmbeddedPostgres) -> Iterator[None]:
    pg.psql("DROP TABLE IF EXISTS it_rows; CREATE TABLE it_rows (id int PRIMARY KEY, v int);"
            " INSERT INTO it_rows VALUES (1, 0); GRANT ALL ON it_rows TO alice", db=DB)
    yield
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'alice'"
            " AND state LIKE 'idle in transaction%'; DROP TABLE it_rows", db=DB)


def dsn(proxy: ProxyHandle) -> str:
    return proxy.dsn(USER, PASSWORDS[USER], DB)


def stopped_client(proxy: ProxyHandle) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, dsn(proxy)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def update_waits(proxy: ProxyHandle, lock_timeout: str) -> float:
    """Seconds another client's UPDATE of the locked row took (raises if it timed out)."""
    with psycopg.connect(dsn(proxy), autocommit=True) as conn:
        conn.execute(f"SET lock_timeout = '{lock_timeout}'")
        started = time.monotonic()
        conn.execute("UPDATE it_rows SET v = v + 10 WHERE id = 1")
        return time.monotonic() - started


def test_stopped_client_loses_its_locks(proxy_factory: ProxyFactory, table: None) -> None:
    proxy = proxy_factory("--idle-transaction-timeout", "1")
    proc = stopped_client(proxy)
    try:
        waited = update_waits(proxy, "10s")
        assert 0.5 < waited < 4, f"the other UPDATE waited {waited:.1f} s"
        with psycopg.connect(dsn(proxy), autocommit=True) as conn:
            assert conn.execute("SELECT v FROM it_rows").fetchone() == (10,)  # the +1 rolled back
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_told_why(proxy_factory: ProxyFactory, table: None) -> None:
    """The client that comes back finds Postgres's SQLSTATE for the same thing (25P03)."""
    proxy = proxy_factory("--idle-transaction-timeout", "0.5")
    with psycopg.connect(dsn(proxy)) as conn:
        conn.execute("UPDATE it_rows SET v = v + 1 WHERE id = 1")
        time.sleep(1.5)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
            conn.execute("SELECT 1")
        assert info.value.sqlstate == "25P03"


def test_busy_transactions_and_the_default_are_left_alone(proxy_factory: ProxyFactory, table: None) -> None:
    """Only idle time counts: a statement longer than the timeout is fine. Off by default: a
    stopped client keeps its locks, as with Postgres's own default."""
    proxy = proxy_factory("--idle-transaction-timeout", "0.5")
    with psycopg.connect(dsn(proxy)) as conn:
        conn.execute("SELECT pg_sleep(1.5)")
        conn.execute("UPDATE it_rows SET v = v + 1 WHERE id = 1")
        conn.commit()
    default = proxy_factory()
    proc = stopped_client(default)
    try:
        with pytest.raises(psycopg.errors.LockNotAvailable):
            update_waits(default, "2s")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
