"""The wire door's side of the cache: answer a Query from cache, coalesce it, or lead it.

`try_query` runs when a client with no server connection sends a simple Query: a hit is
written back at once (no task, no server); a query identical to one in flight waits for
that one's reply; otherwise this client leads: its Query goes to Postgres as usual and
relay.backward feeds the reply, message by message, to a `Fill`, which lands it in the
cache and hands it to every waiter at ReadyForQuery.

Writes: relay notes the tables each statement writes (`note_writes`); at the
ReadyForQuery that ends the transaction, `commit` bumps their versions before the client
sees it (with Redis, output to the client is gated until the bump is acknowledged).
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from cache.engine import Flight
from cache.keys import make_key, parse_duration, relevant_settings, setting_value
from cache.versions import GLOBAL
from planner import Flag, Kind, Plan, Planner

from .pgwire import codes, encode

if TYPE_CHECKING:
    from .session import ClientSession

_I = struct.Struct("!I")
SERVED, ASYNC, PASS = range(3)
_RFQ_IDLE = encode.ready_for_query()
_FORMAT_SIMPLE = b"Q"  # a simple Query's reply: text format, with RowDescription
_ENDS_AT_READY = (0, 1, 2)  # relay.QUERY, SYNC, FUNC (relay checks)
_CANCELED = b"\x00C57014\x00"
_STORABLE = frozenset({codes.B_ROW_DESCRIPTION, codes.B_DATA_ROW, codes.B_COMMAND_COMPLETE,
                       codes.B_EMPTY_QUERY_RESPONSE})
_SHAREABLE = _STORABLE | {codes.B_ERROR_RESPONSE, codes.B_NOTICE_RESPONSE}


class Fill:
    """Collects the leader's reply for its Flight."""

    __slots__ = ("flight", "limit", "parts", "shareable", "size", "storable")

    def __init__(self, flight: Flight, limit: int) -> None:
        self.flight = flight
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.storable = True
        self.shareable = True

    def add(self, code: int, message: bytes) -> None:
        if not self.shareable:
            return
        if code not in _STORABLE:
            self.storable = False
            if code not in _SHAREABLE:
                return  # ParameterStatus, NotificationResponse...: this client's alone
            if code == codes.B_ERROR_RESPONSE and _CANCELED in message:
                self.shareable = False  # cancelled for the leader, not for the waiters
                return
        self.size += len(message)
        if self.size > self.limit:
            self.storable = self.shareable = False
            self.parts = []
            return
        self.parts.append(message)

    def too_big(self) -> None:
        """A message is passed through in pieces: nothing to keep or share."""
        self.storable = self.shareable = False
        self.parts = []


# ---- reads -------------------------------------------------------------------------------------

def _key_settings(s: ClientSession) -> tuple[tuple[tuple[str, str], ...], float | None]:
    if s.key_source is not s.settings:
        s.key_source = s.settings
        s.key_settings = relevant_settings(s.settings)
        staleness = None
        for name, statement in s.settings:
            if name == "pgsluice.max_staleness":
                staleness = parse_duration(setting_value(statement))
        s.max_staleness = staleness
    return s.key_settings, s.max_staleness


def try_query(s: ClientSession) -> int:
    """The head of s.inbuf is a complete Query and s holds no server connection."""
    cache = s.server.cache
    assert cache is not None
    end = 1 + _I.unpack_from(s.inbuf, 1)[0]
    sql = bytes(s.inbuf[5:end - 1]).decode("utf-8", "replace")
    planner = s.planner or s.server.planner_for(s.database)
    plan = planner.analyze(sql, s.facts)
    settings, max_age = _key_settings(s)
    hinted = plan.hint("max_staleness")
    if hinted is not None:
        max_age = parse_duration(hinted)
    if plan.kind is not Kind.READ:
        return PASS
    reason = cache.admit(plan, s.database)
    if reason is None and max_age is not None and max_age <= 0:
        reason = "max_staleness=0"
    if reason is None and s.row_cap:
        reason = "max_rows cut"
    if reason is not None:
        cache.stats.bypassed(reason)
        s.agent_stats.bypassed += 1
        return PASS
    names = cache.version_names(s.database, plan.tables_read)
    if cache.needs_sync:
        s.spawn_task(_lookup_after_sync(s, plan, settings, names, max_age, end))
        return ASYNC
    return _lookup(s, plan, settings, names, max_age, end)


def _key(s: ClientSession, plan: Plan, settings: object, names: tuple[str, ...]) -> object:
    assert s.server.cache is not None
    return make_key(s.database, s.user, s.facts.role_policy, settings, plan.fingerprint, plan.params,
                    _FORMAT_SIMPLE, s.server.cache.current(names))


def _lookup(s: ClientSession, plan: Plan, settings: object, names: tuple[str, ...],
            max_age: float | None, end: int) -> int:
    cache = s.server.cache
    assert cache is not None
    key = _key(s, plan, settings, names)
    value = cache.local.get(key, max_age)
    if value is not None:
        cache.stats.hits += 1
        s.agent_stats.hits += 1
        _reply(s, value, end)
        return SERVED
    flight = cache.flights.get(key)
    if flight is not None:
        s.spawn_task(_join(s, flight, end))
        return ASYNC
    flight = cache.lead(key)
    s.agent_stats.misses += 1
    if cache.redis is not None and cache.redis.up:
        s.spawn_task(_lead_via_redis(s, flight, max_age, end))
        return ASYNC
    s.fill = Fill(flight, cache.settings.max_entry)
    return PASS


def _reply(s: ClientSession, payload: bytes, end: int) -> None:
    del s.inbuf[:end]
    s.unnamed = None  # a simple Query destroys the unnamed statement
    s.queries += 1
    s.agent_stats.queries += 1
    s.write(payload + _RFQ_IDLE)


