"""A client of the pipeline without a socket: the way non-wire doors (gRPC, tools) go through
exactly what the wire door does — planner, guardrails, cache, single-flight, pool.

    client = InternalClient(server, user="app", database="shop", password="...")
    reply = await client.query("SELECT name FROM customers WHERE id = $1", ["42"])
    reply.columns, reply.rows, reply.tag, reply.served, reply.error
    reply = await client.query(sql, limit=RowLimit(rows=500, bytes=65536, cancel=True))
    reply.truncated  # rows past the limit were dropped as they came (and the statement cancelled)

Each InternalClient is one Session (same counters, same policies, same transaction
pooling) whose transport is a sink in memory. Requests go in as the extended protocol
(Parse, Bind with text parameters, Describe portal, Execute, Sync), replies come back as
the wire messages the session would have sent a socket, parsed here; one request at a
time per client (never pipelined: a cancel then always hits the request it was meant for).

`send(..., wire=True)` is the cheap form for doors that re-encode replies themselves: the
RowDescription, DataRow and CommandComplete messages are kept as Postgres sent them
(`Reply.wire`), no row is parsed, and the future is already done when the session answered
at once (a cache hit writes its whole reply synchronously).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.backends.settings import settings_from_startup
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_error_fields
from proxy.pipeline.session import LoginResult, Session

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

_I = struct.Struct("!I")
_H = struct.Struct("!h")
_i = struct.Struct("!i")
_NULL = _i.pack(-1)
# Describe portal, Execute (all rows), Sync: the same after every Bind
_TAIL = (encode.message(codes.F_DESCRIBE, b"P\x00") + encode.message(codes.F_EXECUTE, b"\x00" + _i.pack(0))
         + encode.sync())
_parses: dict[str, bytes] = {}  # statement text -> its unnamed Parse message (the texts agents repeat)
_KEPT = frozenset({codes.B_ROW_DESCRIPTION, codes.B_DATA_ROW, codes.B_COMMAND_COMPLETE})


@dataclass(slots=True)
class Column:
    name: str
    type_oid: int


MAX_NOTICES = 50  # kept per reply; a loop raising notices must not grow one without bound


@dataclass(frozen=True, slots=True)
class RowLimit:
    """Keep at most `rows` rows and `bytes` bytes of values; the rest are dropped as they come,
    so a huge result never sits in memory. `cancel`: once cut, cancel the statement (only for
    a statement whose rows are its only effect: a cancelled write would be rolled back)."""

    rows: int
    bytes: int
    cancel: bool = False


@dataclass(slots=True)
class Reply:
    columns: list[Column] = field(default_factory=list)
    rows: list[list[bytes | None]] = field(default_factory=list)  # text-format values
    tag: str = ""
    error: dict[str, str] | None = None  # ErrorResponse fields: C (SQLSTATE), M, D, H, P...
    served: str = "executed"  # or "cache" (a hit) / "coalesced" (an identical query in flight) / "batched"
    status: str = "I"  # ReadyForQuery's: "I" idle, "T" in a transaction, "E" in a failed one
    wire: bytes = b""  # send(wire=True): RowDescription, DataRow... and CommandComplete messages
    notices: list[dict[str, str]] = field(default_factory=list)  # NoticeResponse fields
    truncated: bool = False  # a RowLimit or max_rows cut the rows (the rest were dropped)
    dropped: int = 0  # rows that came after a RowLimit's cut (more may not have been read at all)
    cancelled: bool = False  # the cut cancelled the statement
    oversize: bool = False  # the reply passed max_bytes: its rows were dropped


class Socketless(asyncio.Transport):
    """What a socketless session's transport has in common (InternalClient's, the batch
    runner's): no reading to pause, and a peer named "internal"."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("internal", 0) if name == "peername" else default


class _Sink(Socketless):
    def __init__(self, client: InternalClient) -> None:
        super().__init__()
        self._client = client
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._client._received(bytes(data))

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def is_closing(self) -> bool:
        return self._closing


