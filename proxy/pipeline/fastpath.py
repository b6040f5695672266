"""The wire door's fast path: a repeated cacheable request answered before any parsing.

Within one session context (database, user, guardrail policy, search_path, the settings a key
holds, max_staleness) the same raw request bytes — a simple Query, or a [Parse] Bind
[Describe] Execute Sync group, with the Parse of the statement a group binds — always make
the same plan, the same key and the same version names, for as long as the plans stand. So
when the slow path (caching.py) answers a request from cache, it leaves an alias here: raw
bytes -> the cache entry, its whole reply, the version names its key carried and their values
then. A request whose bytes are found is answered with one write when

* no plan or admission decision may have changed since (Cache.fast_gen: catalog, guardrails,
  change feed state, Redis),
* the versions are those of its key (Versions.stamp says so without reading them, else they
  are compared),
* the entry is within the TTL and the request's max_staleness.

Anything else takes the slow path, which decides as always (and leaves a fresh alias). The
rule: never answer what the slow path would not. There is no fast path with Redis: there,
every look-up waits for the version barrier. Aliases are charged to their cache entry and
leave with it (cache/local.py), so they stay within cache_max_bytes.

Passthrough has its side of it: a simple Query is analysed once (try_query hands its plan to
relay.forward in a Head), and one that turned out to need nothing but sending — not a cache
candidate, nothing to rewrite, guard, pin or track but the versions it writes — is remembered
per context as a Pass, beside the aliases (so the one look-up in data_received finds either;
at most MAX_PASSES of them): the next time its bytes come, neither the cache nor the relay
works anything out again (under the same fast_gen).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from cache.local import SERIAL, STORED, Entry
from planner import Plan
from proxy.pgwire import codes
from proxy.pipeline import cacheable, tracking

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

SIMPLE, PARSED, BOUND = range(3)  # a Query; a group with its Parse; a group binding a known statement
_OVERHEAD = 400  # per alias besides its raw bytes, reply and versions: tuple, dict slot, key tuple
_MAX_CONTEXTS = 10_000
MAX_PASSES = 16_384  # remembered passthrough texts per worker (then all are forgotten at once)


# One alias: what a request's bytes were answered with, and under which conditions. A plain
# tuple of bytes, numbers and strings, so that the collector does not track it (cache/local.py):
Fast = tuple[int, bytes, int, "bytes | None", tuple[str, ...], Any, int, int, float, float]
# (the entry's serial; the reply: Parse/BindComplete, the cached messages, ReadyForQuery; the
# kind; PARSED: the unnamed statement it leaves; the version names in its key; `current`, their
# (generation, versions) then; Versions.stamp when `current` was last found true; fast_gen;
# when the entry's TTL ends; when it is older than the request's max_staleness)


def _fast(serial: int, reply: bytes, kind: int, parse_msg: bytes | None, names: tuple[str, ...],
          current: object, stamp: int, gen: int, expires: float, fresh_until: float) -> Fast:
    return (serial, reply, kind, parse_msg, names, current, stamp, gen, expires, fresh_until)


class Pass:
    """A simple Query that needs nothing but sending (see the module docstring)."""

    __slots__ = ("gen", "key", "last_sql", "names", "reason")

    def __init__(self, key: bytes, reason: str, names: frozenset[str], last_sql: bytes, gen: int) -> None:
        self.key = key  # the whole message
        self.reason = reason  # the cache bypass it counts as ("": none, it is not a plain read)
        self.names = names  # the versions it writes (tracking.mark)
        self.last_sql = last_sql
        self.gen = gen


class Head:
    """What try_query worked out for the Query at the head of s.inbuf, for relay.forward."""

    __slots__ = ("facts", "gen", "key", "plan", "reason")

    def __init__(self, key: bytes, facts: object, gen: int) -> None:
        self.key = key
        self.facts = facts
        self.gen = gen
        self.plan: Plan | None = None  # analysed once, here
        self.reason: str | None = None  # None: looked up in the cache (so not a Pass)


def context(s: Session) -> dict[Hashable, Fast | Pass]:
    """The aliases of the session's context (shared by every session in the same one)."""
    if s.fast_settings is s.settings and s.fast_facts is s.facts:
        return s.fast_map
    cache = s.server.cache
    assert cache is not None
    settings, max_age = cacheable.key_settings(s)
    ctx = (s.facts, settings, max_age)
    maps = cache.fast_maps
    found = maps.get(ctx)
    if found is None:
        if len(maps) >= _MAX_CONTEXTS:  # contexts come and go (settings per tenant...)
            for key in [k for k, (_, m) in maps.items() if not m]:
                cache.local.unregister(maps.pop(key)[0])
        fresh: dict[Hashable, Fast | Pass] = {}
        found = maps[ctx] = (cache.local.register(fresh), fresh)
    s.fast_settings, s.fast_facts = s.settings, s.facts
    s.fast_holder, s.fast_map = found
    return s.fast_map


