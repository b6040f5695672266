"""The fast path's passthrough side (proxy/pipeline/fastpath.py Pass): a simple Query that needed nothing
but sending is remembered per session context and sent the next time without planner, cache or
sqlscan work — from data_received when the session is idle (relay.send_known), else through
relay.forward. It must do what the slow path does for such a text, and stop being used when
anything it was worked out from changes: one test per check — its bypass counted, what it
writes marked (with today's catalog and the session's search_path), guardrails (another role,
a reload, also while the client waits for a server connection), the change feed coming back,
texts that name the session's statements. And its replies are relayed as they come (looking
only at message boundaries when nothing needs more: replies._plain_reply): byte for byte as
Postgres sends them, errors counted.

Each test first sends a text three times (SHOW CACHE's known_passthrough says it was sent as
known), then changes one thing.
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests import cachedb
from tests.cachedb import show_cache
from tests.rawpg import Msg, query, rows, sqlstates, types
from tests.test_fastpath import _conn, _fast_hits, _own_proxy, _prepare, _primed
from tests.util import ProxyFactory, ProxyHandle, wait_until

DB = "fastpass"
ANALYST = '[pgsluice.roles.analyst]\nmatch_application_names = ["analyst*"]\n'
DENY_UPPER = ANALYST + 'deny_functions = ["upper"]\n'


@pytest.fixture(scope="module")
def proxy(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    cachedb.create(pg, DB)
    handle = proxy_factory_module("--pool-max-size", "4")
    cachedb.start_feed(handle, DB)
    yield handle


def _n(proxy: ProxyHandle, name: str, db: str = DB) -> int:
    return int(show_cache(proxy, db).get(name, "0"))


def _sent_as_known(proxy: ProxyHandle, send: Callable[[], list[Msg]], db: str = DB) -> list[Msg]:
    """Three sends of one passthrough text: the last is sent as known (not worked out again)."""
    known = _n(proxy, "known_passthrough", db)
    replies = [send() for _ in range(3)]
    assert _n(proxy, "known_passthrough", db) - known >= 1, "never sent as a known text"
    return replies[-1]


def _stats(proxy: ProxyHandle) -> dict[bytes, bytes | None]:
    with _conn(proxy, db="pgsluice") as admin:
        return {r[0] or b"": r[1] for r in rows(admin.simple("SHOW STATS"))}


# ---- what the slow path would have done --------------------------------------------------------

def test_a_known_passthrough_text_is_counted_as_a_bypass(proxy: ProxyHandle) -> None:
    sql = "SELECT v, now() > '2000-01-01' FROM items WHERE id = 51"
    with _conn(proxy, db=DB) as conn:
        _sent_as_known(proxy, lambda: conn.simple(sql))
        before = _n(proxy, "bypass: not cacheable")
        known = _n(proxy, "known_passthrough")
        for _ in range(3):
            assert rows(conn.simple(sql)) == [[b"v51", b"t"]]
        assert _n(proxy, "bypass: not cacheable") - before == 3
        assert _n(proxy, "known_passthrough") - known >= 3  # (SHOW CACHE's connections' too)


def test_a_known_write_marks_what_it_writes(proxy: ProxyHandle) -> None:
    read = "SELECT n FROM counters WHERE id = 15"
    write = "UPDATE counters SET n = n + 1 WHERE id = 15"
    with _conn(proxy, db=DB) as conn:
        _sent_as_known(proxy, lambda: conn.simple(write))
        start = int(rows(conn.simple(read))[0][0] or b"0")
        for i in range(1, 6):
            _primed(_fast_hits(proxy, DB), lambda: conn.simple(read))
            assert types(conn.simple(write)) == "CZ"
            assert rows(conn.simple(read)) == [[str(start + i).encode()]], f"round {i}: stale"


def test_a_known_write_follows_the_catalog(proxy: ProxyHandle) -> None:
    """A foreign key added after the DELETE's text became known: its cascade is marked too."""
    delete = "DELETE FROM parents WHERE id = 7"
    read = "SELECT count(*) FROM kids WHERE parent_id = 7"
    with _conn(proxy, db=DB) as conn:
        conn.simple("DROP TABLE IF EXISTS kids, parents; CREATE TABLE parents (id int PRIMARY KEY);"
                    "CREATE TABLE kids (id int PRIMARY KEY, parent_id int)")
        cachedb.wait_feed(proxy, DB)
        _sent_as_known(proxy, lambda: conn.simple(delete))
        conn.simple("ALTER TABLE kids ADD FOREIGN KEY (parent_id) REFERENCES parents ON DELETE CASCADE")
        cachedb.wait_feed(proxy, DB)
        conn.simple("INSERT INTO parents VALUES (7); INSERT INTO kids VALUES (1, 7), (2, 7)")
        assert rows(_primed(_fast_hits(proxy, DB), lambda: conn.simple(read))) == [[b"2"]]
        conn.simple(delete)
        assert rows(conn.simple(read)) == [[b"0"]]


