"""The wire door's side of the cache: answer a Query from cache, coalesce it, or lead it.

`try_query` runs when a client with no server connection sends a simple Query: a hit is
written back at once (no task, no server); a query identical to one in flight waits for
that one's reply; otherwise this client leads: its Query goes to Postgres as usual and
replies.backward feeds the reply, message by message, to a `Fill`, which lands it in the
cache and hands it to every waiter at ReadyForQuery.

Writes: relay notes the tables each statement writes (`note_writes`); at the
ReadyForQuery that ends the transaction, `commit` bumps their versions before the client
sees it (with Redis, output to the client is gated until the bump is acknowledged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import struct
from typing import TYPE_CHECKING

from cache.deps import Bound, Values, write_names
from cache.engine import Flight
from cache.keys import make_key, parse_duration, relevant_settings, setting_value
from cache.versions import GLOBAL
from planner import Flag, Kind, Plan, Planner, SessionFacts
from planner.tables import Effect
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_bind_names, parse_bind_params, parse_parse
from proxy.pgwire.errors import ProtocolError
from proxy.pipeline import fastpath

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
_H = struct.Struct("!h")
_i = struct.Struct("!i")
SERVED, ASYNC, PASS = range(3)
_RFQ_IDLE = encode.ready_for_query()
_FORMAT_SIMPLE = b"Q"  # a simple Query's reply: text format, with RowDescription
_ENDS_AT_READY = (0, 1, 2)  # relay.QUERY, SYNC, FUNC (relay checks)
_COMMIT_PREPARED = re.compile(r"(?i)\bcommit\s+prepared\b")
_CANCELED = b"\x00C57014\x00"
_STORABLE = frozenset({codes.B_ROW_DESCRIPTION, codes.B_DATA_ROW, codes.B_COMMAND_COMPLETE,
                       codes.B_EMPTY_QUERY_RESPONSE, codes.B_NO_DATA, codes.B_PORTAL_SUSPENDED})
_PROTOCOL_REPLIES = frozenset({codes.B_PARSE_COMPLETE, codes.B_BIND_COMPLETE, codes.B_CLOSE_COMPLETE})
_SHAREABLE = _STORABLE | {codes.B_ERROR_RESPONSE, codes.B_NOTICE_RESPONSE}


class Fill:
    """Collects the leader's reply for its Flight."""

    __slots__ = ("extended", "flight", "limit", "parts", "shareable", "size", "storable")

    def __init__(self, flight: Flight, limit: int, extended: bool = False) -> None:
        self.flight = flight
        self.extended = extended  # a Parse/Bind group: an error may come before BindComplete
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.storable = True
        self.shareable = True

    def add(self, code: int, message: bytes) -> None:
        if not self.shareable or code in _PROTOCOL_REPLIES:
            return
        if code not in _STORABLE:
            self.storable = False
            if code not in _SHAREABLE:
                return  # ParameterStatus, NotificationResponse...: this client's alone
            if code == codes.B_ERROR_RESPONSE and (_CANCELED in message or self.extended):
                # cancelled for the leader, not for the waiters; or, in a Parse/Bind group, an
                # error whose place in the reply we do not know: the waiters run it themselves
                self.shareable = False
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

def key_settings(s: Session) -> tuple[tuple[tuple[str, str], ...], float | None]:
    if s.key_source is not s.settings:
        s.key_source = s.settings
        s.key_settings = relevant_settings(s.settings)
        staleness = None
        for name, statement in s.settings:
            if name == "pgsluice.max_staleness":
                staleness = parse_duration(setting_value(statement))
        s.max_staleness = staleness
    return s.key_settings, s.max_staleness


class Request:
    """One cacheable request at the head of s.inbuf: a Query, or a Bind..Execute..Sync group."""

    __slots__ = ("bind", "bypass", "end", "fmt", "max_age", "names", "parse_msg", "plan", "prefix",
                 "settings", "stmt_parse", "types")

    def __init__(self, plan: Plan, end: int, fmt: object, prefix: bytes = b"",
                 parse_msg: bytes | None = None, bind: bytes | None = None, types: bytes = b"",
                 stmt_parse: bytes | None = None) -> None:
        self.plan = plan
        self.end = end  # bytes of s.inbuf it takes
        self.fmt = fmt  # what else shapes the reply: protocol, parameters, formats
        self.prefix = prefix  # replies of the group's Parse/Bind, before the cached part
        self.parse_msg = parse_msg  # an unnamed Parse the group carries (it replaces s.unnamed)
        self.settings: object = ()
        self.names: tuple[str, ...] = ()
        self.max_age: float | None = None
        self.bind = bind  # the group's Bind after its names: the values a key may be pinned to
        self.types = types  # the statement's declared parameter types (Parse)
        self.stmt_parse = stmt_parse  # a group without Parse: the Parse of the statement it binds
        self.bypass: str | None = None  # not looked up: why ("" uncounted: not a plain read)


