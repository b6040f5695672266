"""Server connection pools, one per (database, user), with a bounded, timed acquire queue.

Rules: a backend is either idle in `idle`, held by exactly one holder, or closed;
`size` counts idle + held + connecting. Waiters are served first-come first-served,
and a waiter that times out gets SQLSTATE 53300, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.backends.backend import Backend, Credentials, LoginError, Upstream, connect
from proxy.pgwire.errors import TOO_MANY_CONNECTIONS, PgError

log = logging.getLogger("pgsluice.pool")


class Pids(set[int]):
    """A pool's server process ids; `changed` is called when one comes or goes (the change
    feed tells our own writes by them, across workers: Server.publish_pids)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed: Callable[[], None] = lambda: None

    def add(self, pid: int) -> None:
        super().add(pid)
        self.changed()

    def discard(self, pid: object) -> None:
        super().discard(pid)
        self.changed()


@dataclass(slots=True)
class PoolSettings:
    min_size: int = 0
    max_size: int = 20
    acquire_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    lifetime: float = 3600.0
    check_delay: float = 30.0


@dataclass(slots=True)
class PoolStats:
    connects: int = 0
    connect_failures: int = 0
    acquires: int = 0
    waits: int = 0
    wait_time: float = 0.0
    timeouts: int = 0


