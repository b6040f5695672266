"""Burst batching (issue 16) through the wire door: point reads of one shape with different keys
that arrive while the first is in flight run as one `= ANY($n)` statement, and each client gets
byte for byte what its own statement gets from Postgres directly.

Deterministic bursts: a direct transaction holds an ACCESS EXCLUSIVE lock on the table, so the
first read (the shape's leader) waits in Postgres; the others are sent and seen queued in
pgsluice (SHOW CLIENTS: waiting); then the lock goes and the queue runs as one batch.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence

import asyncpg
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.embedded import EmbeddedPostgres, free_port
from proxy.pgwire import encode
from tests import cachedb
from tests import rawpg as rp
from tests.cachedb import calls, connect
from tests.rawpg import Msg, PgConn
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, wait_until, wait_until_async

DB = "batch1"
UUIDS = [uuid.UUID(int=(i * 7919) << 64 | i) for i in range(1, 101)]
SCHEMA = f"""
CREATE TABLE kint (id int PRIMARY KEY, v text, n numeric, at timestamptz, b bytea);
INSERT INTO kint SELECT g, 'v' || g, g / 7.0, '2024-01-01'::timestamptz + g * interval '1 hour',
       decode(lpad(to_hex(g), 8, '0'), 'hex') FROM generate_series(1, 2000) g;
CREATE TABLE kbig (id bigint PRIMARY KEY, v text);
INSERT INTO kbig SELECT g * 10000000000, 'b' || g FROM generate_series(1, 100) g;
CREATE TABLE kuuid (id uuid PRIMARY KEY, v text);
INSERT INTO kuuid SELECT u::uuid, 'u' || ord FROM unnest(ARRAY[{", ".join(f"'{u}'" for u in UUIDS)}])
       WITH ORDINALITY AS x(u, ord);