def test_a_known_write_follows_the_search_path(proxy: ProxyHandle) -> None:
    """One UPDATE text writes sp1.t under one search_path and sp2.t under another: known in the
    first context, it must mark sp2.t in the second — also as the first request after the SET
    (the session's context is found again then)."""
    write = "UPDATE t SET n = n + 1 WHERE id = 1"
    read = "SELECT n FROM sp2.t WHERE id = 1"
    with _conn(proxy, db=DB) as conn:
        conn.simple("DROP SCHEMA IF EXISTS sp1, sp2 CASCADE; CREATE SCHEMA sp1; CREATE SCHEMA sp2;"
                    "CREATE TABLE sp1.t (id int PRIMARY KEY, n int);"
                    "CREATE TABLE sp2.t (id int PRIMARY KEY, n int);"
                    "INSERT INTO sp1.t VALUES (1, 0); INSERT INTO sp2.t VALUES (1, 0)")
        cachedb.wait_feed(proxy, DB)
        for i in range(1, 4):
            conn.simple("SET search_path = sp2")
            assert rows(_primed(_fast_hits(proxy, DB), lambda: conn.simple(read))) == [[str(i - 1).encode()]]
            conn.simple("SET search_path = sp1")
            _sent_as_known(proxy, lambda: conn.simple(write))
            conn.simple("SET search_path = sp2")
            assert types(conn.simple(write)) == "CZ"
            assert rows(conn.simple(read)) == [[str(i).encode()]], f"round {i}: stale"


@pytest.mark.parametrize("command", ["DEALLOCATE", "EXECUTE"])
def test_texts_naming_the_sessions_statements_are_never_known(proxy: ProxyHandle, command: str) -> None:
    """`DEALLOCATE st` / `EXECUTE st` of a statement the session has not prepared fail (26000)
    however often they are sent; once it has prepared `st` (protocol level), they name it."""
    with _conn(proxy, db=DB) as conn:
        for _ in range(3):
            assert sqlstates(conn.simple(f"{command} st")) == ["26000"]
        _prepare(conn, "st", "SELECT v FROM items WHERE id = 8")
        reply = conn.simple(f"{command} st")
        assert sqlstates(reply) == []
        if command == "EXECUTE":
            assert rows(reply) == [[b"v8"]]


# ---- when it must not be used any more ---------------------------------------------------------

def test_a_text_known_for_one_role_is_guarded_for_another(pg: EmbeddedPostgres, proxy_factory: ProxyFactory,
                                                         tmp_path: Path) -> None:
    db = "fastpass_roles"
    config = tmp_path / "pgsluice.toml"
    config.write_text(DENY_UPPER)
    proxy = _own_proxy(pg, proxy_factory, db, "--config", str(config))
    sql = "SELECT upper(v), now() > '2000-01-01' FROM items WHERE id = 4"
    with _conn(proxy, db=db, application_name="etl") as etl, \
            _conn(proxy, db=db, application_name="analyst-1") as analyst:
        assert rows(_sent_as_known(proxy, lambda: etl.simple(sql), db)) == [[b"V4", b"t"]]
        for _ in range(3):
            assert sqlstates(analyst.simple(sql)) == ["42501"]
        assert rows(etl.simple(sql)) == [[b"V4", b"t"]]


def _reload(proxy: ProxyHandle, config: Path, text: str) -> None:
    config.write_text(text)
    seen = proxy.log_text().count("configuration reloaded")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.log_text().count("configuration reloaded") > seen, timeout=5)


def test_a_known_text_follows_a_guardrail_reload(pg: EmbeddedPostgres, proxy_factory: ProxyFactory,
                                                 tmp_path: Path) -> None:
    db = "fastpass_guard"
    config = tmp_path / "pgsluice.toml"
    config.write_text(ANALYST)
    proxy = _own_proxy(pg, proxy_factory, db, "--config", str(config))
    sql = "SELECT upper(v), now() > '2000-01-01' FROM items WHERE id = 4"
    with _conn(proxy, db=db, application_name="analyst-1") as conn:
        assert rows(_sent_as_known(proxy, lambda: conn.simple(sql), db)) == [[b"V4", b"t"]]
        _reload(proxy, config, DENY_UPPER)
        assert sqlstates(conn.simple(sql)) == ["42501"]


def test_a_reload_while_a_known_text_waits_for_a_server_connection(pg: EmbeddedPostgres,
                                                                  proxy_factory: ProxyFactory,
                                                                  tmp_path: Path) -> None:
    """The text was found known when it came in; the guardrails changed while it waited in the
    pool's queue: it is worked out again when it gets a server connection."""
    db = "fastpass_queue"
    config = tmp_path / "pgsluice.toml"
    config.write_text(ANALYST)
    proxy = _own_proxy(pg, proxy_factory, db, "--config", str(config), "--pool-max-size", "1")
    sql = "SELECT upper(v), now() > '2000-01-01' FROM items WHERE id = 4"
    with _conn(proxy, db=db) as holder, _conn(proxy, db=db, application_name="analyst-1") as conn:
        _sent_as_known(proxy, lambda: conn.simple(sql), db)
        holder.simple("BEGIN")  # the one server connection
        conn.send(query(sql))
        wait_until(lambda: _waiting(proxy, db), timeout=5, message="the client waits in the queue")
        _reload(proxy, config, DENY_UPPER)
        holder.simple("COMMIT")
        assert sqlstates(conn.read_until_ready()) == ["42501"]


