"""The cache as the pipeline sees it: admission, keys, tiers, single-flight, versions, feeds.

    reason = cache.admit(plan, database)          # None, or why this read is not cached
    await cache.sync()                            # with Redis: the version barrier
    key = cache.key(...); cache.local.get(key)    # the in-process tier (sync)
    flight = cache.flights.get(key) or cache.lead(key)
    ...; cache.land(flight, payload, storable)    # waiters get the payload, tiers store it
    cache.bump(names)                             # a write committed: before the client sees it

Correctness rules (DESIGN.md): keys carry every version a read depends on, versions only
grow, a write bumps before its client hears of it, and whenever versions may have been
missed (Redis or a change feed away) the affected reads bypass the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from planner import Plan
from planner.reach import ReadDep

from .deps import Bound, Values, read_names
from .feed import ChangeFeed
from .local import LocalCache
from .redis_tier import RedisDown, RedisTier
from .versions import SharedCounters, Versions

log = logging.getLogger("pgsluice.cache")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = True
    max_bytes: int = 256 * 1024 * 1024
    max_entry: int = 1024 * 1024
    ttl: float = 60.0
    redis: str = ""
    redis_timeout: float = 0.05
    requires_feed: bool = True  # cache a table only while a change feed covers it


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    fast_hits: int = 0  # of hits: answered by the wire door's fast path (proxy/pipeline/fastpath.py)
    known_passes: int = 0  # simple Queries sent as they were sent before, not analysed again
    redis_hits: int = 0  # of hits: found in the Redis tier
    misses: int = 0
    coalesced: int = 0  # waited for an identical query in flight
    stores: int = 0
    too_large: int = 0
    bumps: int = 0
    feed_bumps: int = 0
    feed_own: int = 0  # feed notifications of writes made here (bumped by their session)
    redis_errors: int = 0
    bypass: dict[str, int] = field(default_factory=dict)

    def bypassed(self, reason: str) -> None:
        self.bypass[reason] = self.bypass.get(reason, 0) + 1


class Flight:
    """One execution many identical requests wait for. `future` gets the reply (the wire
    messages before ReadyForQuery) or None: the leader went away, run it yourselves."""

    __slots__ = ("future", "key", "redis_key", "waiters")

    def __init__(self, key: Hashable, redis_key: str) -> None:
        self.key = key
        self.redis_key = redis_key
        self.future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.waiters = 0


def redis_key(key: Hashable) -> str:
    return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()


class Cache:
    def __init__(self, settings: CacheSettings, shared: SharedCounters | None = None) -> None:
        self.settings = settings
        self.local = LocalCache(settings.max_bytes, settings.max_entry, settings.ttl)
        # several workers without Redis share versions in memory; with Redis, Redis does
        self.versions = Versions(shared if not settings.redis else None)
        self.stats = CacheStats()
        self.flights: dict[Hashable, Flight] = {}
        self.feeds: dict[str, ChangeFeed] = {}
        self.redis: RedisTier | None = None
        if settings.redis:
            self.redis = RedisTier(settings.redis, self.versions, settings.redis_timeout, self._redis_changed)
        self._tasks: set[asyncio.Task[None]] = set()
        self.own_pid: Callable[[int], bool] = lambda _pid: False
        self._read_names: dict[tuple[object, ...], tuple[str, ...]] = {}
        self._feed_pending: set[str] = set()
        self._feed_task: asyncio.Task[None] | None = None
        # The wire door's fast path (proxy/pipeline/fastpath.py): per session context, raw request ->
        # an alias of a local entry. `fast_gen` moves whenever a plan or an admission decision
        # may have changed (catalog, guardrails, change feed state, Redis): aliases made
        # before are not used. With Redis there is none: every look-up waits for the barrier.
        self.fast = not settings.redis
        self.fast_gen = 0
        self.fast_maps: dict[Hashable, tuple[int, dict[Hashable, Any]]] = {}  # (holder id, aliases)
        self.passes = 0  # passthrough texts remembered in them

    def plans_changed(self) -> None:
        """A planner dropped its plans, or a change feed's state moved (Planner.on_change,
        ChangeFeed.on_state): what the fast path learnt from them is not trusted."""
        self.fast_gen += 1

    # ---- lifecycle ----

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()

    async def close(self) -> None:
        for feed in self.feeds.values():
            await feed.close()
        if self.redis is not None:
            await self.redis.close()
        for task in list(self._tasks):
            task.cancel()

    def add_feed(self, feed: ChangeFeed) -> None:
        self.feeds[feed.database] = feed
        feed.on_state = self.plans_changed
        self.plans_changed()
        feed.start()

    def _redis_changed(self, up: bool) -> None:
        # the history of versions this process saw may be incomplete either way: start over
        self.plans_changed()
        self.local.clear()
        if not up:
            self.versions.reset()

    # ---- admission ----

    def active(self, database: str) -> bool:
        """Whether anything of `database` can be cached, here or by another instance sharing
        the versions. When not (the change feed is required and known not to be installed
        there), pgsluice skips planning reads and tracking writes: the feed's arrival is DDL,
        which bumps every version of the database. Until the feed's first connection says
        whether it is installed, writes are tracked (other instances may be caching)."""
        if not self.settings.requires_feed:
            return True
        feed = self.feeds.get(database)
        return feed is not None and (feed.installed or not feed.checked)

    def admit(self, plan: Plan, database: str) -> str | None:
        """None if this read may be answered from cache, else the bypass reason."""
        if not plan.cacheable:
            return "not cacheable"
        feed = self.feeds.get(database)
        covered = feed is not None and feed.covers(plan.tables_read)
        if not covered:
            if feed is not None and feed.installed and not feed.up:
                return "change feed down"
            if self.settings.requires_feed:
                return "not covered by change feed"
        redis = self.redis
        if redis is not None and not redis.up:
            # another instance's writes are invisible without the shared versions (the change
            # feed is not synchronous with their acknowledgement): correct and slower
            return "redis down"
        return None

    @property
    def needs_sync(self) -> bool:
        """Whether a lookup must wait for the version barrier (Redis is up)."""
        return self.redis is not None and self.redis.up

    async def sync(self, names: tuple[str, ...]) -> bool:
        """With Redis: bring the mirror up to date for `names`. False: bypass this lookup."""
        redis = self.redis
        if redis is None or not redis.up:
            return True
        try:
            await redis.barrier()
            missing = self.versions.known(names)
            if missing:
                await redis.load_versions(missing)
        except RedisDown:
            self.stats.redis_errors += 1
            return False
        return True

    def read_names(self, database: str, plan: Plan, bound: Bound | None = None) -> tuple[str, ...]:
        """The versions a read's key carries (deps.py), at the grain its plan worked out; a
        read without that analysis depends on every row and column of each table it reads."""
        reach = plan.reach
        if reach is not None and reach.bound and bound is not None:
            return read_names(database, reach.reads, Values(reach.own_params, plan.params, bound))
        memo_key: tuple[object, ...] = (database, reach, plan.params) if reach is not None else \
            (database, plan.tables_read)
        names = self._read_names.get(memo_key)
        if names is None:
            if len(self._read_names) > 100_000:
                self._read_names.clear()
            deps = reach.reads if reach is not None else \
                tuple(ReadDep(t, None) for t in sorted(plan.tables_read))
            own = reach.own_params if reach is not None else 0
            names = self._read_names[memo_key] = read_names(database, deps, Values(own, plan.params))
        return names

    def current(self, names: tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
        return self.versions.generation, self.versions.get(names)

    # ---- single-flight ----

    def lead(self, key: Hashable) -> Flight:
        flight = self.flights[key] = Flight(key, redis_key(key) if self.redis is not None else "")
        self.stats.misses += 1
        return flight

    def land(self, flight: Flight, payload: bytes | None, storable: bool) -> None:
        """The leader's reply is complete (payload None: it gave up)."""
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        if not flight.future.done():
            flight.future.set_result(payload)
        if payload is None or not storable:
            return
        if self.local.put(flight.key, payload):
            self.stats.stores += 1
            redis = self.redis
            if redis is not None and redis.up:
                self._spawn(self._redis_put(redis, flight.redis_key, payload))
        else:
            self.stats.too_large += 1

    async def _redis_put(self, redis: RedisTier, key: str, payload: bytes) -> None:
        try:
            await redis.put(key, payload, self.settings.ttl)
        except RedisDown:
            self.stats.redis_errors += 1

    async def redis_get(self, flight: Flight, max_age: float | None) -> bytes | None:
        redis = self.redis
        if redis is None or not redis.up:
            return None
        try:
            found = await redis.get(flight.redis_key)
        except RedisDown:
            self.stats.redis_errors += 1
            return None
        if found is None:
            return None
        value, age = found
        limit = self.settings.ttl if max_age is None else min(max_age, self.settings.ttl)
        if age > limit:
            return None
        self.local.put(flight.key, value)
        return value

    # ---- versions ----

    def bump(self, names: Iterable[str]) -> asyncio.Task[None] | None:
        """A write committed: bump the versions `names` (deps.write_names). Without Redis (or
        while it is away) they move at once; with Redis the returned task moves them there, and
        the client must not see the write's completion before it ends."""
        names = sorted(set(names))
        self.stats.bumps += 1
        redis = self.redis
        if redis is None or not redis.up:
            self.versions.bump(names)
            if redis is not None:
                redis._dirty.update(names)  # pushed to Redis when it is back
            return None
        task = asyncio.get_running_loop().create_task(self._redis_bump(redis, names))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _redis_bump(self, redis: RedisTier, names: list[str]) -> None:
        try:
            await redis.bump(names)
        except RedisDown:
            # Redis may not have it: nothing this process stored may be trusted any more, and
            # the bump goes again when the tier reconnects (which also shares its generation
            # again: a private one would keep this instance from the Redis tier for good)
            self.stats.redis_errors += 1
            self.versions.reset()
            self.local.clear()
            redis.resync()

    def feed_change(self, names: frozenset[str], pid: int = 0) -> None:
        """A change feed saw a commit by server process `pid` (0: unknown) that changed what
        `names` stand for (deps.write_names of the change and its closure). A commit by one of
        our own server connections (Server.own_pid: any worker) is not bumped twice: the
        session that sent it bumped it, as finely as the planner saw it, before its client
        heard of the commit. A pgsluice that died first (its worker restarted) moved the epoch."""
        if pid and self.own_pid(pid):
            self.stats.feed_own += 1
            return
        self.stats.feed_bumps += 1
        redis = self.redis
        if redis is None or not redis.up:
            self.bump(names)
            return
        # many notifications, few round trips: bumps queued while one is in flight go together
        self._feed_pending |= names
        if self._feed_task is None or self._feed_task.done():
            self._feed_task = asyncio.get_running_loop().create_task(self._feed_bumps(redis))

    async def _feed_bumps(self, redis: RedisTier) -> None:
        while self._feed_pending:
            batch, self._feed_pending = sorted(self._feed_pending), set()
            await self._redis_bump(redis, batch)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- visibility ----

    def rows(self) -> list[tuple[str, str]]:
        """SHOW CACHE: (name, value) pairs."""
        s, ls = self.stats, self.local.stats
        out = [("hits", s.hits), ("fast_hits", s.fast_hits), ("hits_from_redis", s.redis_hits),
               ("misses", s.misses), ("coalesced", s.coalesced), ("stores", s.stores),
               ("too_large", s.too_large + ls.too_large),
               ("evictions", ls.evictions), ("expired", ls.expired), ("entries", ls.entries),
               ("bytes", ls.bytes), ("max_bytes", self.local.max_bytes), ("in_flight", len(self.flights)),
               ("known_passthrough", s.known_passes), ("write_bumps", s.bumps), ("feed_bumps", s.feed_bumps),
               ("feed_own_writes", s.feed_own)]
        rows = [(k, str(v)) for k, v in out]
        rows += [(f"bypass: {reason}", str(n)) for reason, n in sorted(s.bypass.items())]
        if self.redis is not None:
            rows += [("redis", "up" if self.redis.up else "down"), ("redis_errors", str(s.redis_errors))]
        for db, feed in sorted(self.feeds.items()):
            state = "up" if feed.up else "down"
            if not feed.installed:
                state += " (not installed: run pgsluice install-change-feed)"
            rows += [(f"change_feed {db}", f"{state}, {len(feed.covered)} tables, "
                      f"{feed.notifications} notifications")]
            if feed.checked and not self.active(db):
                rows.append((f"caching {db}", f"OFF: no change feed (run `pgsluice install-change-feed "
                             f"--database {db}`, or set cache_requires_feed = false)"))
            else:
                rows.append((f"caching {db}", "on" if feed.checked else "starting"))
        return rows
