"""The wire door's fast path (proxy/pipeline/fastpath.py): a repeated request answered before any
parsing. It must never answer where the slow path would not: one test per check it makes —
settings, role, guardrails, max_staleness and TTL, DDL, change feed down, Redis, and versions
(key-pinned reads after writes of their key and of another, both protocols; two workers).
Its passthrough side is tested in tests/test_fastpath_pass.py.

Each test first reads a request three times (a miss, a hit that leaves the alias, a fast hit:
SHOW CACHE's fast_hits says the fast path answered), then changes one thing.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg2
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests import cachedb
from tests.cachedb import calls, show_cache
from tests.rawpg import Msg, PgConn, bind, describe_portal, execute, parse, rows, sqlstates, sync
from tests.redisproc import RedisServer
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, wait_until

DB = "fastpath"
ITEM = "SELECT id, v FROM items WHERE id = $1"


@pytest.fixture(scope="module")
def proxy1(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    cachedb.create(pg, DB)
    handle = proxy_factory_module("--pool-max-size", "4")
    cachedb.start_feed(handle, DB)
    yield handle


def _n(proxy: ProxyHandle, name: str, db: str = DB) -> int:
    return int(show_cache(proxy, db).get(name, "0"))


def _conn(target: ProxyHandle | EmbeddedPostgres, user: str = "postgres", db: str = DB,
          **params: str) -> PgConn:
    return PgConn.connect(target.host, target.port, user, PASSWORDS[user], db, params=params)


def _own_proxy(pg: EmbeddedPostgres, proxy_factory: ProxyFactory, db: str, *args: str) -> ProxyHandle:
    """A pgsluice of the test's own, with `args`, in front of a fresh database `db`."""
    cachedb.create(pg, db)
    proxy = proxy_factory(*args)
    cachedb.connect(proxy, db).close()
    cachedb.wait_feed(proxy, db)
    return proxy


def _primed(fast_hits: Callable[[], int], read: Callable[[], list[Msg]]) -> list[Msg]:
    """Three reads of one request: the last is answered by the fast path; its reply."""
    fast = fast_hits()
    replies = [read() for _ in range(3)]
    assert replies[0] == replies[1] == replies[2]
    assert fast_hits() - fast >= 1, "the fast path never answered"
    return replies[2]


def _fast_hits(proxy: ProxyHandle, db: str = DB) -> Callable[[], int]:
    return lambda: _n(proxy, "fast_hits", db)


def _bound(conn: PgConn, statement: str, params: Sequence[str]) -> list[Msg]:
    """Bind a named statement and run it (the group carries no Parse)."""
    conn.send_messages([bind("", statement, params), describe_portal(), execute(), sync()])
    return conn.read_until_ready()


def _prepare(conn: PgConn, name: str, sql: str) -> None:
    conn.send_messages([parse(name, sql), sync()])
    conn.read_until_ready()


# ---- answers ---------------------------------------------------------------------------------

