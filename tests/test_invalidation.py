"""Precise invalidation (issue 12): a write evicts only the cached reads it can change — by
operation, column and key — whether it goes through pgsluice or reaches Postgres directly (the
change feed). Real Postgres, real drivers; hits and upstream executions are counted.

The randomized proof that nothing stale is ever served is tests/test_differential.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator

import asyncpg
import psycopg2
import pytest

from proxy.ops.embedded import EmbeddedPostgres, free_port
from tests import cachedb
from tests.cachedb import connect, show_cache
from tests.redisproc import RedisServer
from tests.util import ProxyFactory, ProxyHandle, wait_until

DB = "inval"
SHOP = """
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL UNIQUE,
                        country text NOT NULL, last_seen timestamptz);
CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, category text NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers,
                     status text NOT NULL);
CREATE TABLE order_items (order_id bigint NOT NULL REFERENCES orders, product_id bigint NOT NULL
                          REFERENCES products, qty int NOT NULL, PRIMARY KEY (order_id, product_id));
INSERT INTO customers SELECT i, 'c' || i, 'c' || i || '@x', (ARRAY['DE', 'FR', 'JP'])[1 + i % 3], now()
FROM generate_series(1, 100) i;
INSERT INTO products SELECT i, 'p' || i, (ARRAY['books', 'games'])[1 + i % 2] FROM generate_series(1, 20) i;
INSERT INTO orders SELECT i, 1 + i % 100, 'new' FROM generate_series(1, 300) i;
INSERT INTO order_items SELECT i, 1 + i % 20, 1 + i % 3 FROM generate_series(1, 300) i;
CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL);
INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 50) g;
"""
JOIN = ("SELECT p.category, sum(oi.qty) FROM order_items oi JOIN products p ON p.id = oi.product_id "
        "GROUP BY 1 ORDER BY 1")


def create(pg: EmbeddedPostgres, database: str) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE); CREATE DATABASE {database};")
    with psycopg2.connect(pg.dsn(database=database)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(SHOP)
            from cache.feed import INSTALL
            cur.execute(INSTALL)
    conn.close()


@pytest.fixture(scope="module")
def proxy1(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    create(pg, DB)
    handle = proxy_factory_module()
    cachedb.start_feed(handle, DB)
    yield handle


def _cache(proxy: ProxyHandle) -> dict[str, str]:
    return show_cache(proxy, DB)


def _notifications(proxy: ProxyHandle) -> int:
    row = _cache(proxy)[f"change_feed {DB}"]
    return int(re.search(r"(\d+) notifications", row).group(1))  # type: ignore[union-attr]


def _direct(pg: EmbeddedPostgres, sql: str) -> None:
    with psycopg2.connect(pg.dsn(database=DB)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    conn.close()


def _counts(proxy: ProxyHandle) -> tuple[int, int]:
    c = _cache(proxy)
    return int(c["hits"]), int(c["misses"])


def _read(cur: psycopg2.extensions.cursor, sql: str) -> list[tuple[object, ...]]:
    cur.execute(sql)
    return list(cur.fetchall())


def test_an_update_seen_through_the_feed_follows_its_operation(pg: EmbeddedPostgres,
                                                               proxy1: ProxyHandle) -> None:
    """Defect 1: an UPDATE of customers (not of a referenced column) made directly on Postgres
    used to reach every table referencing it, as TRUNCATE ... CASCADE would."""
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    want = _read(cur, JOIN)
    assert _read(cur, JOIN) == want
    hits, misses = _counts(proxy1)
    before = _notifications(proxy1)
    _direct(pg, "UPDATE customers SET last_seen = now() WHERE id = 5")
    wait_until(lambda: _notifications(proxy1) > before, message="the feed's notification")
    assert _read(cur, JOIN) == want
    assert _counts(proxy1) == (hits + 1, misses)  # still cached
    # a TRUNCATE ... CASCADE does reach them: the next read is a miss, and right
    before = _notifications(proxy1)
    _direct(pg, "BEGIN; CREATE TABLE scratch_t (id int PRIMARY KEY); "
                "CREATE TABLE scratch_r (t int REFERENCES scratch_t); COMMIT")
    _direct(pg, "INSERT INTO scratch_t VALUES (1); INSERT INTO scratch_r VALUES (1)")
    cachedb.wait_feed(proxy1, DB)  # DDL: the catalog is read again
    assert _read(cur, "SELECT count(*) FROM scratch_r") == [(1,)]
    assert _read(cur, "SELECT count(*) FROM scratch_r") == [(1,)]
    before = _notifications(proxy1)
    _direct(pg, "TRUNCATE scratch_t CASCADE")
    wait_until(lambda: _notifications(proxy1) > before, message="the feed's notification")
    assert _read(cur, "SELECT count(*) FROM scratch_r") == [(0,)]
    conn.close()


def test_own_writes_are_bumped_once(proxy1: ProxyHandle) -> None:
    """Defect 2: the feed's notification of a write made through pgsluice is recognized as ours
    (its session bumped it before the client heard of the commit)."""
    cachedb.wait_feed(proxy1, DB)  # its catalog loaded: the writes' keys are known
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    c = _cache(proxy1)
    own, feed_bumps, before = int(c["feed_own_writes"]), int(c["feed_bumps"]), _notifications(proxy1)
    for i in range(5):
        cur.execute(f"UPDATE customers SET last_seen = now() WHERE id = {10 + i}")
        cur.execute(f"UPDATE kv SET v = 'own{i}' WHERE k = {i + 1}")
    wait_until(lambda: _notifications(proxy1) >= before + 10, message="ten notifications")
    c = _cache(proxy1)
    assert int(c["feed_own_writes"]) - own == 10
    assert int(c["feed_bumps"]) == feed_bumps
    conn.close()


def test_own_writes_of_another_worker_are_bumped_once(proxy1: ProxyHandle,
                                                      proxy_factory: ProxyFactory) -> None:
    """With two workers, each worker's change feed sees the other's writes too: they are known
    by their server connections (shared between the workers), not bumped again. (proxy1 made
    the database.)"""
    proxy = proxy_factory(env={"PGSLUICE_WORKERS": "2"})
    conns = cachedb.on_every_worker(proxy, DB, workers=2, total=8)

    def workers() -> dict[str, dict[str, str]]:
        out = {}
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SHOW CACHE")
                rows = dict(cur.fetchall())
            out[rows["worker_pid"]] = rows
        return out
    for conn in conns:
        cachedb.wait_feed_on(conn, DB)
    before = workers()
    for i, conn in enumerate(conns):
        with conn.cursor() as cur:
            cur.execute(f"UPDATE kv SET v = 'w{i}' WHERE k = {41 + i % 4}")

    def seen(rows: dict[str, str]) -> int:
        return int(re.search(r"(\d+) notifications", rows[f"change_feed {DB}"]).group(1))  # type: ignore[union-attr]
    wait_until(lambda: all(seen(r) - seen(before[w]) >= 8 for w, r in workers().items()),
               message="each worker's feed saw the eight writes")
    for worker, rows in workers().items():
        assert int(rows["feed_bumps"]) == int(before[worker]["feed_bumps"])
        assert int(rows["feed_own_writes"]) - int(before[worker]["feed_own_writes"]) == 8
    for conn in conns:
        conn.close()


def test_a_column_the_read_does_not_use_keeps_its_entry(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    conn = connect(proxy1, DB)
    cur = conn.cursor()
    reads = ["SELECT name FROM customers WHERE country = 'DE' ORDER BY id",  # no key: column level
             "SELECT count(*) FROM customers", "SELECT id, name, email FROM customers WHERE id = 7"]
    want = [_read(cur, sql) for sql in reads]
    hits, misses = _counts(proxy1)
    cur.execute("UPDATE customers SET last_seen = now() WHERE id = 7")  # through pgsluice
    cur.execute("UPDATE customers SET last_seen = now() WHERE country = 'FR'")  # no key
    before = _notifications(proxy1)
    _direct(pg, "UPDATE customers SET last_seen = now() WHERE id = 7")  # directly: one row
    wait_until(lambda: _notifications(proxy1) > before, message="the feed's notification")
    assert [_read(cur, sql) for sql in reads] == want
    assert _counts(proxy1) == (hits + 3, misses)
    cur.execute("UPDATE customers SET name = 'renamed' WHERE id = 7")
    got = [_read(cur, sql) for sql in reads]
    assert got[2] == [(7, "renamed", "c7@x")]
    assert got[1] == want[1]  # count(*) reads no column: still cached
    assert _counts(proxy1) == (hits + 4, misses + 2)
    conn.close()


async def test_a_write_pinned_to_one_key_keeps_other_keys_cached(pg: EmbeddedPostgres,
                                                                 proxy1: ProxyHandle) -> None:
    """Prepared statements (asyncpg: binary int8 parameters) and literals alike."""
    conn = await asyncpg.connect(proxy1.dsn(database=DB))
    select = "SELECT k, v FROM kv WHERE k = $1"
    for k in (20, 21):
        await conn.fetch(select, k)
    hits, misses = _counts(proxy1)
    await conn.execute("UPDATE kv SET v = $1 WHERE k = $2", "new20", 20)
    assert await conn.fetch(select, 21) == [(21, "v21")]
    assert _counts(proxy1) == (hits + 1, misses)
    assert [tuple(r) for r in await conn.fetch(select, 20)] == [(20, "new20")]
    assert _counts(proxy1) == (hits + 1, misses + 1)
    # = ANY($1), an IN list, an INSERT of given keys, a DELETE: each reaches its keys only
    anyk = "SELECT v FROM kv WHERE k = ANY($1::int[]) ORDER BY k"
    for _ in range(2):  # asyncpg's first execution of a statement prepares it (not looked up)
        await conn.fetch(anyk, [22, 23])
    await conn.fetch(select, 24)
    await conn.fetch(select, 60)
    hits, misses = _counts(proxy1)
    await conn.execute("DELETE FROM kv WHERE k IN (25, 26)")
    await conn.execute("INSERT INTO kv VALUES (60, 'sixty')")
    assert [r[0] for r in await conn.fetch(anyk, [22, 23])] == ["v22", "v23"]
    assert [tuple(r) for r in await conn.fetch(select, 24)] == [(24, "v24")]
    assert _counts(proxy1) == (hits + 2, misses)
    assert [tuple(r) for r in await conn.fetch(select, 60)] == [(60, "sixty")]
    assert [r[0] for r in await conn.fetch(anyk, [25, 60])] == ["sixty"]
    # directly on Postgres: the feed reports the keys of a small statement
    before = _notifications(proxy1)
    _direct(pg, "UPDATE kv SET v = 'direct' WHERE k = 22")
    await asyncio.to_thread(wait_until, lambda: _notifications(proxy1) > before)
    hits, misses = _counts(proxy1)
    assert [tuple(r) for r in await conn.fetch(select, 24)] == [(24, "v24")]
    assert _counts(proxy1) == (hits + 1, misses)
    assert [r[0] for r in await conn.fetch(anyk, [22, 23])] == ["direct", "v23"]
    await conn.close()


async def test_the_feed_reports_operation_columns_and_keys(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    conn = await asyncpg.connect(pg.dsn(database=DB))
    got: list[dict[str, object]] = []
    await conn.add_listener("pgsluice_changes", lambda *a: got.append(json.loads(a[3])))
    other = await asyncpg.connect(pg.dsn(database=DB))
    await other.execute("UPDATE kv SET v = v WHERE k = 30")  # no value changed
    await other.execute("UPDATE kv SET v = 'x' WHERE k = 31")
    await other.execute("UPDATE kv SET k = 1031 WHERE k = 32")  # a key changed
    await other.execute("UPDATE kv SET v = v || '' WHERE k > 1000")
    await other.execute("UPDATE kv SET v = 'y' WHERE k IN (33, 34)")  # a few rows: keys only
    await other.execute("INSERT INTO kv VALUES (2000, 'a'), (2001, 'b')")
    await other.execute("DELETE FROM kv WHERE k = 2000")
    await other.execute("UPDATE customers SET last_seen = now()")  # 100 rows: the operation alone
    await other.execute("UPDATE kv SET v = 'none' WHERE k = -1")  # no row: nothing
    await other.close()
    await asyncio.to_thread(wait_until, lambda: len(got) >= 8)
    await asyncio.sleep(0.2)
    await conn.close()
    brief = [(g["o"], g["t"], g.get("c"), g.get("m"), g.get("k")) for g in got]
    assert brief == [
        ("U", "kv", [], False, [[30]]),
        ("U", "kv", ["v"], False, [[31]]),
        ("U", "kv", ["k"], True, [[32], [1031]]),
        ("U", "kv", [], False, [[1031]]),  # v || '' changed nothing
        ("U", "kv", None, True, [[33], [34]]),
        ("I", "kv", None, None, [[2000], [2001]]),
        ("D", "kv", None, None, [[2000]]),
        ("U", "customers", None, None, None),
    ]
    assert all(g["s"] == "public" and isinstance(g["p"], int) for g in got)


def test_a_fresh_instance_bumps_what_the_others_read(pg: EmbeddedPostgres,
                                                     proxy_factory: ProxyFactory) -> None:
    """Defect 3: two instances share Redis; a write through one that has just started (its
    catalog still loading) must be seen by a read through the other as soon as it is
    acknowledged — not only once the other's change feed has caught up."""
    create(pg, "inval_fresh")
    redis = RedisServer()
    redis.start()
    try:
        b = proxy_factory("--redis", redis.url)
        conn_b = connect(b, "inval_fresh")
        cachedb.wait_feed(b, "inval_fresh")
        cur_b = conn_b.cursor()
        stale = []
        for attempt in range(3):  # each start of A is a new chance for the race
            a = proxy_factory("--redis", redis.url)
            conn_a = connect(a, "inval_fresh")  # at once: A's catalog is still loading
            cur_a = conn_a.cursor()
            for i in range(150):
                k = 1 + i % 10
                for _ in range(2):
                    cur_b.execute(f"SELECT v FROM kv WHERE k = {k}")
                value = f"a{attempt}-{i}"
                cur_a.execute(f"UPDATE kv SET v = '{value}' WHERE k = {k}")
                cur_b.execute(f"SELECT v FROM kv WHERE k = {k}")
                row = cur_b.fetchone()
                if row != (value,):
                    stale.append((attempt, i, row, value))
            conn_a.close()
            a.stop()
        assert stale == []
        assert int(show_cache(b, "inval_fresh")["hits"]) > 300
        conn_b.close()
    finally:
        redis.stop()


