"""The change feed: writes that do not pass through pgsluice still bump table versions.

Mechanism (chosen over logical decoding): statement-level AFTER triggers on every user table
(one per INSERT, UPDATE, DELETE and TRUNCATE) call pg_notify('pgsluice_changes', JSON), and an
event trigger notifies '*' after any DDL (and puts the triggers on tables created later). Why:

* it works on any Postgres as it is: logical decoding needs wal_level = logical (a
  restart) and a slot that retains WAL for as long as pgsluice is away;
* NOTIFY is transactional: it is delivered at COMMIT, never for a rolled-back write, and
  identical payloads in one transaction are folded;
* LISTEN pushes: no polling interval adds to the staleness window.

A notification says what changed as finely as stays cheap: the operation (so a foreign key's
closure follows the write that ran: an UPDATE that assigns no referenced column cascades
nowhere); from the transition tables of a statement of at most SMALL rows, the primary key
values it touched; for an UPDATE of one row, the columns whose text changed. A larger statement
reports only the operation (cache/deps.py: its table's reads of that kind). A statement that
changed no row says nothing. Payload:

    {"p": writer pid, "o": "I"|"U"|"D"|"T", "s": schema, "t": table,
     "c": [columns changed] (U of one row), "m": a key may have changed (U),
     "kc": [key columns], "k": [[key]...]}

A write made through pgsluice is known by its writer's pid (one of our server connections, in
any worker) and not bumped again: its session bumped it, as finely as the planner saw it.

The cost is one trigger call per write statement (not per row), plus the transition tables
Postgres fills for it (README, "Change feed": measured with loadtest/feed_cost.py). INSTALL is
what `pgsluice install-change-feed` runs; it is idempotent and replaces the one-trigger feed of
earlier versions. The listener (`ChangeFeed`) holds one asyncpg connection per database; while it is
down, reads of the tables it covers bypass the cache, and when it is back every version of that
database is bumped (notifications may have been missed in between).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

log = logging.getLogger("pgsluice.cache.feed")

CHANNEL = "pgsluice_changes"
CLUSTER_WIDE = frozenset(f"pg_catalog.{name}" for name in (
    "pg_authid", "pg_auth_members", "pg_roles", "pg_user", "pg_shadow", "pg_group", "pg_database",
    "pg_db_role_setting", "pg_tablespace", "pg_shdescription", "pg_shdepend", "pg_shseclabel",
    "pg_replication_origin", "pg_subscription", "pg_parameter_acl"))
LEGACY_TRIGGER = "pgsluice_change_feed"  # the one trigger of earlier versions (schema.table payload)
TRIGGERS = ("pgsluice_feed_insert", "pgsluice_feed_update", "pgsluice_feed_delete", "pgsluice_feed_truncate")
SMALL = 64  # rows: up to this many, a statement's keys (and changed columns) are reported

# a row's key: its primary key's values (the trigger's arguments name the columns), as JSON
_KEY = ("CASE WHEN TG_NARGS = 1 THEN jsonb_build_array(to_jsonb(r) -> TG_ARGV[0]) ELSE "
        "(SELECT jsonb_agg(to_jsonb(r) -> a ORDER BY i) FROM unnest(TG_ARGV) WITH ORDINALITY u(a, i)) END")
PAYLOAD_KEYS = 7000  # bytes of keys at most: NOTIFY takes 8000

INSTALL = f"""
CREATE SCHEMA IF NOT EXISTS pgsluice;
-- the triggers run as whoever writes or creates a table
GRANT USAGE ON SCHEMA pgsluice TO PUBLIC;
DROP FUNCTION IF EXISTS pgsluice.notify_change() CASCADE;  -- the one-trigger feed of earlier versions

-- One SQL statement per trigger call (each costs a writer a few tens of microseconds). The key
-- of a row: its primary key's columns (the trigger's arguments) as a JSON array.
CREATE OR REPLACE FUNCTION pgsluice.notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', CASE
      WHEN n <= {SMALL} AND TG_NARGS > 0 AND octet_length(k::text) < {PAYLOAD_KEYS} THEN
        json_build_object('p', pg_backend_pid(), 'o', 'I', 's', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME,
                          'kc', TG_ARGV, 'k', k)::text
      ELSE json_build_object('p', pg_backend_pid(), 'o', 'I', 's', TG_TABLE_SCHEMA,
                             't', TG_TABLE_NAME)::text END)
  FROM (SELECT count(*) AS n, jsonb_agg(DISTINCT {_KEY}) AS k
        FROM (SELECT * FROM pgsluice_new LIMIT {SMALL + 1}) r) x
  WHERE n > 0;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsluice.notify_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', CASE
      WHEN n <= {SMALL} AND TG_NARGS > 0 AND octet_length(k::text) < {PAYLOAD_KEYS} THEN
        json_build_object('p', pg_backend_pid(), 'o', 'D', 's', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME,
                          'kc', TG_ARGV, 'k', k)::text
      ELSE json_build_object('p', pg_backend_pid(), 'o', 'D', 's', TG_TABLE_SCHEMA,
                             't', TG_TABLE_NAME)::text END)
  FROM (SELECT count(*) AS n, jsonb_agg(DISTINCT {_KEY}) AS k
        FROM (SELECT * FROM pgsluice_old LIMIT {SMALL + 1}) r) x
  WHERE n > 0;
  RETURN NULL;
