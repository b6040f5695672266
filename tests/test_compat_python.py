"""Python drivers through pgsluice, many clients over few server connections, real Postgres.

Every driver here uses the extended protocol in its own way: asyncpg prepares named
statements (its statement cache), pipelines executemany and uses binary COPY; psycopg 3
prepares server-side after `prepare_threshold` executions (0: at once) and pipelines
executemany; psycopg2 interpolates client-side but uses server-side cursors and COPY.
With 50 clients on 5 server connections, consecutive statements of a client land on
different server connections, so prepared statements have to follow them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import pytest
from sqlalchemy import ForeignKey, String, create_engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

USER, DB = "alice", "app"
CLIENTS = 50
POOL = ("--pool-max-size", "5")
ROWS = 20  # executemany rows per client
COPY_ROWS = 50  # COPY rows per client
TS = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)


def proxy_dsn(proxy: ProxyHandle) -> str:
    return proxy.dsn(USER, PASSWORDS[USER], DB)


class Tables:
    """Two tables per test: `items` (worker, n, label) and `copied` (same shape, for COPY)."""

    def __init__(self, pg: EmbeddedPostgres, prefix: str) -> None:
        self.pg = pg
        self.items = f"{prefix}_items"
        self.copied = f"{prefix}_copied"

    def create(self) -> None:
        ddl = "(worker int NOT NULL, n int NOT NULL, label text NOT NULL, PRIMARY KEY (worker, n))"
        self.pg.psql(f"DROP TABLE IF EXISTS {self.items}, {self.copied};"
                     f"CREATE TABLE {self.items} {ddl}; CREATE TABLE {self.copied} {ddl};"
                     f"ALTER TABLE {self.items} OWNER TO {USER};"
                     f"ALTER TABLE {self.copied} OWNER TO {USER};", db=DB)  # fmt: skip

    def drop(self) -> None:
        self.pg.psql(f"DROP TABLE IF EXISTS {self.items}, {self.copied}", db=DB)

    def scalar(self, sql: str) -> str:
        return self.pg.psql(sql, db=DB).strip()

    def check_totals(self, clients: int = CLIENTS) -> None:
        """What every client left behind, counted straight on Postgres."""
        expected_items = "|".join(map(str, (clients * (ROWS + 2), clients, clients * 10)))
        got = self.scalar(f"SELECT count(*), count(DISTINCT worker), "
                          f"count(*) FILTER (WHERE label LIKE '%!') FROM {self.items}")  # fmt: skip
        assert got == expected_items
        got = self.scalar(f"SELECT count(*), count(DISTINCT worker), min(n), max(n) FROM {self.copied}")
        assert got == f"{clients * COPY_ROWS}|{clients}|0|{COPY_ROWS - 1}"


@pytest.fixture
def tables(pg: EmbeddedPostgres, request: pytest.FixtureRequest) -> Iterator[Tables]:
    name = request.node.name.removeprefix("test_")
    digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    t = Tables(pg, "py_" + "".join(c if c.isalnum() else "_" for c in name).lower()[:24] + digest)
    t.create()
    yield t
    t.drop()


def expected_series(i: int, count: int = 5) -> list[tuple[int, int, str]]:
    return [(g, i * g, f"w{i}-{g}") for g in range(1, count + 1)]


SERIES_SQL_DOLLAR = "SELECT g, $1::int * g, $2::text || g FROM generate_series(1, $3::int) AS g"
SERIES_SQL_PCT = "SELECT g, %s::int * g, %s::text || g FROM generate_series(1, %s::int) AS g"


def own(i: int) -> str:
    """A comment that makes a statement's text, hence its server-side name, unique to client i:
    such a statement exists only where this client prepared it, not on every server connection."""
    return f" /* client {i} */"


class Rollback(Exception):
    pass


# -- asyncpg --------------------------------------------------------------------------------

async def asyncpg_client(dsn: str, i: int, t: Tables, cache_size: int | None) -> None:
    kwargs: dict[str, Any] = {} if cache_size is None else {"statement_cache_size": cache_size}
    conn = await asyncpg.connect(dsn, **kwargs)
    try:
        # fetch with parameters, repeated: the cached statement is reused on other backends
        for _ in range(3):
            rows = await conn.fetch(SERIES_SQL_DOLLAR, i, f"w{i}-", 5)
            assert [tuple(r) for r in rows] == expected_series(i)
        row = await conn.fetchrow(
            "SELECT $1::numeric * 2 AS d, $2::timestamptz AS ts, $3::int[] AS arr, "
            "$4::jsonb ->> 'k' AS k, $5::text IS NULL AS isnull",
            Decimal("1.25") + i, TS, [i, -i], json.dumps({"k": f"v{i}"}), None)  # fmt: skip
        assert row is not None
        assert (row["d"], row["ts"], row["arr"], row["k"], row["isnull"]) == (
            (Decimal("1.25") + i) * 2, TS, [i, -i], f"v{i}", True)

        # conn.prepare: a named statement that outlives many backend changes
        stmt = await conn.prepare(f"SELECT n, label FROM {t.items} WHERE worker = $1 AND n < $2 ORDER BY n"
                                  + own(i))
        assert await stmt.fetch(i, 100) == []

        await conn.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES ($1, $2, $3)",
                               [(i, n, f"w{i}-{n}") for n in range(ROWS)])  # fmt: skip
        assert [tuple(r) for r in await stmt.fetch(i, 3)] == [(n, f"w{i}-{n}") for n in range(3)]
        assert await stmt.fetchval(i, 1000, column=0) == 0
        count_sql = f"SELECT count(*) FROM {t.items}{own(i)} WHERE worker = $1"
        assert await conn.fetchval(count_sql, i) == ROWS
        with pytest.raises(asyncpg.UniqueViolationError):  # executemany is atomic: all or nothing
            await conn.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES ($1, $2, $3)",
                                   [(i, 200, "x"), (i, 0, "dup"), (i, 201, "y")])  # fmt: skip
        assert await conn.fetchval(count_sql, i) == ROWS

        async with conn.transaction():
            status = await conn.execute(
                f"UPDATE {t.items} SET label = label || '!' WHERE worker = $1 AND n < 10", i)
            assert status == "UPDATE 10"
            assert await conn.fetchval(f"{count_sql} AND label LIKE '%!'", i) == 10
        with pytest.raises(Rollback):
            async with conn.transaction():
                await conn.execute(f"DELETE FROM {t.items} WHERE worker = $1", i)
                assert await conn.fetchval(count_sql, i) == 0
                raise Rollback
        assert await conn.fetchval(count_sql, i) == ROWS
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t.items} VALUES ($1, $2, 'dup')", i, 0)
        async with conn.transaction():  # a savepoint that fails inside a transaction that commits
            await conn.execute(f"INSERT INTO {t.items} VALUES ($1, 100, 'outer')", i)
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t.items} VALUES ($1, 100, 'dup')", i)
            await conn.execute(f"INSERT INTO {t.items} VALUES ($1, 101, 'after savepoint')", i)

        result = await conn.copy_records_to_table(
            t.copied, records=[(i, n, f"c{i}-{n}") for n in range(COPY_ROWS)],
            columns=["worker", "n", "label"])  # fmt: skip
        assert result == f"COPY {COPY_ROWS}"
        out = io.BytesIO()
        await conn.copy_from_query(f"SELECT n, label FROM {t.copied} WHERE worker = $1 ORDER BY n",
                                   i, output=out, format="csv")  # fmt: skip
        assert out.getvalue().decode() == "".join(f"{n},c{i}-{n}\n" for n in range(COPY_ROWS))

        rows = await stmt.fetch(i, 1000)
        assert [r["n"] for r in rows] == [*range(ROWS), 100, 101]
        assert rows[-1]["label"] == "after savepoint"
    finally:
        await conn.close()


@pytest.mark.parametrize(("cache_size", "proxy_args"), [
    (None, ()),
    (0, ()),
    # the proxy keeps at most 4 statements per server connection: constant LRU eviction
    (None, ("--max-prepared-statements", "4")),
], ids=["statement_cache_default", "statement_cache_0", "server_side_lru_4"])  # fmt: skip
async def test_asyncpg_many_clients(proxy_factory: ProxyFactory, tables: Tables,
                                    cache_size: int | None, proxy_args: tuple[str, ...]) -> None:  # fmt: skip
    proxy = proxy_factory(*POOL, *proxy_args)
    dsn = proxy_dsn(proxy)
    async with asyncio.TaskGroup() as tg:
        for i in range(CLIENTS):
            tg.create_task(asyncpg_client(dsn, i, tables, cache_size))
    tables.check_totals()


async def test_asyncpg_pool_many_tasks(proxy_factory: ProxyFactory, tables: Tables) -> None:
    """asyncpg's own Pool: 50 connections, and on every release its reset query
    (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL), which must not pin."""
    proxy = proxy_factory(*POOL)
    pool = await asyncpg.create_pool(proxy_dsn(proxy), min_size=CLIENTS, max_size=CLIENTS)
    try:
        async def task(k: int) -> None:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {tables.items} VALUES ($1, $2, $3)", k % CLIENTS,
                                       k // CLIENTS, f"t{k}")  # fmt: skip
                assert await conn.fetchval(f"SELECT label FROM {tables.items} WHERE worker = $1 AND n = $2",
                                           k % CLIENTS, k // CLIENTS) == f"t{k}"  # fmt: skip
            assert await pool.fetchval("SELECT $1::int * 2", k) == 2 * k

        async with asyncio.TaskGroup() as tg:
            for k in range(4 * CLIENTS):
                tg.create_task(task(k))
        assert pool.get_size() == CLIENTS
    finally:
        await pool.close()
    got = tables.scalar(f"SELECT count(*), count(DISTINCT worker) FROM {tables.items}")
    assert got == f"{4 * CLIENTS}|{CLIENTS}"


async def test_asyncpg_timeout_cancels_query(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """asyncpg's `timeout=` sends a CancelRequest with the key pgsluice gave it: the query must
    stop on Postgres and the connection stay usable."""
    proxy = proxy_factory("--pool-max-size", "2")
    conn = await asyncpg.connect(proxy_dsn(proxy))
    try:
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30) /* cancel me */", timeout=0.5)
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        async with conn.transaction():
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute("SET LOCAL statement_timeout = '200ms'; SELECT pg_sleep(30)")
        assert await conn.fetchval("SELECT 'still fine'") == "still fine"
    finally:
        await conn.close()
    running = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%cancel me%' "
                      "AND state = 'active' AND pid <> pg_backend_pid()")  # fmt: skip
    assert running.strip() == "0"


# -- psycopg 3 ------------------------------------------------------------------------------

def psycopg_kwargs(prepare_threshold: int | None) -> dict[str, Any]:
    return {} if prepare_threshold is None else {"prepare_threshold": prepare_threshold}


THRESHOLDS = pytest.mark.parametrize("prepare_threshold", [0, None],
                                     ids=["prepare_threshold_0", "prepare_threshold_default"])  # fmt: skip


async def psycopg_async_client(dsn: str, i: int, t: Tables, prepare_threshold: int | None) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, **psycopg_kwargs(prepare_threshold))
    async with conn:
        for _ in range(6):  # past the default threshold (5): prepared from then on
            cur = await conn.execute(SERIES_SQL_PCT, (i, f"w{i}-", 5))
            assert await cur.fetchall() == expected_series(i)
        for k in range(3):
            cur = await conn.execute("SELECT %s::int + %s::int, %s::timestamptz" + own(i), (i, k, TS),
                                     prepare=True)  # fmt: skip
            assert await cur.fetchone() == (i + k, TS)
        cur = await conn.execute("SELECT %s::jsonb ->> 'k', %s::numeric, %s::int[]",
                                 (json.dumps({"k": i}), Decimal("0.5"), [i, i]))  # fmt: skip
        assert await cur.fetchone() == (str(i), Decimal("0.5"), [i, i])

        async with conn.cursor() as cur:
            await cur.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES (%s, %s, %s)",
                                  [(i, n, f"w{i}-{n}") for n in range(ROWS)])  # fmt: skip
        count_sql = f"SELECT count(*) FROM {t.items}{own(i)} WHERE worker = %s"

        async def count(extra: str = "") -> int:
            cur = await conn.execute(count_sql + extra, (i,))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        assert await count() == ROWS
        with pytest.raises(psycopg.errors.UniqueViolation):  # one pipeline, one Sync: all or nothing
            async with conn.cursor() as cur:
                await cur.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES (%s, %s, %s)",
                                      [(i, 200, "x"), (i, 0, "dup"), (i, 201, "y")])  # fmt: skip
        assert await count() == ROWS
        async with conn.transaction():
            cur = await conn.execute(
                f"UPDATE {t.items} SET label = label || '!' WHERE worker = %s AND n < 10", (i,))
            assert cur.rowcount == 10
            assert await count(" AND label LIKE '%%!'") == 10
        async with conn.transaction():  # psycopg.Rollback: rolled back, not raised
            await conn.execute(f"DELETE FROM {t.items} WHERE worker = %s", (i,))
            assert await count() == 0
            raise psycopg.Rollback()
        assert await count() == ROWS
        with pytest.raises(psycopg.errors.UniqueViolation):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t.items} VALUES (%s, 0, 'dup')", (i,))
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {t.items} VALUES (%s, 100, 'outer')", (i,))
            with pytest.raises(psycopg.errors.UniqueViolation):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t.items} VALUES (%s, 100, 'dup')", (i,))
            await conn.execute(f"INSERT INTO {t.items} VALUES (%s, 101, 'after savepoint')", (i,))

        async with conn.pipeline():  # explicit pipeline: several queries, one Sync at the end
            c1 = await conn.execute("SELECT %s::int * 3", (i,))
            c2 = await conn.execute(f"SELECT max(n) FROM {t.items} WHERE worker = %s", (i,))
        assert await c1.fetchone() == (i * 3,)
        assert await c2.fetchone() == (101,)

        async with conn.cursor() as cur:
            async with cur.copy(f"COPY {t.copied} (worker, n, label) FROM STDIN") as copy:
                for n in range(COPY_ROWS):
                    await copy.write_row((i, n, f"c{i}-{n}"))
            assert cur.rowcount == COPY_ROWS
            got = []
            async with cur.copy(f"COPY (SELECT n, label FROM {t.copied} WHERE worker = {i} ORDER BY n) "
                                "TO STDOUT") as copy:  # fmt: skip
                copy.set_types(["int4", "text"])
                async for row in copy.rows():
                    got.append(row)
            assert got == [(n, f"c{i}-{n}") for n in range(COPY_ROWS)]
        cur = await conn.execute(f"SELECT n, label FROM {t.items} WHERE worker = %s ORDER BY n", (i,))
        rows = await cur.fetchall()
        assert [n for n, _ in rows] == [*range(ROWS), 100, 101]


@THRESHOLDS
async def test_psycopg_async_many_clients(proxy_factory: ProxyFactory, tables: Tables,
                                          prepare_threshold: int | None) -> None:  # fmt: skip
    proxy = proxy_factory(*POOL)
    dsn = proxy_dsn(proxy)
    async with asyncio.TaskGroup() as tg:
        for i in range(CLIENTS):
            tg.create_task(psycopg_async_client(dsn, i, tables, prepare_threshold))
    tables.check_totals()


def psycopg_sync_client(dsn: str, i: int, t: Tables, prepare_threshold: int | None) -> None:
    # Not autocommit: psycopg opens a transaction with the first statement; commit() ends it.
    with psycopg.connect(dsn, **psycopg_kwargs(prepare_threshold)) as conn:
        for _ in range(6):
            assert conn.execute(SERIES_SQL_PCT, (i, f"w{i}-", 5)).fetchall() == expected_series(i)
            conn.commit()
        for k in range(3):
            row = conn.execute("SELECT %s::int + %s::int, %s::timestamptz" + own(i), (i, k, TS),
                               prepare=True).fetchone()  # fmt: skip
            assert row == (i + k, TS)
            conn.commit()
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES (%s, %s, %s)",
                            [(i, n, f"w{i}-{n}") for n in range(ROWS)])  # fmt: skip
        conn.commit()
        count_sql = f"SELECT count(*) FROM {t.items}{own(i)} WHERE worker = %s"

        def count(extra: str = "") -> int:
            row = conn.execute(count_sql + extra, (i,)).fetchone()
            assert row is not None
            return int(row[0])

        with pytest.raises(psycopg.errors.UniqueViolation), conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES (%s, %s, %s)",
                            [(i, 200, "x"), (i, 0, "dup"), (i, 201, "y")])  # fmt: skip
        conn.rollback()
        assert count() == ROWS
        cur = conn.execute(f"UPDATE {t.items} SET label = label || '!' WHERE worker = %s AND n < 10", (i,))
        assert cur.rowcount == 10
        assert count(" AND label LIKE '%%!'") == 10
        conn.commit()
        conn.execute(f"DELETE FROM {t.items} WHERE worker = %s", (i,))
        assert count() == 0
        conn.rollback()
        assert count() == ROWS
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {t.items} VALUES (%s, 0, 'dup')", (i,))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        with conn.transaction():
            conn.execute(f"INSERT INTO {t.items} VALUES (%s, 100, 'outer')", (i,))
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute(f"INSERT INTO {t.items} VALUES (%s, 100, 'dup')", (i,))
            conn.execute(f"INSERT INTO {t.items} VALUES (%s, 101, 'after savepoint')", (i,))
        with conn.transaction(), conn.cursor(name=f"walk_{i}") as named:  # DECLARE + FETCH FORWARD
            named.itersize = 7
            named.execute(f"SELECT n, label FROM {t.items} WHERE worker = %s ORDER BY n", (i,))
            walked = list(named)
        assert [n for n, _ in walked] == [*range(ROWS), 100, 101]
        with conn.cursor() as cur:
            with pytest.raises(Rollback), cur.copy(f"COPY {t.copied} (worker, n, label) FROM STDIN") as copy:
                copy.write_row((i, -1, "sent, then CopyFail"))
                raise Rollback
            conn.rollback()
            with cur.copy(f"COPY {t.copied} (worker, n, label) FROM STDIN") as copy:
                for n in range(COPY_ROWS):
                    copy.write_row((i, n, f"c{i}-{n}"))
            conn.commit()
            with cur.copy(f"COPY (SELECT n, label FROM {t.copied} WHERE worker = {i} ORDER BY n) "
                          "TO STDOUT") as copy:  # fmt: skip
                copy.set_types(["int4", "text"])
                got = list(copy.rows())
            conn.commit()
        assert got == [(n, f"c{i}-{n}") for n in range(COPY_ROWS)]
        rows = conn.execute(f"SELECT n FROM {t.items} WHERE worker = %s ORDER BY n", (i,)).fetchall()
        assert [n for (n,) in rows] == [*range(ROWS), 100, 101]


def run_threads(fn: Callable[[int], None], count: int = CLIENTS) -> None:
    with ThreadPoolExecutor(max_workers=count) as ex:
        futures = [ex.submit(fn, i) for i in range(count)]
        errors = [exc for f in futures if (exc := f.exception()) is not None]
    if errors:
        raise errors[0]


@THRESHOLDS
def test_psycopg_sync_threads(proxy_factory: ProxyFactory, tables: Tables,
                              prepare_threshold: int | None) -> None:  # fmt: skip
    proxy = proxy_factory(*POOL)
    dsn = proxy_dsn(proxy)
    run_threads(lambda i: psycopg_sync_client(dsn, i, tables, prepare_threshold))
    tables.check_totals()


def libpq_unnamed_client(dsn: str, i: int) -> None:
    """libpq's PQprepare(conn, "", ...) then PQexecPrepared(conn, "", ...) in later round trips,
    as psql's `\\parse ''` + `\\bind_named ''` or JDBC-style drivers do: the unnamed statement
    must follow the client to whichever server connection runs the next Bind."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgconn = conn.pgconn
        res = pgconn.prepare(b"", f"SELECT $1::int + {i * 1000}{own(i)}".encode())
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK, res.error_message
        for k in range(10):
            res = pgconn.exec_prepared(b"", [str(k).encode()])
            assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
            assert res.get_value(0, 0) == str(i * 1000 + k).encode()
        res = pgconn.describe_prepared(b"")
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK, res.error_message
        assert res.nparams == 1 and res.nfields == 1