def test_no_change_feed_is_said_at_startup(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """Defect 4: a database whose reads cannot be cached says so at once: a warning naming the
    command, SHOW CACHE, /metrics."""
    pg.psql("DROP DATABASE IF EXISTS nofeed WITH (FORCE); CREATE DATABASE nofeed;")
    metrics = free_port()
    proxy = proxy_factory("--upstream", pg.dsn(database="nofeed"), "--metrics-listen", f"127.0.0.1:{metrics}")
    wait_until(lambda: "install-change-feed --database nofeed" in proxy.log_text(), timeout=15,
               message="the warning, with no client connected")
    rows = show_cache(proxy, "nofeed")
    assert rows["caching nofeed"].startswith("OFF: no change feed (run `pgsluice install-change-feed")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    assert 'pgsluice_cache_active{database="nofeed"} 0.0' in scrape()
    assert 'pgsluice_cache_active{database="nofeed"} 0.0' in scrape()
    # installed while running: caching comes on, and says so
    with psycopg2.connect(pg.dsn(database="nofeed")) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            from cache.feed import INSTALL
            cur.execute(INSTALL)
    conn.close()
    wait_until(lambda: show_cache(proxy, "nofeed")["caching nofeed"] == "on", timeout=10)
    wait_until(lambda: 'pgsluice_cache_active{database="nofeed"} 1.0' in scrape(), timeout=5)


def test_the_trigger_of_an_earlier_version_is_replaced(pg: EmbeddedPostgres) -> None:
    """`pgsluice install-change-feed` over an install of the one-trigger feed: one set of
    triggers per table afterwards, with the primary key as their arguments."""
    pg.psql("DROP DATABASE IF EXISTS oldfeed WITH (FORCE); CREATE DATABASE oldfeed;")
    with psycopg2.connect(pg.dsn(database="oldfeed")) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (a int, b text, PRIMARY KEY (b, a)); CREATE SCHEMA pgsluice; "
                        "CREATE FUNCTION pgsluice.notify_change() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$BEGIN RETURN NULL; END$$; CREATE TRIGGER pgsluice_change_feed AFTER INSERT ON t "
                        "FOR EACH STATEMENT EXECUTE FUNCTION pgsluice.notify_change()")
            from cache.feed import INSTALL
            cur.execute(INSTALL)
            cur.execute(INSTALL)  # idempotent
            cur.execute("SELECT tgname, encode(tgargs, 'escape') FROM pg_trigger "
                        "WHERE tgrelid = 't'::regclass ORDER BY 1")
            assert cur.fetchall() == [("pgsluice_feed_delete", "b\\000a\\000"),
                                      ("pgsluice_feed_insert", "b\\000a\\000"),
                                      ("pgsluice_feed_truncate", ""),
                                      ("pgsluice_feed_update", "b\\000a\\000")]
            # the key changes: the triggers follow (ALTER TABLE through the event trigger)
            cur.execute("ALTER TABLE t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (a)")
            cur.execute("SELECT DISTINCT encode(tgargs, 'escape') FROM pg_trigger "
                        "WHERE tgrelid = 't'::regclass AND tgname <> 'pgsluice_feed_truncate'")
            assert cur.fetchall() == [("a\\000",)]
            cur.execute("ALTER TABLE t DROP COLUMN b")  # our triggers never hold a column
    conn.close()
