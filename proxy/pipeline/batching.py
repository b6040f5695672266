"""Burst batching: point reads of one shape that differ only in the key run as one statement.

Natural batching, like group commit — no added delay. The first cache miss of a batchable shape
(planner/batch.py; same fingerprint, other values, settings, role and formats) runs alone as
usual; misses of that shape with other keys arriving while it is in flight queue here. When it
lands, the queue runs as one statement: the text of one queued read with its key value
replaced by `ANY($n)` (an array of every queued key) and the key column appended to the select
list (batch_sql.py, sans I/O). Each client then gets what its own statement would have got from Postgres: the
RowDescription without the added column, only the rows of its key (at most one: the key is
unique), `SELECT n`, in its formats. Each answer lands in the client's own single-flight and
cache entry. Reads arriving while a batch runs form the next one.

Rules: a request is batched only when its key value can be read here exactly as Postgres would
read it (else it runs alone); anything unexpected in the batch's reply (an error, a notice)
makes every client of the batch run its own statement, so no client sees an error its own
statement would not have produced.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Hashable
from typing import TYPE_CHECKING

from proxy.pgwire import codes, encode
from proxy.pipeline import batch_sql, cacheable, caching
from proxy.pipeline.internal import Socketless
from proxy.pipeline.session import LoginResult, Session

if TYPE_CHECKING:
    from cache.engine import Flight
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.batching")
_I = struct.Struct("!I")
MAX_IDLE_RUNNERS = 4  # per user, database and settings
MAX_RUNNER_KEYS = 256


class Waiter:
    """One queued read."""

    __slots__ = ("flight", "future", "gone", "norm", "req", "s", "sql", "value")

    def __init__(self, s: Session, req: cacheable.Request, flight: Flight, norm: object,
                 value: str) -> None:
        self.s, self.req, self.flight = s, req, flight
        self.norm = norm  # the key value, as compared with the rows' (int, UUID or bytes)
        self.value = value  # ... as an element of the array literal
        self.sql = req.plan.sql
        self.future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.gone = False  # the client stopped waiting (cancelled, or left)


class Group:
    __slots__ = ("queue", "running")

    def __init__(self) -> None:
        self.queue: list[Waiter] = []
        self.running = False


class Batcher:
    def __init__(self, server: Runtime, max_size: int) -> None:
        self.server = server
        self.max_size = max_size
        self.groups: dict[Hashable, Group] = {}
        self._runners: dict[Hashable, list[_Runner]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # shapes whose texts could not be made the batch statement (`(id) = 5`): not batched
        self._unwritable: set[str] = set()

    # ---- called by caching._lookup on a miss with no identical read in flight ----

    def offer(self, s: Session, req: cacheable.Request, key: Hashable) -> tuple[bool, Hashable | None]:
        """(True, group): queued behind the shape's read in flight (an ASYNC outcome); (False,
        group): this read leads its shape (call `lead` with its flight); (False, None): not
        batched."""
        batch = req.plan.batch
        if batch is None or req.plan.fingerprint in self._unwritable:
            return False, None
        reported = s.reported
        if reported.get("client_encoding", "UTF8").upper() not in ("UTF8", "UTF-8") \
                or reported.get("standard_conforming_strings", "on") != "on":
            return False, None  # literals and values read here as Postgres reads them, or not at all
        found = batch_sql.key_of(s, req, batch)
        if found is None:
            return False, None
        gkey, norm, value = found
        group = self.groups.get(gkey)
        if group is None:
            self.groups[gkey] = Group()
            return False, gkey
        cache = s.server.cache
        assert cache is not None
        waiter = Waiter(s, req, cache.lead(key), norm, value)
        group.queue.append(waiter)
        s.spawn_task(self._wait(waiter))
        return True, gkey

    def lead(self, gkey: Hashable, flight: Flight) -> None:
        flight.future.add_done_callback(lambda _f: self._leader_done(gkey))

    def _leader_done(self, gkey: Hashable) -> None:
        group = self.groups.get(gkey)
        if group is None or group.running:
            return
        if not group.queue:
            del self.groups[gkey]
            return
        group.running = True
        task = asyncio.get_running_loop().create_task(self._drain(gkey, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, gkey: Hashable, group: Group) -> None:
        try:
            while group.queue:
                batch, group.queue = group.queue[:self.max_size], group.queue[self.max_size:]
                try:
                    await self._run(batch)
                except Exception:  # a bug here must not leave its clients waiting
                    log.exception("burst batch failed; its reads run alone")
                    self._fall_back(batch)
        finally:
            for waiter in group.queue:  # only if cancelled (shutdown): let them run alone
                _resolve(waiter, None)
            self.groups.pop(gkey, None)

    # ---- the waiting client ----

    async def _wait(self, w: Waiter) -> None:
        s, req = w.s, w.req
        cache = s.server.cache
        assert cache is not None
        s.waiting = True
        try:
            payload = await asyncio.shield(w.future)
        except asyncio.CancelledError:
            w.gone = True
            if s.closed:
                raise
            del s.inbuf[:req.end]  # a CancelRequest: answered as Postgres answers it
            s.write(req.prefix + encode.error_response("57014", "canceling statement due to user request")
                    + caching.RFQ_IDLE)
            s.resume_pump(cache_done=False)
            return
        finally:
            s.waiting = False
        if payload is None:  # run alone: this client leads its own flight
            s.fill = caching.Fill(w.flight, cache.settings.max_entry, extended=bool(req.prefix))
            s.resume_pump(cache_done=True)
            return
        s.agent_stats.batched += 1
        s.served = "batched"
        caching.answer(s, payload, req)
        s.resume_pump(cache_done=False)

    # ---- the batch ----

    async def _run(self, batch: list[Waiter]) -> None:
        values: dict[object, str] = {}
        for w in batch:
            values.setdefault(w.norm, w.value)
        array = list(values.values())
        # the statement is any one's text (they differ in spelling only); one whose key is not a
        # plain `key = value` (`id = -5`) cannot be rewritten: the next one is tried
        rep, request = batch[0], None
        for w in batch[:8]:
            request = batch_sql.statement(w.req, w.sql, array)
            if request is not None:
                rep = w
                break
        answers: dict[object, list[bytes]] | None = None
        rd = b""
        if request is None:
            if len(self._unwritable) > 10_000:
                self._unwritable.clear()
            self._unwritable.add(rep.req.plan.fingerprint)
        else:
            runner = self._runner(rep)
            try:
                messages = await runner.run(request)
            except (TimeoutError, ConnectionError):
                messages = None
                runner.close()
            else:
                self._give_back(runner)
            split = batch_sql.split(messages, rep.req.plan.batch) if messages is not None else None
            if split is not None:
                rd, answers = split
        if answers is None:
            self._fall_back(batch)
            return
        self.server.stats.batches += 1
        simple = not rep.req.prefix
        for w in batch:
            rows = answers.get(w.norm, [])
            head = rd if simple or w.req.fmt[3] else b""  # type: ignore[index]
            payload = head + b"".join(rows) + encode.command_complete(f"SELECT {len(rows)}")
            cache = w.s.server.cache
            assert cache is not None
            cache.land(w.flight, payload, True)
            _resolve(w, payload)

    def _fall_back(self, batch: list[Waiter]) -> None:
        """Every read of `batch` runs alone (one gone meanwhile: its flight's waiters do)."""
        self.server.stats.batch_fallbacks += 1
        for w in batch:
            if w.gone or w.s.closed:
                cache = w.s.server.cache
                assert cache is not None
                cache.land(w.flight, None, False)
            _resolve(w, None)

    def _runner(self, w: Waiter) -> _Runner:
        # the settings that can change a result (the group's): application_name and the like
        # do not make a runner of their own
        key = (w.s.database, w.s.user, w.req.settings)
        idle = self._runners.get(key)
        if idle:
            return idle.pop()
        return _Runner(self.server, w.s, key)

    def _give_back(self, runner: _Runner) -> None:
        idle = self._runners.setdefault(runner.key, [])
        keep = len(idle) < MAX_IDLE_RUNNERS and len(self._runners) <= MAX_RUNNER_KEYS
        if keep and not runner.session.closed:
            idle.append(runner)
        else:
            runner.close()
            if not idle:
                del self._runners[runner.key]

    def close(self) -> None:
        for idle in self._runners.values():
            for runner in idle:
                runner.close()
        self._runners.clear()
        for task in list(self._tasks):
            task.cancel()


def _resolve(w: Waiter, payload: bytes | None) -> None:
    if not w.future.done():
        w.future.set_result(payload)


# ---- where batches run: a session without a socket, like InternalClient's --------------------

class _Sink(Socketless):
    def __init__(self, runner: _Runner) -> None:
        super().__init__()
        self._runner = runner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._runner.received(bytes(data))

    def close(self) -> None:
        self._runner.lost()

    def abort(self) -> None:
        self._runner.lost()

    def is_closing(self) -> bool:
        return self._runner.session.closed


class _Runner:
    """A session of the client's user, database and settings that runs batch statements on the
    pool like any client (transaction pooling), bypassing the cache."""

    def __init__(self, server: Runtime, s: Session, key: Hashable) -> None:
        assert s.pool is not None
        self.key = key
        self._buf = bytearray()
        self._welcomed = False
        self._messages: list[tuple[int, bytes]] = []
        self._done: asyncio.Future[list[tuple[int, bytes]]] | None = None
        session = self.session = Session(server)
        session.transport = _Sink(self)
        session.peer = ("internal", 0)
        session.uncached = True
        params = {"user": s.user, "database": s.database, "application_name": "pgsluice batch"}
        session.start(LoginResult(s.user, s.database, params, s.pool, s.settings, {}))
        # the clients' own settings (their policy's included), no guardrail of its own: the
        # statement is theirs, already allowed
        session.startup_settings = session.settings = s.settings
        session.policy = None
        session.row_cap = 0

    async def run(self, request: bytes) -> list[tuple[int, bytes]]:
        self._messages = []
        self._done = asyncio.get_running_loop().create_future()
        self.session.data_received(request)
        return await self._done

    def received(self, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        while len(buf) >= 5:
            length = _I.unpack_from(buf, 1)[0]
            if len(buf) < length + 1:
                break
            code, body = buf[0], bytes(buf[5:length + 1])
            del buf[:length + 1]
            if not self._welcomed:
                self._welcomed = code == codes.B_READY_FOR_QUERY
                continue
            if code == codes.B_READY_FOR_QUERY:
                if self._done is not None and not self._done.done():
                    self._done.set_result(self._messages)
            else:
                self._messages.append((code, body))

    def lost(self) -> None:
        self.session.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("batch session closed"))

    def close(self) -> None:
        if not self.session.closed:
            self.session.data_received(encode.terminate())
            self.session.connection_lost(None)