async def _lookup_after_sync(s: ClientSession, plan: Plan, settings: object, names: tuple[str, ...],
                             max_age: float | None, end: int) -> None:
    cache = s.server.cache
    assert cache is not None
    if not await cache.sync(names):
        cache.stats.bypassed("redis slow or down")
        s.agent_stats.bypassed += 1
        s.resume_pump(cache_done=True)
        return
    result = _lookup(s, plan, settings, names, max_age, end)
    if result == ASYNC:
        return  # a join or a Redis look-up took over
    s.resume_pump(cache_done=result == PASS)


async def _join(s: ClientSession, flight: Flight, end: int) -> None:
    cache = s.server.cache
    assert cache is not None
    flight.waiters += 1
    payload = await asyncio.shield(flight.future)
    if payload is None:  # the leader gave up: look again (maybe leading this time)
        s.resume_pump(cache_done=False)
        return
    cache.stats.coalesced += 1
    s.agent_stats.coalesced += 1
    _reply(s, payload, end)
    s.resume_pump(cache_done=False)


async def _lead_via_redis(s: ClientSession, flight: Flight, max_age: float | None, end: int) -> None:
    cache = s.server.cache
    assert cache is not None
    try:
        value = await cache.redis_get(flight, max_age)
    except BaseException:
        cache.land(flight, None, False)
        raise
    if value is not None:
        cache.stats.hits += 1
        cache.stats.redis_hits += 1
        cache.stats.misses -= 1
        s.agent_stats.hits += 1
        s.agent_stats.misses -= 1
        cache.land(flight, value, False)
        _reply(s, value, end)
        s.resume_pump(cache_done=False)
        return
    s.fill = Fill(flight, cache.settings.max_entry)
    s.resume_pump(cache_done=True)


def finish(s: ClientSession, fill: Fill) -> None:
    """ReadyForQuery ended the leader's Query."""
    s.fill = None
    assert s.server.cache is not None
    s.server.cache.land(fill.flight, b"".join(fill.parts) if fill.shareable else None,
                        fill.storable and fill.shareable)


def abandon(s: ClientSession) -> None:
    """The leader will not see its reply (it left, its server went away): waiters retry."""
    fill = s.fill
    if fill is not None:
        s.fill = None
        assert s.server.cache is not None
        s.server.cache.land(fill.flight, None, False)


# ---- writes ------------------------------------------------------------------------------------

def write_set(plan: Plan, planner: Planner) -> frozenset[str]:
    """Tables whose cached reads a statement may invalidate ("*": all of the database)."""
    kind = plan.kind
    if kind is Kind.READ:
        if plan.tables_written:
            return plan.tables_written
        if Flag.VOLATILE_FUNCTION in plan.flags and any(
                not f.startswith("pg_catalog.") for f in plan.functions):
            return frozenset({GLOBAL})  # a user function may write anything
        return frozenset()
    if kind is Kind.TXN:
        return frozenset()
    if kind is Kind.SESSION:
        head = plan.sql.lstrip().split(None, 1)
        return frozenset({GLOBAL}) if head and head[0].lower() == "execute" else frozenset()
    if kind is Kind.WRITE and plan.tables_written:
        if plan.tables_written & planner.catalog.triggers:
            return plan.tables_written | {GLOBAL}  # a trigger or rule may write elsewhere
        return plan.tables_written
    return plan.tables_written | {GLOBAL}  # DDL, utility, unknown


def writes_of(s: ClientSession, sql: bytes) -> frozenset[str]:
    planner = s.planner or s.server.planner_for(s.database)
    plan = planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    if plan.kind is Kind.DDL:
        s.server.ddl_seen(s.database)
    return write_set(plan, planner)


def note_writes(s: ClientSession, sql: bytes) -> None:
    mark(s, writes_of(s, sql))


def mark(s: ClientSession, tables: frozenset[str]) -> None:
    """Statements about to be sent write `tables`: they are done (committed, or part of the
    transaction) at the ReadyForQuery of the next message that ends at one (Query, Sync)."""
    if tables:
        if s.server.cache is not None:
            s.server.cache.note_own_write(s.database, tables)
        due = s.ready_seen + 1 + sum(1 for kind, _ in s.entries if kind in _ENDS_AT_READY)
        s.write_marks.append((due, tables))


def ready(s: ClientSession, idle: bool) -> bool:
    """A ReadyForQuery from the server: True if a transaction with writes just ended."""
    s.ready_seen += 1
    marks = s.write_marks
    while marks and marks[0][0] <= s.ready_seen:
        s.committing |= marks.popleft()[1]
    return idle and bool(s.committing)


def write_due(s: ClientSession) -> bool:
    """Whether the next ReadyForQuery may end a transaction that wrote."""
    return bool(s.committing) or bool(s.write_marks and s.write_marks[0][0] == s.ready_seen + 1)


def commit(s: ClientSession) -> None:
    """The transaction that wrote s.committing is over (committed or not): bump them."""
    tables, s.committing = s.committing, set()
    cache = s.server.cache
    if cache is None or not tables:
        return
    if GLOBAL in tables:
        s.server.ddl_seen(s.database)  # plans may depend on what changed: read the catalog again
    task = cache.bump(s.database, tables)
    if task is not None and not task.done():
        s.gate_until(task)


def commit_all(s: ClientSession) -> frozenset[str]:
    """The client or its server connection is gone: whatever it sent may have committed."""
    while s.write_marks:
        s.committing |= s.write_marks.popleft()[1]
    tables = frozenset(s.committing)
    commit(s)
    return tables