CREATE TABLE ktext (k text PRIMARY KEY, v int);
INSERT INTO ktext SELECT 'key "' || g || '"' || E'\\\\' || 'é', g FROM generate_series(1, 100) g;
CREATE TABLE kuniq (code int NOT NULL UNIQUE, v text);
INSERT INTO kuniq SELECT g, 'c' || g FROM generate_series(1, 100) g;
"""


@pytest.fixture(scope="module")
def proxy(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    cachedb.create(pg, DB)
    with psycopg2.connect(pg.dsn(database=DB)) as conn, conn.cursor() as cur:
        cur.execute(SCHEMA)
    port = free_port()
    handle = proxy_factory_module("--max-client-conn", "3000", "--pool-max-size", "10",
                                  "--metrics-listen", f"127.0.0.1:{port}")
    handle.metrics_port = port  # type: ignore[attr-defined]
    cachedb.start_feed(handle, DB)
    yield handle


def _admin(proxy: ProxyHandle, command: str) -> list[tuple[str, ...]]:
    conn = psycopg2.connect(proxy.dsn(user="postgres", password=PASSWORDS["postgres"], database="pgsluice"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(command)
            return [tuple(str(v) for v in row) for row in cur.fetchall()]
    finally:
        conn.close()


def _stat(proxy: ProxyHandle, name: str) -> float:
    return float(dict(_admin(proxy, "SHOW STATS"))[name])  # type: ignore[arg-type]


def _busy(proxy: ProxyHandle) -> int:
    """Clients queued for a batch (or any wait), or running (the leader, reads run alone)."""
    return sum(1 for row in _admin(proxy, "SHOW CLIENTS") if row[5] in ("waiting", "active"))


Request = Callable[[PgConn], None]  # sends one request on a connection (no reading)


def _simple(sql: str) -> Request:
    return lambda conn: conn.send(encode.query(sql))


def _extended(sql: str, params: Sequence[rp.Param], **kw: object) -> Request:
    types = kw.pop("param_types", ())
    describe = kw.pop("describe", "P")
    def send(conn: PgConn) -> None:
        msgs = [rp.parse(b"", sql, types)]  # type: ignore[arg-type]
        msgs.append(rp.bind(b"", b"", params, **kw))  # type: ignore[arg-type]
        if describe:
            msgs.append(rp.describe_portal())
        conn.send_messages([*msgs, rp.execute(), rp.sync()])
    return send


def _direct(pg: EmbeddedPostgres, requests: Sequence[Request], **startup: str) -> list[list[Msg]]:
    with PgConn.connect(pg.host, pg.port, "postgres", "postgres", DB, **startup) as conn:
        out = []
        for send in requests:
            send(conn)
            out.append(conn.read_until_ready())
        return out


def _burst(pg: EmbeddedPostgres, proxy: ProxyHandle, table: str,
           requests: Sequence[Request], early: int = 0, **startup: str) -> list[list[Msg]]:
    """The first request leads (held by a lock on `table`), the rest queue behind it (but
    `early` of them, answered without waiting for the lock)."""
    conns = [PgConn.connect(proxy.host, proxy.port, "postgres", "postgres", DB, **startup) for _ in requests]
    lock = psycopg2.connect(pg.dsn(database=DB))
    try:
        with lock.cursor() as cur:
            cur.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            requests[0](conns[0])
            wait_until(lambda: _lock_waiters(pg) >= 1, 10, message="the leader waits for the lock")
            for send, conn in zip(requests[1:], conns[1:], strict=True):
                send(conn)
            wait_until(lambda: _busy(proxy) >= len(requests) - early, 30, message=f"{len(requests)} reads in")
        lock.commit()
        return [conn.read_until_ready(timeout=60) for conn in conns]
    finally:
        lock.close()
        for conn in conns:
            conn.close()


def _lock_waiters(pg: EmbeddedPostgres) -> int:
    with psycopg2.connect(pg.dsn(database=DB)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = %s",
                    (DB,))
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0])


def _check(pg: EmbeddedPostgres, proxy: ProxyHandle, table: str, requests: Sequence[Request],
           batched: int | None = None, early: int = 0, found: Sequence[int] | None = None,
           **startup: str) -> list[list[Msg]]:
    """Each reply through a burst equals the same request's reply direct; `found`: how many rows
    each has (so a case is not all misses by mistake)."""
    want = _direct(pg, requests, **startup)
    if found is not None:
        assert [len(rp.rows(w)) for w in want] == list(found)
    before = _stat(proxy, "batched_reads")
    got = _burst(pg, proxy, table, requests, early, **startup)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert g == w, f"client {i}: {rp.first_difference(w, g)}"
    expected = len(requests) - 1 if batched is None else batched
    assert _stat(proxy, "batched_reads") - before == expected
    return got


# ---- the planner's verdict -----------------------------------------------------------------

@pytest.mark.parametrize(("sql", "verdict"), [
    ("SELECT * FROM kint WHERE id = 5", "yes (key public.kint.id)"),
    ("SELECT v FROM kuniq k WHERE k.code = $1 AND v <> 'x'", "yes (key public.kuniq.code)"),
    ("SELECT * FROM kint WHERE id = 5 LIMIT 1", "no (has LIMIT)"),
    ("SELECT count(*) FROM kint WHERE id = 5", "no (has an aggregate)"),
    ("SELECT DISTINCT ON (v) v FROM kint WHERE id = 5", "no (has DISTINCT ON)"),
    ("SELECT * FROM kint WHERE id = 5::bigint", "no (no top-level equality of id to one value"),
    ("SELECT * FROM kint WHERE id = 5 OR id = 6", "no (no top-level equality of id to one value"),
    ("SELECT * FROM kint WHERE id = 5 AND id = 6", "no (no top-level equality of id to one value"),
    ("SELECT * FROM kint WHERE v = 'x'", "no (no top-level equality of id to one value"),
    ("SELECT * FROM kint WHERE 5 = id", "no (no top-level equality of id to one value"),
    ("SELECT * FROM kint a JOIN kbig b ON b.id = a.id WHERE a.id = 5", "no (reads more than one table)"),
    ("SELECT random(), * FROM kint WHERE id = 5", "no (not cacheable"),
])
def test_show_plan_says_whether_a_read_is_batchable(proxy: ProxyHandle, sql: str, verdict: str) -> None:
    with connect(proxy, DB) as conn, conn.cursor() as cur:
        cur.execute("SHOW PLAN %s", (sql,))
        text = "\n".join(str(row[0]) for row in cur.fetchall())
    conn.close()
    line = next(x for x in text.splitlines() if x.startswith("batchable:"))
    assert line.split(None, 1)[1].startswith(verdict), text


# ---- byte for byte -------------------------------------------------------------------------

def test_simple_protocol_int_keys_with_missing_ones(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    keys = [10, 11, 12, 999_999, 13, 14, 0, 15, 2_000, 2_001]
    _check(pg, proxy, "kint", [_simple(f"SELECT v, n, at, b FROM kint WHERE id = {k}") for k in keys],
           found=[1, 1, 1, 0, 1, 1, 0, 1, 1, 0])
    assert calls(pg, DB, "FROM kint WHERE id = ANY(") >= 1


def test_simple_protocol_other_key_types(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    _check(pg, proxy, "kbig", [_simple(f"SELECT * FROM kbig WHERE id = {k * 10_000_000_000}")
                               for k in (1, 2, 3, 555, 4)], found=[1, 1, 1, 0, 1])
    _check(pg, proxy, "kuuid", [_simple(f"SELECT v, id FROM kuuid WHERE id = '{u}'")
                                for u in (*UUIDS[:6], uuid.UUID(int=1), str(UUIDS[7]).upper())],
           found=[1] * 6 + [0, 1])
    texts = ["key \"1\"\\\\é", "key \"2\"\\\\é", "absent", "key \"3\"\\\\é", "it''s"]
    got = _check(pg, proxy, "ktext", [_simple(f"SELECT v FROM ktext WHERE k = E'{t}'") for t in texts])
    assert [rp.rows(g) for g in got] == [[[b"1"]], [[b"2"]], [], [[b"3"]], []]
    _check(pg, proxy, "kuniq", [_simple(f"SELECT * FROM kuniq WHERE code = {k} AND v LIKE 'c%'")
                                for k in (1, 2, 3, 400)], found=[1, 1, 1, 0])


def test_extended_protocol_text_and_binary(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    sql = "SELECT id, v, n, at, b FROM kint WHERE id = $1"
    # text parameters, text results
    _check(pg, proxy, "kint", [_extended(sql, [str(k)]) for k in (20, 21, 22, 5000, 23)],
           found=[1, 1, 1, 0, 1])
    # binary parameters (declared int4 and int8) and binary results, with and without Describe
    _check(pg, proxy, "kint", [_extended(sql, [k.to_bytes(4, "big", signed=True)], param_types=[23],
                                         param_formats=[1], result_formats=[1]) for k in (30, 31, 32, -1)],
           found=[1, 1, 1, 0])
    _check(pg, proxy, "kint", [_extended(sql, [k.to_bytes(8, "big", signed=True)], param_types=[20],
                                         param_formats=[1], result_formats=[1], describe="")
                               for k in (40, 41, 9000, 42)], found=[1, 1, 0, 1])
    # one format per column
    _check(pg, proxy, "kint", [_extended(sql, [str(k)], result_formats=[0, 1, 0, 1, 1])
                               for k in (50, 51, 52)], found=[1, 1, 1])
    # a literal key through the extended protocol, with another bound parameter
    _check(pg, proxy, "kint", [_extended(f"SELECT v FROM kint WHERE v <> $1 AND id = {k}", ["x"])
                               for k in (60, 61, 62)], found=[1, 1, 1])
    # uuid and text keys, binary
    _check(pg, proxy, "kuuid", [_extended("SELECT * FROM kuuid WHERE id = $1", [u.bytes], param_formats=[1],
                                          result_formats=[1]) for u in (*UUIDS[10:14], uuid.UUID(int=5))],
           found=[1, 1, 1, 1, 0])
    got = _check(pg, proxy, "ktext", [_extended("SELECT k, v FROM ktext WHERE k = $1", [t.encode()],
                                                param_formats=[1], result_formats=[1])
                                      for t in ('key "10"\\é', "nope", 'key "11"\\é')])
    assert [len(rp.rows(g)) for g in got] == [1, 0, 1]


def test_duplicate_keys_are_answered_from_the_same_rows(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    sql = "SELECT v FROM kint WHERE id = $1"
    got = _check(pg, proxy, "kint", [_extended(sql, [k]) for k in ("70", "71", " 71", "+71", "071", "72")])
    assert rp.rows(got[2]) == rp.rows(got[3]) == [[b"v71"]]


def test_what_cannot_be_read_exactly_runs_alone(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    """Keys Postgres would refuse or read differently are not batched: each gets its own answer
    (an error included), the others are batched."""
    sql = "SELECT v FROM kint WHERE id = $1"
    requests = [_extended(sql, ["80"]), _extended(sql, ["81"]), _extended(sql, ["1e3"]),
                _extended(sql, ["99999999999"]), _extended(sql, ["82"]), _extended(sql, [None]),
                _extended(sql, ["83"], param_types=[1700])]
    got = _check(pg, proxy, "kint", requests, batched=2)
    assert rp.sqlstates(got[2]) == ["22P02"] and rp.sqlstates(got[3]) == ["22003"]


def test_a_failing_batch_gives_only_that_client_the_error(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    sql = "SELECT id, 100 / (id - 93) FROM kint WHERE id = {}"
    fallbacks = _stat(proxy, "batch_fallbacks")
    got = _check(pg, proxy, "kint", [_simple(sql.format(k)) for k in (90, 91, 92, 93, 94)], batched=0)
    assert [rp.sqlstates(g) for g in got] == [[], [], [], ["22012"], []]
    assert _stat(proxy, "batch_fallbacks") - fallbacks == 1


def test_a_thousand_clients_few_statements(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    keys = list(range(1000, 2000))
    sql = "SELECT id, v, at FROM kint WHERE id = $1 AND n > $2"
    before_any = calls(pg, DB, "FROM kint WHERE id = ANY($1) AND n >")
    before_one = calls(pg, DB, "FROM kint WHERE id = $1 AND n >")
    batches = _stat(proxy, "batches")
    _check(pg, proxy, "kint", [_extended(sql, [str(k), "-1"]) for k in keys])
    assert calls(pg, DB, "FROM kint WHERE id = ANY($1) AND n >") - before_any == 2  # 500 + 499
    assert calls(pg, DB, "FROM kint WHERE id = $1 AND n >") - before_one == 1 + 1000  # + the direct ones
    assert _stat(proxy, "batches") - batches == 2
    agents = _admin(proxy, "SHOW AGENTS")
    assert sum(int(row[-1]) for row in agents) >= 999
    assert float(dict(_admin(proxy, "SHOW STATS"))["batch_mean_size"]) > 1
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=5) as resp:  # type: ignore[attr-defined]
        metrics = {s.name: s.value for f in text_string_to_metric_families(resp.read().decode())
                   for s in f.samples if not s.labels}
    assert metrics["pgsluice_batches_total"] >= 2


def test_a_key_the_text_cannot_be_rewritten_for_is_still_batched(pg: EmbeddedPostgres,
                                                                  proxy: ProxyHandle) -> None:
    """`id = -3` is `=`, `-`, `3` to the scanner: its text is not the batch's statement, the next
    one's is; its key is in the array all the same."""
    keys = [100, -3, 101, 102]
    _check(pg, proxy, "kint", [_simple(f"SELECT v FROM kint WHERE id = {k}") for k in keys])


