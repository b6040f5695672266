"""A small typed client for pgsluice's gRPC door.

    from proxy.client import SluiceClient

    async with SluiceClient("127.0.0.1:50051", token="...") as db:
        rows = await db.query("SELECT id, name FROM customers WHERE id = $1", 42)
        rows[0]["name"]; db.last.served  # pb.CACHE_HIT, pb.COALESCED or pb.EXECUTED

Queries go over one Session stream per client object (opened at the first query, opened
again after it ended): many queries at once share it, each answered as it finishes, and a
query costs both sides a fraction of a unary call. `query(..., unary=True)` (or
`SluiceClient(stream=False)`) makes one unary Query call instead. Parameters are bound (never
interpolated): None, bool, int, float, str, bytes, lists (arrays), and anything else as its
text form. Values come back as Python values for null/bool/integers/floats/text/bytea/
arrays, as strings (Postgres's text form) for numeric, dates, times, intervals, uuid and
json. Postgres errors raise SluiceError with the SQLSTATE; so does a stream that ends
(UNAVAILABLE when pgsluice shuts down: the queries still waiting were not run).
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import grpc

from protos.pgsluice.v1 import sluice_pb2 as pb
from protos.pgsluice.v1 import sluice_pb2_grpc
from proxy.pgwire import values

_SESSION = "/pgsluice.v1.Sluice/Session"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_H = struct.Struct("!h")
_I = struct.Struct("!I")
_i = struct.Struct("!i")


class SluiceError(Exception):
    def __init__(self, code: grpc.StatusCode, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}" if sqlstate else message)
        self.code, self.sqlstate, self.message = code, sqlstate, message


def to_value(x: Any) -> pb.Value:
    if x is None:
        return pb.Value(null=True)
    if isinstance(x, bool):
        return pb.Value(bool=x)
    if isinstance(x, int):
        return pb.Value(int64=x)
    if isinstance(x, float):
        return pb.Value(double=x)
    if isinstance(x, bytes):
        return pb.Value(bytea=x)
    if isinstance(x, list | tuple):
        return pb.Value(array=pb.Array(values=[to_value(v) for v in x]))
    return pb.Value(text=str(x))


def _text(raw: bytes) -> Any:
    return raw.decode()


def _from_wire(oid: int) -> Callable[[bytes], Any]:
    """A text-format value of type `oid` -> what from_value(values.decode(...)) gives."""
    if oid in (20, 21, 23, 26):
        return int
    if oid in (700, 701):
        return float
    if oid == 16:
        return lambda raw: raw == b"t"
    if oid in (18, 19, 25, 1042, 1043) or oid in values._STRING_KINDS:
        return _text
    return lambda raw: from_value(values.decode(raw, oid))


def rows_from_wire(wire: bytes) -> list[dict[str, Any]]:
    """A WIRE-format reply's RowDescription and DataRow messages -> rows as dicts."""
    names: list[str] = []
    decoders: list[Callable[[bytes], Any]] = []
    out: list[dict[str, Any]] = []
    pos, n = 0, len(wire)
    while pos < n:
        end = pos + 1 + _I.unpack_from(wire, pos + 1)[0]
        code = wire[pos]
        if code == 0x44:  # DataRow
            row: list[Any] = []
            at = pos + 7
            for decode in decoders:
                (length,) = _i.unpack_from(wire, at)
                at += 4
                if length < 0:
                    row.append(None)
                else:
                    row.append(decode(wire[at:at + length]))
                    at += length
            out.append(dict(zip(names, row, strict=True)))
        elif code == 0x54:  # RowDescription
            names, decoders = _described(wire[pos:end])
        pos = end
    return out


_descriptions: dict[bytes, tuple[list[str], list[Callable[[bytes], Any]]]] = {}


def _described(message: bytes) -> tuple[list[str], list[Callable[[bytes], Any]]]:
    """A RowDescription's column names and decoders, remembered: a query shape's RowDescription
    is the same bytes every time."""
    known = _descriptions.get(message)
    if known is not None:
        return known
    (count,) = _H.unpack_from(message, 5)
    at, names, decoders = 7, list[str](), list[Callable[[bytes], Any]]()
    for _ in range(count):
        stop = message.index(b"\x00", at)
        names.append(message[at:stop].decode())
        decoders.append(_from_wire(_I.unpack_from(message, stop + 7)[0]))
        at = stop + 19
    if len(_descriptions) >= 1024:
        _descriptions.clear()
    _descriptions[message] = names, decoders
    return names, decoders


