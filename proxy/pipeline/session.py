"""One client's session in the pipeline, whatever door it came through: transaction-pooled relay.

A door makes a Session (the wire door's WireSession adds sockets, TLS and login; the
in-process client of the gRPC and MCP doors gives it a socketless transport), starts it with
a LoginResult, feeds it Postgres frontend messages with data_received and reads the backend
messages it writes to its transport. That is the whole interface: the pipeline never knows
which door a session belongs to.

Rules (PgBouncer's): a client holds a backend from its first message until
ReadyForQuery says 'I' with nothing outstanding; then the backend goes back to the
pool, unless the client is pinned by session state it created. Responses are
tracked per message sent (see relay.py) so that pgsluice can answer for prepared
statements it keeps on its own and swallow what it sent itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from planner import Planner, Policy, SessionFacts
from planner.guard import session_settings
from proxy.backends.backend import Backend, LoginError, send_cancel
from proxy.backends.settings import Settings, resync, set_config
from proxy.base.logs import fields, peer_text
from proxy.base.stats import AgentStats
from proxy.pgwire import codes, encode
from proxy.pgwire.errors import (
    ADMIN_SHUTDOWN,
    CONNECTION_FAILURE,
    IDLE_IN_TRANSACTION_TIMEOUT,
    QUERY_CANCELED,
    PgError,
    ProtocolError,
)
from proxy.pipeline import caching, fastpath, relay, replies, tracking

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.base.config import Config
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.session")
_I = struct.Struct("!I")
_PAUSE_AT = 1 << 20  # buffered client bytes while waiting for a backend
_tokens = itertools.count(1)
_CACHEABLE_HEADS = (codes.F_QUERY, codes.F_PARSE, codes.F_BIND)  # requests the cache may answer


class LoginResult:
    """Who a session is, as its door's login found: what Session.start needs. pool None: the
    admin console (the wire door's own)."""

    __slots__ = ("database", "params", "pool", "settings", "user", "welcome")

    def __init__(self, user: str, database: str, params: dict[str, str], pool: Pool | None,
                 settings: tuple[tuple[str, str], ...], welcome: dict[str, str]) -> None:
        self.user = user
        self.database = database
        self.params = params
        self.pool = pool
        self.settings = settings
        self.welcome = welcome


class Session(asyncio.Protocol):
    """See module docstring. States: login (the door's, until start) -> ready -> closed."""

    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer: object = None
        self.inbuf = bytearray()
        self.state = "login"
        self.closed = False
        self.user = ""
        self.database = ""
        self.pool: Pool | None = None  # the primary's, for this database and user
        self.bpool: Pool | None = None  # the pool `backend` came from (the primary's or a replica's)
        self.route_source: object = None  # settings `route_forced` was worked out from
        self.route_forced = False  # SET pgsluice.route = primary
        self.backend: Backend | None = None
        self.key = (0, b"")
        self.startup_settings: Settings = ()
        self.settings: Settings = ()
        self.reported: dict[str, str] = {}
        self.pinned: str | None = None
        # relay state
        self.entries: deque[relay.Entry] = deque()
        self.statements: dict[bytes, relay.Statement] = {}
        self.unnamed: bytes | None = None  # the client's last unnamed Parse message
        self.unnamed_gen = 0
        self.unnamed_writes = tracking.NO_WRITES  # what the unnamed statement may change
        self.stream_left = 0  # bytes of a large backend message still to pass through
        self.skipping = False  # Postgres is discarding messages until Sync after an error
        self.copy_in = False  # a COPY FROM STDIN of this client's may be running (relay.py)
        self.token = next(_tokens)
        self.queries = 0
        # guardrails (issue 3): set at login when a role policy matches this session
        self.policy: Policy | None = None
        self.planner: Planner | None = None
        self.facts = SessionFacts()
        self.agent = ""
        self.agent_stats = AgentStats()
        self.row_cap = 0  # max_rows_mode = "cut": rows past this are dropped, with a NOTICE
        self.rows_seen = self.rows_cut = 0
        self._waiter: asyncio.Future[None] | None = None
        self._queued: asyncio.Future[Backend] | None = None  # in the pool's queue, no task
        self._cancel_asked = False  # a CancelRequest ended the wait in the queue
        self._attaching: asyncio.Task[None] | None = None  # _attach, while it runs
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[None] | None = None  # a task, or a cache look-up's marker
        self._paused = False
        self._writing = True
        # cache (issue 4): see caching.py
        self.fill: caching.Fill | None = None  # this client leads a flight: its reply fills it
        # (ReadyForQuery no., versions, may change the catalog)
        self.write_marks: deque[tuple[int, frozenset[str], bool]] = deque()
        self.committing: set[str] = set()  # versions written in the transaction now open
        self.committing_ddl = False  # ... and it may have changed the catalog
        self.ready_seen = 0  # ReadyForQuery messages from servers so far
        self.held: list[bytes] = []  # output held back until the write's bump
        self._gate: list[bytes] | None = None  # output waiting for a bump in Redis
        self._cache_done = False  # the head Query already went through the cache
        self.waiting = False  # for an identical query in flight (a CancelRequest stops that)
        self.served = "executed"  # how the last cacheable request was answered (internal clients)
        self.uncached = False  # never looked up (burst batching's own sessions, batching.py)
        self.key_source: object = None
        self.key_settings: tuple[tuple[str, str], ...] = ()
        self.max_staleness: float | None = None
        # the fast path (fastpath.py): whether it may answer this session, and its aliases
        self.fast_ok = False
        self.fast_settings: object = None
        self.fast_facts: object = None
        self.fast_map: dict[Any, Any] = {}
        self.head: fastpath.Pass | fastpath.Head | None = None  # try_query -> relay.forward
        # operations (issue 5)
        self.connected_at = time.monotonic()
        self.last_sql = b""  # the last statement text sent (for the logs), truncated
        self.request_started = self.connected_at
        self.now = self.connected_at  # when the bytes being handled arrived (data_received)
        self._idle_timer: asyncio.TimerHandle | None = None  # idle_transaction_timeout

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        self.server.clients.add(self)
        self.server.stats.clients_total += 1

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        now = self.now = time.monotonic()  # the one clock read of this pass
        if not self.entries and self.backend is None and self._task is None:
            self.request_started = now
            if self.fast_ok and not self.inbuf and self._queued is None and not self.skipping \
                    and not self._cache_done and self._gate is None:
                outcome = fastpath.serve(self, data, now)
                if outcome == fastpath.SERVED:
                    return
                if outcome == fastpath.KNOWN and not self.server.paused:
                    # a passthrough text seen before: straight to a server connection
                    self.inbuf += data
                    head = self.head
                    if self._acquire() and isinstance(head, fastpath.Pass):
                        relay.send_known(self, head)
                    return
        self.inbuf += data
        self.pump()
        if self.backend is not None and not self.entries:  # part of a message only
            self.idle_in_transaction()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.server.clients.discard(self)
        self.server.cancel_keys.pop(self.key, None)
        if self.fill is not None:
            caching.abandon(self)
        if self.state != "login":
            log.info("client disconnected", extra=fields(
                client=self.token, user=self.user, database=self.database, agent=self.agent,
                queries=self.queries, seconds=round(time.monotonic() - self.connected_at, 3)))
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._queued is not None:
            self._queued.cancel()
        backend = self.backend
        if backend is not None:
            self.backend = None
            self.server.spawn(self._cleanup(backend))

    def pause_writing(self) -> None:
        self._writing = False
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing = True
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    # backend flow control calls these
    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    # ---- output --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._gate is not None:
            self._gate.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def gate_until(self, task: asyncio.Task[None]) -> None:
        """Hold all output to the client until `task` (a version bump in Redis) is over."""
        if self._gate is None:
            self._gate = []
        task.add_done_callback(self._open_gate)

    def _open_gate(self, _task: object) -> None:
        gate, self._gate = self._gate, None
        if gate:
            self.write(b"".join(gate))

    def fatal(self, sqlstate: str, message: str, **kw: str | None) -> None:
        """Send a FATAL ErrorResponse and close this connection only."""
        self.write(encode.error_response(sqlstate, message, severity="FATAL", **kw))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def start(self, result: LoginResult) -> None:
        """Logged in: ready for requests (the door has written nothing yet; this writes the
        welcome and runs what came early)."""
        assert result.pool is not None
        log.info("client connected", extra=fields(client=self.token, peer=peer_text(self.peer),
                                                  user=result.user, database=result.database,
                                                  agent=result.params.get("application_name", "")))
        self.user, self.database, self.pool = result.user, result.database, result.pool
        self.startup_settings = self.settings = result.settings
        app = result.params.get("application_name", "")
        self.set_agent(app or self.user)
        self.facts, policy = session_facts(self.server.config, self.user, self.database, result.params)
        if self.server.tracks_writes:
            self.planner = self.server.planner_for(self.database)
        if policy is not None:
            self.policy = policy
            self.planner = self.server.planner_for(self.database)
            if policy.max_rows and policy.max_rows_mode == "cut":
                self.row_cap = policy.max_rows
            # Postgres enforces read-only and the timeout too, on every server connection used
            self.startup_settings = self.settings = result.settings + tuple(
                (name, set_config(name, value)) for name, value in session_settings(policy))
        self.reported = result.welcome
        cache = self.server.cache
        self.fast_ok = cache is not None and cache.fast and not self.row_cap
        self.welcome(result, "ready")
        self.pump()

    def welcome(self, result: LoginResult, state: str) -> None:
        """ParameterStatus, BackendKeyData, ReadyForQuery."""
        self.key = self.server.new_cancel_key(self)
        self.write(encode.parameter_statuses(result.welcome)
                   + encode.backend_key_data(self.key[0], _I.unpack(self.key[1])[0])
                   + encode.ready_for_query())
        self.state = state
        self._task = None

    # ---- relay: client -> backend ----------------------------------------------------------------

    def pump(self) -> None:
        """Move complete client messages to a backend, getting one if needed."""
        if self.closed or self.state != "ready":
            return
        if self.backend is None:
            if self._task is not None or self._queued is not None:  # already getting one
                if len(self.inbuf) > _PAUSE_AT:
                    self.pause_reading()
                return
            while True:
                try:
                    if not relay.has_message(self.inbuf, self.server.config.max_message_size):
                        return
                    code = self.inbuf[0]
                    if code not in codes.FRONTEND_CODES or code == codes.F_PASSWORD:
                        raise ProtocolError(f"invalid frontend message type {code}")
                except ProtocolError as exc:
                    self.fatal(exc.sqlstate, exc.message)
                    return
                if code == codes.F_TERMINATE:
                    self.close()
                    return
                if self.skipping:  # after a failed acquire: discard up to Sync, as Postgres would
                    replies.skip_to_sync(self)
                    continue
                if self.server.cache is None or self.pinned or self.uncached or code not in _CACHEABLE_HEADS:
                    break
                if self._cache_done:
                    self._cache_done = False
                    break
                outcome = caching.try_query(self) if code == codes.F_QUERY else caching.try_extended(self)
                if outcome == caching.PASS:
                    break
                if outcome == caching.ASYNC or self.closed:
                    return
            if not self._acquire():
                return
        head = self.head
        if isinstance(head, fastpath.Pass) and fastpath.known_whole(self, head):
            relay.send_known(self, head)
            return
        try:
            relay.forward(self)
        except ProtocolError as exc:
            self.fatal(exc.sqlstate, exc.message)
            backend = self.backend
            if backend is not None:
                self.backend = None
                self.server.spawn(self._cleanup(backend))

    def _acquire(self) -> bool:
        """A server connection for the request at the head of inbuf: True if bound now; else
        the request waits (PAUSE, the pool's queue, a new connection or a resync)."""
        assert self.pool is not None
        if self.server.paused:  # PAUSE: cache hits go on, new transactions wait for RESUME
            self.server.parked.add(self)
            return False
        replicas = self.server.replicas
        pool = self.bpool = (replicas.route(self) if replicas is not None else None) or self.pool
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
            replies.fail_pending(self, err)
            if len(self.inbuf) < _PAUSE_AT:
                self.resume_reading()
            return
        except LoginError as err:
            self._task = self._attaching = None
            self._cancel_asked = False
            replies.fail_pending(self, PgError(err.fields.get("C", CONNECTION_FAILURE),
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
            replies.fail_pending(self, PgError(QUERY_CANCELED, "canceling statement due to user request"))
            if len(self.inbuf) < _PAUSE_AT:
                self.resume_reading()
            return
        self._bind(backend)
        self.resume_reading()
        self.pump()

    def hold(self, marker: asyncio.Future[None]) -> None:
        """Busy until resume_pump: `marker` is cancelled if the client goes away."""
        self._task = marker

    def spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as this client's one pending task: pump waits until resume_pump."""
        self._task = asyncio.get_running_loop().create_task(coro)

    def resume_pump_admin(self) -> None:
        self._task = None

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

    def resume_pump(self, cache_done: bool) -> None:
        self._task = None
        self._cache_done = cache_done
        if len(self.inbuf) < _PAUSE_AT:
            self.resume_reading()
        self.pump()

    @property
    def last_statement(self) -> str:
        """The last statement sent (truncated), for a log line: decoded only when one is written."""
        return self.last_sql.decode("utf-8", "replace")

    @property
    def busy(self) -> bool:
        """Waiting for a server connection, or for a cache look-up or an identical query."""
        return self._task is not None or self._queued is not None

    def note_query(self) -> None:
        """One query (counted in the second it arrived)."""
        self.agent_stats.queries += 1
        self.agent_stats.count(self.now)

    def request_done(self) -> float:
        """A reply ended with ReadyForQuery: the time since the request came in. Returns now."""
        now = time.monotonic()
        elapsed = now - self.request_started
        self.agent_stats.latency.observe(elapsed)
        self.request_started = now
        slow = self.server.config.slow_query_ms
        if slow and elapsed * 1000 >= slow:
            log.warning("slow query", extra=fields(client=self.token, agent=self.agent,
                                                   ms=round(elapsed * 1000, 1), sql=self.last_statement))
        return now

    def set_agent(self, name: str) -> None:
        if name != self.agent:
            self.agent = name
            self.agent_stats = self.server.stats.agent(name)

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
                    replies.fail_pending(self, PgError(QUERY_CANCELED,
                                                       "canceling statement due to user request"))
                else:
                    pool.stats.timeouts += 1
                    replies.fail_pending(self, pool.timeout_error())
                if len(self.inbuf) < _PAUSE_AT:
                    self.resume_reading()
            self._cancel_asked = False
            return
        exc = fut.exception()
        if exc is not None:  # the pool failed to open a connection for us
            if not self.closed:
                replies.fail_pending(self, _pg_error(exc))
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
        backend.on_data = backend._idle_data
        if backend.transport is not None and not self._writing:
            backend.transport.resume_reading()
        self.bpool.release(backend, now)

    def on_backend_data(self) -> None:
        backend = self.backend
        if backend is None:
            return
        if backend.closed and not backend.buf:
            self._backend_lost(backend)
            return
        try:
            replies.backward(self, backend)
        except ProtocolError as exc:
            log.error("protocol error from server: %s", exc.message)
            backend.abort()
            self._backend_lost(backend)
            return
        if backend.closed and self.backend is backend:
            self._backend_lost(backend)

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
        caching.abandon(self)
        tracking.commit_all(self)  # it may have committed before the connection broke
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
        backend.on_data = backend._idle_data
        try:
            await self._cleanup_backend(pool, backend)
        finally:
            # an autocommit write may have committed before the cancel reached it; and once
            # more a little later, for one still finishing on a dropped connection
            names = tracking.commit_all(self)
            if names:
                asyncio.get_running_loop().call_later(2.0, self._bump_again, names)

    def _bump_again(self, names: frozenset[str]) -> None:
        self.committing |= names
        tracking.commit(self)

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

    def pin(self, reason: str) -> None:
        """Keep this client on its backend for the rest of its session."""
        if self.pinned is None:
            self.pinned = reason
            self.fast_ok = False
            self.server.stats.pinned += 1
            log.debug("client %s pinned: %s", self.peer, reason)

    async def cancel(self) -> None:
        backend, pool = self.backend, self.bpool
        if backend is not None and pool is not None and self.entries:
            await send_cancel(pool.upstream, backend.pid, backend.secret)

    def route_primary(self) -> bool:
        """SET pgsluice.route = primary is in force."""
        if self.route_source is not self.settings:
            self.route_source = self.settings
            self.route_forced = any(name == "pgsluice.route" and "primary" in statement.lower()
                                    for name, statement in self.settings)
        return self.route_forced

    def _replica_failed(self) -> bool:
        """A replica's server connection broke under a read outside a transaction: that read
        gets a clean error (SQLSTATE 08006) and this connection goes on (its next request
        goes elsewhere). False when a reply was mid-way in a way we cannot end cleanly."""
        if self.copy_in or self.stream_left:
            return False
        out = []
        for kind, _arg in self.entries:
            if kind in relay._ENDS_AT_READY:
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


def session_facts(config: Config, user: str, database: str,
                  params: dict[str, str]) -> tuple[SessionFacts, Policy | None]:
    """The planner's facts and the role policy of a session that `user` starts on `database`
    with these startup parameters: every door plans with these (an explain or a plan made
    outside a session must see the policy the session would enforce)."""
    policy = config.roles.for_session(user, params.get("application_name", ""))
    return SessionFacts(database, user, _search_path(params), policy.name if policy else ""), policy


def _search_path(params: dict[str, str]) -> tuple[str, ...]:
    value = params.get("search_path")
    if not value:
        return SessionFacts().search_path
    return tuple(p.strip().strip('"') for p in value.split(",") if p.strip())