END $$;

-- An UPDATE of one row: the columns whose text changed (so 1.0 -> 1.00 and 0 -> -0 count),
-- whether its key changed, its key before and after. Of a few rows: their keys (which columns,
-- not worked out). Of more: the operation.
CREATE OR REPLACE FUNCTION pgsluice.notify_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', coalesce(CASE
      WHEN n = 1 AND TG_NARGS > 0 THEN (
        SELECT json_build_object('p', pg_backend_pid(), 'o', 'U', 's', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME,
          'c', (SELECT coalesce(json_agg(e.key), '[]') FROM json_each_text(oj) e
                WHERE e.value IS DISTINCT FROM nj ->> e.key),
          'm', ok <> nk, 'kc', TG_ARGV,
          'k', CASE WHEN ok = nk THEN jsonb_build_array(ok) ELSE jsonb_build_array(ok, nk) END)::text
        FROM (SELECT row_to_json(r) AS oj, {_KEY} AS ok FROM pgsluice_old r) o,
             (SELECT row_to_json(r) AS nj, {_KEY} AS nk FROM pgsluice_new r) w)
      WHEN n <= {SMALL} AND TG_NARGS > 0 THEN (
        SELECT CASE WHEN octet_length(k::text) < {PAYLOAD_KEYS} THEN
          json_build_object('p', pg_backend_pid(), 'o', 'U', 's', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME,
                            'm', true, 'kc', TG_ARGV, 'k', k)::text END
        FROM (SELECT jsonb_agg(DISTINCT x.k) AS k
              FROM (SELECT {_KEY} AS k FROM pgsluice_old r UNION SELECT {_KEY} FROM pgsluice_new r) x) y)
    END, json_build_object('p', pg_backend_pid(), 'o', 'U', 's', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME)::text))
  FROM (SELECT count(*) AS n FROM (SELECT 1 FROM pgsluice_new LIMIT {SMALL + 1}) r) x
  WHERE n > 0;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsluice.notify_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', json_build_object('p', pg_backend_pid(), 'o', 'T', 's', TG_TABLE_SCHEMA,
                                                   't', TG_TABLE_NAME)::text);
  RETURN NULL;
END $$;

-- Put the four triggers on a table, with its primary key's columns as their arguments; made
-- again when the key changed (ALTER TABLE reaches here through the event trigger).
CREATE OR REPLACE FUNCTION pgsluice.watch(rel regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  keycols text[]; args text; wanted bytea; op text; event text; refs text;
BEGIN
  SELECT array_agg(a.attname::text ORDER BY k.ord) INTO keycols
  FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
  WHERE i.indrelid = rel AND i.indisprimary;
  keycols := coalesce(keycols, '{{}}');
  SELECT coalesce(string_agg(quote_literal(c), ', '), ''),
         coalesce(string_agg(convert_to(c, 'UTF8') || '\\x00'::bytea, ''::bytea), ''::bytea)
    INTO args, wanted FROM unnest(keycols) c;
  IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = '{LEGACY_TRIGGER}') THEN
    EXECUTE format('DROP TRIGGER {LEGACY_TRIGGER} ON %s', rel);
  END IF;
  FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
    CONTINUE WHEN EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'pgsluice_feed_' || op
                           AND (op = 'truncate' OR tgargs = wanted));
    event := upper(op);
    refs := CASE op WHEN 'insert' THEN 'REFERENCING NEW TABLE AS pgsluice_new'
                    WHEN 'delete' THEN 'REFERENCING OLD TABLE AS pgsluice_old'
                    WHEN 'update' THEN 'REFERENCING OLD TABLE AS pgsluice_old NEW TABLE AS pgsluice_new'
                    ELSE '' END;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'pgsluice_feed_' || op) THEN
      EXECUTE format('DROP TRIGGER %I ON %s', 'pgsluice_feed_' || op, rel);  -- its key changed
    END IF;
    EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION pgsluice.%I(%s)',
                   'pgsluice_feed_' || op, event, rel, refs, 'notify_' || op,
                   CASE WHEN op = 'truncate' THEN '' ELSE args END);
    -- also for logical replication's apply and session_replication_role = replica
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', rel, 'pgsluice_feed_' || op);
  END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgsluice.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands()
           WHERE command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
             AND object_type = 'table' AND schema_name NOT LIKE 'pg_temp%'
             AND schema_name <> 'pgsluice' LOOP
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = r.objid AND relkind IN ('r', 'p')) THEN
      PERFORM pgsluice.watch(r.objid::regclass);
    END IF;
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
-- running pgsluice instances read the coverage again (and start caching) at once
SELECT pg_notify('{CHANNEL}', '*');
"""

UNINSTALL = """
DROP EVENT TRIGGER IF EXISTS pgsluice_ddl;
DROP EVENT TRIGGER IF EXISTS pgsluice_drop;
DROP SCHEMA IF EXISTS pgsluice CASCADE;
SELECT pg_notify('pgsluice_changes', '*');
"""

_COVERED = f"""
SELECT n.nspname || '.' || c.relname
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgenabled <> 'D' AND t.tgname IN ({", ".join(f"'{name}'" for name in TRIGGERS)})
GROUP BY 1 HAVING count(*) = {len(TRIGGERS)}
UNION
SELECT n.nspname || '.' || c.relname
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgenabled <> 'D' AND t.tgname = '{LEGACY_TRIGGER}'
UNION  -- a view's rows are its tables' (read through it); it and a materialized view change by DDL
SELECT n.nspname || '.' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
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
OPS = {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}