def test_batching_can_be_turned_off(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    off = proxy_factory("--no-batching")
    connect(off, DB).close()
    cachedb.wait_feed(off, DB)
    keys = [110, 111, 112]
    want = _direct(pg, [_simple(f"SELECT v FROM kint WHERE id = {k}") for k in keys])
    got = _burst(pg, off, "kint", [_simple(f"SELECT v FROM kint WHERE id = {k}") for k in keys])
    assert got == want
    assert _stat(off, "batched_reads") == 0 and _stat(off, "batches") == 0


def test_a_cancelled_queued_read_gets_57014_and_the_batch_goes_on(pg: EmbeddedPostgres,
                                                                 proxy: ProxyHandle) -> None:
    keys = [120, 121, 122, 123]
    requests = [_simple(f"SELECT v FROM kint WHERE id = {k}") for k in keys]
    want = _direct(pg, requests)
    conns = [PgConn.connect(proxy.host, proxy.port, "postgres", "postgres", DB) for _ in requests]
    lock = psycopg2.connect(pg.dsn(database=DB))
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE kint IN ACCESS EXCLUSIVE MODE")
            requests[0](conns[0])
            wait_until(lambda: _lock_waiters(pg) >= 1, 10, message="the leader waits for the lock")
            for send, conn in zip(requests[1:], conns[1:], strict=True):
                send(conn)
            wait_until(lambda: _busy(proxy) >= len(requests), 30, message="reads in")
            assert conns[2].backend_key is not None
            with socket.create_connection((proxy.host, proxy.port)) as cancel:
                cancel.sendall(encode.cancel_request(*conns[2].backend_key))
            cancelled = conns[2].read_until_ready(timeout=10)  # before the lock goes
            assert rp.sqlstates(cancelled) == ["57014"]
        lock.commit()
        got = {i: conns[i].read_until_ready(timeout=30) for i in (0, 1, 3)}
        assert got == {i: want[i] for i in (0, 1, 3)}
        assert conns[2].simple("SELECT v FROM kint WHERE id = 122") == want[2]  # still usable
    finally:
        lock.close()
        for conn in conns:
            conn.close()


async def test_asyncpg_prepared_statements_are_batched(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    """asyncpg binds named statements it prepared earlier (binary parameters and results)."""
    sql = "SELECT id, v, n, at, b FROM kint WHERE id = $1"
    keys = [130, 131, 132, 133, 4000, 134]
    direct = await asyncpg.connect(pg.dsn(database=DB))
    want = [await direct.fetchrow(sql, k) for k in keys]
    await direct.close()
    conns = [await asyncpg.connect(proxy.dsn(database=DB)) for _ in keys]
    for c in conns:  # prepared (and in asyncpg's statement cache) before the lock: Parse locks too
        await c.fetchrow(sql, 1)
    before = _stat(proxy, "batched_reads")
    lock = await asyncpg.connect(pg.dsn(database=DB))
    try:
        async with lock.transaction():
            await lock.execute("LOCK TABLE kint IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(conns[0].fetchrow(sql, keys[0]))
            await wait_until_async(lambda: asyncio.to_thread(_lock_waiters, pg), 10, message="leader waits")
            rest = [asyncio.create_task(c.fetchrow(sql, k)) for c, k in zip(conns[1:], keys[1:], strict=True)]
            await wait_until_async(lambda: _busy_at_least(proxy, len(keys)), 10, message="reads in")
        got = [await first, *[await t for t in rest]]
    finally:
        await lock.close()
        for c in conns:
            await c.close()
    assert got == want
    assert _stat(proxy, "batched_reads") - before == len(keys) - 1


async def _busy_at_least(proxy: ProxyHandle, n: int) -> bool:
    return await asyncio.to_thread(_busy, proxy) >= n


def test_a_text_that_is_not_utf8_is_not_batched(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    """Its own statement fails (invalid byte sequence); batched, its key would have been read as
    U+FFFD and answered."""
    bad = b"SELECT v FROM ktext WHERE k = 'k\xff1'"
    requests: list[Request] = [_simple("SELECT v FROM ktext WHERE k = 'a'"),
                               lambda conn: conn.send(encode.query(bad)),
                               _simple("SELECT v FROM ktext WHERE k = 'b'")]
    got = _check(pg, proxy, "ktext", requests, batched=1, early=1)
    assert rp.sqlstates(got[1]) == ["22021"]


def test_literals_of_sessions_without_standard_strings_are_not_batched(pg: EmbeddedPostgres,
                                                                       proxy: ProxyHandle) -> None:
    """standard_conforming_strings = off: a backslash in '...' escapes (two stand for one)."""
    two = "\\" * 2
    keys = ["a", f'key "12"{two}é', "b"]
    requests = [_simple(f"SELECT v FROM ktext WHERE k = '{k}'") for k in keys]
    got = _check(pg, proxy, "ktext", requests, batched=0, standard_conforming_strings="off")
    assert rp.rows(got[1]) == [[b"12"]]