def test_libpq_unnamed_statement_threads(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(*POOL)
    dsn = proxy_dsn(proxy)
    run_threads(lambda i: libpq_unnamed_client(dsn, i), 30)


# -- psycopg2 -------------------------------------------------------------------------------

def psycopg2_client(dsn: str, i: int, t: Tables) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(SERIES_SQL_PCT, (i, f"w{i}-", 5))
            assert cur.fetchall() == expected_series(i)
            cur.execute("SELECT %s::numeric, %s::timestamptz, %s::text[]", (Decimal("2.5"), TS, ["a", "b"]))
            assert cur.fetchone() == (Decimal("2.5"), TS, ["a", "b"])
        conn.commit()
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {t.items} (worker, n, label) VALUES (%s, %s, %s)",
                            [(i, n, f"w{i}-{n}") for n in range(ROWS)])  # fmt: skip
            cur.execute(f"UPDATE {t.items} SET label = label || '!' WHERE worker = %s AND n < 10", (i,))
            assert cur.rowcount == 10
        conn.commit()
        # a server-side (named) cursor: DECLARE + FETCH FORWARD in batches, inside a transaction
        with conn.cursor(name=f"walk_{i}") as named:
            named.itersize = 7
            named.execute(f"SELECT n, label FROM {t.items} WHERE worker = %s ORDER BY n", (i,))
            walked = list(named)
        assert [n for n, _ in walked] == list(range(ROWS))
        assert walked[0][1] == f"w{i}-0!" and walked[-1][1] == f"w{i}-{ROWS - 1}"
        conn.commit()
        with conn.cursor() as cur:
            cur.execute(f"DELETE FROM {t.items} WHERE worker = %s", (i,))
            conn.rollback()
            cur.execute(f"SELECT count(*) FROM {t.items} WHERE worker = %s", (i,))
            assert cur.fetchone() == (ROWS,)
            conn.commit()
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute(f"INSERT INTO {t.items} VALUES (%s, 0, 'dup')", (i,))
            conn.rollback()
            cur.execute(f"INSERT INTO {t.items} VALUES (%s, 100, 'a'), (%s, 101, 'b')", (i, i))
            conn.commit()
            data = "".join(f"{i}\t{n}\tc{i}-{n}\n" for n in range(COPY_ROWS))
            cur.copy_expert(f"COPY {t.copied} (worker, n, label) FROM STDIN", io.StringIO(data))
            assert cur.rowcount == COPY_ROWS
            conn.commit()
            out = io.StringIO()
            cur.copy_expert(f"COPY (SELECT n, label FROM {t.copied} WHERE worker = {i} ORDER BY n) "
                            "TO STDOUT WITH (FORMAT csv)", out)  # fmt: skip
            conn.commit()
            assert out.getvalue() == "".join(f"{n},c{i}-{n}\n" for n in range(COPY_ROWS))
    finally:
        conn.close()


