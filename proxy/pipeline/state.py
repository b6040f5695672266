"""What one pipeline session holds, and its simplest acts.

The fields are documented where __init__ sets them. The acts: writing to the session's
transport (held back while a write's version bump in Redis is on its way), closing it with a
FATAL error, flow control both ways, and the per-agent counters. link.py adds the server
connection, session.py the protocol and the pump; a door only ever sees session.Session.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from planner import Planner, Policy, SessionFacts
from proxy.backends.backend import Backend
from proxy.backends.settings import Settings
from proxy.base.logs import fields
from proxy.base.stats import AgentStats
from proxy.pgwire import encode
from proxy.pipeline import caching, entries, fastpath, prepared, tracking

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.session")
PAUSE_AT = 1 << 20  # buffered client bytes while waiting for a backend
_tokens = itertools.count(1)


class SessionState(asyncio.Protocol):
    """A session's state; see module docstring."""

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
        self.entries: deque[entries.Entry] = deque()
        self.statements: dict[bytes, prepared.Statement] = {}
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
        self.fast_holder = 0  # its id in the cache (LocalCache.register)
        self.head: fastpath.Pass | fastpath.Head | None = None  # try_query -> relay.forward
        # operations (issue 5)
        self.connected_at = time.monotonic()
        self.last_sql = b""  # the last statement text sent (for the logs), truncated
        self.request_started = self.connected_at
        self.now = self.connected_at  # when the bytes being handled arrived (data_received)
        self._idle_timer: asyncio.TimerHandle | None = None  # idle_transaction_timeout

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

    @property
    def last_statement(self) -> str:
        """The last statement sent (truncated), for a log line: decoded only when one is written."""
        return self.last_sql.decode("utf-8", "replace")

    @property
    def gated(self) -> bool:
        """Output is held until a version bump in Redis is over (gate_until)."""
        return self._gate is not None

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

    def pin(self, reason: str) -> None:
        """Keep this client on its backend for the rest of its session."""
        if self.pinned is None:
            self.pinned = reason
            self.fast_ok = False
            self.server.stats.pinned += 1
            log.debug("client %s pinned: %s", self.peer, reason)

    def route_primary(self) -> bool:
        """SET pgsluice.route = primary is in force."""
        if self.route_source is not self.settings:
            self.route_source = self.settings
            self.route_forced = any(name == "pgsluice.route" and "primary" in statement.lower()
                                    for name, statement in self.settings)
        return self.route_forced

