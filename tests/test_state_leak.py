"""Session state never leaks between clients sharing one server connection (pool of 1).

Observed from both sides: what each client sees through the proxy, and what the one
server connection holds, read directly from Postgres as superuser.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.embedded import EmbeddedPostgres
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

USER, DB = "alice", "app"


@pytest.fixture
def one_backend(proxy_factory: ProxyFactory) -> ProxyHandle:
    return proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "1")


@pytest.fixture
async def direct(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg.dsn(database=DB), timeout=10)
    yield conn
    await conn.close()


async def client(proxy: ProxyHandle, **settings: str) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.dsn(USER, PASSWORDS[USER], DB), timeout=10,
                                 server_settings=settings, statement_cache_size=0)


async def seen(conn: asyncpg.Connection) -> tuple[str, ...]:
    row = await conn.fetchrow(
        "SELECT current_setting('TimeZone'), current_setting('application_name'),"
        " current_setting('DateStyle'), current_setting('search_path'),"
        " current_setting('statement_timeout'), '2024-06-01 12:00:00+00'::timestamptz::text", timeout=5)
    assert row is not None
    return tuple(row)


async def test_startup_parameters_follow_their_client(one_backend: ProxyHandle) -> None:
    a = await client(one_backend, TimeZone="UTC", application_name="leak_a", DateStyle="ISO, DMY",
                     search_path="a_schema, public")
    b = await client(one_backend, TimeZone="Asia/Kolkata", application_name="leak_b")
    try:
        want_a = ("UTC", "leak_a", "ISO, DMY", "a_schema, public", "0", "2024-06-01 12:00:00+00")
        want_b = ("Asia/Kolkata", "leak_b", "ISO, MDY", '"$user", public', "0", "2024-06-01 17:30:00+05:30")
        for _ in range(5):
            assert await seen(a) == want_a
            assert await seen(b) == want_b
    finally:
        await a.close()
        await b.close()


async def test_set_and_reset_stay_with_their_client(one_backend: ProxyHandle) -> None:
    a = await client(one_backend, application_name="leak_a")
    b = await client(one_backend, application_name="leak_b")
    try:
        b_before = await seen(b)
        await a.execute("SET TimeZone = 'America/Sao_Paulo'")
        await a.execute("SET statement_timeout = '7s'; SET application_name = 'renamed'")
        assert (await seen(a))[:2] == ("America/Sao_Paulo", "renamed")
        assert (await seen(a))[4] == "7s"
        assert await seen(b) == b_before
        await a.execute("RESET application_name")  # back to a's startup value, not the server's
        assert (await seen(a))[1] == "leak_a"
        async with a.transaction():  # SET LOCAL ends with its transaction
            await a.execute("SET LOCAL statement_timeout = '3s'")
            assert (await seen(a))[4] == "3s"
        assert (await seen(a))[4] == "7s"
        await a.execute("RESET ALL")
        assert (await seen(a))[1] == "leak_a" and (await seen(a))[4] == "0"
        assert await seen(b) == b_before
    finally:
        await a.close()
        await b.close()


async def test_set_in_transaction(one_backend: ProxyHandle, pg: EmbeddedPostgres) -> None:
    """As in Postgres: a SET inside a transaction that rolls back is undone, one that commits
    stays. Such a client is pinned to its server connection, which is reset when it leaves."""
    other = await client(one_backend, application_name="leak_other")
    try:
        for dsn in (pg.dsn(USER, PASSWORDS[USER], DB), one_backend.dsn(USER, PASSWORDS[USER], DB)):
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                tx = conn.transaction()
                await tx.start()
                await conn.execute("SET statement_timeout = '9s'")
                await tx.rollback()
                assert await conn.fetchval("SHOW statement_timeout") == "0"
                async with conn.transaction():
                    await conn.execute("SET statement_timeout = '8s'")
                assert await conn.fetchval("SHOW statement_timeout") == "8s"
            finally:
                await conn.close()
            assert (await seen(other))[4] == "0"
    finally:
        await other.close()


PINNING = [
    pytest.param("CREATE TEMP TABLE leak_tmp (x int)", "SELECT count(*) FROM pg_temp.leak_tmp",
                 "SELECT count(*) FROM pg_class WHERE relname = 'leak_tmp' AND relpersistence = 't'",
                 id="temp"),
    pytest.param("SELECT pg_advisory_lock(424242)", "SELECT 1",
                 "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 424242",
                 id="advisory"),
    pytest.param("LISTEN leak_channel", "SELECT count(*) FROM pg_listening_channels()",
                 None, id="listen"),
    pytest.param("PREPARE leak_stmt AS SELECT 1", "EXECUTE leak_stmt",
                 None, id="sql-prepare"),
    pytest.param("BEGIN; DECLARE leak_cur CURSOR WITH HOLD FOR SELECT 1; COMMIT", "FETCH leak_cur",
                 None, id="cursor-with-hold"),
]


@pytest.mark.parametrize(("create", "use", "server_check"), PINNING)
async def test_session_state_pins_then_is_cleaned(
        one_backend: ProxyHandle, direct: asyncpg.Connection, create: str, use: str,
        server_check: str | None) -> None:
    # b logs in first: a login with startup parameters never seen before needs a server
    # connection to learn what Postgres reports for them.
    b = await client(one_backend, application_name="leak_waiting")
    a = await client(one_backend, application_name="leak_pinned")
    await a.execute(create)
    await a.fetch(use, timeout=5)  # still on the same server connection in a later transaction
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError):  # the only backend is pinned to a
            await b.fetchval("SELECT 1", timeout=5)
        await a.fetch(use, timeout=5)
    finally:
        await a.close()
    # a left: the connection was reset (DISCARD ALL) and serves b with nothing of a's
    assert await b.fetchval("SELECT count(*) FROM pg_listening_channels()", timeout=5) == 0
    assert await b.fetchval("SELECT count(*) FROM pg_prepared_statements", timeout=5) == 0
    assert await b.fetchval("SELECT count(*) FROM pg_cursors WHERE name <> ''", timeout=5) == 0
    assert await b.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'leak_tmp'", timeout=5) == 0
    if server_check is not None:
        assert await direct.fetchval(server_check) == 0
    await b.close()


async def test_listen_receives_notifications(one_backend: ProxyHandle, direct: asyncpg.Connection) -> None:
    a = await client(one_backend, application_name="leak_listener")
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await a.add_listener("leak_news", lambda *args: got.put_nowait(args[3]))
        await direct.execute("NOTIFY leak_news, 'hello'")
        assert await asyncio.wait_for(got.get(), 5) == "hello"
    finally:
        await a.close()


async def test_backend_not_left_in_transaction_between_clients(one_backend: ProxyHandle,
                                                               direct: asyncpg.Connection) -> None:
    a = await client(one_backend, application_name="leak_txn")
    tx = a.transaction()
    await tx.start()
    await a.execute("CREATE TABLE IF NOT EXISTS leak_rows (x int)")
    await a.execute("INSERT INTO leak_rows VALUES (1)")
    await a.close()  # Terminate inside the transaction: rolled back, never committed by the next client
    b = await client(one_backend, application_name="leak_next")
    try:
        assert await b.fetchval("SELECT to_regclass('leak_rows') IS NULL") is True
        states = await direct.fetch(
            "SELECT state FROM pg_stat_activity WHERE usename = $1 AND datname = $2", USER, DB)
        assert all(r["state"] != "idle in transaction" for r in states), states
    finally:
        await b.close()
