"""Shared set-up for the cache tests: a database with the change feed, pg_stat_statements and
a few tables, and helpers to read pgsluice's SHOW CACHE and upstream call counts."""

from __future__ import annotations

import time

import psycopg2

from proxy.ops.embedded import EmbeddedPostgres
from tests.util import PASSWORDS, ProxyHandle, wait_until

SCHEMA = """
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 200) g;
CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counters SELECT g, 0 FROM generate_series(1, 20) g;
CREATE TABLE moments (id int PRIMARY KEY, at timestamptz NOT NULL);
INSERT INTO moments VALUES (1, '2024-03-10 12:34:56.789+00');
CREATE TABLE notes (id serial PRIMARY KEY, owner name NOT NULL DEFAULT current_user, body text);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_notes ON notes USING (owner = current_user);
GRANT SELECT, INSERT ON notes TO alice, bob;
GRANT USAGE ON SEQUENCE notes_id_seq TO alice, bob;
GRANT SELECT ON items, moments TO alice, bob;
GRANT SELECT ON items TO trusted_user;
CREATE SEQUENCE leader_runs;
GRANT USAGE, UPDATE ON SEQUENCE leader_runs TO trusted_user;
CREATE FUNCTION slow_answer(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM nextval('leader_runs'); PERFORM pg_sleep(1); RETURN x * 2; END $$;
CREATE FUNCTION slow_failure(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM nextval('leader_runs'); PERFORM pg_sleep(1);
  RAISE EXCEPTION 'slow failure %', x USING ERRCODE = '22012'; END $$;
"""


def create(pg: EmbeddedPostgres, database: str) -> None:
    """A fresh database `database` with SCHEMA and the change feed installed."""
    pg.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE); CREATE DATABASE {database};")
    pg.psql(f"GRANT CONNECT ON DATABASE {database} TO alice, bob, trusted_user;", db=database)
    with psycopg2.connect(pg.dsn(database=database)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
            from cache.feed import INSTALL
            cur.execute(INSTALL)


def connect(target: EmbeddedPostgres | ProxyHandle, database: str, user: str = "postgres",
            **kw: str) -> psycopg2.extensions.connection:
    """psycopg2 (simple protocol), autocommit."""
    password = PASSWORDS[user]
    dsn = target.dsn(user=user, password=password, database=database)
    conn = psycopg2.connect(dsn, **kw)
    conn.autocommit = True
    return conn


def show_cache(proxy: ProxyHandle, database: str) -> dict[str, str]:
    with connect(proxy, database) as conn, conn.cursor() as cur:
        cur.execute("SHOW CACHE")
        out = dict(cur.fetchall())
    conn.close()
    return out


def calls(pg: EmbeddedPostgres, database: str, like: str) -> int:
    """How many times Postgres ran statements whose normalized text contains `like`."""
    with psycopg2.connect(pg.dsn(database=database)) as conn, conn.cursor() as cur:
        cur.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
                    "ON d.oid = s.dbid WHERE d.datname = %s AND s.query LIKE %s", (database, f"%{like}%"))
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0])


def _feed_up(rows: dict[str, str], database: str) -> bool:
    return rows.get(f"change_feed {database}", "").startswith("up") and \
        rows.get(f"catalog {database}", "").startswith("loaded")


def start_feed(proxy: ProxyHandle, database: str) -> None:
    """Open one connection to `database` through pgsluice (that starts its planner and change
    feed) and wait until the feed is up."""
    connect(proxy, database).close()
    wait_feed(proxy, database)


def wait_feed(proxy: ProxyHandle, database: str, timeout: float = 10.0) -> None:
    """Until pgsluice's change feed for `database` is up (the first connection starts it)."""
    wait_until(lambda: _feed_up(show_cache(proxy, database), database), timeout, 0.05,
               message=f"change feed of {database} up")


def wait_feed_on(conn: psycopg2.extensions.connection, database: str, timeout: float = 10.0) -> None:
    """wait_feed, through one open connection (so: its worker)."""
    def up() -> bool:
        with conn.cursor() as cur:
            cur.execute("SHOW CACHE")
            return _feed_up(dict(cur.fetchall()), database)
    wait_until(up, timeout, 0.05, message=f"change feed of {database} up on this connection")


def worker_of(conn: psycopg2.extensions.connection) -> int:
    """The pid of the pgsluice worker serving `conn`."""
    with conn.cursor() as cur:
        cur.execute("SHOW CACHE")
        return int(dict(cur.fetchall())["worker_pid"])


def on_every_worker(proxy: ProxyHandle, database: str, workers: int = 2,
                    total: int = 2) -> list[psycopg2.extensions.connection]:
    """`total` connections (at least `workers`), the first `workers` of them each on another
    worker. The kernel spreads new connections over the workers that listen; the harness only
    waits for the first worker, so on a busy machine the others may still be starting."""
    by_worker: dict[int, list[psycopg2.extensions.connection]] = {}
    for n in range(400):
        if len(by_worker) == workers and n >= total:
            break
        if n and n % 20 == 0:
            time.sleep(0.2)
        conn = connect(proxy, database)
        by_worker.setdefault(worker_of(conn), []).append(conn)
    every = [conns[0] for conns in by_worker.values()]
    rest = [c for conns in by_worker.values() for c in conns[1:]]
    keep = every + rest[:max(0, total - len(every))]
    for conn in rest[len(keep) - len(every):]:
        conn.close()
    assert len(by_worker) == workers, f"connections reached {len(by_worker)} of {workers} workers"
    return keep
