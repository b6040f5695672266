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
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from cache.local import Entry

from . import caching
from .pgwire import codes

if TYPE_CHECKING:
    from .session import ClientSession

SIMPLE, PARSED, BOUND = range(3)  # a Query; a group with its Parse; a group binding a known statement
_OVERHEAD = 400  # per alias besides its raw bytes, reply and versions: object, dict slot, key tuple
_MAX_CONTEXTS = 10_000


class Fast:
    """One alias: what a request's bytes were answered with, and under which conditions."""

    __slots__ = ("current", "entry", "expires", "fresh_until", "gen", "kind", "names", "parse_msg",
                 "reply", "stamp")

    def __init__(self, entry: Entry, reply: bytes, kind: int, parse_msg: bytes | None,
                 names: tuple[str, ...], current: object, stamp: int, gen: int, ttl: float,
                 max_age: float | None) -> None:
        self.entry = entry
        self.reply = reply  # Parse/BindComplete, the cached messages, ReadyForQuery
        self.kind = kind
        self.parse_msg = parse_msg  # PARSED: the unnamed statement it leaves
        self.names = names
        self.current = current  # (generation, versions of names) in its key
        self.stamp = stamp  # Versions.stamp when `current` was last found true
        self.gen = gen
        self.expires = entry.stored + ttl
        self.fresh_until = entry.stored + max_age if max_age is not None else math.inf


def context(s: ClientSession) -> dict[Hashable, Fast]:
    """The aliases of the session's context (shared by every session in the same one)."""
    if s.fast_settings is s.settings and s.fast_facts is s.facts:
        return s.fast_map
    cache = s.server.cache
    assert cache is not None
    settings, max_age = caching.key_settings(s)
    ctx = (s.facts, settings, max_age)
    maps = cache.fast_maps
    found = maps.get(ctx)
    if found is None:
        if len(maps) >= _MAX_CONTEXTS:  # contexts come and go (settings per tenant...)
            for key in [k for k, m in maps.items() if not m]:
                del maps[key]
        found = maps[ctx] = {}
    s.fast_settings, s.fast_facts, s.fast_map = s.settings, s.facts, found
    return found


def _statement(s: ClientSession, data: bytes) -> bytes | None:
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


def serve(s: ClientSession, data: bytes, now: float) -> bool:
    """Answer `data` (all the client sent, one request) if an alias allows; else False."""
    aliases = s.fast_map if s.fast_settings is s.settings and s.fast_facts is s.facts else context(s)
    if data[0] == codes.F_BIND:
        stmt = _statement(s, data)
        fast = aliases.get((stmt, data)) if stmt is not None else None
    else:
        fast = aliases.get(data)
    if fast is None:
        return False
    cache = s.server.cache
    assert cache is not None
    if fast.gen != cache.fast_gen or now >= fast.expires or now > fast.fresh_until:
        return False
    stamp = cache.versions.stamp()
    if stamp != fast.stamp:
        if cache.current(fast.names) != fast.current:
            return False
        fast.stamp = stamp
    fast.entry.used = True
    kind = fast.kind
    if kind == SIMPLE:
        s.unnamed = None  # a simple Query destroys the unnamed statement
    elif kind == PARSED:
        s.unnamed = fast.parse_msg
        s.unnamed_gen += 1
        s.unnamed_writes = caching.NO_WRITES
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
    transport.write(fast.reply)
    return True


def remember(s: ClientSession, req: caching.Request, raw: bytes, entry: Entry, reply: bytes,
             current: object, stamp: int) -> None:
    """The slow path answered `raw` (the request's bytes) with `reply` from `entry`: alias it."""
    cache = s.server.cache
    assert cache is not None
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
    fast = Fast(entry, reply, kind, req.parse_msg, req.names, current, stamp, cache.fast_gen,
                cache.local.ttl, req.max_age)
    aliases[key] = fast
    if old is None or old.entry is not entry:  # (else it is charged to this entry already)
        cache.local.alias(entry, aliases, key, sys.getsizeof(raw) + sys.getsizeof(reply)
                          + _footprint(current) + _OVERHEAD)


def _footprint(current: Any) -> int:
    return sys.getsizeof(current) + (sys.getsizeof(current[1]) if isinstance(current, tuple) else 0)