def head_of(s: Session, end: int) -> Pass | Head:
    """The Query at the head of s.inbuf (`end` bytes): its Pass, else a Head for try_query to
    fill in; either is s.head until relay.forward takes it."""
    cache = s.server.cache
    assert cache is not None
    key = bytes(s.inbuf[:end])
    known = context(s).get(key)
    if isinstance(known, Pass) and known.gen == cache.fast_gen:
        s.head = known
        return known
    head = s.head = Head(key, s.facts, cache.fast_gen)
    return head


def count_pass(s: Session, known: Pass) -> None:
    """A known passthrough text is sent: counted as the slow path would have counted it."""
    cache = s.server.cache
    assert cache is not None
    cache.stats.known_passes += 1
    if known.reason:
        cache.stats.bypassed(known.reason)
        s.agent_stats.bypassed += 1


def take_head(s: Session, buf: bytearray, pos: int, end: int) -> Pass | Head | None:
    """relay.forward sends the Query at buf[pos:end]: what try_query left for it, if it is that
    Query (by its bytes), and nothing it was worked out from has changed since."""
    head = s.head
    if head is None:
        return None
    s.head = None
    cache = s.server.cache
    if pos or end != len(head.key) or cache is None or head.gen != cache.fast_gen \
            or not buf.startswith(head.key):
        return None
    if isinstance(head, Head) and head.facts is not s.facts:
        return None
    return head


def known_whole(s: Session, known: Pass) -> bool:
    """Whether s.inbuf is exactly the text of `known`, under the same fast_gen (a client waiting
    for a server connection keeps its context; what changes meanwhile — catalog, guardrails, the
    change feed — moves fast_gen), and nothing makes Postgres treat it otherwise (skipping to a
    Sync after an error, COPY FROM STDIN): then relay.send_known sends it as it is."""
    cache = s.server.cache
    return (cache is not None and known.gen == cache.fast_gen and s.inbuf == known.key
            and not s.skipping and not s.copy_in)


def remember_pass(s: Session, head: Head, names: frozenset[str], last_sql: bytes) -> None:
    """relay.forward found that the Query of `head` needed nothing but sending: remember it."""
    cache = s.server.cache
    if cache is None or head.reason is None or head.gen != cache.fast_gen:
        return
    if cache.passes >= MAX_PASSES:  # forget them all (aliases stay: they are charged elsewhere)
        for _, aliases in cache.fast_maps.values():
            for key in [k for k, v in aliases.items() if isinstance(v, Pass)]:
                del aliases[key]
        cache.passes = 0
    aliases = context(s)
    old = aliases.get(head.key)
    if type(old) is tuple:
        return  # answered from cache meanwhile
    if old is None:
        cache.passes += 1
    aliases[head.key] = Pass(head.key, head.reason, names, last_sql, head.gen)


