"""Cancel requests reach the right query; clients that vanish leave nothing behind.

Every outcome is also read straight from Postgres (superuser): which queries run, which
server connections are idle in transaction, whose row locks are held.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from proxy.pgwire import codes, encode
from tests.cachedb import show_cache
from tests.rawpg import Raw, data_rows, errors_in
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, wait_until_async

USER, DB = "alice", "app"
CANCEL_LATENCY = 1.0  # the error must reach the client this soon after the CancelRequest


@pytest.fixture
async def direct(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg.dsn(database=DB), timeout=10)
    yield conn
    await conn.close()


@pytest.fixture
def small_pool(proxy_factory: ProxyFactory) -> ProxyHandle:
    return proxy_factory("--pool-max-size", "2", "--pool-acquire-timeout", "10")


@pytest.fixture
def one_backend(proxy_factory: ProxyFactory) -> ProxyHandle:
    return proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "10")


@pytest.fixture
async def rows(direct: asyncpg.Connection) -> AsyncIterator[str]:
    """A one-row table alice can update; yields its name."""
    await direct.execute("DROP TABLE IF EXISTS dc_rows; CREATE TABLE dc_rows (id int PRIMARY KEY, v int);"
                         " INSERT INTO dc_rows VALUES (1, 0); GRANT ALL ON dc_rows TO alice;"
                         " DROP TABLE IF EXISTS dc_copy; CREATE TABLE dc_copy (x int);"
                         " GRANT ALL ON dc_copy TO alice")
    yield "dc_rows"
    # a server connection a failed test left holding locks must not make the DROP hang
    await direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE usename = 'alice' AND datname = 'app' AND state <> 'idle'")
    await direct.execute("DROP TABLE dc_rows; DROP TABLE dc_copy", timeout=10)


def dsn(proxy: ProxyHandle) -> str:
    return proxy.dsn(USER, PASSWORDS[USER], DB)


async def raw_client(proxy: ProxyHandle) -> tuple[Raw, int, bytes]:
    """A raw protocol client logged in through the proxy, with the cancel key it was given."""
    raw = await Raw.open(proxy)
    msgs = await raw.startup(encode.startup_message({"user": USER, "database": DB}),
                             password=PASSWORDS[USER], user=USER)
    for code, body in msgs:
        if code == codes.B_BACKEND_KEY_DATA:
            return raw, struct.unpack_from("!i", body)[0], body[4:]
    raise AssertionError("no BackendKeyData")


async def send_cancel(proxy: ProxyHandle, pid: int, secret: bytes) -> None:
    """A CancelRequest on a new connection; returns once the proxy has closed it (handled)."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(encode.cancel_request(pid, secret))
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # no answer, as from Postgres
    finally:
        writer.close()


async def running(direct: asyncpg.Connection, tag: str) -> list[str]:
    """Tagged statements Postgres is executing right now."""
    rows = await direct.fetch(
        "SELECT query FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1"
        " AND pid <> pg_backend_pid() ORDER BY query", f"%/* {tag}%")
    return [r["query"] for r in rows]


async def wait_running(direct: asyncpg.Connection, tag: str, n: int, timeout: float = 5) -> list[str]:
    async def check() -> tuple[list[str]] | None:
        now = await running(direct, tag)
        return (now,) if len(now) == n else None
    (now,) = await wait_until_async(check, timeout=timeout, message=f"{n} queries tagged {tag} running")
    return now


async def in_transaction(direct: asyncpg.Connection) -> int:
    """Server connections of alice left idle in (an aborted) transaction."""
    return int(await direct.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2"
        " AND state LIKE 'idle in transaction%'", USER, DB))


async def alice_backends(direct: asyncpg.Connection) -> list[int]:
    rows = await direct.fetch("SELECT pid FROM pg_stat_activity WHERE usename = $1 AND datname = $2"
                              " AND backend_type = 'client backend'", USER, DB)
    return [r["pid"] for r in rows]


async def backends_are(direct: asyncpg.Connection, pids: list[int]) -> bool:
    """(Connections of earlier tests' proxies may take a moment to go.)"""
    return await alice_backends(direct) == pids


async def backends_at_most(direct: asyncpg.Connection, n: int) -> bool:
    return len(await alice_backends(direct)) <= n


def sqlstates(msgs: list[tuple[int, bytes]]) -> list[str]:
    return [e["C"] for e in errors_in(msgs)]


