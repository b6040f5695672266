"""A client of the pipeline without a socket: the way non-wire doors (gRPC, tools) go through
exactly what the wire door does — planner, guardrails, cache, single-flight, pool.

    client = InternalClient(server, user="app", database="shop", password="...")
    reply = await client.query("SELECT name FROM customers WHERE id = $1", ["42"])
    reply.columns, reply.rows, reply.tag, reply.served, reply.error
    reply = await client.query(sql, limit=RowLimit(rows=500, bytes=65536, cancel=True))
    reply.truncated  # rows past the limit were dropped as they came (and the statement cancelled)

Each InternalClient is one ClientSession (same counters, same policies, same transaction
pooling) whose transport is a sink in memory. Requests go in as the extended protocol
(Parse, Bind with text parameters, Describe portal, Execute, Sync), replies come back as
the wire messages the session would have sent a socket, parsed here; one request at a
time per client.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .login import LoginResult
from .pgwire import codes, encode
from .pgwire.decode import parse_error_fields
from .session import ClientSession
from .settings import settings_from_startup

if TYPE_CHECKING:
    from .server import Server

_I = struct.Struct("!I")
_H = struct.Struct("!h")
_i = struct.Struct("!i")


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
    served: str = "executed"  # or "cache" (a hit) / "coalesced" (an identical query in flight)
    notices: list[dict[str, str]] = field(default_factory=list)  # NoticeResponse fields
    truncated: bool = False  # a RowLimit cut the rows
    dropped: int = 0  # rows that came after the cut (more may not have been read at all)
    cancelled: bool = False  # the cut cancelled the statement


class _Sink(asyncio.Transport):
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

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("internal", 0) if name == "peername" else default


class InternalClient:
    def __init__(self, server: Server, user: str, database: str, password: str | None = None,
                 application_name: str = "", settings: dict[str, str] | None = None) -> None:
        params = {"user": user, "database": database, **(settings or {})}
        if application_name:
            params["application_name"] = application_name
        pool = server.pool(database, user)
        if password is not None and pool.creds.password is None and not pool.creds.md5:
            pool.creds.password = password
        session = self.session = ClientSession(server)
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
        self._limit: RowLimit | None = None
        self._kept = 0  # bytes of values kept under the limit
        self._cancel: asyncio.Task[None] | None = None
        self.returned = 0  # times handed back to a door's idle sessions (grpc_door.py)
        session._startup_done = True
        session._start(LoginResult(user, database, params, pool, settings_from_startup(params), {}))

    async def query(self, sql: str, params: list[str | None] | None = None,
                    limit: RowLimit | None = None) -> Reply:
        """Run one statement (parameters as text, NULL as None); the reply as Postgres gave it,
        but for the rows past `limit`."""
        async with self._lock:
            if self.session.closed:
                raise ConnectionError("internal client closed")
            if "\x00" in sql:
                return _nul_in_statement()
            self._reply = Reply()
            self._limit, self._kept = limit, 0
            self._done = asyncio.get_running_loop().create_future()
            self.session.served = "executed"
            self._send(sql, params or [])
            try:
                reply = await self._done
            finally:
                self._limit = None
            if self._cancel is not None:
                await self._cancel
                self._cancel = None
            reply.served = self.session.served
            if reply.cancelled and reply.error is not None and reply.error.get("C") == "57014":
                reply.error = None  # our own cancel: the rows kept are the answer
            return reply

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
            self._buffered, self._paused = 0, False
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
        bind = [b"\x00\x00", _H.pack(0), _H.pack(len(values))]
        for v in values:
            bind.append(_i.pack(-1) if v is None else _i.pack(len(v.encode())) + v.encode())
        bind.append(_H.pack(0))
        self.session.data_received(b"".join((
            encode.parse(b"", sql.encode()), encode.message(codes.F_BIND, b"".join(bind)),
            encode.message(codes.F_DESCRIBE, b"P\x00"),
            encode.message(codes.F_EXECUTE, b"\x00" + _i.pack(0)), encode.sync())))

    def close(self) -> None:
        self.session.data_received(encode.terminate())
        self.session.connection_lost(None)

    # ---- replies ----

    def _received(self, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        while len(buf) >= 5:
            length = _I.unpack_from(buf, 1)[0]
            if len(buf) < length + 1:
                break
            code, body = buf[0], bytes(buf[5:length + 1])
            del buf[:length + 1]
            if not self._welcomed:  # the login's ParameterStatus .. ReadyForQuery
                self._welcomed = code == codes.B_READY_FOR_QUERY
                continue
            self._message(code, body)

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
