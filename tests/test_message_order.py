"""Out-of-order and malformed message sequences: each gets Postgres's answer, and whatever a
client leaves behind when it goes never reaches the next client.

One server connection (pool_max_size 1), so the next client always gets the connection the
misbehaving one used (if pgsluice kept it). A server connection goes back to the pool only
after a ReadyForQuery 'I' that answers everything sent; otherwise it is closed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from proxy.ops.embedded import EmbeddedPostgres
from proxy.pgwire import codes, encode
from tests.rawpg import (
    PgConn,
    bind,
    describe_portal,
    describe_statement,
    execute,
    flush,
    parse,
    rows,
    sqlstates,
    sync,
)
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, wait_until

USER, DB = "alice", "app"
SQL = "select v from mo_t where k = $1::int"


@pytest.fixture(scope="module")
def table(pg: EmbeddedPostgres) -> Iterator[None]:
    pg.psql("DROP TABLE IF EXISTS mo_t; CREATE TABLE mo_t (k int PRIMARY KEY, v text);"
            " INSERT INTO mo_t VALUES (1, 'one'); GRANT ALL ON mo_t TO alice", db=DB)
    yield
    pg.psql("DROP TABLE mo_t", db=DB)


@pytest.fixture
def one_backend(proxy_factory: ProxyFactory, table: None) -> ProxyHandle:
    return proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "5")


def connect(proxy: ProxyHandle) -> PgConn:
    return PgConn.connect(proxy.host, proxy.port, USER, PASSWORDS[USER], DB, timeout=5)


def admin(proxy: ProxyHandle, command: str) -> list[list[str | None]]:
    conn = PgConn.connect(proxy.host, proxy.port, "postgres", PASSWORDS["postgres"], "pgsluice")
    try:
        msgs = conn.simple(command)
    finally:
        conn.close()
    return [[None if v is None else v.decode() for v in row] for row in rows(msgs)]


def pool_agrees(proxy: ProxyHandle) -> bool:
    """SHOW POOLS counts as active exactly the server connections SHOW SERVERS shows held."""
    pools = admin(proxy, "SHOW POOLS")
    servers = admin(proxy, "SHOW SERVERS")
    active = sum(int(p[3] or 0) for p in pools)
    return active == sum(1 for s in servers if s[3] == "active")


def cache_hits(proxy: ProxyHandle) -> int:
    return sum(int(r[1] or 0) for r in admin(proxy, "SHOW STATS") if r[0] == "cache_hits")


def next_client_is_answered(proxy: ProxyHandle) -> None:
    """A fresh client gets answers at once, in a fresh transaction of its own."""
    started = time.monotonic()
    with connect(proxy) as conn:
        msgs = conn.simple("select 12345", timeout=3)
        assert sqlstates(msgs) == [], msgs
        # 25001 if the server connection still held another session's (implicit) transaction
        msgs = conn.simple("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", timeout=3)
        assert sqlstates(msgs) == [], msgs
        assert msgs[-1] == (codes.B_READY_FOR_QUERY, b"T")
        conn.simple("COMMIT", timeout=3)
    assert time.monotonic() - started < 3
    wait_until(lambda: pool_agrees(proxy), timeout=5, message="SHOW POOLS agrees with SHOW SERVERS")


MESSAGES = {
    "P": lambda: parse(b"", SQL),
    "B": lambda: bind(b"", b"", [b"1"]),
    "D": lambda: describe_portal(),
    "S": lambda: sync(),
    "E": lambda: execute(),
    "H": lambda: flush(),
}


@pytest.mark.parametrize("order", ["PBDSE", "SBDEP", "PSDEB", "PBSED", "PBDEH", "PDH", "BEH", "PBEHS"])
def test_out_of_order_then_close(one_backend: ProxyHandle, order: str) -> None:
    """The issue's orders (and asyncpg's Parse + Describe + Flush): whatever Postgres answers,
    the client goes, and the next client is answered in its own transaction."""
    conn = connect(one_backend)
    conn.send_messages([MESSAGES[c]() for c in order])
    time.sleep(0.2)  # let Postgres answer what it will
    conn.sock.close()  # no Terminate, as a crashed client
    next_client_is_answered(one_backend)


def test_prepare_with_flush_then_close(one_backend: ProxyHandle) -> None:
    """asyncpg prepares with Parse + Describe + Flush (no Sync): Postgres opened an implicit
    transaction and took a snapshot. A client that goes then must not hand it on."""
    conn = connect(one_backend)
    conn.send_messages([parse(b"s1", SQL), describe_statement(b"s1"), flush()])
    assert [m[0] for m in (conn.read_message(), conn.read_message(), conn.read_message())] == [
        codes.B_PARSE_COMPLETE, codes.B_PARAMETER_DESCRIPTION, codes.B_ROW_DESCRIPTION]
    conn.send_messages([bind(b"", b"s1", [b"1"]), execute(), flush()])
    assert conn.read_message()[0] == codes.B_BIND_COMPLETE
    conn.close()
    next_client_is_answered(one_backend)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_malformed_bind_gets_an_error(proxy_factory: ProxyFactory, table: None, cache: str) -> None:
    """A Bind whose parameter count is larger than the values it carries: Postgres's own
    08P01 and, at the Sync, ReadyForQuery (it used to raise struct.error and answer nothing)."""
    proxy = proxy_factory("--pool-max-size", "1", "--cache" if cache == "on" else "--no-cache")
    with connect(proxy) as conn:
        if cache == "on":  # the cache looks at a Bind only once it serves the database
            wait_until(lambda: conn.simple("select v from mo_t where k = 1") and cache_hits(proxy),
                       timeout=10, message="the cache serves a hit")
        good = bind(b"", b"", [b"1"])
        # claim two parameters, send one
        bad = good[:5] + good[5:7] + b"\x00\x00" + b"\x00\x02" + good[11:]
        conn.send_messages([parse(b"", SQL), bad, describe_portal(), execute(), sync()])
        msgs = conn.read_until_ready(timeout=3)
        assert sqlstates(msgs) == ["08P01"], msgs
        assert conn.simple("select 1")[-1][0] == codes.B_READY_FOR_QUERY
    assert "Traceback" not in proxy.log_text()
    next_client_is_answered(proxy)


def test_error_voids_a_write_mark(one_backend: ProxyHandle) -> None:
    """A Bind of a statement pgsluice does not know (it may write anything) fails, so Postgres
    skips to a Sync and ignores the Query after it: the replies before the error, and the
    error, must still reach the client (they were held for a ReadyForQuery that never came)."""
    with connect(one_backend) as conn:
        conn.send_messages([encode.query("select 1"), bind(b"", b"s2", [b"1"]), encode.query("select 2")])
        got = [conn.read_message(timeout=2)[0] for _ in range(5)]
        assert bytes(got) == b"TDCZE", got
        conn.send_messages([sync()])
        assert conn.read_message(timeout=2) == (codes.B_READY_FOR_QUERY, b"I")
    next_client_is_answered(one_backend)


@pytest.mark.parametrize("data", [b"1\tdup\n", b"77\tnew\n"], ids=["copy-fails", "copy-works"])
def test_sync_inside_copy_in(pg: EmbeddedPostgres, one_backend: ProxyHandle, data: bytes) -> None:
    """Postgres ignores a Sync sent during COPY FROM STDIN (no ReadyForQuery for it): so does
    pgsluice, and the replies after the COPY still arrive (they waited for that Sync's)."""
    from tests.rawpg import copy_data, copy_done
    msgs = [encode.query("copy mo_t (k, v) from stdin"), sync(), copy_data(data), copy_done(),
            encode.query("select 2"), bind(b"", b"nope", []), sync()]
    seen = []
    for port in (pg.port, one_backend.port):
        with PgConn.connect("127.0.0.1", port, USER, PASSWORDS[USER], DB, timeout=5) as conn:
            conn.send_messages(msgs)
            seen.append("".join(chr(m[0]) for m in conn.read_until_ready(timeout=3, count=3)))
            conn.simple("delete from mo_t where k = 77")
    assert seen[1] == seen[0], f"Postgres {seen[0]!r}, pgsluice {seen[1]!r}"
