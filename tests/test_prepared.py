"""Protocol-level prepared statements under transaction pooling, driven through libpq.

psycopg with libpq < 17 evicts statements from its cache with `DEALLOCATE name`; through
pgsluice that name is the client's, not the server-side one, and it must neither fail nor
pin the client to its server connection.
"""

from __future__ import annotations

import psycopg
from psycopg import pq

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import ProxyFactory

Outcome = tuple[str, str | None, bytes | None, list[bytes | None]]


def _outcome(res: pq.abc.PGresult) -> Outcome:
    values = [res.get_value(0, c) for c in range(res.nfields)] if res.ntuples else []
    sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
    return (pq.ExecStatus(res.status).name, sqlstate.decode() if sqlstate else None,
            res.command_status, values)  # fmt: skip


def deallocate_session(dsn: str, other: psycopg.Connection | None = None) -> list[Outcome]:
    """Prepare, use and DEALLOCATE statements by name; `other` (another client) runs a
    query between steps, which fails with 53300 if this client were pinned on a pool of 1."""
    seen: list[Outcome] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgc = conn.pgconn

        def step(res: pq.abc.PGresult) -> None:
            seen.append(_outcome(res))
            if other is not None:
                assert other.execute("SELECT 1").fetchone() == (1,)

        step(pgc.prepare(b"my_stmt", b"SELECT $1::int + 1"))
        step(pgc.exec_prepared(b"my_stmt", [b"41"]))
        step(pgc.exec_(b"DEALLOCATE my_stmt"))
        step(pgc.exec_prepared(b"my_stmt", [b"1"]))  # 26000: it is gone
        step(pgc.prepare(b"Mixed Case", b"SELECT 'x'::text"))
        step(pgc.exec_(b'DEALLOCATE PREPARE "Mixed Case";'))
        step(pgc.exec_(b"DEALLOCATE nope"))  # 26000: never existed
        step(pgc.prepare(b"my_stmt", b"SELECT $1::int * 2"))  # the name is free again
        step(pgc.exec_prepared(b"my_stmt", [b"21"]))
        step(pgc.exec_(b"DEALLOCATE ALL"))
        step(pgc.exec_prepared(b"my_stmt", [b"1"]))
    return seen


def test_deallocate_by_name_matches_postgres(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    direct = deallocate_session(pg.dsn())
    assert direct[1][3] == [b"42"] and direct[2][2] == b"DEALLOCATE" and direct[3][1] == "26000"
    proxy = proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "1")
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert deallocate_session(proxy.dsn(), other) == direct


def duplicate_name_session(dsn: str) -> list[Outcome]:
    """A statement name stays taken until it is closed: a second Parse under it fails with
    42P05 and the first statement is still the one that runs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgc = conn.pgconn
        seen = [_outcome(pgc.prepare(b"dup", b"SELECT 1")),
                _outcome(pgc.prepare(b"dup", b"SELECT 2")),
                _outcome(pgc.exec_prepared(b"dup", [])),
                _outcome(pgc.exec_(b"DEALLOCATE dup")),
                _outcome(pgc.prepare(b"dup", b"SELECT 3")),
                _outcome(pgc.exec_prepared(b"dup", []))]
    return seen


def test_duplicate_statement_name_matches_postgres(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    direct = duplicate_name_session(pg.dsn())
    assert direct[1][1] == "42P05" and direct[2][3] == [b"1"] and direct[5][3] == [b"3"]
    proxy = proxy_factory("--pool-max-size", "1")
    assert duplicate_name_session(proxy.dsn()) == direct


def execute_session(dsn: str, other: psycopg.Connection | None = None) -> list[Outcome]:
    """SQL EXECUTE of statements prepared over the protocol, as a simple Query and inside
    another prepared statement; `other` runs queries in between, so that through a pool of two
    the client's next transaction may land on the other server connection."""
    seen: list[Outcome] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgc = conn.pgconn

        def step(res: pq.abc.PGresult) -> None:
            seen.append(_outcome(res))
            if other is not None:
                with other.transaction():
                    assert other.execute("SELECT 1").fetchone() == (1,)

        step(pgc.prepare(b"foobar", b"SELECT $1::int * 2"))
        step(pgc.exec_(b"EXECUTE foobar(21)"))
        step(pgc.exec_(b"execute FOOBAR (4);"))
        step(pgc.prepare(b"Quoted Name", b"SELECT 'q'::text"))
        step(pgc.exec_(b'EXECUTE "Quoted Name"'))
        step(pgc.exec_(b"EXECUTE nope"))  # 26000
        step(pgc.prepare(b"outer", b"EXECUTE foobar(5)"))  # a statement that executes another
        step(pgc.exec_prepared(b"outer", []))
        step(pgc.exec_params(b"EXECUTE foobar(6)", []))  # the unnamed statement
        step(pgc.exec_(b"DEALLOCATE foobar"))
        step(pgc.exec_(b"EXECUTE foobar(1)"))  # 26000: gone
    return seen


def test_sql_execute_of_protocol_statement(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """asyncpg's test_prepare_explicitly_named: prepare(name='foobar') then EXECUTE foobar."""
    direct = execute_session(pg.dsn())
    assert direct[1][3] == [b"42"] and direct[7][3] == [b"10"] and direct[5][1] == "26000"
    proxy = proxy_factory("--pool-max-size", "2", "--pool-acquire-timeout", "2")
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert execute_session(proxy.dsn(), other) == direct
