"""The change feed: writes that do not pass through pgsluice still bump table versions.

Mechanism (chosen over logical decoding): a statement-level AFTER trigger on every user
table calls pg_notify('pgsluice_changes', 'schema.table'), and an event trigger notifies
'*' after any DDL (and puts the trigger on tables created later). Why:

* it works on any Postgres as it is: logical decoding needs wal_level = logical (a
  restart) and a slot that retains WAL for as long as pgsluice is away;
* NOTIFY is transactional: it is delivered at COMMIT, never for a rolled-back write, and
  identical payloads in one transaction are folded, so a bulk write is one message;
* LISTEN pushes: no polling interval adds to the staleness window.

The cost is one trigger call per write *statement* (not per row). `install_sql()` is what
`pgsluice install-change-feed` runs; it is idempotent. The listener (`ChangeFeed`) holds one
asyncpg connection per database; while it is down, reads of the tables it covers bypass the
cache, and when it is back every version of that database is bumped (notifications may have
been missed in between).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

log = logging.getLogger("pgsluice.cache.feed")

CHANNEL = "pgsluice_changes"
CLUSTER_WIDE = frozenset(f"pg_catalog.{name}" for name in (
    "pg_authid", "pg_auth_members", "pg_roles", "pg_user", "pg_shadow", "pg_group", "pg_database",
    "pg_db_role_setting", "pg_tablespace", "pg_shdescription", "pg_shdepend", "pg_shseclabel",
    "pg_replication_origin", "pg_subscription", "pg_parameter_acl"))
TRIGGER = "pgsluice_change_feed"

INSTALL = f"""
CREATE SCHEMA IF NOT EXISTS pgsluice;
-- the triggers run as whoever writes or creates a table
GRANT USAGE ON SCHEMA pgsluice TO PUBLIC;

CREATE OR REPLACE FUNCTION pgsluice.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', pg_backend_pid() || ' ' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsluice.watch(rel regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = '{TRIGGER}') THEN
    EXECUTE format('CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE'
                   ' ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgsluice.notify_change()', rel);
    -- also for logical replication's apply and session_replication_role = replica
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER {TRIGGER}', rel);
  END IF;
END $$;

CREATE OR REPLACE FUNCTION pgsluice.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands()
           WHERE command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
             AND object_type = 'table' AND schema_name NOT LIKE 'pg_temp%' LOOP
    PERFORM pgsluice.watch(r.objid::regclass);
  END LOOP;
  PERFORM pg_notify('{CHANNEL}', '*');
END $$;

CREATE OR REPLACE FUNCTION pgsluice.on_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', '*');
END $$;

DROP EVENT TRIGGER IF EXISTS pgsluice_ddl;
CREATE EVENT TRIGGER pgsluice_ddl ON ddl_command_end EXECUTE FUNCTION pgsluice.on_ddl();
DROP EVENT TRIGGER IF EXISTS pgsluice_drop;
CREATE EVENT TRIGGER pgsluice_drop ON sql_drop EXECUTE FUNCTION pgsluice.on_drop();

SELECT pgsluice.watch(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgsluice')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%';
"""

UNINSTALL = """
DROP EVENT TRIGGER IF EXISTS pgsluice_ddl;
DROP EVENT TRIGGER IF EXISTS pgsluice_drop;
DROP SCHEMA IF EXISTS pgsluice CASCADE;
"""

_COVERED = f"""
SELECT n.nspname || '.' || c.relname
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgname = '{TRIGGER}' AND t.tgenabled <> 'D'
"""
_EVENT_TRIGGERS = "SELECT count(*) FROM pg_event_trigger WHERE evtname IN ('pgsluice_ddl', 'pgsluice_drop')" \
    " AND evtenabled <> 'D'"


async def install(conn: asyncpg.Connection) -> int:
    """Install (or refresh) the feed in conn's database; returns the number of tables watched."""
    await conn.execute(INSTALL)
    return len(await conn.fetch(_COVERED))


async def uninstall(conn: asyncpg.Connection) -> None:
    await conn.execute(UNINSTALL)


Connect = Callable[[], Awaitable[asyncpg.Connection]]


class ChangeFeed:
    """LISTENs on one database; calls `on_change(tables)` ("*" = everything) for each write."""

    def __init__(self, database: str, connect: Connect, on_change: Callable[[str, list[str], int], None],
                 check_interval: float = 1.0) -> None:
        self.database = database
        self.connect = connect
        self.on_change = on_change
        self.check_interval = check_interval
        self.up = False
        self.installed = False  # the event triggers exist: catalog and new tables are covered
        self.covered: frozenset[str] = frozenset()
        self.notifications = 0
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._refresh: asyncio.Event | None = None

    def covers(self, tables: frozenset[str]) -> bool:
        """Whether the feed is up and sees every write to all of `tables`. The catalog is
        covered by the event triggers (any DDL bumps everything), except what roles and
        databases change: those are cluster-wide objects, no event trigger fires for them."""
        if not self.up or not self.installed:
            return False
        covered = self.covered
        return all(t in covered or (t.startswith(("pg_catalog.", "information_schema."))
                                    and t not in CLUSTER_WIDE and "role" not in t) for t in tables)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.up = False

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self.up:
                    log.warning("change feed of %s lost: %s", self.database, exc)
            finally:
                self._set_down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _set_down(self) -> None:
        self.up = False
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _listen(self) -> None:
        async with asyncio.timeout(10):
            conn = self._conn = await self.connect()
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_lost(_conn: object) -> None:
                if not lost.done():
                    lost.set_result(None)

            conn.add_termination_listener(on_lost)
            await conn.add_listener(CHANNEL, self._notified)
            await self._load_coverage(conn)
        self._refresh = asyncio.Event()
        if not self.installed and not self.reconnects:
            log.warning("no change feed in database %s: its reads are not cached (run "
                        "`pgsluice install-change-feed --database %s`, or set cache_requires_feed = "
                        "false to cache with the TTL as the only bound for outside writes)",
                        self.database, self.database)
        # anything may have changed while we were not listening
        self.on_change(self.database, ["*"], 0)
        self.up = True
        if self.reconnects:
            log.warning("change feed of %s is back", self.database)
        self.reconnects += 1
        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                if waiter is None:
                    waiter = asyncio.ensure_future(self._refresh.wait())
                await asyncio.wait([lost, waiter], timeout=self.check_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    break
                async with asyncio.timeout(max(self.check_interval * 2, 1.0)):
                    if waiter.done():
                        waiter = None
                        self._refresh = asyncio.Event()
                        await self._load_coverage(conn)
                    else:
                        await conn.fetchval("SELECT 1")  # a dead connection shows here
        finally:
            if waiter is not None:
                waiter.cancel()
        raise ConnectionError("change feed connection closed")

    async def _load_coverage(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(_COVERED)
        self.covered = frozenset(r[0] for r in rows)
        was, self.installed = self.installed, bool(await conn.fetchval(_EVENT_TRIGGERS))
        if was and not self.installed:
            self.on_change(self.database, ["*"], 0)  # removed: nothing cached so far is trusted

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        assert isinstance(payload, str)
        self.notifications += 1
        if payload == "*" and self._refresh is not None:
            self._refresh.set()  # DDL: tables may have appeared or gone
        pid, _, table = payload.partition(" ")
        if not pid.isdigit():  # "*", or a trigger from an older install
            pid, table = "0", payload
        self.on_change(self.database, [table], int(pid))
