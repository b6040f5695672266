"""Cancel requests with several workers: the kernel hands a CancelRequest's connection to any
worker, and it must reach the worker whose session the key names (2 and 4 workers)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

USER, DB = "alice", "app"
ROUNDS = 12  # cancels per driver: all landing on the owning worker by chance is 2**-12 or less


def dsn(proxy: ProxyHandle) -> str:
    return proxy.dsn(USER, PASSWORDS[USER], DB)


async def worker_pid(conn: asyncpg.Connection) -> int:
    rows = await conn.fetch("SHOW CACHE")
    return int(dict((r[0], r[1]) for r in rows)["worker_pid"])


async def all_workers_listen(proxy: ProxyHandle, workers: int) -> None:
    """Connections spread over every worker (a worker may still be starting on a busy machine)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only {len(seen)} of {workers} workers answered"
        conns = [await asyncpg.connect(dsn(proxy), timeout=10) for _ in range(4 * workers)]
        seen |= {await worker_pid(c) for c in conns}
        for c in conns:
            await c.close()
        await asyncio.sleep(0.1)


@pytest.fixture(params=[2, 4], ids=["2-workers", "4-workers"])
async def workers(request: pytest.FixtureRequest, proxy_factory: ProxyFactory) -> AsyncIterator[ProxyHandle]:
    proxy = proxy_factory("--pool-max-size", "8", env={"PGSLUICE_WORKERS": str(request.param)})
    await all_workers_listen(proxy, request.param)
    yield proxy


async def running(direct: asyncpg.Connection, tag: str) -> int:
    return int(await direct.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1", f"%{tag}%"))


async def test_asyncpg_timeouts_stop_the_query(workers: ProxyHandle, pg: EmbeddedPostgres) -> None:
    """asyncpg's statement timeout sends a CancelRequest on a new connection: every time, the
    query stops on the server and the connection answers the next query at once."""
    direct = await asyncpg.connect(pg.dsn(database=DB), timeout=10)
    conns = [await asyncpg.connect(dsn(workers), timeout=10) for _ in range(ROUNDS)]
    try:
        async def one(i: int, conn: asyncpg.Connection) -> float:
            with pytest.raises(TimeoutError):
                await conn.execute(f"SELECT pg_sleep(20) /* cw_{i} */", timeout=0.3)
            started = time.monotonic()
            # asyncpg waits for the cancelled query's ReadyForQuery before it sends this
            assert await conn.fetchval("SELECT 42", timeout=10) == 42
            return time.monotonic() - started

        waits = await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
        assert max(waits) < 2.0, f"cancels lost: {sorted(round(w, 2) for w in waits)}"
        assert await running(direct, "/* cw_") == 0
    finally:
        for c in conns:
            await c.close()
        await direct.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%/* cw_%'"
                             " AND pid <> pg_backend_pid()")
        await direct.close()


def test_psycopg_cancel(workers: ProxyHandle) -> None:
    """libpq's cancel from another thread: QueryCanceled (57014) within a second, every time."""
    for _ in range(ROUNDS // 2):
        with psycopg.connect(dsn(workers), autocommit=True, connect_timeout=10) as conn:
            sent: list[float] = []

            def cancel_soon(conn: psycopg.Connection[tuple[object, ...]] = conn,
                            sent: list[float] = sent) -> None:
                time.sleep(0.2)
                sent.append(time.monotonic())
                conn.cancel_safe()

            thread = threading.Thread(target=cancel_soon, daemon=True)
            thread.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            assert time.monotonic() - sent[0] < 1.0
            thread.join(5)
            assert conn.execute("SELECT 7").fetchone() == (7,)


def test_psql_ctrl_c(workers: ProxyHandle) -> None:
    """psql's Ctrl-C (SIGINT) sends a CancelRequest: the statement stops at once."""
    for _ in range(ROUNDS // 2):
        proc = subprocess.Popen(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-c", "SELECT pg_sleep(20)",
                                 dsn(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - started < 2.0, err
        assert "canceling statement due to user request" in err