def from_value(v: pb.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    if kind == "array":
        return [from_value(x) for x in v.array.values]
    if kind == "other":
        return v.other.text
    return getattr(v, kind)


def _read(pem: str | bytes | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if pem is None or isinstance(pem, bytes):
        return pem
    with open(pem, "rb") as f:
        return f.read()


class SluiceClient:
    """`tls=True` (or a `ca`) talks TLS: `ca` is the CA bundle that signed pgsluice's certificate
    (None: the system's roots); `cert`/`key` are a client certificate, when pgsluice has tls_ca.
    Each is PEM bytes or a file path. `stream=False`: every query is a unary call. Replies
    come as Postgres's own messages (format WIRE), decoded here to the same values as typed
    replies, with less work for both sides; `wire=False` asks for typed replies (`last.rows`).
    `last` is the last reply: `served`, `command_tag`, `elapsed_ms`, `fingerprint`..."""

    def __init__(self, target: str, token: str, database: str = "", *, tls: bool = False,
                 ca: str | bytes | None = None, cert: str | bytes | None = None,
                 key: str | bytes | None = None, stream: bool = True, wire: bool = True) -> None:
        if tls or ca is not None or cert is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                                       certificate_chain=_read(cert))
            self.channel = grpc.aio.secure_channel(target, credentials)
        else:
            self.channel = grpc.aio.insecure_channel(target)
        self.stub = sluice_pb2_grpc.SluiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.database = database
        self.stream, self.format = stream, pb.WIRE if wire else pb.TYPED
        self.last: pb.QueryResponse | None = None
        self._session: Any = None  # the Session call, while it lasts
        self._pending: dict[int, asyncio.Future[pb.SessionReply]] = {}
        self._outbox: deque[bytes] = deque()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)

    async def query(self, sql: str, *params: Any, max_staleness: float | None = None,
                    timeout: float = 0.0, unary: bool = False) -> list[dict[str, Any]]:
        hints = pb.Hints(timeout_seconds=timeout)
        if max_staleness is not None:
            hints.max_staleness_seconds = max_staleness
        request = pb.QueryRequest(sql=sql, params=[to_value(p) for p in params], database=self.database,
                                  hints=hints, format=self.format)
        if unary or not self.stream:
            try:
                reply: pb.QueryResponse = await self.stub.Query(request, metadata=self.metadata)
            except grpc.aio.AioRpcError as err:
                trailers: Any = err.trailing_metadata() or ()
                sqlstate = next((str(item[1]) for item in trailers if item[0] == "pgsluice-sqlstate"), "")
                raise SluiceError(err.code(), sqlstate, err.details() or "") from None
        else:
            answer = await self._ask(request)
            if answer.HasField("error"):
                e = answer.error
                raise SluiceError(_CODES.get(e.status_code, grpc.StatusCode.UNKNOWN), e.sqlstate, e.message)
            reply = answer.result
        self.last = reply
        if reply.wire:
            return rows_from_wire(reply.wire)
        names = [c.name for c in reply.columns]
        return [dict(zip(names, (from_value(v) for v in row.values), strict=True)) for row in reply.rows]

    # ---- the Session stream: a writer and a reader task per stream, so a caller that is
    # cancelled never cancels the stream under the others (grpc cancels a call whose read or
    # write is cancelled) ----

    async def _ask(self, request: pb.QueryRequest) -> pb.SessionReply:
        if self._session is None:
            self._open()
        assert self._wake is not None
        request_id = next(self._ids)
        answer: asyncio.Future[pb.SessionReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        self._outbox.append(pb.SessionRequest(id=request_id, query=request).SerializeToString())
        self._wake.set()
        try:
            return await answer
        finally:
            self._pending.pop(request_id, None)

    def _open(self) -> None:
        method: Any = self.channel.stream_stream(_SESSION, None, None)  # bytes in, bytes out
        call = self._session = method(metadata=self.metadata)
        wake = self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write(call, wake)), loop.create_task(self._read(call))]

    async def _write(self, call: Any, wake: asyncio.Event) -> None:
        outbox = self._outbox
        try:
            while True:
                while outbox:
                    await call.write(outbox.popleft())
                wake.clear()
                await wake.wait()
        except Exception:  # the stream ended (the reader says why), or it must: nothing more is sent
            if not call.done():
                call.cancel()

    async def _read(self, call: Any) -> None:
        pending = self._pending
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                answer = pb.SessionReply.FromString(raw)
                waiter = pending.get(answer.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
            code, details = await call.code(), await call.details()
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details() or ""
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this reader is being stopped
                raise
            code, details = grpc.StatusCode.CANCELLED, "the session stream was cancelled"
        self._ended(call, SluiceError(code, "", details or f"the session stream ended ({code.name})"))

    def _ended(self, call: Any, error: SluiceError) -> None:
        """The stream is over: whoever still waits hears why; the next query opens another."""
        if self._session is not call:
            return
        self._session = None
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._outbox.clear()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(error)

    async def close(self) -> None:
        call = self._session
        if call is not None:
            self._ended(call, SluiceError(grpc.StatusCode.CANCELLED, "", "client closed"))
            call.cancel()
        await self.channel.close(None)

    async def __aenter__(self) -> SluiceClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