def settings_changed(s: Session) -> None:
    """s.settings moved (SET/RESET outside a transaction): names resolve through the new
    search_path, so the planner's facts follow it."""
    path = SessionFacts().search_path
    for name, statement in s.settings:
        if name == "search_path":
            path = tuple(p.strip().strip("'\"") for p in setting_value(statement).split(",")
                         if p.strip()) or path
    if path != s.facts.search_path:
        s.facts = dataclasses.replace(s.facts, search_path=path)


def try_query(s: Session) -> int:
    """The head of s.inbuf is a complete Query and s holds no server connection."""
    cache = s.server.cache
    assert cache is not None
    end = 1 + _I.unpack_from(s.inbuf, 1)[0]
    head = fastpath.head_of(s, end) if s.fast_ok else None
    if isinstance(head, fastpath.Pass):  # seen before: nothing to look up (counted when sent)
        return PASS
    if not cache.active(s.database):
        if head is not None:
            head.reason = ""
        return PASS
    sql = bytes(s.inbuf[5:end - 1]).decode("utf-8", "replace")
    planner = s.planner or s.server.planner_for(s.database)
    req = Request(planner.analyze(sql, s.facts), end, _FORMAT_SIMPLE)
    result = _try(s, req)
    if head is not None:  # relay.forward sends it: with this plan, and maybe remembers it
        head.plan, head.reason = req.plan, req.bypass
    return result


def try_extended(s: Session) -> int:
    """The head of s.inbuf is a Parse or Bind and s holds no server connection: a group
    [Parse (unnamed)] Bind [Describe portal] Execute Sync, complete, can be cached."""
    assert s.server.cache is not None
    if not s.server.cache.active(s.database):
        return PASS
    try:
        found = _statement(s)
    except ProtocolError:
        return PASS  # relay refuses it, with the error Postgres would give
    if found is None:
        return PASS
    end, parse_msg, stmt_parse, sql, types, bind_rest, describe, raw_bind = found
    planner = s.planner or s.server.planner_for(s.database)
    plan = planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    prefix = (encode.PARSE_COMPLETE if parse_msg is not None else b"") + encode.BIND_COMPLETE
    return _try(s, Request(plan, end, (b"X", types, bind_rest, describe), prefix, parse_msg, raw_bind, types,
                           stmt_parse))


def _statement(s: Session
               ) -> tuple[int, bytes | None, bytes | None, bytes, bytes, bytes, bool, bytes] | None:
    group = _group(s)
    if group is None:
        return None
    end, parse_msg, stmt, bind_rest, describe, raw_bind = group
    stmt_parse = None
    if parse_msg is not None:
        _name, sql, types = parse_parse(parse_msg[5:])
    elif not stmt:
        if s.unnamed is None:
            return None
        stmt_parse = s.unnamed
        _name, sql, types = parse_parse(s.unnamed[5:])
    else:
        known = s.statements.get(stmt)
        if known is None:
            return None  # SQL-level PREPARE: Postgres knows it, we do not
        stmt_parse = known.parse_msg
        _name, sql, types = parse_parse(known.parse_msg[5:])
    return end, parse_msg, stmt_parse, sql, types, bind_rest, describe, raw_bind


def _normal_bind(rest: bytes) -> bytes:
    """A Bind's formats, parameters and result formats, with the all-text spellings made one
    (libpq sends one result format 0, others none: the same reply), for the cache key.
    A malformed Bind raises ProtocolError: it goes to Postgres, which answers it."""
    try:
        return _normal_bind_parts(rest)
    except struct.error:
        raise ProtocolError("invalid Bind message") from None


