"""Raw protocol-v3 clients for tests: bytes in, (type, body) messages out, every read timed.

Two clients share the message model ``Msg = (type byte, body)``:

- :class:`PgConn` (synchronous, plain sockets): ``PgConn.connect(host, port, user, password,
  database, **startup_params)`` logs in with SCRAM-SHA-256, md5, cleartext or trust and keeps
  every login-phase message (``login_messages``, ``parameters``, ``backend_key``); then
  ``simple(sql)``, ``extended(sql, ...)`` or ``send_messages([...])`` + ``read_until_ready()``.
- :class:`Raw` (asyncio streams): the older client of the proxy-misbehaviour tests.

Both work against the proxy and against Postgres directly, so tests can compare the two byte
for byte. Nothing here waits without a deadline: a read that does not complete in time raises
TimeoutError naming what had arrived so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_auth, parse_error_fields, parse_parameter_status
from proxy.pgwire.scram import ScramClient, md5_response
from tests.util import ProxyHandle

_I = struct.Struct("!I")
_i = struct.Struct("!i")
_h = struct.Struct("!h")
USER, PASSWORD, DB = "postgres", "postgres", "postgres"
STARTUP = encode.startup_message({"user": USER, "database": DB})
Msg = tuple[int, bytes]
DEFAULT_TIMEOUT = 10.0

# ---- frontend messages the proxy's encode module does not have ------------------------------

Param = bytes | str | None


def _name(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def parse(name: str | bytes, sql: str | bytes, param_types: Sequence[int] = ()) -> bytes:
    """Parse with explicit parameter type OIDs (0 = let the server infer)."""
    tail = _h.pack(len(param_types)) + b"".join(_I.pack(oid) for oid in param_types)
    return encode.parse(_name(name), _name(sql), tail)


def bind(portal: str | bytes = b"", statement: str | bytes = b"", params: Sequence[Param] = (),
         *, param_formats: Sequence[int] = (), result_formats: Sequence[int] = ()) -> bytes:
    """Bind; ``param_formats``/``result_formats`` as on the wire (empty = all text, one = all)."""
    body = bytearray(encode.cstr(_name(portal)) + encode.cstr(_name(statement)))
    body += _h.pack(len(param_formats)) + b"".join(_h.pack(f) for f in param_formats)
    body += _h.pack(len(params))
    for p in params:
        if p is None:
            body += _i.pack(-1)
        else:
            raw = _name(p)
            body += _i.pack(len(raw)) + raw
    body += _h.pack(len(result_formats)) + b"".join(_h.pack(f) for f in result_formats)
    return encode.message(codes.F_BIND, bytes(body))


def describe_statement(name: str | bytes = b"") -> bytes:
    return encode.message(codes.F_DESCRIBE, b"S" + encode.cstr(_name(name)))


def describe_portal(name: str | bytes = b"") -> bytes:
    return encode.message(codes.F_DESCRIBE, b"P" + encode.cstr(_name(name)))


def execute(portal: str | bytes = b"", max_rows: int = 0) -> bytes:
    return encode.message(codes.F_EXECUTE, encode.cstr(_name(portal)) + _i.pack(max_rows))


def close_statement(name: str | bytes = b"") -> bytes:
    return encode.message(codes.F_CLOSE, b"S" + encode.cstr(_name(name)))


def close_portal(name: str | bytes = b"") -> bytes:
    return encode.message(codes.F_CLOSE, b"P" + encode.cstr(_name(name)))


def flush() -> bytes:
    return encode.message(codes.F_FLUSH)


def sync() -> bytes:
    return encode.sync()


def query(sql: str | bytes) -> bytes:
    return encode.query(sql)


def copy_data(data: bytes) -> bytes:
    return encode.message(codes.F_COPY_DATA, data)


def copy_done() -> bytes:
    return encode.message(codes.F_COPY_DONE)


def copy_fail(reason: str) -> bytes:
    return encode.message(codes.F_COPY_FAIL, encode.cstr(reason))


# ---- backend message bodies -----------------------------------------------------------------

def data_row_values(body: bytes) -> list[bytes | None]:
    """DataRow body -> column values (None for NULL), in whatever format they were sent."""
    (n,) = _h.unpack_from(body)
    pos, out = 2, list[bytes | None]()
    for _ in range(n):
        (size,) = _i.unpack_from(body, pos)
        pos += 4
        if size < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + size])
            pos += size
    return out


def row_description_names(body: bytes) -> list[str]:
    """RowDescription body -> column names."""
    (n,) = _h.unpack_from(body)
    pos, names = 2, []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        names.append(body[pos:end].decode())
        pos = end + 1 + 18  # table oid, attnum, type oid, typlen, typmod, format
    return names


def rows(msgs: Iterable[Msg]) -> list[list[bytes | None]]:
    """Every DataRow's values."""
    return [data_row_values(body) for code, body in msgs if code == codes.B_DATA_ROW]


