"""Read replicas with causal reads (issue 15): which reads may run on a streaming replica.

Rules. A read runs on a replica only if that replica has replayed (pg_last_wal_replay_lsn,
polled every 20 ms) past the WAL position of every write pgsluice knows of to the tables the
read touches. A write is known before anyone can see it — through pgsluice, before its client
hears of the commit; by others, when its change-feed notice arrives, before the cache
versions move — and its tables are "held" until the primary's pg_current_wal_insert_lsn(),
read after that moment, is recorded as their position: meanwhile their reads run on the
primary. A read whose tables are not known needs every write of its database. Anything else,
and everything when no replica qualifies, runs on the primary. Positions only grow; two
names sharing a slot only make reads stricter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg

from cache.versions import SharedLsns
from proxy.backends.backend import Upstream
from proxy.backends.pool import Pool
from proxy.base.config import mask_url, parse_upstream

log = logging.getLogger("pgsluice.replicas")
POLL = 0.02  # s between two polls of a replica's replay position (and of the primary's)
POLL_TIMEOUT = 0.5  # s a poll may take before the replica is counted as down
HISTORY = 30.0  # s of the primary's positions kept to tell a replica's lag in time
_LSN = "(pg_current_wal_insert_lsn() - '0/0')::bigint"
_REPLAY = "SELECT pg_is_in_recovery(), coalesce((pg_last_wal_replay_lsn() - '0/0')::bigint, 0)"


EVERY = "**"  # every read needs it: raised after a worker died (SharedLsns.open_gap)


_I = struct.Struct("!I")
UNKNOWN = 1 << 63  # a position being read: no replica has passed it


def any_name(database: str) -> str:
    """The position of the latest write of `database` known here (a read of unknown tables)."""
    return f"{database}/**"


class Positions:
    """Per name (`db/schema.table`, `db/*` for writes of unknown reach that every read of the
    database needs, `db/**` for any write), the WAL position after which it is current, and
    whether a write's position is still being read (then no replica qualifies)."""

    def __init__(self, shared: SharedLsns | None, worker: int = 0) -> None:
        self.shared = shared
        self.worker = worker
        self._v: dict[str, int] = {}
        self._held: dict[str, int] = {}

    def hold(self, database: str, names: Iterable[str]) -> frozenset[str]:
        """A write to `names` committed; its position is not known yet."""
        held = frozenset({*names, any_name(database)})
        if self.shared is not None:
            self.shared.hold(self.worker, held, +1)
        else:
            for n in held:
                self._held[n] = self._held.get(n, 0) + 1
        return held

    def settle(self, held: frozenset[str], lsn: int) -> None:
        """The held write's position is `lsn` (raised before the hold is let go)."""
        if self.shared is not None:
            self.shared.raise_to(held, lsn)
            self.shared.hold(self.worker, held, -1)
            return
        v, h = self._v, self._held
        for n in held:
            if v.get(n, 0) < lsn:
                v[n] = lsn
            if h.get(n, 0) <= 1:
                h.pop(n, None)
            else:
                h[n] -= 1

    def need(self, names: Iterable[str]) -> int:
        shared = self.shared
        if shared is not None:
            get, held = shared.get, shared.held
            if held(EVERY) or any(held(n) for n in names):
                return UNKNOWN
            return max(get(EVERY), *(get(n) for n in names))
        if self._held and any(n in self._held for n in names):
            return UNKNOWN
        v = self._v
        return max((v.get(n, 0) for n in names), default=0)