def _normal_bind_parts(rest: bytes) -> bytes:
    pos = 0
    (n,) = _H.unpack_from(rest, pos)
    formats = rest[pos + 2:pos + 2 + 2 * n]
    pos += 2 + 2 * n
    (count,) = _H.unpack_from(rest, pos)
    start = pos
    pos += 2
    for _ in range(count):
        (length,) = _i.unpack_from(rest, pos)
        pos += 4 + max(length, 0)
    params = rest[start:pos]
    (n,) = _H.unpack_from(rest, pos)
    results = rest[pos + 2:pos + 2 + 2 * n]
    if pos + 2 + 2 * n != len(rest):
        raise ProtocolError("invalid Bind message")
    parts = (b"" if formats.strip(b"\x00") == b"" else formats, params,
             b"" if results.replace(b"\x00\x00", b"") == b"" else results)
    return b"".join(_I.pack(len(p)) + p for p in parts)  # length-prefixed: unambiguous


def _group(s: Session) -> tuple[int, bytes | None, bytes, bytes, bool, bytes] | None:
    """(end, unnamed Parse message or None, statement name, Bind parameters and formats (for
    the key), Describe portal?, the Bind after its names) of a cacheable group at the head of
    s.inbuf, else None."""
    buf = s.inbuf
    n = len(buf)
    pos = 0
    parse_msg: bytes | None = None
    stmt = bind_rest = raw_bind = b""
    bound = described = executed = False
    while n - pos >= 5:
        code = buf[pos]
        end = pos + 1 + _I.unpack_from(buf, pos + 1)[0]
        if end > n:
            return None
        body = bytes(buf[pos + 5:end])
        if code == codes.F_PARSE and pos == 0:
            if body[:1] != b"\x00":
                return None  # a named statement: Postgres must keep it
            parse_msg = bytes(buf[pos:end])
        elif code == codes.F_BIND and not bound:
            portal, stmt, rest = parse_bind_names(body)
            if portal or (parse_msg is not None and stmt):
                return None
            raw_bind = body[rest:]
            bind_rest, bound = _normal_bind(raw_bind), True
        elif code == codes.F_DESCRIBE and bound and not described and not executed:
            if body != b"P\x00":
                return None
            described = True
        elif code == codes.F_EXECUTE and bound and not executed:
            if len(body) != 5 or body[0]:  # the unnamed portal (Sync closes it: the reply is whole)
                return None
            executed = True
            bind_rest += body[1:]  # max_rows (asyncpg's fetchval asks for 1) shapes the reply
        elif code == codes.F_SYNC and executed:
            return end, parse_msg, stmt, bind_rest, described, raw_bind
        else:
            return None
        pos = end
    return None


def _try(s: Session, req: Request) -> int:
    cache = s.server.cache
    assert cache is not None
    plan = req.plan
    if plan.kind is not Kind.READ or not plan.verdict.allowed:
        req.bypass = ""
        return PASS
    settings, max_age = key_settings(s)
    hinted = plan.hint("max_staleness")
    if hinted is not None:
        max_age = parse_duration(hinted)
    reason = cache.admit(plan, s.database)
    if reason is None and max_age is not None and max_age <= 0:
        reason = "max_staleness=0"
    if reason is None and s.row_cap:
        reason = "max_rows cut"
    if reason is not None:
        cache.stats.bypassed(reason)
        s.agent_stats.bypassed += 1
        req.bypass = reason
        return PASS
    req.settings, req.max_age = settings, max_age
    bound = None
    if req.bind is not None and plan.reach is not None and plan.reach.bound:
        bound = parse_bind_params(req.bind, req.types)
    req.names = cache.read_names(s.database, plan, bound)
    if cache.needs_sync:
        return _after_barrier(s, req)
    return _lookup(s, req)


