"""The gRPC door's Session stream: one per agent, many requests, replies in any order.

Rules it keeps:
- A request runs on one of the stream's internal sessions that is free, never pipelined behind
  another (a timeout's cancel then hits its own statement only). A free session is reused, so
  an agent whose requests do not overlap holds one session; overlapping ones run concurrently
  on more, and identical reads among them coalesce through single-flight.
- A statement that changes a session's state (BEGIN and the other transaction statements,
  SET, PREPARE, LISTEN...: the planner's TXN and SESSION kinds) and every later request of the
  stream for that database run in order on one session, as on a connection: until the
  transaction is over, or for good after a SET and the like (what it set holds for them).
- Flow control: at most MAX_IN_FLIGHT requests are read and not yet answered, and reading
  stops while more than MAX_BUFFERED bytes of replies wait for the client to take them; a
  client that stops reading thus stops pgsluice reading it (HTTP/2 flow control does the rest).
- A cache hit is answered synchronously inside the read loop: no task, no protobuf object.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque

import grpc

from planner import Kind
from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.base.config import AgentAuth
from proxy.doors.grpc import wire as grpc_wire
from proxy.doors.grpc.calls import Ctx
from proxy.doors.grpc.statements import Statements, hinted
from proxy.pgwire import values
from proxy.pipeline.internal import InternalClient, Reply

log = logging.getLogger("pgsluice.grpc")
MAX_IN_FLIGHT = 64  # requests read and not answered, per stream
MAX_BUFFERED = 1 << 20  # bytes of replies waiting for the client before reading stops
KEEP_FREE = 4  # free sessions a stream keeps per database (more go back to the door)
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_STATEFUL = frozenset({Kind.TXN, Kind.SESSION})


class _Job:
    __slots__ = ("cancel", "client", "database", "fingerprint", "id", "params", "request", "sql", "started",
                 "timed_out", "timer")

    def __init__(self, request_id: int, request: pb.QueryRequest, database: str, fingerprint: str) -> None:
        self.id, self.request, self.database, self.fingerprint = request_id, request, database, fingerprint
        self.sql = request.sql
        self.params: list[str | None] = []
        self.client: InternalClient | None = None
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.cancel: asyncio.Task[None] | None = None  # the timeout's cancel, while it is sent


class _Serial:
    """The session the stream's requests for one database run on in order (a transaction, or
    session state a statement set: `sticky`)."""

    __slots__ = ("client", "jobs", "running", "sticky")

    def __init__(self, client: InternalClient, sticky: bool = False) -> None:
        self.client = client
        self.jobs: deque[_Job] = deque()
        self.running = False
        self.sticky = sticky


class Stream:
    """One Session call: its reader and writer loops and the sessions its requests run on."""

    def __init__(self, service: Statements, streams: set[Stream], agent: AgentAuth, context: Ctx) -> None:
        self.service, self.server, self.agent, self.context = service, service.server, agent, context
        self.streams = streams  # the door's open streams, told to end at shutdown
        self.default_database = service.database(agent, "")
        self.loop = asyncio.get_running_loop()
        self.outbox: deque[bytes] = deque()
        self.buffered = 0  # bytes in outbox
        self.in_flight = 0
        self.wake = asyncio.Event()  # for the writer: a reply, or the reader ended
        self.room = asyncio.Event()  # for the reader: below the limits again
        self.reader_waits = False
        self.writing = False
        self.starting = False
        self.reading = False
        self.free: dict[str, list[InternalClient]] = {}
        self.serial: dict[str, _Serial] = {}
        self.busy: dict[InternalClient, _Job] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.reader: asyncio.Task[None] | None = None
        self.closing = False  # pgsluice is shutting down
        self.over = False

    async def run(self) -> None:
        self.streams.add(self)
        self.reader = self.loop.create_task(self._read())
        try:
            await self._write()
        finally:
            self.over = True
            self.streams.discard(self)
            self.reader.cancel()
            for task in self.tasks:
                task.cancel()
            self._let_go()
        if self.closing:
            self.context.set_code(grpc.StatusCode.UNAVAILABLE)
            self.context.set_details("pgsluice is shutting down: requests without a reply were not run")

    def shutdown(self) -> None:
        """Stop reading; the stream ends once the requests it read are answered (a reply the
        reader is writing is not cut: it stops after)."""
        self.closing = True
        if self.reader is not None and self.reading:
            self.reader.cancel()

    # ---- the two loops ----

    async def _write(self) -> None:
        while True:
            if self.outbox and not self.writing:
                await self._drain()
                continue
            reader = self.reader
            assert reader is not None
            if reader.done() and not self.in_flight and not self.outbox:
                if not reader.cancelled() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                return
            self.wake.clear()
            await self.wake.wait()

    async def _drain(self) -> None:
        """Write what waits (one writer at a time: the reader, for a reply it had at once, or
        the writer task, for the rest)."""
        self.writing = True
        outbox, write = self.outbox, self.context.write
        try:
            while outbox:
                message = outbox.popleft()
                self.buffered -= len(message)
                self._maybe_room()
                await write(message)
        finally:
            self.writing = False

    async def _read(self) -> None:
        try:
            while not self.closing:
                self.reading = True  # shutdown() may cancel this task only while it waits to read
                while self.in_flight >= MAX_IN_FLIGHT or self.buffered > MAX_BUFFERED:
                    self.room.clear()
                    self.reader_waits = True
                    await self.room.wait()
                raw = await self.context.read()
                self.reading = False
                if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                self.starting = True  # a reply _start makes at once is written below, by this task
                try:
                    self._start(raw)
                finally:
                    self.starting = False
                if self.outbox and not self.writing:  # answered at once: no hop to the writer
                    await self._drain()
        finally:
            self.wake.set()

    def _maybe_room(self) -> None:
        if self.reader_waits and self.in_flight < MAX_IN_FLIGHT and self.buffered <= MAX_BUFFERED:
            self.reader_waits = False
            self.room.set()

    def _reply(self, message: bytes) -> None:
        if self.over:
            return
        self.outbox.append(message)
        self.buffered += len(message)
        if not self.writing and not self.starting:
            self.wake.set()

    # ---- requests ----

    def _start(self, raw: bytes) -> None:
        try:
            message = pb.SessionRequest.FromString(raw)
        except Exception as exc:
            self._reply(grpc_wire.session_reply(grpc_wire.request_id(raw), err=grpc_wire.error(
                {"C": "08P01", "M": f"pgsluice: the request could not be decoded ({type(exc).__name__})"},
                _INVALID)))
            return
        request = message.query
        database = request.database or self.default_database
        try:
            plan = self.service.plan(self.agent, database, request.sql)
            job = _Job(message.id, request, database, plan.fingerprint)
            job.sql = hinted(request)
            job.params = [values.encode(v) for v in request.params]
            refused = self.service.refusal(plan)
        except Exception:
            log.exception("gRPC session request not started")
            self._reply(grpc_wire.session_reply(message.id, err=_internal()))
            return
        if refused is not None:
            self._reply(grpc_wire.session_reply(message.id, err=refused.body))
            return
        self.in_flight += 1
        serial = self.serial.get(database)
        if serial is None and plan.kind in _STATEFUL:
            free = self.free.get(database)
            serial = self.serial[database] = _Serial(free.pop() if free else self.service.take(self.agent,
                                                                                               database))
        if serial is not None:
            serial.sticky |= plan.kind is Kind.SESSION
            if request.idempotency_key:
                self._answer(job, err=_refused("0A000", "pgsluice: an idempotency_key is not taken on a "
                                                        "stream's transaction or session state"))
                return
            serial.jobs.append(job)
            if not serial.running:
                serial.running = True
                self._next(serial)
            return
        if request.idempotency_key or request.hints.priority == pb.BATCH:
            task = self.loop.create_task(self._slow(job))  # idempotency keys, the batch gate
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        free = self.free.get(job.database)
        self._run(job, free.pop() if free else self.service.take(self.agent, job.database))

    def _run(self, job: _Job, client: InternalClient) -> None:
        request = job.request
        hints = request.hints
        job.client = client
        job.started = time.perf_counter()
        try:
            done = client.send(job.sql, job.params, wire=True, max_rows=max(0, hints.max_rows),
                               max_bytes=self.service.max_reply)
        except ConnectionError:
            self._answer(job, err=_lost())
            self._release(job.database, client, "I")
            return
        self.busy[client] = job
        if done.done():
            self._done(job, done)
            return
        if hints.timeout_seconds > 0:
            job.timer = self.loop.call_later(hints.timeout_seconds, self._timeout, job)
        done.add_done_callback(functools.partial(self._done, job))

    def _done(self, job: _Job, done: asyncio.Future[Reply]) -> None:
        if job.timer is not None:
            job.timer.cancel()
        client = job.client
        assert client is not None
        self.busy.pop(client, None)
        if self.over:
            return
        try:
            reply = done.result()
        except ConnectionError:
            self._answer(job, err=_lost())
            self._release(job.database, client, "I")
            return
        serial = self.serial.get(job.database)
        if reply.status != "I" and serial is not None and serial.client is not client:
            # a second transaction at once on one stream: which later requests meant which is
            # unknowable, so this one is rolled back (its session closed) and says so
            client.close()
            self._answer(job, err=_refused("25001", "pgsluice: another transaction of this stream is open; "
                                                "this statement's was rolled back"))
            return
        try:
            outcome = self.service.outcome(self.agent, job.database, job.request, reply, job.timed_out,
                                           job.started, job.fingerprint)
        except Exception:
            log.exception("gRPC session reply not encoded")
            outcome = grpc_wire.failed({"C": "XX000", "M": "pgsluice: internal error"})
        self._answer(job, outcome.body if outcome.ok else None, None if outcome.ok else outcome.body)
        if job.cancel is not None and not job.cancel.done():  # the session is free once it is sent
            job.cancel.add_done_callback(lambda _: self._release(job.database, client, reply.status))
        else:
            self._release(job.database, client, reply.status)

    def _answer(self, job: _Job, result: bytes | None = None, err: bytes | None = None) -> None:
        self.in_flight -= 1
        self._reply(grpc_wire.session_reply(job.id, result, err))
        self._maybe_room()

    def _release(self, database: str, client: InternalClient, status: str) -> None:
        """A session's request is over: keep it for the transaction, the stream, or the door."""
        if self.over:
            return
        serial = self.serial.get(database)
        if client.session.closed:
            if serial is not None and serial.client is client:  # what waited for it cannot run
                del self.serial[database]
                for job in serial.jobs:
                    self._answer(job, err=_lost())
            return
        if status != "I" and serial is None:
            serial = self.serial[database] = _Serial(client)
        if serial is not None and serial.client is client:
            if serial.jobs:
                self.loop.call_soon(self._next, serial)
                return
            serial.running = False
            if status != "I" or serial.sticky:
                return
            del self.serial[database]
        free = self.free.setdefault(database, [])
        if len(free) < KEEP_FREE:
            free.append(client)
        else:
            self.service.give_back(self.agent, database, client)

    def _next(self, serial: _Serial) -> None:
        if self.over:
            return
        if not serial.jobs or serial.client.busy:
            serial.running = bool(serial.jobs) and serial.client.busy
            return
        self._run(serial.jobs.popleft(), serial.client)

    def _timeout(self, job: _Job) -> None:
        """The request's own timeout: cancel its statement (or its wait for an identical one)."""
        job.timer = None
        job.timed_out = True
        client = job.client
        if client is not None and self.busy.get(client) is job:
            job.cancel = self.loop.create_task(self.server.cancel(*client.session.key))

    async def _slow(self, job: _Job) -> None:
        """Requests with an idempotency key or the batch priority: the unary path's own way."""
        try:
            outcome = await self.service.answer(self.agent, job.database, job.request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("gRPC session request failed")
            self._answer(job, err=_internal())
            return
        self._answer(job, outcome.body if outcome.ok else None, None if outcome.ok else outcome.body)

    def _let_go(self) -> None:
        """The stream is over: sessions in flight or in a transaction close (their statements
        are cancelled, their transactions rolled back), free ones go back to the door."""
        for client in list(self.busy):
            client.close()
        self.busy.clear()
        for serial in self.serial.values():
            serial.client.close()
        self.serial.clear()
        for database, free in self.free.items():
            for client in free:
                self.service.give_back(self.agent, database, client)
        self.free.clear()


def _internal() -> bytes:
    return _refused("XX000", "pgsluice: internal error")


def _lost() -> bytes:
    return _refused("08006", "pgsluice: the stream's session was lost")


def _refused(sqlstate: str, message: str) -> bytes:
    return grpc_wire.error({"C": sqlstate, "M": message}, grpc_wire.status_for(sqlstate).value[0])