@dataclass(frozen=True, slots=True)
class Change:
    """One notification. `op`: insert / update / delete / truncate, "table" (an earlier
    version's trigger: any write) or "*" (DDL, or a gap: everything). `columns`: an UPDATE's
    changed columns when reported; `moved`: a key changed; `keys`: key values (JSON), with the
    key's columns as the trigger knew them (the caller checks they are still the key)."""

    op: str
    table: str = ""
    pid: int = 0
    columns: frozenset[str] | None = None
    moved: bool = False
    key_columns: tuple[str, ...] = ()
    keys: tuple[tuple[object, ...], ...] | None = None


EVERYTHING = Change("*")


def parse_payload(payload: str) -> Change:
    """A notification's payload; anything unexpected is "everything" (never less)."""
    if payload.startswith("{"):
        try:
            data = json.loads(payload)
            op = OPS[data["o"]]
            table = f"{data['s']}.{data['t']}"
            pid = int(data.get("p") or 0)
            columns = frozenset(data["c"]) if isinstance(data.get("c"), list) else None
            keys = data.get("k")
            key_columns = tuple(data.get("kc") or ())
            rows = tuple(tuple(k) for k in keys) if isinstance(keys, list) and key_columns and all(
                isinstance(k, list) and len(k) == len(key_columns) for k in keys) else None
            return Change(op, table, pid, columns, bool(data.get("m")), key_columns, rows)
        except (ValueError, KeyError, TypeError):
            log.warning("change feed: unreadable notification %r", payload[:200])
            return EVERYTHING
    head, _, table = payload.partition(" ")
    if head.isdigit() and table:  # an earlier version's trigger: "pid schema.table"
        return Change("table", table, int(head))
    if payload != "*":
        log.warning("change feed: unreadable notification %r", payload[:200])
    return EVERYTHING


class ChangeFeed:
    """LISTENs on one database; calls `on_change(database, change)` for each notification
    (EVERYTHING when the feed (re)connects or is removed)."""

    def __init__(self, database: str, connect: Connect, on_change: Callable[[str, Change], None],
                 check_interval: float = 1.0) -> None:
        self.database = database
        self.connect = connect
        self.on_change = on_change
        self.check_interval = check_interval
        self.up = False
        self.installed = False  # the event triggers exist: catalog and new tables are covered
        self.checked = False  # whether it is installed is known (the first connection read it)
        # called whenever up, installed, checked or covered may have changed: what was decided
        # from them (the wire door's fast path) is decided again
        self.on_state: Callable[[], None] = lambda: None
        self._warned = -1e9
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
        self.on_state()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # (asyncpg's InternalClientError too): down, and connect again
                if self.up:
                    log.warning("change feed of %s lost: %s", self.database, exc or type(exc).__name__)
            finally:
                self._set_down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _set_down(self) -> None:
        self.up = False
        self.on_state()
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
            self.warn_not_installed()
        # anything may have changed while we were not listening
        self.on_change(self.database, EVERYTHING)
        self.up = True
        self.on_state()
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

    def warn_not_installed(self) -> None:
        """Say why nothing of this database is cached (at most every ten minutes)."""
        now = time.monotonic()
        if now - self._warned < 600:
            return
        self._warned = now
        log.warning("no change feed in database %s: its reads are NOT cached (run "
                    "`pgsluice install-change-feed --database %s`, or set cache_requires_feed = "
                    "false to cache with the TTL as the only bound for outside writes)",
                    self.database, self.database)

    async def _load_coverage(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(_COVERED)
        self.covered = frozenset(r[0] for r in rows)
        was, self.installed = self.installed, bool(await conn.fetchval(_EVENT_TRIGGERS))
        if self.checked and not self.installed:
            self.warn_not_installed()  # after DDL, or removed
        self.checked = True
        self.on_state()
        if was and not self.installed:
            self.on_change(self.database, EVERYTHING)  # removed: nothing cached so far is trusted

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        assert isinstance(payload, str)
        self.notifications += 1
        if payload == "*" and self._refresh is not None:
            self._refresh.set()  # DDL: tables may have appeared or gone
        self.on_change(self.database, parse_payload(payload))