def sqlstates(msgs: Iterable[Msg]) -> list[str]:
    """SQLSTATE of every ErrorResponse, in order."""
    return [parse_error_fields(body).get("C", "?") for code, body in msgs
            if code == codes.B_ERROR_RESPONSE]


def types(msgs: Iterable[Msg]) -> str:
    """The message type letters, e.g. 'TDDCZ'."""
    return "".join(chr(code) for code, _ in msgs)


def render(msg: Msg, limit: int = 160) -> str:
    """One message, readably: its letter and body (errors and notices as fields)."""
    code, body = msg
    if code in (codes.B_ERROR_RESPONSE, codes.B_NOTICE_RESPONSE):
        text = repr(parse_error_fields(body))
    else:
        text = repr(body)
    return f"{chr(code)} {text[:limit]}{'...' if len(text) > limit else ''}"


def first_difference(want: Sequence[Msg], got: Sequence[Msg]) -> str:
    """Where two message lists first differ, for assertion messages ('' if equal)."""
    for n, (a, b) in enumerate(zip(want, got, strict=False)):
        if a != b:
            return (f"message {n} of {len(want)} (want) / {len(got)} (got) differs:\n"
                    f"  want {render(a, 400)}\n  got  {render(b, 400)}\n"
                    f"  want types {types(want)}\n  got  types {types(got)}")
    if len(want) != len(got):
        return (f"lengths differ: want {len(want)} messages ({types(want)}), "
                f"got {len(got)} ({types(got)})")
    return ""


# ---- the synchronous client -----------------------------------------------------------------

class ConnectionClosed(EOFError):
    """The peer closed the connection; ``messages`` holds what arrived before (this read)."""

    def __init__(self, what: str, messages: Sequence[Msg] = ()) -> None:
        super().__init__(f"{what}; got {[render(m, 80) for m in messages]}")
        self.messages = list(messages)


class LoginError(Exception):
    """The server refused the login with an ErrorResponse (``fields``) or spoke nonsense."""

    def __init__(self, what: str, messages: Sequence[Msg] = ()) -> None:
        self.messages = list(messages)
        errors = [parse_error_fields(b) for c, b in self.messages if c == codes.B_ERROR_RESPONSE]
        self.fields: dict[str, str] = errors[-1] if errors else {}
        super().__init__(f"{what}: {self.fields or types(self.messages)}")