def test_psycopg2_threads(proxy_factory: ProxyFactory, tables: Tables) -> None:
    proxy = proxy_factory(*POOL)
    dsn = proxy_dsn(proxy)
    run_threads(lambda i: psycopg2_client(dsn, i, tables))
    tables.check_totals()


# -- SQLAlchemy 2 ORM -----------------------------------------------------------------------

def make_models(prefix: str) -> tuple[type[DeclarativeBase], Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"{prefix}_author"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(100), unique=True)
        books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")

    class Book(Base):
        __tablename__ = f"{prefix}_book"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(200))
        year: Mapped[int]
        author_id: Mapped[int] = mapped_column(ForeignKey(Author.id))
        author: Mapped[Author] = relationship(back_populates="books")

    return Base, Author, Book


LIBRARY = {"Le Guin": [("A Wizard of Earthsea", 1968), ("The Dispossessed", 1974)],
           "Lem": [("Solaris", 1961), ("His Master's Voice", 1968), ("Fiasco", 1986)],
           "Butler": [("Kindred", 1979)]}  # fmt: skip
SQLA_POOL = ("--pool-max-size", "3")
SQLA_WORKERS = 8


async def test_sqlalchemy_orm_asyncpg(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(*SQLA_POOL)
    base, author_cls, book_cls = make_models("sqla_apg")
    url = proxy_dsn(proxy).replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(url, pool_size=SQLA_WORKERS, max_overflow=0)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)
            await conn.run_sync(base.metadata.create_all)
        make_session = async_sessionmaker(engine, expire_on_commit=False)
        async with make_session() as session:
            for name, books in LIBRARY.items():
                session.add(author_cls(name=name, books=[book_cls(title=t, year=y) for t, y in books]))
            await session.commit()

        async def reader(k: int) -> None:
            async with make_session() as session:
                for _ in range(5):
                    stmt = (select(book_cls).join(book_cls.author).where(author_cls.name == "Lem")
                            .where(book_cls.year >= 1955 + k % 3).order_by(book_cls.year))  # fmt: skip
                    titles = (await session.scalars(stmt)).all()
                    assert [b.title for b in titles] == ["Solaris", "His Master's Voice", "Fiasco"]
                    with_books = selectinload(author_cls.books)
                    stmt2 = select(author_cls).options(with_books).order_by(author_cls.name)
                    authors = (await session.scalars(stmt2)).all()
                    assert {a.name: len(a.books) for a in authors} == {n: len(b) for n, b in LIBRARY.items()}
                    await session.commit()

        async with asyncio.TaskGroup() as tg:
            for k in range(SQLA_WORKERS):
                tg.create_task(reader(k))

        async with make_session() as session:
            le_guin = await session.scalar(select(author_cls).where(author_cls.name == "Le Guin")
                                           .options(selectinload(author_cls.books)))  # fmt: skip
            assert le_guin is not None
            assert [b.title for b in le_guin.books] == ["A Wizard of Earthsea", "The Dispossessed"]
            assert le_guin.books[1].author is le_guin
            session.add(book_cls(title="Not Written", year=2030, author_id=le_guin.id))
            await session.flush()
            assert await session.scalar(select(func.count()).select_from(book_cls)) == 7
            await session.rollback()
            assert await session.scalar(select(func.count()).select_from(book_cls)) == 6
            session.add(author_cls(name="Lem"))
            with pytest.raises(IntegrityError):
                await session.commit()
            await session.rollback()
            assert await session.scalar(select(func.count()).select_from(author_cls)) == 3
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)
    finally:
        await engine.dispose()