# ---- cancel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["task-cancel", "timeout"])
async def test_cancel_with_asyncpg(small_pool: ProxyHandle, direct: asyncpg.Connection, how: str) -> None:
    """asyncpg sends a CancelRequest when the awaiting task is cancelled or times out; the
    query really stops on the server and the connection is usable at once."""
    conn = await asyncpg.connect(dsn(small_pool), timeout=10)
    try:
        sql = f"SELECT pg_sleep(10) /* c_asyncpg_{how} */"
        if how == "task-cancel":
            task = asyncio.create_task(conn.execute(sql))
            await wait_running(direct, f"c_asyncpg_{how}", 1)
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            waiter = asyncio.create_task(wait_running(direct, f"c_asyncpg_{how}", 1))
            started = time.monotonic() + 0.5
            with pytest.raises(TimeoutError):
                await conn.execute(sql, timeout=0.5)
            await waiter
        # asyncpg waits for the cancelled query's ReadyForQuery before sending this one
        assert await conn.fetchval("SELECT 42", timeout=5) == 42
        assert time.monotonic() - started < CANCEL_LATENCY
        assert await running(direct, f"c_asyncpg_{how}") == []
    finally:
        await conn.close()


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_with_psycopg(small_pool: ProxyHandle, method: str) -> None:
    """libpq's cancel (PQcancel with the BackendKeyData the proxy gave, or libpq 17's
    PQcancelConn) from another thread: QueryCanceled 57014 within a second."""
    with psycopg.connect(dsn(small_pool), autocommit=True, connect_timeout=10) as conn:
        sent: list[float] = []

        def cancel_soon() -> None:
            time.sleep(0.3)
            sent.append(time.monotonic())
            getattr(conn, method)()

        thread = threading.Thread(target=cancel_soon, daemon=True)
        thread.start()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            conn.execute("SELECT pg_sleep(10)")
        got = time.monotonic()
        thread.join(5)
        assert info.value.sqlstate == "57014"
        assert sent and got - sent[0] < CANCEL_LATENCY
        assert conn.execute("SELECT 7").fetchone() == (7,)
        # inside a transaction block: the block is aborted, as in Postgres, until ROLLBACK
        conn.execute("BEGIN")
        timer = threading.Timer(0.3, getattr(conn, method))
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        timer.join(5)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 8")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 9").fetchone() == (9,)


async def test_raw_cancel_wrong_key_then_right_key(small_pool: ProxyHandle,
                                                   direct: asyncpg.Connection) -> None:
    """A CancelRequest with the BackendKeyData the proxy gave cancels the query (57014 within a
    second, connection usable); wrong secrets or pids do nothing."""
    raw, pid, secret = await raw_client(small_pool)
    bystander, b_pid, b_secret = await raw_client(small_pool)
    try:
        assert len(secret) == 4
        await raw.send(encode.query("SELECT pg_sleep(10) /* c_raw_target */"))
        await bystander.send(encode.query("SELECT pg_sleep(10) /* c_raw_bystander */"))
        await wait_running(direct, "c_raw_", 2)
        wrong = [(pid, bytes(b ^ 0xFF for b in secret)), (pid, b_secret[:2] + secret[2:]),
                 (pid + 1000, secret), (b_pid, secret), (0, b"\x00\x00\x00\x00")]
        for key in wrong:
            await send_cancel(small_pool, *key)
        await asyncio.sleep(0.3)
        assert len(await running(direct, "c_raw_")) == 2
        started = time.monotonic()
        await send_cancel(small_pool, pid, secret)
        msgs = await raw.read_until_ready(timeout=5)
        assert time.monotonic() - started < CANCEL_LATENCY
        assert sqlstates(msgs) == ["57014"]
        assert await running(direct, "c_raw_") == ["SELECT pg_sleep(10) /* c_raw_bystander */"]
        # usable afterwards, and a cancel while idle does nothing to the next query
        await send_cancel(small_pool, pid, secret)
        msgs = await raw.query("SELECT 11")
        assert sqlstates(msgs) == [] and data_rows(msgs) == [b"11"]
        await send_cancel(small_pool, b_pid, b_secret)
        assert sqlstates(await bystander.read_until_ready(timeout=5)) == ["57014"]
    finally:
        await raw.close()
        await bystander.close()