def _after_barrier(s: Session, req: Request) -> int:
    """With Redis: the look-up continues once the version barrier is passed — by callback, no
    task, in the common case where the mirror already knows every version the key needs."""
    cache = s.server.cache
    assert cache is not None and cache.redis is not None
    if cache.versions.known(req.names):
        s.spawn_task(_lookup_after_sync(s, req))  # first sight of a table: load its versions
        return ASYNC
    barrier = cache.redis.barrier_future()
    if barrier is None:
        return _redis_bypass(s)
    loop = asyncio.get_running_loop()
    marker: asyncio.Future[None] = loop.create_future()
    s.hold(marker)

    def timed_out() -> None:
        if not marker.done():
            marker.set_result(None)
            assert cache.redis is not None
            cache.redis.slow_answer()
            cache.stats.redis_errors += 1
            _redis_bypass(s)
            s.resume_pump(cache_done=True)

    timer = loop.call_later(cache.settings.redis_timeout, timed_out)

    def passed(fut: asyncio.Future[None]) -> None:
        timer.cancel()
        if marker.done():
            return  # timed out, or the client went away
        marker.set_result(None)
        if fut.cancelled() or fut.exception() is not None:
            cache.stats.redis_errors += 1
            _redis_bypass(s)
            s.resume_pump(cache_done=True)
            return
        assert cache.redis is not None
        cache.redis.barrier_answered()
        result = _lookup(s, req)
        if result != ASYNC:
            s.resume_pump(cache_done=result == PASS)

    barrier.add_done_callback(passed)
    return ASYNC


def _redis_bypass(s: Session) -> int:
    assert s.server.cache is not None
    s.server.cache.stats.bypassed("redis slow or down")
    s.agent_stats.bypassed += 1
    return PASS


def _lookup(s: Session, req: Request) -> int:
    cache = s.server.cache
    assert cache is not None
    plan = req.plan
    stamp = cache.versions.stamp()  # before the versions: a bump in between moves it
    current = cache.current(req.names)
    key = make_key(s.database, s.user, s.facts.role_policy, req.settings, plan.fingerprint, plan.params,
                   req.fmt, current)
    entry = cache.local.entry(key, req.max_age)
    if entry is not None:
        cache.stats.hits += 1
        s.agent_stats.hits += 1
        s.served = "cache"
        reply = req.prefix + entry.value + _RFQ_IDLE
        if s.fast_ok and cache.fast:  # the next time, these bytes are answered before parsing
            fastpath.remember(s, req, bytes(s.inbuf[:req.end]), entry, reply, current, stamp)
        _send(s, reply, req)
        return SERVED
    flight = cache.flights.get(key)
    if flight is not None:
        s.spawn_task(_join(s, flight, req))
        return ASYNC
    batcher = s.server.batcher
    group = None
    if batcher is not None and plan.batch is not None:
        queued, group = batcher.offer(s, req, key)  # batching.py
        if queued:
            return ASYNC
    flight = cache.lead(key)
    if batcher is not None and group is not None:
        batcher.lead(group, flight)
    s.agent_stats.misses += 1
    if cache.redis is not None and cache.redis.up:
        s.spawn_task(_lead_via_redis(s, flight, req))
        return ASYNC
    s.fill = Fill(flight, cache.settings.max_entry, extended=bool(req.prefix))
    return PASS


def _reply(s: Session, payload: bytes, req: Request) -> None:
    _send(s, req.prefix + payload + _RFQ_IDLE, req)


def _send(s: Session, reply: bytes, req: Request) -> None:
    del s.inbuf[:req.end]
    s.queries += 1
    s.note_query()
    if req.parse_msg is not None:  # as if the group's Parse had reached Postgres
        s.unnamed = req.parse_msg
        s.unnamed_gen += 1
        s.unnamed_writes = NO_WRITES
    elif not req.prefix:
        s.unnamed = None  # a simple Query destroys the unnamed statement
    s.write(reply)
    s.request_done()


async def _lookup_after_sync(s: Session, req: Request) -> None:
    cache = s.server.cache
    assert cache is not None
    if not await cache.sync(req.names):
        cache.stats.bypassed("redis slow or down")
        s.agent_stats.bypassed += 1
        s.resume_pump(cache_done=True)
        return
    result = _lookup(s, req)
    if result == ASYNC:
        return  # a join or a Redis look-up took over
    s.resume_pump(cache_done=result == PASS)


async def _join(s: Session, flight: Flight, req: Request) -> None:
    cache = s.server.cache
    assert cache is not None
    flight.waiters += 1
    s.waiting = True
    try:
        payload = await asyncio.shield(flight.future)
    except asyncio.CancelledError:
        if s.closed:
            raise
        # a CancelRequest: answered as Postgres answers a cancelled statement
        del s.inbuf[:req.end]
        s.write(req.prefix + encode.error_response("57014", "canceling statement due to user request")
                + _RFQ_IDLE)
        s.resume_pump(cache_done=False)
        return
    finally:
        s.waiting = False
    if payload is None:  # the leader gave up: look again (maybe leading this time)
        s.resume_pump(cache_done=False)
        return
    cache.stats.coalesced += 1
    s.agent_stats.coalesced += 1
    s.served = "coalesced"
    _reply(s, payload, req)
    s.resume_pump(cache_done=False)