def test_sqlalchemy_orm_psycopg(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(*SQLA_POOL)
    base, author_cls, book_cls = make_models("sqla_pg3")
    url = proxy_dsn(proxy).replace("postgresql://", "postgresql+psycopg://", 1)
    # prepare_threshold=1: server-side prepared statements from the second execution on
    engine = create_engine(url, pool_size=SQLA_WORKERS, max_overflow=0,
                           connect_args={"prepare_threshold": 1})  # fmt: skip
    try:
        with engine.begin() as conn:
            base.metadata.drop_all(conn)
            base.metadata.create_all(conn)
        with Session(engine) as session:
            for name, books in LIBRARY.items():
                session.add(author_cls(name=name, books=[book_cls(title=t, year=y) for t, y in books]))
            session.commit()

        def reader(k: int) -> None:
            with Session(engine) as session:
                for _ in range(5):
                    stmt = (select(book_cls).join(book_cls.author).where(author_cls.name == "Lem")
                            .where(book_cls.year >= 1955 + k % 3).order_by(book_cls.year))  # fmt: skip
                    assert [b.title for b in session.scalars(stmt)] == [
                        "Solaris", "His Master's Voice", "Fiasco"]
                    authors = session.scalars(select(author_cls).order_by(author_cls.name)).all()
                    # lazy loading through the relationship
                    assert {a.name: len(a.books) for a in authors} == {n: len(b) for n, b in LIBRARY.items()}
                    session.commit()

        run_threads(reader, SQLA_WORKERS)

        with Session(engine) as session:
            le_guin = session.scalars(select(author_cls).where(author_cls.name == "Le Guin")).one()
            assert [b.title for b in le_guin.books] == ["A Wizard of Earthsea", "The Dispossessed"]
            assert le_guin.books[1].author is le_guin
            session.add(book_cls(title="Not Written", year=2030, author=le_guin))
            session.flush()
            assert session.scalar(select(func.count()).select_from(book_cls)) == 7
            session.rollback()
            assert session.scalar(select(func.count()).select_from(book_cls)) == 6
            session.add(author_cls(name="Lem"))
            with pytest.raises(IntegrityError):
                session.commit()
            session.rollback()
            assert session.scalar(select(func.count()).select_from(author_cls)) == 3
        with engine.begin() as conn:
            base.metadata.drop_all(conn)
    finally:
        engine.dispose()


# -- cached statements after a schema change ------------------------------------------------
# Postgres refuses to run a prepared statement whose result columns changed since it was
# prepared (0A000 "cached plan must not change result type"); a client recovers by preparing
# the same text again, which Postgres then plans afresh. asyncpg does so by itself.

async def asyncpg_sees_new_column(dsn: str, table: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int);"
                           f"INSERT INTO {table} VALUES (1)")  # fmt: skip
        assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}")] == [(1,)]
        await conn.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 7")
        # asyncpg gets InvalidCachedStatementError, drops its cache and prepares again
        rows = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table}")]
        await conn.execute(f"DROP TABLE {table}")
        return rows
    finally:
        await conn.close()


