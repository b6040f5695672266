"""The pipeline's side of the cache: answer a request from cache, coalesce it, or lead it.

`try_query` runs when a client with no server connection sends a simple Query (`try_extended`:
a [Parse] Bind [Describe] Execute Sync group, read by cacheable.py): a hit is written back at
once (no task, no server); a query identical to one in flight waits for that one's reply;
otherwise this client leads: its Query goes to Postgres as usual and replies.backward feeds the
reply, message by message, to a `Fill`, which lands it in the cache and hands it to every waiter
at ReadyForQuery. What writes change, and the version bumps that follow: tracking.py.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from cache.engine import Flight
from cache.keys import make_key, parse_duration
from cache.local import VALUE
from planner import Kind
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_bind_params
from proxy.pgwire.errors import ProtocolError
from proxy.pipeline import cacheable, fastpath, tracking
from proxy.pipeline.cacheable import Request, key_settings

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
SERVED, ASYNC, PASS = range(3)
RFQ_IDLE = encode.ready_for_query()
_FORMAT_SIMPLE = b"Q"  # a simple Query's reply: text format, with RowDescription
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
        found = cacheable.group(s)
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
        reply = req.prefix + entry[VALUE] + RFQ_IDLE
        if s.fast_ok and cache.fast:  # the next time, these bytes are answered before parsing
            fastpath.remember(s, req, bytes(s.inbuf[:req.end]), key, entry, reply, current, stamp)
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


def answer(s: Session, payload: bytes, req: Request) -> None:
    """Answer `req` with a cached or shared reply's messages (burst batching's too)."""
    _send(s, req.prefix + payload + RFQ_IDLE, req)


def _send(s: Session, reply: bytes, req: Request) -> None:
    del s.inbuf[:req.end]
    s.queries += 1
    s.note_query()
    if req.parse_msg is not None:  # as if the group's Parse had reached Postgres
        s.unnamed = req.parse_msg
        s.unnamed_gen += 1
        s.unnamed_writes = tracking.NO_WRITES
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
                + RFQ_IDLE)
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
    answer(s, payload, req)
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
        answer(s, value, req)
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