async def _lead_via_redis(s: Session, flight: Flight, req: Request) -> None:
    cache = s.server.cache
    assert cache is not None
    try:
        value = await cache.redis_get(flight, req.max_age)
    except BaseException:
        cache.land(flight, None, False)
        raise
    if value is not None:
        cache.stats.hits += 1
        cache.stats.redis_hits += 1
        cache.stats.misses -= 1
        s.agent_stats.hits += 1
        s.agent_stats.misses -= 1
        s.served = "cache"
        cache.land(flight, value, False)
        _reply(s, value, req)
        s.resume_pump(cache_done=False)
        return
    s.fill = Fill(flight, cache.settings.max_entry, extended=bool(req.prefix))
    s.resume_pump(cache_done=True)


def finish(s: Session, fill: Fill) -> None:
    """ReadyForQuery ended the leader's Query."""
    s.fill = None
    assert s.server.cache is not None
    s.server.cache.land(fill.flight, b"".join(fill.parts) if fill.shareable else None,
                        fill.storable and fill.shareable)


def abandon(s: Session) -> None:
    """The leader will not see its reply (it left, its server went away): waiters retry."""
    fill = s.fill
    if fill is not None:
        s.fill = None
        assert s.server.cache is not None
        s.server.cache.land(fill.flight, None, False)


# ---- writes ------------------------------------------------------------------------------------

class Writes:
    """What executing a statement may change (planner/tables.Effect, with key pins); its
    version names are worked out per execution, when the bound values are known. `ddl`: it may
    change the catalog too (DDL, utility, unknown), so plans are made again after it."""

    __slots__ = ("ddl", "effects", "generation", "own", "params")

    def __init__(self, effects: tuple[Effect, ...], own: int = 0, params: tuple[str, ...] = (),
                 ddl: bool = False) -> None:
        self.effects = effects
        self.own = own  # placeholders up to this are bound at Bind; the rest are `params`
        self.params = params
        self.ddl = ddl
        self.generation = 0  # of the catalog it was worked out with (0: none)

    def names(self, database: str, bound: Bound | None = None) -> frozenset[str]:
        if not self.effects:
            return frozenset()
        return write_names(database, self.effects, Values(self.own, self.params, bound))


NO_WRITES = Writes(())
EVERYTHING = Writes((Effect(GLOBAL, "table"),))  # data anywhere (a user function, a trigger...)


def write_set(plan: Plan, planner: Planner) -> Writes:
    """What a statement may change, as finely as its plan allows; unknown reach is the whole
    database, and a table with triggers or rules may write anywhere."""
    kind = plan.kind
    if kind is Kind.READ:
        if plan.tables_written:
            return _tables(plan.tables_written)
        if Flag.VOLATILE_FUNCTION in plan.flags and any(
                not f.startswith("pg_catalog.") for f in plan.functions):
            return EVERYTHING  # a user function may write anything
        return NO_WRITES
    if kind is Kind.TXN:
        if _COMMIT_PREPARED.search(plan.sql):
            return EVERYTHING  # a prepared transaction's writes show now; which, unknown
        return NO_WRITES
    if kind is Kind.SESSION:
        head = plan.sql.lstrip().split(None, 1)
        return EVERYTHING if head and head[0].lower() == "execute" else NO_WRITES
    if kind is Kind.WRITE and plan.tables_written:
        reach = plan.reach
        triggers = planner.catalog.triggers
        if reach is not None:
            effects = reach.writes
            if any(e.table in triggers for e in effects):
                effects = (*effects, Effect(GLOBAL, "table"))  # a trigger or rule may write elsewhere
            return Writes(effects, reach.own_params, plan.params)
        if plan.tables_written & triggers:
            return _tables(plan.tables_written | {GLOBAL})
        return _tables(plan.tables_written)
    return _tables(plan.tables_written | {GLOBAL}, ddl=True)  # DDL, utility, unknown


