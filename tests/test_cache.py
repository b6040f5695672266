"""The cache through the wire door, one pgsluice, no Redis: hits, keys, freshness, single-flight.

Real Postgres (with pg_stat_statements to count what reached it) and real drivers.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Iterator

import psycopg2
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from proxy.pgwire import encode
from tests import cachedb
from tests.cachedb import calls, connect, show_cache
from tests.rawpg import PgConn, Raw, sqlstates
from tests.util import ProxyFactory, ProxyHandle

DB = "cache1"


@pytest.fixture(scope="module")
def proxy1(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    cachedb.create(pg, DB)
    handle = proxy_factory_module("--max-client-conn", "3000", "--pool-max-size", "10")
    cachedb.start_feed(handle, DB)
    yield handle


def _counter(proxy: ProxyHandle, name: str) -> int:
    return int(show_cache(proxy, DB).get(name, "0"))


def test_repeat_is_served_from_cache_byte_for_byte(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    sql = "SELECT id, v FROM items WHERE id IN (3, 4, 5) ORDER BY id"
    with PgConn.connect(pg.host, pg.port, "postgres", "postgres", DB) as direct:
        want = direct.simple(sql)
    before_calls = calls(pg, DB, "FROM items WHERE id IN")
    hits = _counter(proxy1, "hits")
    with PgConn.connect(proxy1.host, proxy1.port, "postgres", "postgres", DB) as conn:
        replies = [conn.simple(sql) for _ in range(5)]
    assert all(reply == want for reply in replies)
    assert calls(pg, DB, "FROM items WHERE id IN") - before_calls == 1
    assert _counter(proxy1, "hits") - hits == 4
    # the same query spelled differently shares the entry (canonical fingerprint)
    with PgConn.connect(proxy1.host, proxy1.port, "postgres", "postgres", DB) as conn:
        assert conn.simple("select id,v from items where id in (3,4,5) order by id") == want
    assert calls(pg, DB, "FROM items WHERE id IN") - before_calls == 1


def test_read_your_writes_10000_randomized_operations(proxy1: ProxyHandle) -> None:
    rng = random.Random(4)
    model = {i: f"v{i}" for i in range(1, 201)}
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    cur.execute("UPDATE items SET v = 'v' || id")
    hits_before = _counter(proxy1, "hits")
    keys = list(range(1, 21))  # a few hot keys, so reads hit the cache between writes
    for op in range(10_000):
        k = rng.choice(keys)
        r = rng.random()
        if r < 0.70:
            cur.execute(f"SELECT v FROM items WHERE id = {k}")
            assert cur.fetchone() == (model[k],), f"operation {op}: stale read of {k}"
        elif r < 0.82:
            cur.execute("SELECT count(*), max(v) FROM items WHERE id <= 20")
            assert cur.fetchone() == (20, max(model[i] for i in keys)), f"operation {op}"
        elif r < 0.95:
            model[k] = f"w{op}"
            cur.execute(f"UPDATE items SET v = 'w{op}' WHERE id = {k}")
        elif r < 0.99:
            a, b = rng.sample(keys, 2)
            model[a], model[b] = f"t{op}a", f"t{op}b"
            cur.execute("BEGIN")
            cur.execute(f"UPDATE items SET v = 't{op}a' WHERE id = {a}")
            cur.execute(f"SELECT v FROM items WHERE id = {a}")  # inside: never from cache
            assert cur.fetchone() == (model[a],)
            cur.execute(f"UPDATE items SET v = 't{op}b' WHERE id = {b}")
            cur.execute("COMMIT")
        else:
            cur.execute("BEGIN")
            cur.execute(f"UPDATE items SET v = 'rolled back' WHERE id = {k}")
            cur.execute("ROLLBACK")
    hits = _counter(proxy1, "hits") - hits_before
    assert hits > 1000, "the cache served almost nothing: the test proves little"
    conn.close()


def test_write_through_one_connection_read_through_another(proxy1: ProxyHandle) -> None:
    writer, reader = connect(proxy1, DB), connect(proxy1, DB)
    wc, rc = writer.cursor(), reader.cursor()
    for i in range(300):
        rc.execute("SELECT n FROM counters WHERE id = 1")
        before = rc.fetchone()
        wc.execute("UPDATE counters SET n = n + 1 WHERE id = 1 RETURNING n")
        written = wc.fetchone()
        rc.execute("SELECT n FROM counters WHERE id = 1")
        assert rc.fetchone() == written, f"round {i}: read {before} before, stale after the write"
    writer.close()
    reader.close()


def test_role_isolation_with_row_level_security(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    alice, bob = connect(proxy1, DB, "alice"), connect(proxy1, DB, "bob")
    ac, bc = alice.cursor(), bob.cursor()
    ac.execute("INSERT INTO notes (body) VALUES ('alice secret')")
    sql = "SELECT owner, body FROM notes ORDER BY id"
    for _ in range(3):
        ac.execute(sql)
        assert ac.fetchall() == [("alice", "alice secret")]
        bc.execute(sql)
        assert bc.fetchall() == [], "bob received alice's rows"
    bc.execute("INSERT INTO notes (body) VALUES ('bob own')")
    bc.execute(sql)
    assert bc.fetchall() == [("bob", "bob own")]
    ac.execute(sql)
    assert ac.fetchall() == [("alice", "alice secret")]
    alice.close()
    bob.close()


@pytest.mark.parametrize("how", ["startup", "set"])
def test_guc_isolation_timezone(pg: EmbeddedPostgres, proxy1: ProxyHandle, how: str) -> None:
    sql = "SELECT at, at::text FROM moments WHERE id = 1"
    got = {}
    for tz in ("UTC", "Asia/Tokyo", "UTC", "America/New_York", "Asia/Tokyo"):
        kw = {"TimeZone": tz} if how == "startup" else {}
        with PgConn.connect(pg.host, pg.port, "postgres", "postgres", DB, **kw) as direct:
            if how == "set":
                direct.simple(f"SET TimeZone = '{tz}'")
            want = direct.simple(sql)
        with PgConn.connect(proxy1.host, proxy1.port, "postgres", "postgres", DB, **kw) as conn:
            if how == "set":
                conn.simple(f"SET TimeZone = '{tz}'")
            for _ in range(2):
                assert conn.simple(sql) == want, f"TimeZone {tz}: bytes differ"
        got[tz] = want
    assert got["UTC"] != got["Asia/Tokyo"]


def test_volatile_and_time_dependent_queries_are_not_cached(pg: EmbeddedPostgres,
                                                            proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    values = set()
    for _ in range(5):
        cur.execute("SELECT random()")
        row = cur.fetchone()
        assert row is not None
        values.add(row[0])
    assert len(values) == 5
    cur.execute("SELECT now()")
    first = cur.fetchone()
    time.sleep(0.02)
    cur.execute("SELECT now()")
    assert cur.fetchone() != first
    before = calls(pg, DB, "clock_timestamp")
    for _ in range(3):
        cur.execute("SELECT clock_timestamp() > '2000-01-01'")
    assert calls(pg, DB, "clock_timestamp") - before == 3
    conn.close()


def test_reads_inside_transactions_always_reach_postgres(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    sql = "SELECT v FROM items WHERE id = 77"
    cur.execute(sql)
    cur.execute(sql)  # cached now
    before = calls(pg, DB, "FROM items WHERE id = $1")
    cur.execute("BEGIN")
    for _ in range(4):
        cur.execute(sql)
    cur.execute("COMMIT")
    assert calls(pg, DB, "FROM items WHERE id = $1") - before == 4
    conn.close()


def test_max_staleness_hint_and_setting(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    sql = "SELECT v FROM items WHERE id = 150"
    cur.execute(sql)
    before = calls(pg, DB, "FROM items WHERE id = $1")
    cur.execute("/* pgsluice: max_staleness=0 */ " + sql)
    cur.execute("/* pgsluice: max_staleness=0 */ " + sql)
    assert calls(pg, DB, "FROM items WHERE id = $1") - before == 2
    cur.execute("SET pgsluice.max_staleness = '0'")
    cur.execute(sql)
    assert calls(pg, DB, "FROM items WHERE id = $1") - before == 3
    cur.execute("SET pgsluice.max_staleness = '1s'")
    time.sleep(1.1)
    cur.execute(sql)  # the entry is older than 1 s: asked again, stored anew
    cur.execute(sql)
    assert calls(pg, DB, "FROM items WHERE id = $1") - before == 4
    time.sleep(1.1)
    cur.execute(sql)  # older than 1 s: asked again
    assert calls(pg, DB, "FROM items WHERE id = $1") - before == 5
    cur.execute("RESET pgsluice.max_staleness")
    cur.execute(sql)
    assert calls(pg, DB, "FROM items WHERE id = $1") - before == 5
    conn.close()


KEYS: dict[Raw, tuple[int, bytes]] = {}  # each raw client's cancel key


async def _raw_clients(proxy: ProxyHandle, n: int) -> list[Raw]:
    sem = asyncio.Semaphore(50)

    async def one() -> Raw:
        async with sem:
            raw = await Raw.open(proxy)
            msgs = await raw.startup(encode.startup_message({"user": "trusted_user", "database": DB}))
            body = next(body for code, body in msgs if code == ord("K"))
            KEYS[raw] = (int.from_bytes(body[:4], "big"), body[4:8])
            return raw

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _leader_runs(pg: EmbeddedPostgres) -> int:
    return int(pg.psql("SELECT last_value FROM leader_runs WHERE is_called UNION ALL SELECT 0 LIMIT 1",
                       db=DB).strip() or 0)


async def test_single_flight_1000_identical_reads_one_execution(pg: EmbeddedPostgres,
                                                                proxy1: ProxyHandle) -> None:
    clients = await _raw_clients(proxy1, 1000)
    try:
        runs = _leader_runs(pg)
        before = calls(pg, DB, "slow_answer")
        coalesced = _counter(proxy1, "coalesced")
        # a quarter of the waiters hang up while waiting: the others are not affected
        leavers = clients[1::4]
        for c in clients:
            await c.send(encode.query("SELECT slow_answer(21)"))
            await asyncio.sleep(0) if c is not clients[0] else await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        for c in leavers:
            c.writer.transport.abort()
        stayers = [c for c in clients if c not in leavers]
        replies = await asyncio.gather(*(c.read_until_ready(timeout=30) for c in stayers))
        for msgs in replies:
            assert sqlstates(msgs) == []
            assert any(t == ord("D") and body.endswith(b"42") for t, body in msgs)
        assert calls(pg, DB, "slow_answer") - before == 1
        assert _leader_runs(pg) - runs == 1
        assert _counter(proxy1, "coalesced") - coalesced == len(stayers) - 1
    finally:
        for c in clients:
            c.writer.transport.abort()


async def test_single_flight_leader_failure_reaches_every_waiter(pg: EmbeddedPostgres,
                                                                 proxy1: ProxyHandle) -> None:
    clients = await _raw_clients(proxy1, 50)
    try:
        runs = _leader_runs(pg)
        await clients[0].send(encode.query("SELECT slow_failure(7)"))
        await asyncio.sleep(0.1)
        for c in clients[1:]:
            await c.send(encode.query("SELECT slow_failure(7)"))
        replies = await asyncio.gather(*(c.read_until_ready(timeout=30) for c in clients))
        assert {tuple(sqlstates(m)) for m in replies} == {("22012",)}
        messages = {next(body for t, body in m if t == ord("E")) for m in replies}
        assert len(messages) == 1, "waiters got a different error than the leader"
        assert _leader_runs(pg) - runs == 1
        # errors are not cached: the next one runs again
        await clients[0].send(encode.query("SELECT slow_failure(7)"))
        assert sqlstates(await clients[0].read_until_ready(timeout=30)) == ["22012"]
        assert _leader_runs(pg) - runs == 2
    finally:
        for c in clients:
            c.writer.transport.abort()


def test_external_write_is_seen_through_the_change_feed(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    """Writes straight to Postgres: the window until pgsluice serves the new value."""
    direct = psycopg2.connect(pg.dsn(database=DB))
    direct.autocommit = True
    dc = direct.cursor()
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    windows = []
    stale_first = 0
    for i in range(200):
        cur.execute("SELECT n FROM counters WHERE id = 5")
        cur.execute("SELECT n FROM counters WHERE id = 5")  # cached
        dc.execute("UPDATE counters SET n = %s WHERE id = 5", (10_000 + i,))
        start = time.perf_counter()
        while True:
            cur.execute("SELECT n FROM counters WHERE id = 5")
            if cur.fetchone() == (10_000 + i,):
                break
            stale_first += 1
            assert time.perf_counter() - start < 5, "external write never seen"
        windows.append(time.perf_counter() - start)
    windows.sort()
    p50, p99 = statistics.median(windows), windows[int(len(windows) * 0.99) - 1]
    print(f"\nstaleness window for external writes over {len(windows)} trials: "
          f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {windows[-1] * 1000:.2f} ms; "
          f"stale reads seen: {stale_first}")
    assert p99 < 1.0
    conn.close()
    direct.close()


def test_change_feed_down_means_bypass_then_fresh(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    sql = "SELECT n FROM counters WHERE id = 9"
    cur.execute(sql)
    cur.execute(sql)
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgsluice control' AND query LIKE 'LISTEN%' OR query = 'SELECT 1' "
            "AND application_name = 'pgsluice control'", db=DB)
    # external write while the feed is (or is about to be seen as) down
    pg.psql("UPDATE counters SET n = 424242 WHERE id = 9", db=DB)
    deadline = time.monotonic() + 5
    while True:
        cur.execute(sql)
        if cur.fetchone() == (424242,):
            break
        assert time.monotonic() < deadline, "stale after the change feed was cut"
        time.sleep(0.01)
    cachedb.wait_feed(proxy1, DB)
    cur.execute(sql)
    assert cur.fetchone() == (424242,)
    conn.close()


def test_show_cache_counts(proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    cur.execute("SELECT v FROM items WHERE id = 199")
    cur.execute("SELECT v, random() FROM items WHERE id = 199")  # a bypass
    conn.close()
    rows = show_cache(proxy1, DB)
    for name in ("hits", "misses", "coalesced", "evictions", "bytes", "entries", "stores"):
        assert rows[name].isdigit()
    assert any(k.startswith("bypass: ") for k in rows)
    assert int(rows["bytes"]) > 0


def test_ddl_through_pgsluice_invalidates(proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    cur.execute("CREATE TABLE ddl_t (a int)")
    cur.execute("INSERT INTO ddl_t VALUES (1)")
    time.sleep(0.3)  # the catalog reload after DDL
    cur.execute("SELECT * FROM ddl_t")
    cur.execute("SELECT * FROM ddl_t")
    assert cur.fetchall() == [(1,)]
    cur.execute("ALTER TABLE ddl_t ADD COLUMN b int DEFAULT 7")
    cur.execute("SELECT * FROM ddl_t")
    assert cur.fetchall() == [(1, 7)]
    cur.execute("DROP TABLE ddl_t")
    with pytest.raises(psycopg2.errors.UndefinedTable):
        cur.execute("SELECT * FROM ddl_t")
    conn.close()


def test_copy_and_truncate_bump(proxy1: ProxyHandle) -> None:
    import io
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    cur.execute("CREATE TABLE copy_t (a int)")
    time.sleep(0.3)
    cur.execute("SELECT count(*) FROM copy_t")
    cur.execute("SELECT count(*) FROM copy_t")
    assert cur.fetchone() == (0,)
    cur.copy_expert("COPY copy_t FROM STDIN", io.StringIO("1\n2\n3\n"))
    cur.execute("SELECT count(*) FROM copy_t")
    assert cur.fetchone() == (3,)
    cur.execute("TRUNCATE copy_t")
    cur.execute("SELECT count(*) FROM copy_t")
    assert cur.fetchone() == (0,)
    conn.close()


# ---- the extended protocol ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    {"describe": "P"}, {"describe": ""}, {"describe": "P", "result_formats": [1]},
    {"describe": "P", "param_types": [23]}, {"describe": "P", "max_rows": 1},
])
def test_extended_groups_are_cached_byte_for_byte(pg: EmbeddedPostgres, proxy1: ProxyHandle,
                                                  shape: dict[str, object]) -> None:
    sql = "SELECT id, v, length(v) FROM items WHERE id = $1 OR id = $2 ORDER BY id"
    params = [b"11", b"12"]
    with PgConn.connect(pg.host, pg.port, "postgres", "postgres", DB) as direct:
        want = direct.extended(sql, params, **shape)  # type: ignore[arg-type]
    before = calls(pg, DB, "OR id = $2")
    with PgConn.connect(proxy1.host, proxy1.port, "postgres", "postgres", DB) as conn:
        for _ in range(4):
            assert conn.extended(sql, params, **shape) == want  # type: ignore[arg-type]
        # other parameter values are other entries
        other = conn.extended(sql, [b"13", b"14"], **shape)  # type: ignore[arg-type]
        assert other != want and sqlstates(other) == []
    assert calls(pg, DB, "OR id = $2") - before == 2


async def test_asyncpg_prepared_statements_are_cached(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    import asyncpg
    conn = await asyncpg.connect(proxy1.dsn(database=DB))
    direct = await asyncpg.connect(pg.dsn(database=DB))
    try:
        before = calls(pg, DB, "FROM items WHERE id = ANY")
        for _ in range(5):
            for key in ([1, 2], [3], [1, 2]):
                sql = "SELECT id, v FROM items WHERE id = ANY($1::int[]) ORDER BY id"
                got, want = await conn.fetch(sql, key), await direct.fetch(sql, key)
                assert got == want
        # direct ran 15, pgsluice 2 (one per distinct parameter value)
        assert calls(pg, DB, "FROM items WHERE id = ANY") - before == 15 + 2
        # a write through pgsluice is seen by the next cached read
        await conn.execute("UPDATE items SET v = 'changed' WHERE id = 3")
        assert (await conn.fetchrow("SELECT id, v FROM items WHERE id = ANY($1::int[]) ORDER BY id",
                                    [3]))["v"] == "changed"
        await conn.execute("UPDATE items SET v = 'v3' WHERE id = 3")
        # fetchval asks for one row (Execute max_rows=1): cached as such, and fresh after writes
        await conn.execute("UPDATE items SET v = 'v190' WHERE id = 190")
        for i in range(3):
            assert await conn.fetchval("SELECT v FROM items WHERE id = $1", 190) == f"v190{'x' * i}"
            assert await conn.fetchval("SELECT v FROM items WHERE id = $1", 190) == f"v190{'x' * i}"
            await conn.execute("UPDATE items SET v = v || 'x' WHERE id = 190")
    finally:
        await conn.close()
        await direct.close()


def test_psycopg3_parameters_and_writes(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    import psycopg
    with psycopg.connect(proxy1.dsn(database=DB), autocommit=True) as conn:
        before = calls(pg, DB, "FROM counters WHERE id = $1")
        for i in range(20):
            n = conn.execute("SELECT n FROM counters WHERE id = %s", (12,)).fetchone()
            if i % 5 == 4:
                conn.execute("UPDATE counters SET n = n + 1 WHERE id = %s", (12,))
                after = conn.execute("SELECT n FROM counters WHERE id = %s", (12,)).fetchone()
                assert after is not None and n is not None and after[0] == n[0] + 1
        # 20 + 4 reads, 4 writes in between: at most one execution per version
        assert calls(pg, DB, "FROM counters WHERE id = $1") - before <= 5


def test_search_path_set_in_session_keys_and_invalidates(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    pg.psql("CREATE SCHEMA IF NOT EXISTS other; CREATE TABLE IF NOT EXISTS other.items (id int, v text);"
            "TRUNCATE other.items; INSERT INTO other.items VALUES (1, 'other one');", db=DB)
    pg.psql("SELECT pgsluice.watch('other.items')", db=DB)
    time.sleep(0.3)  # DDL: catalog reload and feed coverage
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    cur.execute("SET search_path TO other, public")
    for _ in range(2):
        cur.execute("SELECT v FROM items WHERE id = 1")
        assert cur.fetchone() == ("other one",)
    pg.psql("UPDATE other.items SET v = 'changed outside' WHERE id = 1", db=DB)  # the change feed
    deadline = time.monotonic() + 2
    while True:
        cur.execute("SELECT v FROM items WHERE id = 1")
        if cur.fetchone() == ("changed outside",):
            break
        assert time.monotonic() < deadline, "a write to other.items never reached the key"
    cur.execute("RESET search_path")
    cur.execute("SELECT v FROM items WHERE id = 1")
    row = cur.fetchone()
    assert row is not None and row[0] != "changed outside"
    conn.close()


async def test_cancel_while_waiting_for_a_flight(proxy1: ProxyHandle) -> None:
    clients = await _raw_clients(proxy1, 3)
    try:
        await clients[0].send(encode.query("SELECT slow_answer(5)"))
        await asyncio.sleep(0.2)
        await clients[1].send(encode.query("SELECT slow_answer(5)"))
        await asyncio.sleep(0.2)
        # clients[1] is waiting for clients[0]'s execution: its cancel ends only its wait
        key = KEYS[clients[1]]
        cancel = await Raw.open(proxy1)
        await cancel.send(encode.cancel_request(*key))
        await cancel.close()
        assert sqlstates(await clients[1].read_until_ready(timeout=5)) == ["57014"]
        assert sqlstates(await clients[0].read_until_ready(timeout=5)) == []
    finally:
        for c in clients:
            c.writer.transport.abort()


def test_external_write_into_a_partition_invalidates_the_parent(pg: EmbeddedPostgres,
                                                                 proxy1: ProxyHandle) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS measures (k int, v int) PARTITION BY RANGE (k);"
            "CREATE TABLE IF NOT EXISTS measures_low PARTITION OF measures FOR VALUES FROM (0) TO (100);"
            "TRUNCATE measures; INSERT INTO measures VALUES (1, 10);", db=DB)
    time.sleep(0.5)  # DDL: catalog reload and feed coverage of the new tables
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    for _ in range(2):
        cur.execute("SELECT sum(v) FROM measures")
        assert cur.fetchone() == (10,)
    pg.psql("INSERT INTO measures_low VALUES (2, 5)", db=DB)  # straight into the partition
    deadline = time.monotonic() + 2
    while True:
        cur.execute("SELECT sum(v) FROM measures")
        if cur.fetchone() == (15,):
            break
        assert time.monotonic() < deadline, "the parent's cached read never saw the partition's write"
    conn.close()


def test_roles_catalog_is_not_cached(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    """CREATE ROLE fires no event trigger (roles are cluster-wide): never cache pg_roles."""
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    sql = "SELECT rolname FROM pg_roles WHERE rolname = 'late_role'"
    cur.execute(sql)
    cur.execute(sql)
    assert cur.fetchall() == []
    pg.psql("DROP ROLE IF EXISTS late_role; CREATE ROLE late_role")
    cur.execute(sql)
    assert cur.fetchall() == [("late_role",)]
    pg.psql("DROP ROLE late_role")
    conn.close()


async def test_show_cache_and_show_plan_over_the_extended_protocol(proxy1: ProxyHandle) -> None:
    import asyncpg
    conn = await asyncpg.connect(proxy1.dsn(database=DB))
    try:
        rows = dict(await conn.fetch("SHOW CACHE"))
        assert rows["hits"].isdigit() and rows[f"change_feed {DB}"].startswith("up")
        plan = [r["plan"] for r in await conn.fetch("SHOW PLAN 'SELECT v FROM items WHERE id = 1'")]
        assert "cacheable:   yes" in plan
    finally:
        await conn.close()


async def test_extended_group_errors_keep_their_place_for_coalesced_clients(pg: EmbeddedPostgres,
                                                                            proxy1: ProxyHandle) -> None:
    from tests import rawpg
    group = b"".join([rawpg.parse(b"", "SELECT slow_failure($1::int)"), rawpg.bind(params=[b"3"]),
                      rawpg.execute(), rawpg.sync()])
    direct = await Raw.open((pg.host, pg.port))
    await direct.startup(encode.startup_message({"user": "trusted_user", "database": DB}))
    await direct.send(group)
    want = [t for t, _ in await direct.read_until_ready(timeout=30)]  # the function folds at Bind
    await direct.close()
    clients = await _raw_clients(proxy1, 4)
    try:
        await clients[0].send(group)
        await asyncio.sleep(0.2)
        for c in clients[1:]:
            await c.send(group)
        replies = await asyncio.gather(*(c.read_until_ready(timeout=30) for c in clients))
        for msgs in replies:  # each exactly as from Postgres, the error in its place
            assert [t for t, _ in msgs] == want
            assert sqlstates(msgs) == ["22012"]
    finally:
        for c in clients:
            c.writer.transport.abort()
