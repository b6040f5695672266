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
import logging
import struct
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from planner import Policy, SessionFacts
from planner.guard import session_settings
from proxy.backends.settings import set_config
from proxy.base.logs import fields, peer_text
from proxy.pgwire import codes, encode
from proxy.pgwire.errors import (
    ProtocolError,
)
from proxy.pipeline import caching, fastpath, relay, replies
from proxy.pipeline.link import ServerLink
from proxy.pipeline.state import PAUSE_AT

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.base.config import Config

log = logging.getLogger("pgsluice.session")
_I = struct.Struct("!I")
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


class Session(ServerLink):
    """See module docstring. States: login (the door's, until start) -> ready -> closed."""

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
                if len(self.inbuf) > PAUSE_AT:
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

    def hold(self, marker: asyncio.Future[None]) -> None:
        """Busy until resume_pump: `marker` is cancelled if the client goes away."""
        self._task = marker

    def spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as this client's one pending task: pump waits until resume_pump."""
        self._task = asyncio.get_running_loop().create_task(coro)

    def resume_pump_admin(self) -> None:
        self._task = None

    def resume_pump(self, cache_done: bool) -> None:
        self._task = None
        self._cache_done = cache_done
        if len(self.inbuf) < PAUSE_AT:
            self.resume_reading()
        self.pump()


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
