"""End to end: misbehaving clients against a real proxy over raw sockets.

Each case: a well-behaved asyncpg client connects first; the bad client gets an
ErrorResponse (SQLSTATE checked) and only its own connection is closed; afterwards the
well-behaved client still works, the proxy process is alive and logged no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.ops.embedded import free_port
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_auth, parse_error_fields
from tests.rawpg import DB, PASSWORD, STARTUP, USER, Raw, data_rows, describe, errors_in
from tests.util import ProxyFactory, ProxyHandle, wait_until_async

_I = struct.Struct("!I")


async def expect_fatal(raw: Raw, sqlstates: str | tuple[str, ...], timeout: float = 5) -> dict[str, str]:
    """The proxy answers with one ErrorResponse carrying one of `sqlstates`, then closes."""
    sqlstates = (sqlstates,) if isinstance(sqlstates, str) else sqlstates
    msgs = await raw.read_until_eof(timeout)
    errs = errors_in(msgs)
    assert errs, f"connection closed without an ErrorResponse (got {describe(msgs)}, reset={raw.reset})"
    assert len(errs) == 1, describe(msgs)
    assert errs[0].get("C") in sqlstates, errs[0]
    assert errs[0].get("S") in ("FATAL", "ERROR"), errs[0]
    assert msgs[-1][0] == codes.B_ERROR_RESPONSE, describe(msgs)
    return errs[0]


# ---- bystander and health ------------------------------------------------------------------------

def assert_healthy(proxy: ProxyHandle) -> None:
    assert proxy.proc.poll() is None, f"proxy exited with {proxy.proc.returncode}:\n{proxy.log_text()}"
    log = proxy.log_text()
    for bad in ("Traceback", "Fatal error", "Exception in callback", "exception was never retrieved"):
        assert bad not in log, f"proxy logged {bad!r}:\n{log}"


@contextlib.asynccontextmanager
async def bystander(proxy: ProxyHandle) -> AsyncIterator[asyncpg.Connection]:
    """A good client connected before the bad one; it must still work afterwards."""
    conn = await asyncpg.connect(proxy.dsn(USER, PASSWORD, DB), timeout=10)
    try:
        assert await conn.fetchval("SELECT 1", timeout=5) == 1
        yield conn
        assert await conn.fetchval("SELECT $1::int + 1", 41, timeout=5) == 42
        async with conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'pg_class'") == 1
        assert_healthy(proxy)
    finally:
        await conn.close(timeout=5)


async def logged_in(proxy: ProxyHandle, phase: str) -> Raw:
    """A raw client after login; in phase 'in_transaction' it holds a backend (after BEGIN)."""
    raw = await Raw.open(proxy)
    msgs = await raw.startup()
    assert msgs[-1] == (codes.B_READY_FOR_QUERY, b"I")
    if phase == "in_transaction":
        assert (await raw.query("BEGIN"))[-1] == (codes.B_READY_FOR_QUERY, b"T")
    return raw


# ---- startup phase -------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    pytest.param(b"\x00\x00", id="half-length-word"),
    pytest.param(STARTUP[:11], id="truncated-startup"),
    pytest.param(_I.pack(100) + STARTUP[4:20], id="length-says-100-sends-20"),
])
async def test_truncated_startup_then_close(proxy: ProxyHandle, data: bytes) -> None:
    """Like Postgres ("incomplete startup packet" is only logged): closed at once, nothing or
    an 08P01 sent, long before the login timeout."""
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(data)
        raw.writer.write_eof()
        started = time.monotonic()
        msgs = await raw.read_until_eof(timeout=3)
        assert time.monotonic() - started < 3
        assert all(code == codes.B_ERROR_RESPONSE for code, _ in msgs), describe(msgs)
        assert all(err.get("C") == "08P01" for err in errors_in(msgs)), describe(msgs)
        await raw.close()
        # and a client that vanishes without a half-close
        raw = await Raw.open(proxy)
        await raw.send(data)
        raw.writer.transport.abort()


async def test_startup_packet_over_10k(proxy: ProxyHandle) -> None:
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(_I.pack(10_001) + _I.pack(codes.PROTOCOL_3_0) + b"user\x00")  # body never sent
        await expect_fatal(raw, "08P01", timeout=3)
        await raw.close()
        raw = await Raw.open(proxy)
        await raw.send(_I.pack(1 << 30))
        await expect_fatal(raw, "08P01", timeout=3)
        await raw.close()


@pytest.mark.parametrize(("version", "sqlstate"), [
    pytest.param((2, 0), "0A000", id="2.0"),
    pytest.param((4, 0), "0A000", id="4.0"),
    pytest.param((1234, 5677), "0A000", id="1234.5677"),
    pytest.param((0, 0), "0A000", id="0.0"),
])
async def test_unsupported_protocol_version(proxy: ProxyHandle, version: tuple[int, int],
                                            sqlstate: str) -> None:
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(encode.startup_message({"user": USER}, version=(version[0] << 16) | version[1]))
        err = await expect_fatal(raw, sqlstate)
        assert "protocol" in err["M"]
        await raw.close()


async def test_version_1234_5678_is_a_malformed_cancel_request(proxy: ProxyHandle) -> None:
    """1234.5678 is the CancelRequest code: with no key it is a bad cancel request (08P01);
    a well-formed one with an unknown key is closed without an answer, as Postgres does."""
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(_I.pack(8) + _I.pack(codes.CANCEL_REQUEST))
        await expect_fatal(raw, "08P01")
        await raw.close()
        raw = await Raw.open(proxy)
        await raw.send(encode.cancel_request(123, b"nope"))
        assert await raw.read_until_eof() == []
        await raw.close()


async def test_protocol_3_1_is_negotiated_down(proxy: ProxyHandle) -> None:
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(encode.startup_message({"user": USER, "_pq_.x": "1"}, version=(3 << 16) | 1))
        first = await raw.read_message()
        assert first is not None and first[0] == codes.B_NEGOTIATE_PROTOCOL_VERSION
        assert first[1] == _I.pack(0) + _I.pack(1) + b"_pq_.x\x00"
        await raw.startup(b"")  # carry on with authentication
        assert data_rows(await raw.query("SELECT 7")) == [b"7"]
        await raw.close()


@pytest.mark.parametrize("request_code", [codes.SSL_REQUEST, codes.GSSENC_REQUEST],
                         ids=["SSLRequest", "GSSENCRequest"])
async def test_encryption_request_refused_then_login(proxy: ProxyHandle, request_code: int) -> None:
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(_I.pack(8) + _I.pack(request_code))
        assert await raw.read_byte() == b"N"
        await raw.startup()
        assert data_rows(await raw.query("SELECT 'after N'")) == [b"after N"]
        await raw.close()


async def test_query_pipelined_during_login(proxy_factory: ProxyFactory) -> None:
    """Good input, not bad: Postgres runs a Query that arrives before login completes. Here
    login is held up deterministically (the user's only backend is busy, and new startup
    settings need one); the Query sent meanwhile must not be read as a startup packet."""
    proxy = proxy_factory("--pool-max-size", "1")
    async with bystander(proxy):
        holder = await Raw.open(proxy)
        await holder.startup(encode.startup_message({"user": "trusted_user", "database": DB}))
        assert (await holder.query("BEGIN"))[-1] == (codes.B_READY_FOR_QUERY, b"T")
        raw = await Raw.open(proxy)
        await raw.send(encode.startup_message({"user": "trusted_user", "database": DB,
                                               "application_name": "pipelined"}))
        msg = await raw.read_message()
        assert msg is not None and msg[0] == codes.B_AUTHENTICATION and parse_auth(msg[1])[0] == 0
        await raw.send(encode.query("SELECT 'pipelined'"))  # login still waits for a backend
        await asyncio.sleep(0.3)
        await holder.query("COMMIT")
        msgs = await raw.read_until_ready()  # the login's ReadyForQuery
        assert not errors_in(msgs), describe(msgs)
        assert data_rows(await raw.read_until_ready()) == [b"pipelined"]
        await raw.close()
        await holder.close()


async def test_missing_user(proxy: ProxyHandle) -> None:
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        await raw.send(encode.startup_message({"database": DB}))
        err = await expect_fatal(raw, "28000")
        assert err["S"] == "FATAL"
        await raw.close()


async def test_wrong_password(proxy: ProxyHandle) -> None:
    async with bystander(proxy):
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(proxy.dsn(USER, "wrong", DB), timeout=10)
        assert info.value.sqlstate == "28P01"


async def test_unknown_database(proxy: ProxyHandle) -> None:
    async with bystander(proxy):
        with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
            await asyncpg.connect(proxy.dsn(USER, PASSWORD, "no_such_db"), timeout=10)
        assert info.value.sqlstate == "3D000"


async def test_max_client_conn(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory("--max-client-conn", "2")
    async with bystander(proxy):
        second = await asyncpg.connect(proxy.dsn(), timeout=10)
        try:
            with pytest.raises(asyncpg.TooManyConnectionsError) as info:
                await asyncpg.connect(proxy.dsn(), timeout=10)
            assert info.value.sqlstate == "53300"
            raw = await Raw.open(proxy)
            await raw.send(STARTUP)
            await expect_fatal(raw, "53300")
            await raw.close()
            assert await second.fetchval("SELECT 2") == 2
        finally:
            await second.close()

        async def third_gets_in() -> bool:
            try:
                conn = await asyncpg.connect(proxy.dsn(), timeout=10)
            except asyncpg.TooManyConnectionsError:
                return False
            await conn.close()
            return True

        await wait_until_async(third_gets_in, timeout=5)


ASKS_PASSWORD = (codes.AUTH_CLEARTEXT, codes.AUTH_MD5, codes.AUTH_SASL)


# ---- login timeout -------------------------------------------------------------------------------

@pytest.mark.parametrize("stall", ["startup", "password"])
async def test_login_timeout(proxy_factory: ProxyFactory, stall: str) -> None:
    proxy = proxy_factory("--login-timeout", "1")
    async with bystander(proxy):
        raw = await Raw.open(proxy)
        started = time.monotonic()
        if stall == "startup":
            await raw.send(STARTUP[:len(STARTUP) // 2])
        else:
            await raw.send(STARTUP)
            msg = await raw.read_message()
            assert msg is not None and parse_auth(msg[1])[0] in ASKS_PASSWORD
        msgs = await raw.read_until_eof(timeout=4)
        elapsed = time.monotonic() - started
        errs = errors_in(msgs)
        assert errs and errs[-1]["C"] == "08P01", describe(msgs)
        assert 0.8 <= elapsed < 3, elapsed
        await raw.close()


# ---- after login ---------------------------------------------------------------------------------

PHASES = ["idle", "in_transaction"]


@pytest.mark.parametrize("phase", PHASES)
async def test_unknown_message_type(proxy: ProxyHandle, phase: str) -> None:
    async with bystander(proxy):
        raw = await logged_in(proxy, phase)
        await raw.send(b"!" + _I.pack(4))
        await expect_fatal(raw, "08P01")
        await raw.close()


@pytest.mark.parametrize("phase", ["auth", *PHASES])
@pytest.mark.parametrize("length", [0, 3])
async def test_message_length_below_4(proxy: ProxyHandle, phase: str, length: int) -> None:
    async with bystander(proxy):
        if phase == "auth":
            raw = await Raw.open(proxy)
            await raw.send(STARTUP)
            msg = await raw.read_message()
            assert msg is not None and parse_auth(msg[1])[0] in ASKS_PASSWORD
            await raw.send(b"p" + _I.pack(length))
        else:
            raw = await logged_in(proxy, phase)
            await raw.send(b"Q" + _I.pack(length))
        await expect_fatal(raw, "08P01")
        await raw.close()


@pytest.mark.parametrize("phase", ["auth", *PHASES])
async def test_message_over_max_message_size(proxy_factory: ProxyFactory, phase: str) -> None:
    """Only the header (claiming 1 MB) is sent: the error must come without the body."""
    proxy = proxy_factory("--max-message-size", "65536")
    async with bystander(proxy):
        if phase == "auth":
            raw = await Raw.open(proxy)
            await raw.send(STARTUP)
            msg = await raw.read_message()
            assert msg is not None and parse_auth(msg[1])[0] in ASKS_PASSWORD
            await raw.send(b"p" + _I.pack(1 << 20))
        else:
            raw = await logged_in(proxy, phase)
            await raw.send(b"Q" + _I.pack(1 << 20) + b"SELECT ")
        await expect_fatal(raw, "08P01", timeout=3)
        await raw.close()


async def test_message_at_max_message_size_is_fine(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory("--max-message-size", "65536")
    async with bystander(proxy):
        raw = await logged_in(proxy, "idle")
        literal = "x" * (65536 - 4 - len("SELECT ''") - 1)
        msg = encode.query(f"SELECT '{literal}'")
        assert len(msg) == 65537  # type byte + 65536
        await raw.send(msg)
        assert data_rows(await raw.read_until_ready()) == [literal.encode()]
        await raw.close()


@pytest.mark.parametrize("phase", PHASES)
async def test_bytes_after_terminate(proxy: ProxyHandle, phase: str) -> None:
    table = f"after_terminate_{phase}"
    async with bystander(proxy) as conn:
        raw = await logged_in(proxy, phase)
        await raw.send(encode.terminate() + encode.query(f"CREATE TABLE {table} ()") + b"\xffgarbage!"
                       + b"Q" + _I.pack(2))
        assert await raw.read_until_eof(timeout=3) == []  # nothing answered, closed
        await raw.close()
        await asyncio.sleep(0.2)
        assert await conn.fetchval("SELECT to_regclass($1)::text", table) is None


@pytest.mark.parametrize("phase", PHASES)
async def test_stalled_message_does_not_block_others(proxy: ProxyHandle, phase: str) -> None:
    async with bystander(proxy) as conn:
        raw = await logged_in(proxy, phase)
        msg = encode.query("SELECT 'finally'")
        await raw.send(msg[:3])  # inside the header
        assert await conn.fetchval("SELECT 1", timeout=3) == 1
        await raw.send(msg[3:9])  # inside the body
        started = time.monotonic()
        for i in range(5):
            assert await conn.fetchval("SELECT $1::int", i, timeout=3) == i
        other = await asyncpg.connect(proxy.dsn(), timeout=5)
        try:
            assert await other.fetchval("SELECT 'other'", timeout=3) == "other"
        finally:
            await other.close()
        assert time.monotonic() - started < 3
        await raw.send(msg[9:])
        assert data_rows(await raw.read_until_ready()) == [b"finally"]
        await raw.close()


# ---- pool and upstream ---------------------------------------------------------------------------

async def test_pool_exhaustion(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "0.5")
    first = await asyncpg.connect(proxy.dsn(), timeout=10)
    second = await asyncpg.connect(proxy.dsn(), timeout=10)
    try:
        tx = first.transaction()
        await tx.start()
        assert await first.fetchval("SELECT 1") == 1  # holds the only backend
        started = time.monotonic()
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await second.fetchval("SELECT 2", timeout=5)
        assert info.value.sqlstate == "53300"
        elapsed = time.monotonic() - started
        assert elapsed < 1.5, elapsed  # 1.0 s today: the Sync asyncpg sends after the error waits again
        # still refused while the transaction lasts, and the connection stays usable
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await second.execute("SELECT 3", timeout=5)
        await tx.commit()
        assert await second.fetchval("SELECT 4", timeout=5) == 4
        assert await second.fetchval("SELECT $1::int", 5, timeout=5) == 5
        assert await first.fetchval("SELECT 6", timeout=5) == 6
        assert_healthy(proxy)
    finally:
        await first.close(timeout=5)
        await second.close(timeout=5)


async def test_pool_exhaustion_raw_pipeline(proxy_factory: ProxyFactory) -> None:
    """Like Postgres: one ErrorResponse per failed extended-protocol batch, then ReadyForQuery."""
    proxy = proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "0.5")
    holder = await logged_in(proxy, "in_transaction")
    raw = await logged_in(proxy, "idle")
    try:
        await raw.send(encode.parse(b"", b"SELECT 1") + b"D" + _I.pack(6) + b"S\x00" + b"H" + _I.pack(4))
        msg = await raw.read_message(timeout=3)
        assert msg is not None and msg[0] == codes.B_ERROR_RESPONSE
        assert parse_error_fields(msg[1])["C"] == "53300"
        await raw.send(encode.sync())  # Postgres skips to Sync, which only gets ReadyForQuery
        msgs = await raw.read_until_ready(timeout=3)
        assert msgs == [(codes.B_READY_FOR_QUERY, b"I")], describe(msgs)
        await holder.query("COMMIT")
        assert data_rows(await raw.query("SELECT 8")) == [b"8"]
        assert_healthy(proxy)
    finally:
        await holder.close()
        await raw.close()


async def test_upstream_unreachable(proxy_factory: ProxyFactory) -> None:
    closed_port = free_port()
    proxy = proxy_factory("--upstream", f"postgresql://postgres:postgres@127.0.0.1:{closed_port}/postgres",
                          "--connect-timeout", "2")
    for _ in range(3):
        raw = await Raw.open(proxy)
        await raw.send(STARTUP)
        started = time.monotonic()
        err = await expect_fatal(raw, ("08001", "08006"), timeout=5)
        assert str(closed_port) in err["M"] or "connect" in err["M"], err
        assert time.monotonic() - started < 3
        await raw.close()
        assert_healthy(proxy)
    with pytest.raises((asyncpg.ClientCannotConnectError, asyncpg.ConnectionFailureError,
                        asyncpg.PostgresConnectionError)):
        await asyncpg.connect(proxy.dsn(), timeout=10)
    assert_healthy(proxy)


# ---- memory ----------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def one_bad_client(proxy: ProxyHandle, kind: int) -> None:
    """A bad connection of one of several kinds; waits until the proxy has closed it."""
    raw = await Raw.open(proxy)
    try:
        if kind == 0:
            await raw.send(b"\xde\xad\xbe\xef" * 4)
        elif kind == 1:
            await raw.send(_I.pack(10_001) + b"\x00" * 64)
        elif kind == 2:
            await raw.send(encode.startup_message({"user": USER}, version=2 << 16))
        elif kind == 3:
            await raw.send(STARTUP[:20])
            raw.writer.write_eof()
        elif kind == 4:
            await raw.startup()
            await raw.send(b"!" + _I.pack(4))
        elif kind == 5:
            await raw.startup()
            await raw.send(encode.query("BEGIN") + b"Q" + _I.pack(1 << 20) + b"x" * 70_000)
        elif kind == 6:
            await raw.startup()
            await raw.send(encode.terminate() + b"garbage" * 100)
        else:
            await raw.send(STARTUP)
            await raw.read_message()
            await raw.send(b"p" + _I.pack(1 << 20) + b"y" * 20_000)
        with contextlib.suppress(AssertionError, TimeoutError):
            await raw.read_until_eof(timeout=5)
    finally:
        await raw.close()


async def test_memory_bounded_after_bad_connections(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory("--max-message-size", "65536")
    pid = proxy.proc.pid
    async with bystander(proxy):
        await asyncio.gather(*(one_bad_client(proxy, i % 8) for i in range(40)))  # warm-up
        await asyncio.sleep(0.5)
        rss_before, fds_before = rss_kib(pid), open_fds(pid)
        for batch in range(10):
            await asyncio.gather(*(one_bad_client(proxy, (batch * 20 + i) % 8) for i in range(20)))
        await asyncio.sleep(0.5)
        rss_after, fds_after = rss_kib(pid), open_fds(pid)
        assert rss_after - rss_before < 50 * 1024, (rss_before, rss_after)
        assert fds_after - fds_before < 10, (fds_before, fds_after)