def _waiting(proxy: ProxyHandle, db: str) -> bool:
    with _conn(proxy, db="pgsluice") as admin:
        return any(r[0] == db.encode() and int(r[5] or 0) for r in rows(admin.simple("SHOW POOLS")))


def test_a_text_known_while_the_feed_was_down_is_cached_once_it_is_up(pg: EmbeddedPostgres,
                                                                       proxy: ProxyHandle) -> None:
    """While the change feed is down a read is bypassed (and its text becomes known as such);
    once the feed is back, the same text is looked up in the cache again."""
    sql = "SELECT v FROM items WHERE id = 77"
    cachedb.wait_feed(proxy, DB)
    direct = psycopg2.connect(pg.dsn(database=DB))
    direct.autocommit = True
    with _conn(proxy, db=DB) as conn:
        pg.psql(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS false")
        try:
            with direct.cursor() as dc:
                dc.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                           "AND application_name = 'pgsluice control'", (DB,))
            direct.close()
            wait_until(lambda: show_cache(proxy, DB)[f"change_feed {DB}"].startswith("down"),
                       timeout=5, message="pgsluice saw its change feed go")
            assert rows(_sent_as_known(proxy, lambda: conn.simple(sql))) == [[b"v77"]]
        finally:
            pg.psql(f"ALTER DATABASE {DB} ALLOW_CONNECTIONS true")
        cachedb.wait_feed(proxy, DB)
        assert rows(_primed(_fast_hits(proxy, DB), lambda: conn.simple(sql))) == [[b"v77"]]


# ---- its replies -------------------------------------------------------------------------------

REPLIES = [
    "SELECT id, v, now() > '2000-01-01' FROM items WHERE id <= 40 ORDER BY id",  # rows
    "SELECT v, now() > '2000-01-01' FROM items WHERE id = -1",  # none
    "SELECT repeat(v, 100000), now() > '2000-01-01' FROM items WHERE id = 9",  # streamed (> 256 KB)
    "SELECT id / (id - id), now() FROM items WHERE id = 1",  # an error
    "SELECT noisy(id) FROM items WHERE id = 3",  # a notice
    "SELECT 1 WHERE now() > '2000-01-01'; SELECT 2 WHERE now() > '2000-01-01'",  # two results
]


def test_known_texts_are_relayed_byte_for_byte(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    with _conn(pg, db=DB) as direct:
        direct.simple("CREATE OR REPLACE FUNCTION noisy(x int) RETURNS int LANGUAGE plpgsql AS "
                      "$$ BEGIN RAISE NOTICE 'n %', x; RETURN x; END $$")
        want = [direct.simple(sql) for sql in REPLIES]
    with _conn(proxy, db=DB) as conn:
        for sql, expected in zip(REPLIES, want, strict=True):
            try:
                _sent_as_known(proxy, lambda sql=sql: conn.simple(sql))  # type: ignore[misc]
            except AssertionError:
                raise AssertionError(sql) from None
            for _ in range(3):
                assert conn.simple(sql) == expected, sql
        assert rows(conn.simple("SELECT 'still usable'")) == [[b"still usable"]]


def test_a_known_text_that_fails_is_counted(proxy: ProxyHandle) -> None:
    sql = "SELECT id / (id - id), now() FROM items WHERE id = 2"
    with _conn(proxy, db=DB) as conn:
        _sent_as_known(proxy, lambda: conn.simple(sql))
        before = int(_stats(proxy)[b"errors_class_22"] or 0)
        for _ in range(3):
            assert sqlstates(conn.simple(sql)) == ["22012"]
        assert int(_stats(proxy)[b"errors_class_22"] or 0) - before == 3


def test_a_known_writes_command_complete_waits_for_its_ready_for_query(proxy: ProxyHandle) -> None:
    """The UPDATE's CommandComplete reaches pgsluice a second before the Query's ReadyForQuery
    (the next statement's first row overflows Postgres's send buffer, the second sleeps): the
    client must not see it before the write's versions are bumped, at the end."""
    sql = ("UPDATE counters SET n = n + 1 WHERE id = 16; SELECT CASE WHEN g = 2 THEN "
           "pg_sleep(1)::text ELSE repeat('x', 20000) END FROM generate_series(1, 2) g")
    with _conn(proxy, db=DB) as conn:
        _sent_as_known(proxy, lambda: conn.simple(sql))
        conn.send(query(sql))
        time.sleep(0.5)
        early, _, _ = select.select([conn.sock], [], [], 0)
        assert types(conn.read_until_ready()) == "CTDDCZ"
        assert not early, "the client saw the UPDATE's CommandComplete before its ReadyForQuery"