async def test_cancel_routed_with_many_clients(small_pool: ProxyHandle, direct: asyncpg.Connection) -> None:
    """Five clients, two server connections: three queries wait for a connection. Each cancel
    stops exactly the query of the client whose key it carries, and a waiting client takes over."""
    clients = [await raw_client(small_pool) for _ in range(5)]
    try:
        for i, (raw, _, _) in enumerate(clients):
            await raw.send(encode.query(f"SELECT pg_sleep(30) /* c_many_{i} */"))
        done: set[int] = set()
        for _ in range(5):
            now = await wait_running(direct, "c_many_", min(2, 5 - len(done)))
            active = {int(q.split("c_many_")[1].split()[0]) for q in now}
            assert not active & done
            target = min(active)
            raw, pid, secret = clients[target]
            started = time.monotonic()
            await send_cancel(small_pool, pid, secret)
            msgs = await raw.read_until_ready(timeout=5)
            assert time.monotonic() - started < CANCEL_LATENCY
            assert sqlstates(msgs) == ["57014"], f"client {target}"
            done.add(target)
            for other in active - {target}:  # still running, untouched
                assert f"/* c_many_{other} */" in " ".join(await running(direct, "c_many_"))
        assert await running(direct, "c_many_") == []
        for raw, _, _ in clients:  # all usable
            assert data_rows(await raw.query("SELECT 1")) == [b"1"]
    finally:
        for raw, _, _ in clients:
            await raw.close()


async def test_cancel_key_of_idle_or_waiting_client(one_backend: ProxyHandle,
                                                    direct: asyncpg.Connection) -> None:
    """A client's key cancels only that client's query: not the query now running on the server
    connection it used before, nor the one running while it waits for a connection."""
    x, x_pid, x_secret = await raw_client(one_backend)
    y, _, _ = await raw_client(one_backend)
    try:
        assert data_rows(await x.query("SELECT 1")) == [b"1"]  # x used the server connection
        await y.send(encode.query("SELECT pg_sleep(1) /* c_idle_y */"))
        await wait_running(direct, "c_idle_y", 1)
        await send_cancel(one_backend, x_pid, x_secret)  # x is idle: nothing to cancel
        assert sqlstates(await y.read_until_ready(timeout=5)) == []
        await y.send(encode.query("SELECT pg_sleep(1) /* c_wait_y */"))
        await wait_running(direct, "c_wait_y", 1)
        await x.send(encode.query("SELECT 2 /* c_wait_x */"))  # x waits for the connection
        await asyncio.sleep(0.1)
        await send_cancel(one_backend, x_pid, x_secret)
        assert sqlstates(await y.read_until_ready(timeout=5)) == []  # y's query ran to its end
        x_msgs = await x.read_until_ready(timeout=5)
        # x's query had not started: it may be answered or refused, nothing else
        assert sqlstates(x_msgs) in ([], ["57014"]), x_msgs
        assert data_rows(await x.query("SELECT 3")) == [b"3"]
    finally:
        await x.close()
        await y.close()


@pytest.mark.parametrize("known", [False, True], ids=["new", "known"])
async def test_cancel_of_a_client_waiting_for_a_server_connection(one_backend: ProxyHandle,
                                                                  direct: asyncpg.Connection,
                                                                  known: bool) -> None:
    """Every server connection is busy: a client's cancel ends its wait in the queue at once,
    with the answer Postgres gives a cancelled statement (not a timeout much later, nor its
    query run after all). Also for a text sent before (a known passthrough text waits for its
    server connection from data_received, proxy/pipeline/fastpath.py)."""
    x, x_pid, x_secret = await raw_client(one_backend)
    y, _, _ = await raw_client(one_backend)
    sql = "SELECT 2, now() > '2000-01-01' /* c_queue_x */" if known else "SELECT 2 /* c_queue_x */"
    try:
        if known:
            before = int(show_cache(one_backend, DB).get("known_passthrough", "0"))
            for _ in range(3):
                assert data_rows(await x.query(sql)) == [b"2"]
            assert int(show_cache(one_backend, DB).get("known_passthrough", "0")) > before
        await y.send(encode.query("SELECT pg_sleep(3) /* c_queue_y */"))
        await wait_running(direct, "c_queue_y", 1)
        await x.send(encode.query(sql))  # x waits for the connection
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await send_cancel(one_backend, x_pid, x_secret)
        x_msgs = await x.read_until_ready(timeout=5)
        assert sqlstates(x_msgs) == ["57014"], x_msgs
        assert time.monotonic() - started < CANCEL_LATENCY
        assert sqlstates(await y.read_until_ready(timeout=10)) == []  # y's query was not touched
        assert data_rows(await x.query("SELECT 3")) == [b"3"]
    finally:
        await x.close()
        await y.close()