def test_repeats_are_answered_byte_for_byte(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    with _conn(pg) as direct:
        want = direct.simple("SELECT id, v FROM items WHERE id = 11")
        want_x = direct.extended(ITEM, ["11"])
        _prepare(direct, "s1", ITEM)
        want_b = _bound(direct, "s1", ["12"])
    fast = _n(proxy1, "fast_hits")
    with _conn(proxy1) as conn:
        for _ in range(5):
            assert conn.simple("SELECT id, v FROM items WHERE id = 11") == want
        for _ in range(5):
            assert conn.extended(ITEM, ["11"]) == want_x
        _prepare(conn, "s1", ITEM)
        for _ in range(5):
            assert _bound(conn, "s1", ["12"]) == want_b
        # the unnamed statement the last Parse group left is still the client's
        conn.send_messages([bind("", "", ["13"]), execute(), sync()])
        assert rows(conn.read_until_ready()) == [[b"13", b"v13"]]
    assert _n(proxy1, "fast_hits") - fast >= 9


# ---- what the session's context holds ----------------------------------------------------------

@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_a_setting_change_is_not_answered_from_the_old_context(pg: EmbeddedPostgres, proxy1: ProxyHandle,
                                                               protocol: str) -> None:
    sql = "SELECT at::text FROM moments WHERE id = $1"

    def read(conn: PgConn) -> list[Msg]:
        return conn.simple(sql.replace("$1", "1")) if protocol == "simple" else conn.extended(sql, ["1"])

    with _conn(pg) as direct:
        direct.simple("SET TimeZone = 'Asia/Tokyo'")
        want = read(direct)
    with _conn(proxy1) as conn:
        conn.simple("SET TimeZone = 'UTC'")
        utc = _primed(_fast_hits(proxy1), lambda: read(conn))
        conn.simple("SET TimeZone = 'Asia/Tokyo'")
        assert read(conn) == want != utc


def test_another_role_never_gets_the_rows_of_an_alias(proxy1: ProxyHandle) -> None:
    """`counters` is the superuser's alone: alice is refused, through the alias or after SET ROLE."""
    sql = "SELECT n FROM counters WHERE id = 12"
    with _conn(proxy1, "alice") as alice, _conn(proxy1) as admin:
        assert rows(_primed(_fast_hits(proxy1), lambda: admin.simple(sql))) == [[b"0"]]
        assert sqlstates(alice.simple(sql)) == ["42501"]
        assert rows(_primed(_fast_hits(proxy1), lambda: alice.simple("SELECT v FROM items WHERE id = 12"))) \
            == [[b"v12"]]
        admin.simple("SET ROLE alice")  # pins the session: Postgres answers as alice from now on
        assert sqlstates(admin.simple(sql)) == ["42501"]


def test_a_guardrail_reload_is_not_answered_from_before(pg: EmbeddedPostgres, proxy_factory: ProxyFactory,
                                                        tmp_path: Path) -> None:
    db = "fastpath_guard"
    config = tmp_path / "pgsluice.toml"
    config.write_text('[pgsluice.roles.analyst]\nmatch_application_names = ["analyst*"]\n')
    proxy = _own_proxy(pg, proxy_factory, db, "--config", str(config))
    sql = "SELECT upper(v) FROM items WHERE id = 3"
    with _conn(proxy, db=db, application_name="analyst-1") as conn:
        assert rows(_primed(_fast_hits(proxy, db), lambda: conn.simple(sql))) == [[b"V3"]]
        config.write_text('[pgsluice.roles.analyst]\nmatch_application_names = ["analyst*"]\n'
                          'deny_functions = ["upper"]\n')
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in proxy.log_text(), timeout=5)
        assert sqlstates(conn.simple(sql)) == ["42501"]


# ---- freshness ---------------------------------------------------------------------------------