async def test_asyncpg_statement_cache_after_schema_change(pg: EmbeddedPostgres,
                                                           proxy_factory: ProxyFactory) -> None:  # fmt: skip
    assert await asyncpg_sees_new_column(pg.dsn(USER, PASSWORDS[USER], DB), "py_schema_apg") == [(1, 7)]
    proxy = proxy_factory("--pool-max-size", "1")
    assert await asyncpg_sees_new_column(proxy_dsn(proxy), "py_schema_apg") == [(1, 7)]


def psycopg_new_client_sees_new_column(dsn: str, table: str) -> list[tuple[Any, ...]]:
    """One client prepares `SELECT *`, the table gains a column, then a *new* connection
    prepares the same text: against Postgres it simply gets the new shape."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (a int)")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
    with psycopg.connect(dsn, autocommit=True) as first:
        assert first.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [(1,)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 7")
    try:
        with psycopg.connect(dsn, autocommit=True) as second:
            return second.execute(f"SELECT * FROM {table}", prepare=True).fetchall()
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")


def test_psycopg_new_client_after_schema_change(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    assert psycopg_new_client_sees_new_column(pg.dsn(USER, PASSWORDS[USER], DB), "py_schema_pg3") == [(1, 7)]
    proxy = proxy_factory("--pool-max-size", "1")
    assert psycopg_new_client_sees_new_column(proxy_dsn(proxy), "py_schema_pg3") == [(1, 7)]
