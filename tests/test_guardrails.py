"""Guardrails at the wire door, end to end: real clients, real Postgres, a roles config.

A refused statement never reaches Postgres: the sessions here log every statement they
run (log_statement=all, set as a startup option), and the server log is searched.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import ProxyFactory, ProxyHandle

CONFIG = """
[pgsluice.roles.reader]
match_application_names = ["reader*"]
read_only = true
max_rows = 5
deny = ["pg_sleep", "set_role", "file_access", "dblink", "admin_functions"]
statement_timeout = "2s"

[pgsluice.roles.writer]
match_application_names = ["writer*"]
deny = ["ddl", "delete_without_where", "update_without_where", "truncate", "copy_program"]
"""


@pytest.fixture(scope="module")
def guarded(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyHandle]:  # fmt: skip
    pg.psql("DROP TABLE IF EXISTS guard_t; CREATE TABLE guard_t (id int PRIMARY KEY, v text);"
            "INSERT INTO guard_t SELECT g, 'v' || g FROM generate_series(1, 20) g;"
            "DROP SEQUENCE IF EXISTS guard_seq; CREATE SEQUENCE guard_seq;")
    path: Path = tmp_path_factory.mktemp("guard") / "pgsluice.toml"
    path.write_text(CONFIG)
    yield proxy_factory_module("--config", str(path), "--pool-max-size", "3")
    pg.psql("DROP TABLE IF EXISTS guard_t; DROP SEQUENCE IF EXISTS guard_seq;")


def connect(proxy: ProxyHandle, app: str) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(), application_name=app, autocommit=True,
                           options="-c log_statement=all")


def count(pg: EmbeddedPostgres) -> int:
    return int(pg.psql("SELECT count(*) FROM guard_t"))


READER_REFUSED = [
    ("DELETE FROM guard_t", "25006"),
    ("/* hi */ delete FROM guard_t WHERE id = 1", "25006"),
    ("SELECT 1; DELETE FROM guard_t", "25006"),
    ("COMMIT; DELETE FROM guard_t", "25006"),
    ("WITH d AS (DELETE FROM guard_t RETURNING *) SELECT * FROM d", "25006"),
    ("EXPLAIN (ANALYZE) DELETE FROM guard_t", "25006"),
    ("EXPLAIN ANALYZE VERBOSE UPDATE guard_t SET v = 'x'", "25006"),
    ("SELECT nextval('guard_seq')", "25006"),
    ("COPY (DELETE FROM guard_t RETURNING *) TO STDOUT", "25006"),
    ("SELECT * INTO guard_copy FROM guard_t", "25006"),
    ("CREATE TABLE guard_new AS SELECT 1", "25006"),
    ("DO $$BEGIN DELETE FROM guard_t; END$$", "25006"),
    ("PREPARE p AS SELECT 1; EXECUTE p", "25006"),
    ("SET default_transaction_read_only = off", "25006"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", "25006"),
    ("SELECT * FROM guard_t FOR UPDATE", "25006"),
    ("SET ROLE postgres", "25006"),
    ("SELECT set_config('role', 'postgres', false)", "25006"),
    # what would undo the read-only setting on the server connection, or outlive the session
    ("SELECT set_config('default_transaction_read_only', 'off', false)", "25006"),
    ("SELECT pg_catalog.SET_CONFIG('Default_Transaction_Read_Only', 'off', false)", "25006"),
    ("SELECT set_config('transaction_read_only', 'off', true)", "25006"),
    ("SELECT set_config(lower('DEFAULT_TRANSACTION_READ_ONLY'), 'off', false)", "25006"),
    ("RESET ALL; INSERT INTO guard_t VALUES (99, 'x')", "25006"),
    ("DISCARD ALL; SELECT 1", "25006"),
    ("SELECT pg_advisory_lock(42)", "25006"),
    ("SELECT pg_try_advisory_lock_shared(42)", "25006"),
    ('SELECT "pg_advisory_lock"(1, 2)', "25006"),
    ("SELECT set_config('statement_timeout', '0', false)", "42501"),
    ('SELECT "pg_sleep"(3)', "42501"),
    ("SELECT pg_catalog.pg_sleep(3)", "42501"),
    ("select PG_SLEEP(3)", "42501"),
    ("SELECT pg_read_file('/etc/passwd')", "42501"),
    ("SELECT pg_terminate_backend(1)", "42501"),
]


@pytest.mark.parametrize(("sql", "sqlstate"), READER_REFUSED, ids=[s for s, _ in READER_REFUSED])
def test_reader_refused_and_never_sent(pg: EmbeddedPostgres, guarded: ProxyHandle, sql: str,
                                       sqlstate: str) -> None:
    marker = f"/* probe {uuid.uuid4().hex} */ "
    offset = pg.logfile.stat().st_size
    with connect(guarded, "reader-bot") as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(marker + sql)
        assert info.value.sqlstate == sqlstate, info.value
        assert "pgsluice" in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    assert count(pg) == 20
    logged = pg.logfile.read_text(errors="replace")[offset:]
    assert marker.strip() not in logged


def test_reader_stays_read_only(pg: EmbeddedPostgres, guarded: ProxyHandle) -> None:
    """After every refused attempt to undo it, Postgres itself still enforces read-only on the
    reader's server connection, and what a reader may still do (asyncpg's set_config('jit'),
    transaction-level advisory locks) works."""
    with connect(guarded, "reader-bot") as conn:
        for sql in ("RESET ALL; SELECT 1", "SELECT set_config('transaction_read_only', 'off', false)"):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(sql)
        # over the extended protocol (a Parse) nothing would set the role's settings again
        for sql in ("RESET ALL", "DISCARD ALL", "/* x */ reset all"):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(sql, prepare=True)
        # a lone RESET ALL as a simple Query is followed at once by the role's settings again
        conn.execute("RESET ALL")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("SELECT set_config('jit', 'off', false)").fetchone() == ("off",)

        with conn.transaction():
            assert conn.execute("SELECT pg_advisory_xact_lock(42)").fetchone() == ("",)
            assert conn.execute("SELECT current_setting('transaction_read_only')").fetchone() == ("on",)


def test_reader_reads_with_row_cap(guarded: ProxyHandle) -> None:
    with connect(guarded, "reader-bot") as conn:
        assert len(conn.execute("SELECT * FROM guard_t ORDER BY id").fetchall()) == 5
        rows = conn.execute("SELECT * FROM guard_t ORDER BY id -- trailing comment").fetchall()
        assert rows[0] == (1, "v1") and len(rows) == 5
        assert len(conn.execute("SELECT * FROM guard_t LIMIT 100;").fetchall()) == 5
        assert len(conn.execute("SELECT id FROM guard_t UNION ALL SELECT id FROM guard_t").fetchall()) == 5
        assert conn.execute("SELECT count(*) FROM guard_t").fetchone() == (20,)
        assert conn.execute("SELECT * FROM guard_t WHERE id = %s", (3,)).fetchone() == (3, "v3")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2s",)


def test_refused_in_transaction_aborts_it(guarded: ProxyHandle) -> None:
    """As with any error from Postgres: the transaction block is aborted."""
    with connect(guarded, "writer-bot") as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO guard_t VALUES (100, 'new')")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("DELETE FROM guard_t")
        assert info.value.sqlstate == "42501"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM guard_t WHERE id = 100").fetchone() == (0,)


WRITER_CASES = [
    ("DELETE FROM guard_t", "42501"),
    ("UPDATE guard_t SET v = 'x'", "42501"),
    ("TRUNCATE guard_t", "42501"),
    ("DROP TABLE guard_t", "42501"),
    ("SELECT 1; DROP TABLE guard_t", "42501"),
    ("COPY guard_t FROM PROGRAM 'cat /etc/passwd'", "42501"),
    ("CREATE INDEX ON guard_t (v)", "42501"),
]


@pytest.mark.parametrize(("sql", "sqlstate"), WRITER_CASES, ids=[s for s, _ in WRITER_CASES])
def test_writer_rules(pg: EmbeddedPostgres, guarded: ProxyHandle, sql: str, sqlstate: str) -> None:
    with connect(guarded, "writer-bot") as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql)
        assert info.value.sqlstate == sqlstate
        conn.execute("UPDATE guard_t SET v = v WHERE id = 1")  # allowed: has a WHERE
    assert count(pg) == 20


async def test_extended_protocol_refusal(guarded: ProxyHandle) -> None:
    """asyncpg prepares every statement: the refusal arrives at Parse, the session goes on."""
    conn = await asyncpg.connect(guarded.dsn(), server_settings={"application_name": "reader-async"})
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("DELETE FROM guard_t WHERE id = $1", 1)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # not a write: the deny rule
            await conn.fetch("SELECT pg_sleep($1)", 1)
        rows = await conn.fetch("SELECT * FROM guard_t WHERE id > $1 ORDER BY id", 0)
        assert len(rows) == 5
        async with conn.transaction():
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("UPDATE guard_t SET v = 'x' WHERE id = 2")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def test_other_sessions_unaffected(guarded: ProxyHandle) -> None:
    with psycopg.connect(guarded.dsn(), application_name="someone-else", autocommit=True) as conn:
        assert len(conn.execute("SELECT * FROM guard_t").fetchall()) == 20
        conn.execute("UPDATE guard_t SET v = v")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)


def test_show_plan(guarded: ProxyHandle) -> None:
    """SHOW PLAN 'query' answers the planner's view as rows, under the session's role."""
    with connect(guarded, "reader-bot") as conn:
        rows = [r[0] for r in conn.execute("SHOW PLAN 'SELECT * FROM guard_t WHERE id = 5'").fetchall()]
        lines = dict(line.split(":", 1) for line in rows)
        assert len(lines["fingerprint"].strip()) == 32
        assert lines["canonical"].strip() == "SELECT * FROM guard_t WHERE id = $1"
        assert lines["rewrites"].strip() == "at most 5 rows (max_rows)"
        refused = [r[0] for r in conn.execute("show plan 'DELETE FROM guard_t';").fetchall()]
        assert any(r.startswith("verdict:     reject 25006 [read_only]") for r in refused), refused
    with psycopg.connect(guarded.dsn(), autocommit=True) as conn:  # no role: plan only
        rows = [r[0] for r in conn.execute("SHOW PLAN 'SELECT 1; SELECT 2'").fetchall()]
        assert "kind:        read (2 statements)" in rows and "verdict:     allow" in rows
        assert conn.execute("SHOW server_version").fetchone() is not None  # other SHOWs untouched


def test_cut_mode(pg: EmbeddedPostgres, proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    """max_rows_mode = "cut": any result stops at max_rows, with a NOTICE; the count in
    CommandComplete says how many rows were sent."""
    pg.psql("DROP TABLE IF EXISTS cut_t; CREATE TABLE cut_t (id int); "
            "INSERT INTO cut_t SELECT generate_series(1, 10)")
    path = tmp_path / "cut.toml"
    path.write_text('[pgsluice.roles.capped]\nmatch_application_names = ["capped"]\n'
                    'max_rows = 3\nmax_rows_mode = "cut"\n')
    proxy = proxy_factory("--config", str(path))
    notices: list[str] = []
    try:
        with psycopg.connect(proxy.dsn(), application_name="capped", autocommit=True) as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            cur = conn.execute("SELECT id FROM cut_t ORDER BY id")
            assert cur.fetchall() == [(1,), (2,), (3,)] and cur.rowcount == 3
            assert any("cut at 3 rows" in n for n in notices), notices
            notices.clear()
            cur = conn.execute("SELECT id FROM cut_t WHERE id <= 2 ORDER BY id")
            assert cur.fetchall() == [(1,), (2,)] and notices == []
            cur = conn.execute("SELECT id FROM cut_t WHERE id > %s ORDER BY id", (0,))  # extended protocol
            assert cur.fetchall() == [(1,), (2,), (3,)]
            cur = conn.execute("INSERT INTO cut_t SELECT generate_series(11, 15) RETURNING id")
            assert len(cur.fetchall()) == 3 and cur.rowcount == 3
        assert int(pg.psql("SELECT count(*) FROM cut_t")) == 15  # all inserted, 3 rows returned
    finally:
        pg.psql("DROP TABLE IF EXISTS cut_t")


async def test_asyncpg_pool_under_a_role(guarded: ProxyHandle) -> None:
    """asyncpg's pool resets connections with pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL (a simple Query) — allowed for a read-only role, whose settings come back at once."""
    pool = await asyncpg.create_pool(guarded.dsn(), min_size=1, max_size=2,
                                     server_settings={"application_name": "reader-pool"})
    try:
        for _ in range(4):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT count(*) FROM guard_t") == 20
                assert await conn.fetchval("SHOW statement_timeout") == "2s"
                assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await conn.execute("INSERT INTO guard_t VALUES (500, 'x')")
                await conn.execute("RESET ALL")
                assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await conn.execute("RESET ALL; SELECT 1")
    finally:
        await pool.close()