class InternalClient:
    def __init__(self, server: Runtime, user: str, database: str, password: str | None = None,
                 application_name: str = "", settings: dict[str, str] | None = None) -> None:
        params = {"user": user, "database": database, **(settings or {})}
        if application_name:
            params["application_name"] = application_name
        pool = server.pool(database, user)
        if password is not None and pool.creds.password is None and not pool.creds.md5:
            pool.creds.password = password
        session = self.session = Session(server)
        session.transport = _Sink(self)
        session.peer = ("internal", 0)
        server.clients.add(session)
        server.stats.clients_total += 1
        self._buf = bytearray()
        self._reply: Reply | None = None
        self._done: asyncio.Future[Reply] | None = None
        self._lock = asyncio.Lock()
        self._welcomed = False
        self._chunks: asyncio.Queue[tuple[str, Any]] | None = None  # streaming: (kind, payload)
        self._chunk: list[list[bytes | None]] = []
        self._chunk_rows = 0
        self._buffered = 0  # rows queued for the consumer
        self._paused = False
        self._wire: list[bytes] | None = None  # send(wire=True): the reply's messages
        self._wire_size = 0
        self._max_rows = 0
        self._max_bytes = 0
        self._rows = 0
        self._limit: RowLimit | None = None
        self._kept = 0  # bytes of values kept under the limit
        self._cancel: asyncio.Task[None] | None = None
        self.returned = 0  # times handed back to a door's idle sessions (doors/grpc)
        session.start(LoginResult(user, database, params, pool, settings_from_startup(params), {}))

    async def query(self, sql: str, params: list[str | None] | None = None,
                    limit: RowLimit | None = None) -> Reply:
        """Run one statement (parameters as text, NULL as None); the reply as Postgres gave it,
        but for the rows past `limit`."""
        async with self._lock:
            done = self.send(sql, params, limit=limit)
            try:
                reply = await done
            finally:
                self._limit = None
            if self._cancel is not None:
                await self._cancel
                self._cancel = None
            if reply.cancelled and reply.error is not None and reply.error.get("C") == "57014":
                reply.error = None  # our own cancel: the rows kept are the answer
            return reply

    @property
    def busy(self) -> bool:
        """A request is in flight (send must not be called)."""
        return self._done is not None and not self._done.done()

    def send(self, sql: str, params: list[str | None] | None = None, *, wire: bool = False,
             max_rows: int = 0, max_bytes: int = 0, limit: RowLimit | None = None) -> asyncio.Future[Reply]:
        """Start one statement now; the client must not be busy (query() waits its turn, this
        does not). The future may be done on return: a cache hit is answered synchronously.
        `wire`: keep the reply's messages in Reply.wire instead of parsing columns and rows (the
        tag and an error are parsed as always); `max_rows` (> 0) keeps that many rows (truncated
        says more came); `max_bytes` (> 0) drops the rows of a reply that grows past it
        (oversize), so a huge result never sits in memory whole; `limit` (parsed replies only):
        see RowLimit (query() clears it and waits for its cancel)."""
        if self.session.closed:
            raise ConnectionError("internal client closed")
        if self.busy:
            raise RuntimeError("internal client busy: one request at a time")
        done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if "\x00" in sql:
            done.set_result(_nul_in_statement())
            return done
        self._reply = Reply()
        self._done = done
        self._wire, self._wire_size = ([] if wire else None), 0
        self._max_rows, self._max_bytes, self._rows = max_rows, max_bytes, 0
        self._limit, self._kept = limit, 0
        self.session.served = "executed"
        self._send(sql, params or [])
        return done

    async def stream(self, sql: str, params: list[str | None] | None = None, chunk_rows: int = 1000,
                     max_buffered: int = 20_000) -> AsyncIterator[tuple[str, Any]]:
        """("columns", [Column]), then ("rows", [[value...]]) chunks, then ("end", Reply) with the
        tag and error. Past `max_buffered` rows not yet taken, the server connection's reads
        pause (the session's own flow control) until the consumer catches up."""
        async with self._lock:
            if self.session.closed:
                raise ConnectionError("internal client closed")
            if "\x00" in sql:
                yield "end", _nul_in_statement()
                return
            queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            self._chunks, self._chunk, self._chunk_rows = queue, [], chunk_rows
            self._buffered, self._paused, self._wire = 0, False, None
            self._reply = Reply()
            self._done = asyncio.get_running_loop().create_future()
            self.session.served = "executed"
            self._send(sql, params or [])
            try:
                while True:
                    kind, payload = await queue.get()
                    if kind == "rows":
                        self._buffered -= len(payload)
                        if self._paused and self._buffered < max_buffered // 2:
                            self._paused = False
                            self.session.resume_writing()
                    yield kind, payload
                    if kind == "end":
                        return
                    if not self._paused and self._buffered > max_buffered:
                        self._paused = True
                        self.session.pause_writing()
            finally:
                self._chunks = None
                if self._paused:
                    self.session.resume_writing()
                if self._done is not None and not self._done.done():
                    self.close()  # left mid-result: the session (and its statement) goes

    def _send(self, sql: str, values: list[str | None]) -> None:
        parse = _parses.get(sql)
        if parse is None:
            parse = encode.parse(b"", sql.encode())
            if len(sql) <= 4096:  # at most 1,024 texts of 4 kB
                if len(_parses) >= 1024:
                    _parses.clear()
                _parses[sql] = parse
        bind = [b"\x00\x00", _H.pack(0), _H.pack(len(values))]
        for v in values:
            if v is None:
                bind.append(_NULL)
            else:
                raw = v.encode()
                bind.append(_i.pack(len(raw)) + raw)
        bind.append(_H.pack(0))
        self.session.data_received(b"".join((parse, encode.message(codes.F_BIND, b"".join(bind)), _TAIL)))

    def close(self) -> None:
        self.session.data_received(encode.terminate())
        self.session.connection_lost(None)
        done = self._done
        if done is not None and not done.done():  # a request in flight: its waiter hears of it
            done.set_exception(ConnectionError("internal client closed"))
            done.exception()  # retrieved: a waiter that went away leaves no warning

    # ---- replies ----

    def _received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < 5 or len(buf) < 1 + _I.unpack_from(buf, 1)[0]:
                return  # the message under way is not whole yet (a large one comes in pieces)
            data = bytes(buf)
            buf.clear()
        pos, n = 0, len(data)
        wire = self._wire
        while n - pos >= 5:  # whole messages straight from `data` (a write is usually whole)
            end = pos + 1 + _I.unpack_from(data, pos + 1)[0]
            if end > n:
                break
            code = data[pos]
            if not self._welcomed:  # the login's ParameterStatus .. ReadyForQuery
                self._welcomed = code == codes.B_READY_FOR_QUERY
            elif wire is not None and code in _KEPT:
                self._keep(wire, code, data[pos:end])
            else:
                self._message(code, data[pos + 5:end])
            pos = end
        if pos < n:
            buf += data[pos:]

    def _keep(self, wire: list[bytes], code: int, message: bytes) -> None:
        """send(wire=True): a RowDescription, DataRow or CommandComplete, kept whole."""
        reply = self._reply
        if reply is None:
            return
        if code == codes.B_DATA_ROW:
            self._rows += 1
            if reply.oversize or (self._max_rows and self._rows > self._max_rows):
                reply.truncated = not reply.oversize
                return
        elif code == codes.B_COMMAND_COMPLETE:
            reply.tag = message[5:].rstrip(b"\x00").decode()
        self._wire_size += len(message)
        if self._max_bytes and self._wire_size > self._max_bytes and not reply.oversize:
            reply.oversize = True  # the rows go now, the rest of them as they come
            wire[:] = [m for m in wire if m[0] != codes.B_DATA_ROW]
            if code == codes.B_DATA_ROW:
                return
        wire.append(message)

    def _message(self, code: int, body: bytes) -> None:
        reply = self._reply
        if reply is None:
            return
        chunks = self._chunks
        if code == codes.B_ROW_DESCRIPTION:
            reply.columns = _columns(body)
            if chunks is not None:
                chunks.put_nowait(("columns", reply.columns))
        elif code == codes.B_DATA_ROW:
            if chunks is None and self._limit is not None:
                self._limited(reply, self._limit, body)
            elif chunks is None:
                reply.rows.append(_values(body))
            else:
                self._chunk.append(_values(body))
                if len(self._chunk) >= self._chunk_rows:
                    self._flush(chunks)
        elif code == codes.B_COMMAND_COMPLETE:
            reply.tag = body.rstrip(b"\x00").decode()
        elif code == codes.B_ERROR_RESPONSE:
            reply.error = parse_error_fields(body)
        elif code == codes.B_NOTICE_RESPONSE and len(reply.notices) < MAX_NOTICES:
            reply.notices.append(parse_error_fields(body))
        elif code == codes.B_READY_FOR_QUERY and self._done is not None and not self._done.done():
            reply.served = self.session.served
            reply.status = chr(body[0]) if body else "I"
            if self._wire is not None:
                reply.wire = b"".join(self._wire) if reply.error is None else b""
                self._wire = None
            self._done.set_result(reply)
            if chunks is not None:
                self._flush(chunks)
                reply.served = self.session.served
                chunks.put_nowait(("end", reply))

    def _limited(self, reply: Reply, limit: RowLimit, body: bytes) -> None:
        if reply.truncated:
            reply.dropped += 1
            return
        size = len(body) - 2  # the values and their lengths
        if len(reply.rows) < limit.rows and self._kept + size <= limit.bytes:
            self._kept += size
            reply.rows.append(_values(body))
            return
        reply.truncated = True
        reply.dropped = 1
        if limit.cancel and self.session.backend is not None:
            reply.cancelled = True
            self._cancel = asyncio.get_running_loop().create_task(
                self.session.server.cancel(*self.session.key))

    def _flush(self, chunks: asyncio.Queue[tuple[str, Any]]) -> None:
        if self._chunk:
            self._buffered += len(self._chunk)
            chunks.put_nowait(("rows", self._chunk))
            self._chunk = []


def _nul_in_statement() -> Reply:
    """A statement travels as a C string: a NUL would cut it short (and leave the rest of the
    Parse message malformed). Postgres's SQLSTATE for a NUL in text."""
    return Reply(error={"C": "22021", "S": "ERROR",
                        "M": "pgsluice: the statement contains a NUL character (0x00)"})


def _columns(body: bytes) -> list[Column]:
    (n,) = _H.unpack_from(body)
    pos, out = 2, list[Column]()
    for _ in range(n):
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode()
        oid = _I.unpack_from(body, end + 7)[0]
        out.append(Column(name, oid))
        pos = end + 19
    return out


def _values(body: bytes) -> list[bytes | None]:
    (n,) = _H.unpack_from(body)
    pos, out = 2, list[bytes | None]()
    for _ in range(n):
        (length,) = _i.unpack_from(body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + length])
            pos += length
    return out