class Pool:
    """Connections to one (database, user)."""

    def __init__(self, upstream: Upstream, database: str, user: str, creds: Credentials,
                 settings: PoolSettings) -> None:
        self.upstream = upstream
        self.database = database
        self.user = user
        self.creds = creds
        self.settings = settings
        self.idle: list[Backend] = []
        self.size = 0
        self.held = 0
        self.waiters: deque[asyncio.Future[Backend]] = deque()
        self.stats = PoolStats()
        self.trusted = False  # Postgres asked this user for no password
        self.server_params: dict[str, str] = {}
        # startup settings -> ParameterStatus values Postgres reported for them
        self.status_cache: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
        self.closed = False
        self.pids = Pids()  # server process ids of this pool's live connections

    @property
    def key(self) -> tuple[str, str]:
        return (self.database, self.user)

    # ---- acquire / release ---------------------------------------------------------------------

    def try_acquire(self) -> Backend | None:
        """An idle backend right now, without waiting, or None."""
        while self.idle:
            backend = self.idle.pop()
            if backend.closed:
                continue
            self.held += 1
            self.stats.acquires += 1
            return backend
        return None

    async def acquire(self) -> Backend:
        backend = self.try_acquire()
        if backend is not None:
            return backend
        if self.size < self.settings.max_size:
            backend = await self._open()
            self.held += 1
            self.stats.acquires += 1
            return backend
        fut = self.enqueue()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.acquire_timeout):
                backend = await fut
        except TimeoutError:
            self.stats.timeouts += 1
            raise self.timeout_error() from None
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed over just as we were cancelled
            raise
        finally:
            self.stats.wait_time += time.monotonic() - started
            if not fut.done():
                fut.cancel()
        return backend

    def enqueue(self) -> asyncio.Future[Backend]:
        """Join the queue for the next free backend (first come, first served). The caller
        awaits the future or adds a done-callback, and cancels it at its deadline."""
        fut: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.stats.waits += 1
        return fut

    def timeout_error(self) -> PgError:
        return PgError(
            TOO_MANY_CONNECTIONS,
            f"pgsluice: no server connection for database \"{self.database}\" user "
            f"\"{self.user}\" became free within {self.settings.acquire_timeout:g} s "
            f"(pool_max_size={self.settings.max_size})",
            hint="Raise pool_max_size or pool_acquire_timeout, or shorten transactions.",
        )

    def release(self, backend: Backend, now: float | None = None) -> None:
        """Give a backend back: kept only if idle with every message answered (Backend.clean);
        one in any other state (mid-transaction, skipping to a Sync, a reply unread) is closed.
        `now`: the clock, if the caller has just read it."""
        self.held -= 1
        backend.holder = None
        backend.last_used = time.monotonic() if now is None else now
        backend.uses += 1
        if not backend.clean or self.closed or backend.last_used - backend.created > self.settings.lifetime:
            if not backend.closed and not backend.clean:
                log.warning("pool %s/%s: server connection %d returned in state %s (%d replies owed%s):"
                            " closed", self.database, self.user, backend.pid, chr(backend.status),
                            backend.ready_owed, ", no Sync yet" if backend.unsynced else "")
            self._drop(backend)
            self.wake_for_capacity()
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.held += 1
                self.stats.acquires += 1
                fut.set_result(backend)
                return
        self.idle.append(backend)

    def discard(self, backend: Backend) -> None:
        """A held backend that must not be reused (broken, or state unknown)."""
        self.held -= 1
        backend.holder = None
        self._drop(backend)
        self.wake_for_capacity()

    def _drop(self, backend: Backend) -> None:
        if not backend.closed:
            backend.close()
        if backend.on_lost is not None:
            backend.on_lost = None
            self.pids.discard(backend.pid)
            self.size -= 1

    def wake_for_capacity(self) -> None:
        """A slot freed up: let the first waiter open a new connection."""
        while self.waiters and self.size < self.settings.max_size:
            fut = self.waiters.popleft()
            if fut.done():
                continue
            self.size += 1
            task = asyncio.get_running_loop().create_task(self._open_for(fut))
            task.add_done_callback(_log_task_error)
            return

    async def _open_for(self, fut: asyncio.Future[Backend]) -> None:
        self.size -= 1  # _open counts it again
        try:
            backend = await self._open()
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        if fut.done():
            self.idle.append(backend)
        else:
            self.held += 1
            self.stats.acquires += 1
            fut.set_result(backend)

    # ---- connections ---------------------------------------------------------------------------

    async def _open(self) -> Backend:
        self.size += 1
        try:
            backend = await connect(self.upstream, self.user, self.database, self.creds,
                                    self.settings.connect_timeout)
        except BaseException:
            self.size -= 1
            self.stats.connect_failures += 1
            raise
        self.stats.connects += 1
        backend.on_lost = self._lost
        self.pids.add(backend.pid)
        if not self.server_params:
            self.server_params = dict(backend.params)
        return backend

    def adopt(self, backend: Backend) -> bool:
        """Take in a connection opened elsewhere (a login's) as held; when the pool is full it
        is closed instead (False)."""
        if self.size >= self.settings.max_size:
            backend.close()
            return False
        self.size += 1
        self.held += 1
        self.stats.connects += 1
        backend.on_lost = self._lost
        self.pids.add(backend.pid)
        if not self.server_params:
            self.server_params = dict(backend.params)
        return True

    def _lost(self, backend: Backend) -> None:
        backend.on_lost = None
        self.pids.discard(backend.pid)
        self.size -= 1
        if backend in self.idle:
            self.idle.remove(backend)
        if not self.closed:
            self.wake_for_capacity()

    async def maintain(self) -> None:
        """Janitor pass: close idle-too-long, ping stale idle ones, top up to min_size."""
        now = time.monotonic()
        keep: list[Backend] = []
        for backend in self.idle:
            idle_for = now - backend.last_used
            if backend.closed:
                continue
            if (idle_for > self.settings.idle_timeout and self.size > self.settings.min_size) or \
                    now - backend.created > self.settings.lifetime:
                self._drop(backend)
            else:
                keep.append(backend)
        self.idle[:] = keep
        for backend in list(self.idle):
            if now - backend.last_used > self.settings.check_delay and backend in self.idle:
                self.idle.remove(backend)
                self.held += 1
                ok = await _ping(backend)
                if ok:
                    self.release(backend)
                else:
                    self.discard(backend)
        if self.creds.any() or self.trusted:
            while self.size < self.settings.min_size and not self.closed:
                try:
                    backend = await self._open()
                except (PgError, LoginError, OSError) as exc:
                    log.warning("pool %s/%s: cannot open connection: %s", self.database,
                                self.user, exc)
                    return
                self.held += 1
                self.release(backend)

    def close_idle(self) -> int:
        """Close every idle connection (DROP DATABASE is about to run); returns how many."""
        idle, self.idle = self.idle, []
        for backend in idle:
            self._drop(backend)
        return len(idle)

    def close(self) -> None:
        self.closed = True
        for backend in self.idle:
            self._drop(backend)
        self.idle.clear()
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(PgError("57P01", "terminating connection due to administrator command",
                                          severity="FATAL"))
        self.waiters.clear()


async def _ping(backend: Backend) -> bool:
    try:
        async with asyncio.timeout(5):
            result = await backend.run("")
    except (TimeoutError, PgError, OSError):
        return False
    return result.error is None and not backend.closed


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pool task failed", exc_info=task.exception())
