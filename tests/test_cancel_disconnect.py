"""Cancel requests reach the right query; clients that vanish leave nothing behind."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from proxy.embedded import EmbeddedPostgres
from proxy.pgwire import codes, encode
from tests.rawpg import Raw, errors_in
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, wait_until_async

USER, DB = "alice", "app"


@pytest.fixture
async def direct(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg.dsn(database=DB), timeout=10)
    yield conn
    await conn.close()


@pytest.fixture
def small_pool(proxy_factory: ProxyFactory) -> ProxyHandle:
    return proxy_factory("--pool-max-size", "2")


async def sleepers(direct: asyncpg.Connection) -> int:
    return int(await direct.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'"
        " AND pid <> pg_backend_pid()"))


async def test_cancel_with_asyncpg(small_pool: ProxyHandle) -> None:
    conn = await asyncpg.connect(small_pool.dsn(USER, PASSWORDS[USER], DB), timeout=10)
    try:
        task = asyncio.create_task(conn.execute("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()  # asyncpg sends a CancelRequest on a new connection
        with pytest.raises(asyncio.CancelledError):
            await task
        # the connection is usable again once the cancelled query's error has been consumed
        assert await conn.fetchval("SELECT 42", timeout=5) == 42
        assert time.monotonic() - started < 1.0
    finally:
        await conn.close()


def test_cancel_with_psycopg(small_pool: ProxyHandle) -> None:
    with psycopg.connect(small_pool.dsn(USER, PASSWORDS[USER], DB), autocommit=True) as conn:
        def cancel_soon() -> None:
            time.sleep(0.3)
            conn.cancel()

        loop = asyncio.new_event_loop()
        try:
            fut = loop.run_in_executor(None, cancel_soon)
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled) as info:
                conn.execute("SELECT pg_sleep(10)")
            assert time.monotonic() - started < 1.3  # 0.3 s before the cancel, then < 1 s
            assert info.value.sqlstate == "57014"
            loop.run_until_complete(fut)
        finally:
            loop.close()
        assert conn.execute("SELECT 7").fetchone() == (7,)


async def raw_client(proxy: ProxyHandle) -> tuple[Raw, int, bytes]:
    raw = await Raw.open(proxy)
    await raw.send(encode.startup_message({"user": "postgres", "database": DB}))
    pid, secret = 0, b""
    while True:
        msg = await raw.read_message()
        assert msg is not None
        code, body = msg
        if code == codes.B_AUTHENTICATION and struct.unpack_from("!i", body)[0] == codes.AUTH_CLEARTEXT:
            await raw.send(encode.password(b"postgres"))
        elif code == codes.B_BACKEND_KEY_DATA:
            pid, secret = struct.unpack_from("!i", body)[0], body[4:]
        elif code == codes.B_READY_FOR_QUERY:
            return raw, pid, secret


async def send_cancel(proxy: ProxyHandle, pid: int, secret: bytes) -> None:
    _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(encode.cancel_request(pid, secret))
    await writer.drain()
    writer.close()


async def test_cancel_reaches_only_its_query(small_pool: ProxyHandle, direct: asyncpg.Connection) -> None:
    """Two sleeping clients on two server connections: a cancel with a wrong key or another
    client's pid cancels nothing; the right one cancels only its own query."""
    clients = [await raw_client(small_pool) for _ in range(2)]
    try:
        for raw, _, _ in clients:
            await raw.send(encode.query("SELECT pg_sleep(3)"))
        await wait_until_async(lambda: sleepers_is(direct, 2), timeout=5)
        target, pid, secret = clients[0]
        await send_cancel(small_pool, pid, bytes(b ^ 0xFF for b in secret))  # wrong key: ignored
        await send_cancel(small_pool, pid + 1 if pid + 1 != clients[1][1] else pid + 2, secret)
        await asyncio.sleep(0.3)
        assert await sleepers(direct) == 2
        started = time.monotonic()
        await send_cancel(small_pool, pid, secret)
        msgs = await target.read_until_ready(timeout=5)
        assert time.monotonic() - started < 1.0
        assert [e["C"] for e in errors_in(msgs)] == ["57014"]
        other = await clients[1][0].read_until_ready(timeout=5)  # finished normally after 3 s
        assert errors_in(other) == []
    finally:
        for raw, _, _ in clients:
            await raw.close()


async def sleepers_is(direct: asyncpg.Connection, n: int) -> bool:
    return await sleepers(direct) == n


async def test_disconnect_mid_transaction_releases_locks(small_pool: ProxyHandle,
                                                         direct: asyncpg.Connection) -> None:
    await direct.execute("DROP TABLE IF EXISTS dc_rows; CREATE TABLE dc_rows (id int PRIMARY KEY, v int);"
                         "INSERT INTO dc_rows VALUES (1, 0)")
    for how in ("abort", "terminate"):
        raw, _, _ = await raw_client(small_pool)
        await raw.query("BEGIN")
        assert errors_in(await raw.query("UPDATE dc_rows SET v = v + 1 WHERE id = 1")) == []
        if how == "abort":
            raw.writer.transport.abort()  # no Terminate: the socket just goes away
        else:
            await raw.send(encode.terminate())
            await raw.close()
        # the row lock is released promptly and the update was rolled back
        async with direct.transaction():
            await direct.execute("SET LOCAL lock_timeout = '3s'")
            await direct.execute("UPDATE dc_rows SET v = v WHERE id = 1")
        assert await direct.fetchval("SELECT v FROM dc_rows WHERE id = 1") == 0
        assert await direct.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()") == 0
    await direct.execute("DROP TABLE dc_rows")


async def test_disconnect_during_query_cancels_it(proxy_factory: ProxyFactory,
                                                  direct: asyncpg.Connection) -> None:
    proxy = proxy_factory("--pool-max-size", "1")
    raw, _, _ = await raw_client(proxy)
    await raw.send(encode.query("SELECT pg_sleep(30)"))
    await wait_until_async(lambda: sleepers_is(direct, 1), timeout=5)
    raw.writer.transport.abort()
    await wait_until_async(lambda: sleepers_is(direct, 0), timeout=3)
    # the single server connection (or its replacement) serves the next client
    conn = await asyncpg.connect(proxy.dsn(), timeout=10)
    try:
        assert await conn.fetchval("SELECT 5", timeout=5) == 5
    finally:
        await conn.close()