class PgConn:
    """One synchronous protocol-v3 connection; see the module docstring."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = bytearray()
        self._pos = 0
        self.login_messages: list[Msg] = []  # every message from the first one to ReadyForQuery
        self.auth_requests: list[int] = []  # the authentication request codes the server sent
        self.parameters: dict[str, str] = {}  # ParameterStatus, at login and later
        self.backend_key: tuple[int, bytes] | None = None
        self.closed = False

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    def connect(cls, host: str, port: int, user: str, password: str | None = None,
                database: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                params: Mapping[str, str] | None = None, **startup: str) -> PgConn:
        """Open a TCP connection, send the startup packet and log in.

        Startup parameters come from ``params`` and the keyword arguments (``TimeZone="UTC"``,
        ``options="-c ..."``). Raises LoginError if the server refuses.
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock, timeout)
        try:
            all_params = {"user": user, **({"database": database} if database else {}),
                          **(params or {}), **startup}
            conn.login(all_params, password)
        except BaseException:
            conn.close()
            raise
        return conn

    def login(self, params: Mapping[str, str], password: str | None) -> list[Msg]:
        """Send the startup packet, answer authentication requests, read to ReadyForQuery."""
        self.send(encode.startup_message(params))
        user = params.get("user", "")
        scram: ScramClient | None = None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                msg = self.read_message(deadline=deadline)
            except ConnectionClosed as exc:
                raise LoginError("connection closed during login", self.login_messages) from exc
            self.login_messages.append(msg)
            code, body = msg
            if code == codes.B_ERROR_RESPONSE:
                raise LoginError("login refused", self.login_messages)
            if code == codes.B_READY_FOR_QUERY:
                return self.login_messages
            if code == codes.B_BACKEND_KEY_DATA:
                self.backend_key = (_I.unpack_from(body)[0], body[4:])
            elif code == codes.B_PARAMETER_STATUS:
                name, value = parse_parameter_status(body)
                self.parameters[name] = value
            elif code == codes.B_AUTHENTICATION:
                kind, extra = parse_auth(body)
                self.auth_requests.append(kind)
                if kind == codes.AUTH_OK:
                    continue
                if kind in (codes.AUTH_CLEARTEXT, codes.AUTH_MD5, codes.AUTH_SASL) and password is None:
                    raise LoginError(f"server asks for a password (request {kind}) and none was given",
                                     self.login_messages)
                if kind == codes.AUTH_CLEARTEXT:
                    self.send(encode.password(_name(password or "")))
                elif kind == codes.AUTH_MD5:
                    self.send(encode.password(md5_response(user, password or "", extra[:4])))
                elif kind == codes.AUTH_SASL:
                    mechanisms = [m.decode() for m in extra.split(b"\x00") if m]
                    if "SCRAM-SHA-256" not in mechanisms:
                        raise LoginError(f"no supported SASL mechanism in {mechanisms}",
                                         self.login_messages)
                    scram = ScramClient(password)
                    self.send(encode.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif kind == codes.AUTH_SASL_CONTINUE and scram is not None:
                    self.send(encode.sasl_response(scram.client_final(extra)))
                elif kind == codes.AUTH_SASL_FINAL and scram is not None:
                    scram.verify_server_final(extra)
                else:
                    raise LoginError(f"unexpected authentication request {kind}", self.login_messages)
            # NoticeResponse, NegotiateProtocolVersion: recorded, nothing to do

    # -- bytes out ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def send_messages(self, messages: Iterable[bytes]) -> None:
        """Send already-encoded messages in one write (a pipeline)."""
        self.send(b"".join(messages))

    # -- messages in ----------------------------------------------------------------------------

    def _fill(self, n: int, deadline: float) -> bool:
        """Make at least `n` unread bytes available; False at EOF."""
        while len(self._buf) - self._pos < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for data ({len(self._buf) - self._pos} bytes "
                                   f"buffered, {n} needed)")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(max(1 << 16, n))
            except TimeoutError:
                continue  # the deadline check above raises with the details
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return False
            if self._pos > (1 << 20) and self._pos > len(self._buf) // 2:
                del self._buf[:self._pos]
                self._pos = 0
            self._buf += chunk
        return True

    def read_message(self, timeout: float | None = None, *, deadline: float | None = None) -> Msg:
        """The next typed message; ConnectionClosed at EOF, TimeoutError after the timeout."""
        if deadline is None:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if not self._fill(5, deadline):
            partial = bytes(self._buf[self._pos:])
            raise ConnectionClosed("connection closed" + (f" inside a message header {partial!r}"
                                                          if partial else ""))
        code = self._buf[self._pos]
        (length,) = _I.unpack_from(self._buf, self._pos + 1)
        if length < 4:
            raise AssertionError(f"invalid message length {length} for type {chr(code)!r}")
        if not self._fill(1 + length, deadline):
            raise ConnectionClosed(f"connection closed inside a {chr(code)!r} message")
        body = bytes(self._buf[self._pos + 5:self._pos + 1 + length])
        self._pos += 1 + length
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        if code == codes.B_PARAMETER_STATUS:
            name, value = parse_parameter_status(body)
            self.parameters[name] = value
        return code, body

    def iter_until_ready(self, timeout: float | None = None) -> Iterator[Msg]:
        """Yield messages up to and including the next ReadyForQuery (for large results).

        ``timeout`` bounds the whole read, not each message.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self.read_message(deadline=deadline)
            yield msg
            if msg[0] == codes.B_READY_FOR_QUERY:
                return

    def read_until_ready(self, timeout: float | None = None, count: int = 1) -> list[Msg]:
        """Every message up to and including the `count`-th next ReadyForQuery."""
        out: list[Msg] = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for _ in range(count):
            while True:
                try:
                    msg = self.read_message(deadline=deadline)
                except ConnectionClosed as exc:
                    raise ConnectionClosed("closed before ReadyForQuery", out) from exc
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc}; no ReadyForQuery yet, got "
                                       f"{[render(m, 80) for m in out]}") from None
                out.append(msg)
                if msg[0] == codes.B_READY_FOR_QUERY:
                    break
        return out

    def read_until_eof(self, timeout: float | None = None) -> list[Msg]:
        """Every message until the server closes; TimeoutError if it does not."""
        out: list[Msg] = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                out.append(self.read_message(deadline=deadline))
            except ConnectionClosed:
                return out

    # -- whole exchanges ------------------------------------------------------------------------

    def simple(self, sql: str | bytes, timeout: float | None = None) -> list[Msg]:
        """A simple Query: every message up to and including ReadyForQuery."""
        self.send(encode.query(sql))
        return self.read_until_ready(timeout)

    def extended(self, sql: str | bytes, params: Sequence[Param] = (), *,
                 param_types: Sequence[int] = (), param_formats: Sequence[int] = (),
                 result_formats: Sequence[int] = (), statement: str | bytes = b"",
                 portal: str | bytes = b"", describe: Literal["S", "P", "SP", ""] = "P",
                 max_rows: int = 0, timeout: float | None = None) -> list[Msg]:
        """Parse, [Describe S], Bind, [Describe P], Execute, Sync in one write; read to ReadyForQuery."""
        msgs = [parse(statement, sql, param_types)]
        if "S" in describe:
            msgs.append(describe_statement(statement))
        msgs.append(bind(portal, statement, params, param_formats=param_formats,
                         result_formats=result_formats))
        if "P" in describe:
            msgs.append(describe_portal(portal))
        msgs += [execute(portal, max_rows), sync()]
        self.send_messages(msgs)
        return self.read_until_ready(timeout)

    def close(self) -> None:
        """Send Terminate (if still possible) and close the socket."""
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                if not self.closed:
                    self.sock.settimeout(1)
                    self.sock.sendall(encode.terminate())
            self.sock.close()
        self.closed = True

    def __enter__(self) -> PgConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str, port: int, user: str, password: str | None = None,
            database: str | None = None, *, timeout: float = DEFAULT_TIMEOUT, **startup: str) -> PgConn:
    """Shorthand for ``PgConn.connect``."""
    return PgConn.connect(host, port, user, password, database, timeout=timeout, params=startup)


# ---- the asyncio client -----------------------------------------------------------------------

class Raw:
    """A client speaking bytes to the proxy through asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reset = False

    @classmethod
    async def open(cls, target: ProxyHandle | tuple[str, int]) -> Raw:
        host, port = target if isinstance(target, tuple) else (target.host, target.port)
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_byte(self, timeout: float = 5) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readexactly(1)

    async def read_message(self, timeout: float = 5) -> Msg | None:
        """The next typed message, or None at EOF."""
        async with asyncio.timeout(timeout):
            try:
                head = await self.reader.readexactly(5)
                body = await self.reader.readexactly(_I.unpack_from(head, 1)[0] - 4)
            except asyncio.IncompleteReadError as exc:
                assert not exc.partial, f"connection closed inside a message: {exc.partial!r}"
                return None
            except ConnectionResetError:
                self.reset = True
                return None
        return head[0], body

    async def read_until_eof(self, timeout: float = 5) -> list[Msg]:
        """Every message until the proxy closes; fails if it does not close within `timeout`."""
        out: list[Msg] = []
        deadline = time.monotonic() + timeout
        while (msg := await self.read_message(max(0.01, deadline - time.monotonic()))) is not None:
            out.append(msg)
        return out

    async def read_until_ready(self, timeout: float = 5) -> list[Msg]:
        out: list[Msg] = []
        while True:
            msg = await self.read_message(timeout)
            assert msg is not None, f"closed before ReadyForQuery; got {describe(out)}"
            out.append(msg)
            if msg[0] == codes.B_READY_FOR_QUERY:
                return out

    async def startup(self, packet: bytes = STARTUP, password: str = PASSWORD,
                      user: str = USER) -> list[Msg]:
        """Send `packet` and authenticate; returns what came after authentication."""
        await self.send(packet)
        seen: list[Msg] = []
        scram = ScramClient(password)
        while True:
            msg = await self.read_message()
            assert msg is not None, f"closed during login; got {describe(seen)}"
            seen.append(msg)
            code, body = msg
            if code == codes.B_ERROR_RESPONSE:
                raise AssertionError(f"login refused: {parse_error_fields(body)}")
            if code != codes.B_AUTHENTICATION:
                continue
            kind, extra = parse_auth(body)
            if kind == codes.AUTH_OK:
                return await self.read_until_ready()
            if kind == codes.AUTH_CLEARTEXT:
                await self.send(encode.password(password.encode()))
            elif kind == codes.AUTH_MD5:
                await self.send(encode.password(md5_response(user, password, extra[:4])))
            elif kind == codes.AUTH_SASL:
                await self.send(encode.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            elif kind == codes.AUTH_SASL_CONTINUE:
                await self.send(encode.sasl_response(scram.client_final(extra)))
            elif kind == codes.AUTH_SASL_FINAL:
                scram.verify_server_final(extra)
            else:
                raise AssertionError(f"unexpected authentication request {kind}")

    async def query(self, sql: str) -> list[Msg]:
        await self.send(encode.query(sql))
        return await self.read_until_ready()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def describe(msgs: list[Msg]) -> list[str]:
    return [chr(code) + (repr(parse_error_fields(body)) if code == codes.B_ERROR_RESPONSE else "")
            for code, body in msgs]


def errors_in(msgs: list[Msg]) -> list[dict[str, str]]:
    return [parse_error_fields(body) for code, body in msgs if code == codes.B_ERROR_RESPONSE]


def data_rows(msgs: list[Msg]) -> list[bytes]:
    """The first column of each DataRow (text format)."""
    out = []
    for code, body in msgs:
        if code == codes.B_DATA_ROW:
            (n,) = struct.unpack_from("!i", body, 2)
            out.append(body[6:6 + n])
    return out