def _statement(s: Session, data: bytes) -> bytes | None:
    """The Parse of the statement a Bind (on the unnamed portal) binds, if the session knows it."""
    if len(data) < 7 or data[5] != 0:
        return None
    end = data.find(b"\x00", 6)
    if end < 0:
        return None
    if end == 6:
        return s.unnamed
    stmt = s.statements.get(data[6:end])
    return stmt.parse_msg if stmt is not None else None


MISS, SERVED, KNOWN = range(3)  # what serve() did


def serve(s: Session, data: bytes, now: float) -> int:
    """Answer `data` (all the client sent, one request) if an alias allows (SERVED). KNOWN: a
    passthrough text seen before, counted and left in s.head for the relay to send."""
    aliases = s.fast_map if s.fast_settings is s.settings and s.fast_facts is s.facts else context(s)
    key: Hashable
    if data[0] == codes.F_BIND:
        stmt = _statement(s, data)
        if stmt is None:
            return MISS
        key = (stmt, data)
    else:
        key = data
    fast = aliases.get(key)
    if fast is None:
        return MISS
    cache = s.server.cache
    assert cache is not None
    if isinstance(fast, Pass):
        if fast.gen != cache.fast_gen:
            return MISS
        s.head = fast
        return KNOWN
    serial, reply, kind, parse_msg, names, current, seen, gen, expires, fresh_until = fast
    if gen != cache.fast_gen or now >= expires or now > fresh_until:
        return MISS
    stamp = cache.versions.stamp()
    if stamp != seen:
        if cache.current(names) != current:
            return MISS
        aliases[key] = (serial, reply, kind, parse_msg, names, current, stamp, gen, expires, fresh_until)
    cache.local.touched.add(serial)
    if kind == SIMPLE:
        s.unnamed = None  # a simple Query destroys the unnamed statement
    elif kind == PARSED:
        s.unnamed = parse_msg
        s.unnamed_gen += 1
        s.unnamed_writes = tracking.NO_WRITES
    s.queries += 1
    agent = s.agent_stats
    agent.queries += 1
    agent.hits += 1
    agent.count(now)
    agent.latency.instant()
    stats = cache.stats
    stats.hits += 1
    stats.fast_hits += 1
    s.served = "cache"
    transport = s.transport
    assert transport is not None
    transport.write(reply)
    return SERVED


def remember(s: Session, req: cacheable.Request, raw: bytes, entry_key: Hashable, entry: Entry,
             reply: bytes, current: object, stamp: int) -> None:
    """The slow path answered `raw` (the request's bytes) with `reply` from `entry`, the cache
    entry at `entry_key`: alias it."""
    cache = s.server.cache
    assert cache is not None
    aliases = context(s)
    if cache.local.holders.get(s.fast_holder) is not aliases:  # its context was pruned meanwhile
        s.fast_settings = None
        aliases = context(s)
    if req.prefix and req.parse_msg is None:
        if req.stmt_parse is None:
            return
        key: Hashable = (req.stmt_parse, raw)
        kind = BOUND
    else:
        key = raw
        kind = PARSED if req.parse_msg is not None else SIMPLE
    old = aliases.get(key)
    stored = entry[STORED]
    aliases[key] = _fast(entry[SERIAL], reply, kind, req.parse_msg, req.names, current, stamp,
                         cache.fast_gen, stored + cache.local.ttl,
                         stored + req.max_age if req.max_age is not None else math.inf)
    if isinstance(old, Pass):
        cache.passes -= 1  # not a passthrough text any more (the change feed came up...)
    if type(old) is not tuple or old[0] != entry[SERIAL]:  # (else charged to this entry already)
        cache.local.alias(entry_key, entry, s.fast_holder, key,
                          sys.getsizeof(raw) + sys.getsizeof(reply)
                          + _footprint(current) + _OVERHEAD)


def _footprint(current: Any) -> int:
    return sys.getsizeof(current) + (sys.getsizeof(current[1]) if isinstance(current, tuple) else 0)