def test_max_staleness_hint_and_setting(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    sql = "/* pgsluice: max_staleness=1s */ SELECT v FROM items WHERE id = 21"
    with _conn(proxy1) as conn:
        _primed(_fast_hits(proxy1), lambda: conn.simple(sql))
        before = calls(pg, DB, "FROM items WHERE id = $1")
        time.sleep(1.1)
        conn.simple(sql)  # the entry is older than the hint allows: Postgres answers
        assert calls(pg, DB, "FROM items WHERE id = $1") - before == 1
        conn.simple("SET pgsluice.max_staleness = '1s'")
        plain = "SELECT v FROM items WHERE id = 22"
        _primed(_fast_hits(proxy1), lambda: conn.simple(plain))
        before = calls(pg, DB, "FROM items WHERE id = $1")
        time.sleep(1.1)
        conn.simple(plain)
        assert calls(pg, DB, "FROM items WHERE id = $1") - before == 1


def test_an_entry_past_its_ttl_is_not_answered(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    db = "fastpath_ttl"
    proxy = _own_proxy(pg, proxy_factory, db, "--cache-ttl", "1")
    sql = "SELECT v FROM items WHERE id = 23"
    with _conn(proxy, db=db) as conn:
        _primed(_fast_hits(proxy, db), lambda: conn.simple(sql))
        before = calls(pg, db, "FROM items WHERE id = $1")
        time.sleep(1.1)
        conn.simple(sql)
        assert calls(pg, db, "FROM items WHERE id = $1") - before == 1


# ---- plans: DDL, the change feed, Redis -------------------------------------------------------

def test_ddl_through_pgsluice_and_directly(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    with _conn(proxy1) as conn:
        conn.simple("DROP TABLE IF EXISTS shapes; CREATE TABLE shapes (id int PRIMARY KEY, a int)")
        conn.simple("INSERT INTO shapes VALUES (1, 10)")
        cachedb.wait_feed(proxy1, DB)  # the catalog is read again after DDL
        sql = "SELECT * FROM shapes WHERE id = 1"
        assert rows(_primed(_fast_hits(proxy1), lambda: conn.simple(sql))) == [[b"1", b"10"]]
        conn.simple("ALTER TABLE shapes ADD COLUMN b int DEFAULT 7")
        assert rows(conn.simple(sql)) == [[b"1", b"10", b"7"]]
        cachedb.wait_feed(proxy1, DB)
        assert rows(_primed(_fast_hits(proxy1), lambda: conn.simple(sql))) == [[b"1", b"10", b"7"]]
        pg.psql("ALTER TABLE shapes DROP COLUMN a", db=DB)  # the feed reports it

        def new_shape() -> bool:
            return rows(conn.simple(sql)) == [[b"1", b"7"]]
        wait_until(new_shape, timeout=5, message="the DDL made directly was seen")


def test_change_feed_down_is_never_answered_from_before(pg: EmbeddedPostgres, proxy1: ProxyHandle) -> None:
    """While the feed is down (its reconnects refused: the database takes no new connections),
    a write made directly to Postgres is not seen by the cache: reads must reach Postgres."""
    sql = "SELECT n FROM counters WHERE id = 14"
    cachedb.wait_feed(proxy1, DB)
    direct = psycopg2.connect(pg.dsn(database=DB))
    direct.autocommit = True
    try:
        with _conn(proxy1) as conn, direct.cursor() as dc:
            _primed(_fast_hits(proxy1), lambda: conn.simple(sql))
            pg.psql(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS false")
            try:
                dc.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                           "AND application_name = 'pgsluice control'", (DB,))
                wait_until(lambda: show_cache(proxy1, DB)[f"change_feed {DB}"].startswith("down"),
                           timeout=5, message="pgsluice saw its change feed go")
                dc.execute("UPDATE counters SET n = 777 WHERE id = 14")
                for _ in range(3):
                    assert rows(conn.simple(sql)) == [[b"777"]]
            finally:
                pg.psql(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS true")
        cachedb.wait_feed(proxy1, DB)
    finally:
        direct.close()


def test_with_redis_every_look_up_waits_for_it(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """With Redis each look-up waits for the version barrier, so there is no fast path; with
    Redis down, reads are not answered from cache at all."""
    db = "fastpath_redis"
    redis = RedisServer()
    redis.start()
    try:
        proxy = _own_proxy(pg, proxy_factory, db, "--redis", redis.url, "--redis-timeout-ms", "50")
        wait_until(lambda: show_cache(proxy, db).get("redis") == "up", timeout=10)
        sql = "SELECT v FROM items WHERE id = 31"
        with _conn(proxy, db=db) as conn:
            hits, fast = _n(proxy, "hits", db), _n(proxy, "fast_hits", db)
            for _ in range(4):
                conn.simple(sql)
            assert _n(proxy, "hits", db) - hits == 3 and _n(proxy, "fast_hits", db) == fast
            redis.kill()
            wait_until(lambda: show_cache(proxy, db).get("redis") == "down", timeout=10)
            before, hits = calls(pg, db, "FROM items WHERE id = $1"), _n(proxy, "hits", db)
            for _ in range(3):
                assert rows(conn.simple(sql)) == [[b"v31"]]
            assert calls(pg, db, "FROM items WHERE id = $1") - before == 3
            assert _n(proxy, "hits", db) == hits
    finally:
        redis.stop()


# ---- versions: key-pinned reads after writes -------------------------------------------------

@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_a_key_pinned_read_after_writes_of_its_key_and_another(pg: EmbeddedPostgres, proxy1: ProxyHandle,
                                                               protocol: str) -> None:
    key, other = {"simple": (41, 42), "extended": (43, 44), "prepared": (45, 46)}[protocol]
    with _conn(proxy1) as conn, _conn(proxy1) as writer:
        if protocol == "prepared":
            _prepare(conn, "pin", ITEM)

        def read() -> list[Msg]:
            if protocol == "simple":
                return conn.simple(ITEM.replace("$1", str(key)))
            if protocol == "extended":
                return conn.extended(ITEM, [str(key)])
            return _bound(conn, "pin", [str(key)])

        assert rows(_primed(_fast_hits(proxy1), read)) == [[str(key).encode(), f"v{key}".encode()]]
        # another key written (both protocols): this read keeps its entry, and stays right
        writer.simple(f"UPDATE items SET v = 'other' WHERE id = {other}")
        writer.extended("UPDATE items SET v = $1 WHERE id = $2", ["other 2", str(other)])
        fast = _n(proxy1, "fast_hits")
        assert rows(read()) == [[str(key).encode(), f"v{key}".encode()]]
        assert _n(proxy1, "fast_hits") - fast == 1, "a write of another key invalidated the read"
        # its own key, through pgsluice in either protocol, and directly (the change feed)
        writer.simple(f"UPDATE items SET v = 'new' WHERE id = {key}")
        assert rows(read()) == [[str(key).encode(), b"new"]]
        _primed(_fast_hits(proxy1), read)
        writer.extended("UPDATE items SET v = $1 WHERE id = $2", ["newer", str(key)])
        assert rows(read()) == [[str(key).encode(), b"newer"]]
        _primed(_fast_hits(proxy1), read)
        pg.psql(f"UPDATE items SET v = 'newest' WHERE id = {key}", db=DB)
        wait_until(lambda: rows(read()) == [[str(key).encode(), b"newest"]], timeout=5,
                   message="the direct write was seen")


def _cache_rows(conn: PgConn) -> dict[bytes, bytes | None]:
    """SHOW CACHE through one connection (so: its worker's)."""
    return {r[0] or b"": r[1] for r in rows(conn.simple("SHOW CACHE"))}


def test_two_workers_see_each_others_writes(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    db = "fastpath_workers"
    cachedb.create(pg, db)
    proxy = proxy_factory("--workers", "2")
    by_worker: dict[bytes | None, PgConn] = {}
    for n in range(200):  # the kernel spreads connections over the workers once both listen
        if n and n % 20 == 0:
            time.sleep(0.2)
        conn = _conn(proxy, db=db)
        pid = _cache_rows(conn)[b"worker_pid"]
        if pid in by_worker:
            conn.close()
            continue
        by_worker[pid] = conn
        if len(by_worker) == 2:
            break
    assert len(by_worker) == 2, "all connections landed on one worker"
    writer, reader = by_worker.values()
    def ready(conn: PgConn) -> bool:
        got = _cache_rows(conn)
        return (got.get(f"change_feed {db}".encode()) or b"").startswith(b"up") and \
            (got.get(f"catalog {db}".encode()) or b"").startswith(b"loaded")

    for conn in (writer, reader):
        wait_until(lambda c=conn: ready(c), timeout=10)  # type: ignore[misc]

    def fast_hits() -> int:
        return int(_cache_rows(reader)[b"fast_hits"] or 0)

    sql = "SELECT n FROM counters WHERE id = 3"
    for i in range(30):
        _primed(fast_hits, lambda: reader.simple(sql))
        writer.simple(f"UPDATE counters SET n = {100 + i} WHERE id = 3")
        assert rows(reader.simple(sql)) == [[str(100 + i).encode()]], f"round {i}: stale read"
    for conn in by_worker.values():
        conn.close()