async def test_cancel_of_a_client_whose_server_connection_is_being_opened(one_backend: ProxyHandle,
                                                                         direct: asyncpg.Connection) -> None:
    """A CancelRequest while pgsluice opens the server connection for the client's statement
    (Session._attach; here a login event trigger makes the opening take 1.5 s): the
    statement is answered 57014 once the connection is ready and is never sent (it was run
    after all, uncancelled, before)."""
    x, x_pid, x_secret = await raw_client(one_backend)
    await direct.execute("""
        DROP TABLE IF EXISTS dc_slow_login; CREATE TABLE dc_slow_login ();
        CREATE OR REPLACE FUNCTION dc_slow_login() RETURNS event_trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = public AS $$
        BEGIN
            IF session_user = 'alice' AND to_regclass('public.dc_slow_login') IS NOT NULL THEN
                PERFORM pg_sleep(1.5);
            END IF;
        END $$;
        CREATE EVENT TRIGGER dc_slow_login ON login EXECUTE FUNCTION dc_slow_login();""")
    try:
        # the pool's idle server connection goes away: the next statement needs a new one
        await direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE usename = 'alice' AND datname = 'app'")
        await asyncio.sleep(0.3)
        await x.send(encode.query("SELECT pg_sleep(3), 'ran' /* c_attach_x */"))
        await asyncio.sleep(0.4)  # pgsluice is opening the server connection (1.5 s)
        started = time.monotonic()
        await send_cancel(one_backend, x_pid, x_secret)
        x_msgs = await x.read_until_ready(timeout=10)
        assert sqlstates(x_msgs) == ["57014"], x_msgs
        assert time.monotonic() - started < 2.5  # the connection's 1.5 s, not the statement's 3 s
        assert await running(direct, "c_attach_x") == []
    finally:
        await direct.execute("DROP EVENT TRIGGER IF EXISTS dc_slow_login; DROP TABLE IF EXISTS dc_slow_login;"
                             " DROP FUNCTION IF EXISTS dc_slow_login()")
        await x.close()
    y, _, _ = await raw_client(one_backend)  # the server connection went back to the pool
    assert data_rows(await y.query("SELECT 4")) == [b"4"]
    await y.close()


# ---- disconnect --------------------------------------------------------------------------------

async def next_client_updates_promptly(proxy: ProxyHandle, pid: int | None) -> None:
    """Another client, through the proxy, takes the row lock at once (lock_timeout) on the
    same server connection (pid), rolled back and reused."""
    conn = await asyncpg.connect(dsn(proxy), timeout=10)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '2s'", timeout=5)
            assert await conn.fetchval("SELECT v FROM dc_rows WHERE id = 1 FOR UPDATE", timeout=5) == 0
            if pid is not None:
                assert await conn.fetchval("SELECT pg_backend_pid()", timeout=5) == pid
        assert await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'dc_tmp'", timeout=5) == 0
    finally:
        await conn.close()


async def hang_up(raw: Raw, how: str) -> None:
    if how.endswith("abort"):
        raw.writer.transport.abort()  # no Terminate: the socket just goes away
    else:
        await raw.send(encode.terminate())
        await raw.close()


@pytest.mark.parametrize("how", ["abort", "terminate", "failed-abort", "failed-terminate", "pinned-abort"])
async def test_disconnect_mid_transaction_releases_locks(one_backend: ProxyHandle, direct: asyncpg.Connection,
                                                         rows: str, how: str) -> None:
    """A client holding a row lock inside a transaction hangs up (abruptly or with Terminate;
    in a healthy or failed transaction; pinned or not): rolled back, lock released, no server
    connection idle in transaction, and the connection serves the next client."""
    raw, _, _ = await raw_client(one_backend)
    assert sqlstates(await raw.query("BEGIN")) == []
    if how.startswith("pinned"):
        assert sqlstates(await raw.query("CREATE TEMP TABLE dc_tmp (x int)")) == []
    assert sqlstates(await raw.query("UPDATE dc_rows SET v = v + 1 WHERE id = 1")) == []
    pid = int(data_rows(await raw.query("SELECT pg_backend_pid()"))[0])
    if how.startswith("failed"):
        assert sqlstates(await raw.query("SELECT 1/0")) == ["22012"]  # the lock stays held
    assert await in_transaction(direct) == 1
    await hang_up(raw, how)
    await wait_until_async(lambda: in_transaction_is(direct, 0), timeout=3)
    assert await direct.fetchval("SELECT v FROM dc_rows WHERE id = 1") == 0
    async with direct.transaction():
        await direct.execute("SET LOCAL lock_timeout = '2s'")
        await direct.execute("UPDATE dc_rows SET v = v WHERE id = 1")
    await next_client_updates_promptly(one_backend, pid)
    await wait_until_async(lambda: backends_are(direct, [pid]), timeout=3)