class PrimaryPosition:
    """The primary's WAL insert position, read on one control connection; callers that come
    while a read is in flight share the next one (a position read after they asked)."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self.connect = connect
        self._conn: asyncpg.Connection | None = None
        self._next: asyncio.Future[int] | None = None
        self._runner: asyncio.Task[None] | None = None
        self.last = 0
        self.history: deque[tuple[float, int]] = deque()  # (monotonic time, position)

    def after(self) -> asyncio.Future[int]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return self._next

    async def _run(self) -> None:
        while self._next is not None:
            fut, self._next = self._next, None
            try:
                lsn = await self._read()
            except Exception as exc:  # (asyncpg's InternalClientError too): the waiters must hear
                if not fut.done():
                    fut.set_exception(ConnectionError(f"primary position unknown: {exc!r}"))
                    fut.exception()  # retrieved: a caller may have gone
                continue
            now = time.monotonic()
            self.last = lsn
            history = self.history
            if not history or history[-1][1] != lsn:
                history.append((now, lsn))
            while history and now - history[0][0] > HISTORY:
                history.popleft()
            if not fut.done():
                fut.set_result(lsn)

    async def _read(self) -> int:
        async with asyncio.timeout(POLL_TIMEOUT * 4):
            if self._conn is None or self._conn.is_closed():
                self._conn = await self.connect()
            try:
                return int(await self._conn.fetchval(f"SELECT {_LSN}"))
            except BaseException:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
                raise

    def lag(self, replay: int) -> float:
        """Seconds since the primary first stood past `replay` (0: caught up)."""
        if replay >= self.last:
            return 0.0
        for at, lsn in self.history:
            if lsn > replay:
                return time.monotonic() - at
        return 0.0

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=1)


class Replica:
    """One streaming replica: its state, replay position and pools (one per database and user,
    with the primary pool's credentials)."""

    def __init__(self, index: int, url: str, tls: Any) -> None:
        parsed = parse_upstream(url)
        self.index = index
        self.url = url
        self.name = f"{parsed.host}:{parsed.port}"
        self.database = parsed.database
        self.upstream = Upstream(parsed.host, parsed.port, None if parsed.host.startswith("/") else tls)
        self.state = "starting"  # up | lagging | promoted | down
        self.replay = 0
        self.lag = 0.0
        self.reads = 0  # requests routed here
        self.pools: dict[tuple[str, str], Pool] = {}
        self.changed = time.monotonic()

    @property
    def outstanding(self) -> int:
        return sum(p.held + len(p.waiters) for p in self.pools.values())

    def set_state(self, state: str) -> None:
        if state != self.state:
            level = logging.INFO if state == "up" or self.state == "starting" else logging.WARNING
            log.log(level, "replica %s: %s -> %s (lag %.3f s)", self.name, self.state, state, self.lag)
            self.state = state
            self.changed = time.monotonic()

    def masked(self) -> str:
        return mask_url(self.url)


class Replicas:
    """The replicas of one pgsluice worker, their health, and the routing decision."""

    def __init__(self, server: Any, shared: SharedLsns | None) -> None:
        config = server.config
        self.server = server
        self.max_lag = config.replica_max_lag
        self.positions = Positions(shared, server.worker)
        self.primary = PrimaryPosition(lambda: server.control_connection(server.admin_database()))
        self.list = [Replica(i, url, server.upstream.tls) for i, url in enumerate(config.replicas)]
        self.primary_reads = 0
        self.recorded = {"own": 0, "feed": 0}  # write positions read after commits / feed notices
        self.feeds: dict[str, Any] = {}  # change feeds when the cache is off (cache.feed.ChangeFeed)
        self._tasks: list[asyncio.Task[None]] = []
        self._turn = 0
        self.memo: dict[tuple[object, ...], Any] = {}  # (text, simple, facts, catalog) -> read_names
        self._gap: asyncio.Task[None] | None = None

    # ---- positions -------------------------------------------------------------------------------

    def committed(self, database: str, names: Iterable[str], source: str = "own") -> None:
        """A write to `names` (version names: `db/schema.table|...`, `db/*`) committed: until its
        position is read, no replica read of those tables (call before anyone can see the write:
        before its client hears of the commit, before the cache versions move)."""
        held = self.positions.hold(database, {n.split("|", 1)[0] for n in names})
        self.recorded[source] += 1
        self.server.spawn(self._settle(held))

    async def _settle(self, held: frozenset[str]) -> None:
        while True:
            try:
                lsn = await self.primary.after()
            except ConnectionError as exc:
                log.warning("write position not read yet (%s): its tables are read on the primary", exc)
                await asyncio.sleep(0.2)
                continue
            self.positions.settle(held, lsn)
            return

    async def _close_gap(self, shared: SharedLsns) -> None:
        gap = shared.gap()
        try:
            lsn = await self.primary.after()
        except ConnectionError:
            await asyncio.sleep(0.2)
            return
        shared.close_gap(gap, (EVERY,), lsn)
        log.info("replica reads resume: a worker's last writes are covered")

    # ---- health ----------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_primary()))
        for replica in self.list:
            self._tasks.append(loop.create_task(self._watch(replica)))

    async def _watch_primary(self) -> None:
        while True:
            try:
                await self.primary.after()
            except ConnectionError:
                await asyncio.sleep(0.5)  # the primary is away: no connection storm meanwhile
            await asyncio.sleep(POLL)

    async def _watch(self, r: Replica) -> None:
        server = self.server
        while True:
            conn: asyncpg.Connection | None = None
            try:
                async with asyncio.timeout(server.config.connect_timeout):
                    conn = await asyncpg.connect(
                        host=r.upstream.host, port=r.upstream.port, user=server.upstream_user,
                        password=server.upstream_password, database=r.database,
                        ssl=server.upstream_ssl(),
                        server_settings={"application_name": "pgsluice replica watch"})
                while True:
                    async with asyncio.timeout(POLL_TIMEOUT):
                        row = await conn.fetchrow(_REPLAY)
                    assert row is not None
                    recovering, replay = row
                    r.replay = int(replay)
                    r.lag = self.primary.lag(r.replay)
                    r.set_state("promoted" if not recovering else
                                "lagging" if r.lag > self.max_lag else "up")
                    await asyncio.sleep(POLL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever it is (asyncpg's InternalClientError too), the
                # replica is out of rotation until a new connection polls it: this loop never ends
                if r.state != "down":
                    log.warning("replica %s down: %s", r.name, exc or type(exc).__name__)
                r.set_state("down")
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(0.2)

    def lost(self, pool: Pool) -> None:
        """A server connection of `pool` broke: if it is a replica's, out of rotation until
        its next good poll."""
        for r in self.list:
            if pool in r.pools.values() and r.state == "up":
                r.set_state("down")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.primary.close()
        for feed in self.feeds.values():
            await feed.close()
        for r in self.list:
            for pool in r.pools.values():
                pool.close()

    # ---- routing ---------------------------------------------------------------------------------

    def pool(self, r: Replica, primary: Pool) -> Pool:
        pool = r.pools.get(primary.key)
        if pool is None:
            pool = r.pools[primary.key] = Pool(r.upstream, primary.database, primary.user, primary.creds,
                                               self.server.pool_settings())
            pool.trusted = primary.trusted
        return pool

    def choose(self, database: str, names: Iterable[str]) -> Replica | None:
        """A replica in rotation that has replayed every write to `names`, the least busy."""
        shared = self.positions.shared
        if shared is not None and shared.gap():
            if self._gap is None or self._gap.done():
                self._gap = asyncio.get_running_loop().create_task(self._close_gap(shared))
            return None
        need = self.positions.need(names)
        best: Replica | None = None
        replicas = self.list
        n = len(replicas)
        self._turn = turn = (self._turn + 1) % n  # ties go round
        for i in range(n):
            r = replicas[(turn + i) % n]
            if r.state == "up" and r.replay >= need and (best is None or r.outstanding < best.outstanding):
                best = r
        return best

    def rows(self) -> list[tuple[object, ...]]:
        return [(r.name, r.state, r.replay, round(r.lag, 3), r.reads, r.outstanding) for r in self.list] + \
            [("primary", "up", self.primary.last, 0.0, self.primary_reads, None)]