def _tables(tables: frozenset[str], ddl: bool = False) -> Writes:
    """Anything in each of `tables`; a name the catalog could not qualify (it was loading, or
    the relation is unknown) may be any table: the whole database."""
    if any("." not in t for t in tables):
        tables = tables | {GLOBAL}
    return Writes(tuple(Effect(t, "table") for t in sorted(tables)), ddl=ddl)


def writes_of(s: Session, sql: bytes, plan: Plan | None = None) -> Writes:
    """What executing `sql` may change; `plan`: its plan, when the caller has it already."""
    cache = s.server.cache
    if (cache is None or not cache.active(s.database)) and s.server.replicas is None:
        return NO_WRITES
    planner = s.planner or s.server.planner_for(s.database)
    if plan is None:
        plan = planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    if plan.kind is Kind.DDL:
        s.server.ddl_seen(s.database)
    writes = write_set(plan, planner)
    if writes.effects and writes.generation != planner.catalog.generation:
        writes = Writes(writes.effects, writes.own, writes.params, writes.ddl)
        writes.generation = planner.catalog.generation
    return writes


def current(s: Session, writes: Writes, sql: bytes) -> Writes:
    """A prepared statement's write set, worked out again if the catalog changed since (a new
    foreign key's cascade; or it was prepared while the catalog was loading)."""
    planner = s.planner
    if planner is None or writes.generation == planner.catalog.generation:
        return writes
    return writes_of(s, sql)


def note_writes(s: Session, sql: bytes, plan: Plan | None = None) -> tuple[frozenset[str], bool]:
    """A Query is about to be sent: mark what it writes; (the versions, whether the catalog too)."""
    writes = writes_of(s, sql, plan)
    names = writes.names(s.database)
    mark(s, names, writes.ddl)
    return names, writes.ddl


def mark_bound(s: Session, writes: Writes, bind_rest: bytes, types: bytes) -> None:
    """A Bind of a statement that writes: its key values are the ones bound here."""
    if not writes.effects:
        return
    bound = parse_bind_params(bind_rest, types) if writes.own else None
    mark(s, writes.names(s.database, bound), writes.ddl)


def mark(s: Session, names: frozenset[str], ddl: bool = False) -> None:
    """Statements about to be sent change what `names` stand for: they are done (committed, or
    part of the transaction) at the ReadyForQuery of the next message that ends at one."""
    if names:
        due = s.ready_seen + 1 + sum(1 for kind, _ in s.entries if kind in _ENDS_AT_READY)
        s.write_marks.append((due, names, ddl))


def mark_everything(s: Session, ddl: bool) -> None:
    """Anything in the database may change (`ddl`: the catalog too)."""
    mark(s, EVERYTHING.names(s.database), ddl)


def ready(s: Session, idle: bool) -> bool:
    """A ReadyForQuery from the server: True if a transaction with writes just ended."""
    s.ready_seen += 1
    marks = s.write_marks
    while marks and marks[0][0] <= s.ready_seen:
        _, names, ddl = marks.popleft()
        s.committing |= names
        s.committing_ddl |= ddl
    return idle and bool(s.committing)


def write_due(s: Session) -> bool:
    """Whether the next ReadyForQuery may end a transaction that wrote."""
    return bool(s.committing) or bool(s.write_marks and s.write_marks[0][0] == s.ready_seen + 1)


def commit(s: Session) -> None:
    """The transaction that wrote s.committing is over (committed or not): bump them."""
    names, s.committing = s.committing, set()
    ddl, s.committing_ddl = s.committing_ddl, False
    cache = s.server.cache
    if not names or (cache is None and s.server.replicas is None):
        return
    if ddl:
        s.server.ddl_seen(s.database)  # plans may depend on what changed: read the catalog again
    if s.server.replicas is not None:
        # no replica read of these tables until the commit's position is known: marked before
        # the client (or a read of the new versions) can see the write
        s.server.replicas.committed(s.database, names)
    if cache is None:
        return
    task = cache.bump(names)
    if task is not None and not task.done():
        s.gate_until(task)


def commit_all(s: Session) -> frozenset[str]:
    """The client or its server connection is gone: whatever it sent may have committed."""
    while s.write_marks:
        _, names, ddl = s.write_marks.popleft()
        s.committing |= names
        s.committing_ddl |= ddl
    names = frozenset(s.committing)
    commit(s)
    return names