async def in_transaction_is(direct: asyncpg.Connection, n: int) -> bool:
    return await in_transaction(direct) == n


@pytest.mark.parametrize("how", ["abort", "in-transaction-abort", "terminate"])
async def test_disconnect_during_query_cancels_it(one_backend: ProxyHandle, direct: asyncpg.Connection,
                                                  rows: str, how: str) -> None:
    """A client hangs up while its query runs: the query is cancelled within a couple of
    seconds (its lock released) and the pool's one connection slot serves the next client."""
    raw, _, _ = await raw_client(one_backend)
    if how.startswith("in-transaction"):
        assert sqlstates(await raw.query("BEGIN; UPDATE dc_rows SET v = v + 1 WHERE id = 1")) == []
    await raw.send(encode.query("SELECT pg_sleep(30) /* dc_running */"))
    await wait_running(direct, "dc_running", 1)
    started = time.monotonic()
    await hang_up(raw, how)
    await wait_running(direct, "dc_running", 0, timeout=3)
    await wait_until_async(lambda: in_transaction_is(direct, 0), timeout=3)
    await next_client_updates_promptly(one_backend, None)
    assert time.monotonic() - started < 5
    assert await direct.fetchval("SELECT v FROM dc_rows WHERE id = 1") == 0
    await wait_until_async(lambda: backends_at_most(direct, 1), timeout=3)  # pool_max_size 1: no leak


async def test_disconnect_while_waiting_for_a_connection(one_backend: ProxyHandle,
                                                         direct: asyncpg.Connection, rows: str) -> None:
    """A client whose query waits for the busy server connection hangs up: its query never
    runs, and the connection goes to the next client as soon as it is free."""
    # logged in first: a login with new startup parameters needs the server connection once
    waiting, _, _ = await raw_client(one_backend)
    holder = await asyncpg.connect(dsn(one_backend), timeout=10)
    try:
        tx = holder.transaction()
        await tx.start()
        pid = await holder.fetchval("SELECT pg_backend_pid()", timeout=5)
        await waiting.send(encode.query("UPDATE dc_rows SET v = 100 WHERE id = 1"))
        await asyncio.sleep(0.2)
        waiting.writer.transport.abort()
        await asyncio.sleep(0.2)
        await tx.commit()
        started = time.monotonic()
        await next_client_updates_promptly(one_backend, pid)
        assert time.monotonic() - started < 2
        assert await direct.fetchval("SELECT v FROM dc_rows WHERE id = 1") == 0  # never ran
    finally:
        await holder.close()


async def test_disconnect_during_copy_in(one_backend: ProxyHandle, direct: asyncpg.Connection,
                                         rows: str) -> None:
    """A client hangs up in the middle of COPY FROM STDIN inside a transaction holding a row
    lock: nothing is copied, the lock is released, the next client is served."""
    raw, _, _ = await raw_client(one_backend)
    assert sqlstates(await raw.query("BEGIN; UPDATE dc_rows SET v = v + 1 WHERE id = 1")) == []
    await raw.send(encode.query("COPY dc_copy FROM STDIN"))
    msg = await raw.read_message()
    assert msg is not None and msg[0] == codes.B_COPY_IN_RESPONSE
    await raw.send(encode.message(codes.F_COPY_DATA, b"1\n2\n3\n"))
    await asyncio.sleep(0.1)
    raw.writer.transport.abort()
    await wait_until_async(lambda: in_transaction_is(direct, 0), timeout=3)
    await wait_until_async(lambda: copy_gone(direct), timeout=3)
    await next_client_updates_promptly(one_backend, None)
    assert await direct.fetchval("SELECT count(*) FROM dc_copy") == 0
    await wait_until_async(lambda: backends_at_most(direct, 1), timeout=3)


async def copy_gone(direct: asyncpg.Connection) -> bool:
    return not await direct.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY dc_copy%' AND state <> 'idle'"
        " AND pid <> pg_backend_pid()")

