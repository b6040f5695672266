"""A session's server connection: getting one (from the pool, a replica, after a resync of
its settings), binding it, giving it back when the transaction is over; and what happens when
it breaks, when the client leaves holding it, or when a CancelRequest comes while waiting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from proxy.backends.backend import Backend, LoginError, send_cancel
from proxy.backends.settings import resync
from proxy.base.logs import fields
from proxy.pgwire import codes, encode
from proxy.pgwire.errors import (
    ADMIN_SHUTDOWN,
    CONNECTION_FAILURE,
    IDLE_IN_TRANSACTION_TIMEOUT,
    QUERY_CANCELED,
    PgError,
)
from proxy.pipeline import caching, entries, replies, routing, tracking
from proxy.pipeline.state import PAUSE_AT, SessionState

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.pipeline.session import Session

log = logging.getLogger("pgsluice.session")


class ServerLink(SessionState):
    """The server-connection half of a session (session.py's Session is the other)."""

    def pump(self) -> None:
        """Move complete client messages on (session.py)."""
        raise NotImplementedError

    def on_backend_data(self) -> None:
        """The bound server connection has data (session.py)."""
        raise NotImplementedError

    @property
    def session(self) -> Session:
        """This object as what it always is: a session.Session (for the pipeline's functions)."""
        return cast("Session", self)

    def _acquire(self) -> bool:
        """A server connection for the request at the head of inbuf: True if bound now; else
        the request waits (PAUSE, the pool's queue, a new connection or a resync)."""
        assert self.pool is not None
        if self.server.paused:  # PAUSE: cache hits go on, new transactions wait for RESUME
            self.server.parked.add(self.session)
            return False
        replicas = self.server.replicas
        routed = routing.route(replicas, self.session) if replicas is not None else None
        pool = self.bpool = routed or self.pool
        backend = pool.try_acquire()
        if backend is not None and backend.applied == self.settings:
            self._bind(backend)
            return True
        if backend is None and pool.size >= pool.settings.max_size:
            # The busy case: wait in the queue with a callback and a timer, no task.
            fut = self._queued = pool.enqueue()
            fut.add_done_callback(self._handed_over)
            self._deadline = asyncio.get_running_loop().call_later(pool.settings.acquire_timeout, fut.cancel)
            return False
        self._task = self._attaching = asyncio.get_running_loop().create_task(self._attach(backend))
        return False

    async def _attach(self, backend: Backend | None) -> None:
        pool = self.bpool
        assert pool is not None and self.pool is not None
        try:
            if backend is None:
                try:
                    backend = await pool.acquire()
                except (PgError, LoginError, OSError) as exc:
                    if pool is self.pool or self.server.replicas is None:
                        raise
                    # a replica that cannot be reached: out of rotation, and this on the primary
                    self.server.replicas.lost(pool)
                    log.warning("replica connection failed (%s): the request runs on the primary", exc)
                    pool = self.bpool = self.pool
                    backend = await pool.acquire()
            if backend.applied != self.settings:
                held, backend = backend, None  # owned by the resync until it succeeds
                try:
                    await resync(held, self.settings)
                except BaseException:
                    pool.discard(held)
                    raise
                backend = held
                # every value as last reported on this connection is this session's now (the
                # resync reports only what differs from that connection's previous state)
                self._report(backend.params)
        except PgError as err:
            self._task = self._attaching = None
            self._cancel_asked = False
            replies.fail_pending(self.session, err)
            if len(self.inbuf) < PAUSE_AT:
                self.resume_reading()
            return
        except LoginError as err:
            self._task = self._attaching = None
            self._cancel_asked = False
            replies.fail_pending(self.session, PgError(err.fields.get("C", CONNECTION_FAILURE),
                                             err.fields.get("M", "login failed")))
            return
        except asyncio.CancelledError:
            if backend is not None and self.closed:
                self.server.spawn(self._cleanup(backend))
            raise
        self._task = self._attaching = None
        if self.closed:
            self.server.spawn(self._cleanup(backend))
            return
        if self._cancel_asked:  # a CancelRequest came meanwhile: the statement is not sent
            self._cancel_asked = False
            pool.release(backend)
            replies.fail_pending(self.session, PgError(QUERY_CANCELED,
                                                       "canceling statement due to user request"))
            if len(self.inbuf) < PAUSE_AT:
                self.resume_reading()
            return
        self._bind(backend)
        self.resume_reading()
        self.pump()

    def cancel_wait(self) -> None:
        """A CancelRequest while this client has no server connection: it stops waiting — for
        an identical query in flight, or in the pool's queue for a server connection (then its
        statement is answered 57014, as Postgres answers a cancelled statement)."""
        if self.waiting and self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._queued is not None and not self._queued.done():
            self._cancel_asked = True
            self._queued.cancel()
        elif self._attaching is not None and self._task is self._attaching and not self._attaching.done():
            self._cancel_asked = True  # opening or preparing a server connection: see _attach

    def _handed_over(self, fut: asyncio.Future[Backend]) -> None:
        """The pool handed us a backend, or our deadline passed, or we left."""
        self._queued = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        pool = self.bpool
        assert pool is not None
        if fut.cancelled():
            if not self.closed:
                if self._cancel_asked:
                    replies.fail_pending(self.session, PgError(QUERY_CANCELED,
                                                       "canceling statement due to user request"))
                else:
                    pool.stats.timeouts += 1
                    replies.fail_pending(self.session, pool.timeout_error())
                if len(self.inbuf) < PAUSE_AT:
                    self.resume_reading()
            self._cancel_asked = False
            return
        exc = fut.exception()
        if exc is not None:  # the pool failed to open a connection for us
            if not self.closed:
                replies.fail_pending(self.session, _pg_error(exc))
            return
        backend = fut.result()
        if self.closed:
            pool.release(backend)  # idle and clean: nobody used it
        elif backend.applied != self.settings:
            self._task = self._attaching = asyncio.get_running_loop().create_task(self._attach(backend))
        else:
            self._bind(backend)
            self.resume_reading()
            self.pump()

    def _report(self, params: dict[str, str]) -> None:
        """Forward ParameterStatus changes the client has not seen yet."""
        out = []
        for name, value in params.items():
            if self.reported.get(name) != value:
                self.reported[name] = value
                out.append(encode.parameter_status(name, value))
        if out:
            self.write(b"".join(out))

    def _bind(self, backend: Backend) -> None:
        self.backend = backend
        backend.holder = self
        backend.on_data = self.on_backend_data
        if backend.last_holder != self.key[0]:
            backend.last_holder = self.key[0]
            self.server.backend_keys.set(backend.pid, self.key[0])
        if not self._writing and backend.transport is not None:
            backend.transport.pause_reading()

    def release(self, now: float | None = None) -> None:
        """Give the backend back: called by relay when the transaction is over (`now`: the
        clock, if the caller has just read it)."""
        backend = self.backend
        assert backend is not None and self.bpool is not None
        self.backend = None
        backend.on_data = backend.idle_data
        if backend.transport is not None and not self._writing:
            backend.transport.resume_reading()
        self.bpool.release(backend, now)

    def idle_in_transaction(self) -> None:
        """Every reply is out and the client holds its server connection inside a transaction:
        with idle_transaction_timeout, it has that long to send something (PgBouncer's)."""
        timeout = self.server.config.idle_transaction_timeout
        backend = self.backend
        if timeout and backend is not None and backend.status != codes.TXN_IDLE and self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._idle_too_long)

    def _idle_too_long(self) -> None:
        self._idle_timer = None
        backend = self.backend
        if self.closed or backend is None or self.entries or backend.status == codes.TXN_IDLE:
            return
        log.info("client idle in transaction too long", extra=fields(
            client=self.token, user=self.user, agent=self.agent,
            seconds=self.server.config.idle_transaction_timeout))
        # the server connection is rolled back now, even if the client (stopped, say) never
        # reads the error and its socket never closes
        self.backend = None
        self.server.spawn(self._cleanup(backend))
        self.fatal(IDLE_IN_TRANSACTION_TIMEOUT, "terminating connection due to idle-in-transaction "
                   "timeout", hint="pgsluice's idle_transaction_timeout closed it.")

    def _backend_lost(self, backend: Backend) -> None:
        self.backend = None
        caching.abandon(self.session)
        tracking.commit_all(self.session)  # it may have committed before the connection broke
        pool = self.bpool
        if pool is not None:
            pool.discard(backend)
            if pool is not self.pool and self.server.replicas is not None:
                self.server.replicas.lost(pool)
                if not self.pinned and backend.status == codes.TXN_IDLE and self._replica_failed():
                    return
        if self.server.shutting_down:
            self.fatal(ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        else:
            self.fatal(CONNECTION_FAILURE, "pgsluice: server connection closed unexpectedly",
                       hint="The server process may have terminated abnormally.")

    # ---- teardown ------------------------------------------------------------------------------

    async def _cleanup(self, backend: Backend) -> None:
        """The client left while holding `backend`: leave nothing idle in transaction."""
        pool = self.bpool
        assert pool is not None
        backend.on_data = backend.idle_data
        try:
            await self._cleanup_backend(pool, backend)
        finally:
            # an autocommit write may have committed before the cancel reached it; and once
            # more a little later, for one still finishing on a dropped connection
            names = tracking.commit_all(self.session)
            if names:
                asyncio.get_running_loop().call_later(2.0, self._bump_again, names)

    def _bump_again(self, names: frozenset[str]) -> None:
        self.committing |= names
        tracking.commit(self.session)

    async def _cleanup_backend(self, pool: Pool, backend: Backend) -> None:
        if backend.closed:
            pool.discard(backend)
            return
        if self.entries or backend.buf or backend.ready_owed:
            # a query is still running for nobody: cancel it and drop the connection
            await send_cancel(pool.upstream, backend.pid, backend.secret)
            pool.discard(backend)
            return
        if backend.unsynced:
            # extended messages with no Sync after them: Postgres may hold an implicit
            # transaction (a Sync would commit it) or skip to a Sync; closing rolls it back
            pool.discard(backend)
            return
        try:
            async with asyncio.timeout(self.server.config.connect_timeout):
                if backend.status != codes.TXN_IDLE:
                    result = await backend.run("ROLLBACK")
                    if result.error is not None:
                        raise PgError(result.error.get("C", ""), "rollback failed")
                if self.pinned:
                    result = await backend.run("DISCARD ALL")
                    if result.error is not None:
                        raise PgError(result.error.get("C", ""), "discard failed")
                    backend.prepared.clear()
                    backend.maybe_prepared.clear()
                    backend.applied = ()
                    backend.unnamed_owner = None
        except (PgError, TimeoutError, OSError):
            pool.discard(backend)
            return
        if backend.status != codes.TXN_IDLE:
            pool.discard(backend)
        else:
            pool.release(backend)

    async def cancel(self) -> None:
        backend, pool = self.backend, self.bpool
        if backend is not None and pool is not None and self.entries:
            await send_cancel(pool.upstream, backend.pid, backend.secret)

    def _replica_failed(self) -> bool:
        """A replica's server connection broke under a read outside a transaction: that read
        gets a clean error (SQLSTATE 08006) and this connection goes on (its next request
        goes elsewhere). False when a reply was mid-way in a way we cannot end cleanly."""
        if self.copy_in or self.stream_left:
            return False
        out = []
        for kind, _arg in self.entries:
            if kind in entries.ENDS_AT_READY:
                out.append(encode.error_response(CONNECTION_FAILURE, "pgsluice: replica connection lost",
                                                 hint="The read can be retried; the replica is out of "
                                                 "rotation until it answers again.")
                           + encode.ready_for_query())
        self.entries.clear()
        self.skipping = False
        self.write(b"".join(out))
        if out:
            self.request_done()
        self.pump()
        return True



def _pg_error(exc: BaseException) -> PgError:
    """What a client waiting for a server connection is told when opening one failed."""
    if isinstance(exc, PgError):
        return exc
    if isinstance(exc, LoginError):
        return PgError(exc.fields.get("C", CONNECTION_FAILURE), exc.fields.get("M", "login failed"))
    return PgError(CONNECTION_FAILURE, f"pgsluice: cannot connect to the server: {exc}")
