"""One server connection to Postgres: TLS (server_tls_mode), login (trust, cleartext, md5,
SCRAM-SHA-256), then raw bytes.

After login a Backend only moves bytes: whoever holds it (a client session, or an
internal query) installs `on_data`. Its read buffer `buf` belongs to the
connection so no byte is lost between holders.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from proxy.pgwire import codes, encode
from proxy.pgwire.decode import (
    Framer,
    parse_auth,
    parse_backend_key,
    parse_error_fields,
    parse_parameter_status,
    read_cstr,
)
from proxy.pgwire.errors import (
    CONNECTION_FAILURE,
    PROTOCOL_VIOLATION,
    UNABLE_TO_CONNECT,
    PgError,
    ProtocolError,
)
from proxy.pgwire.scram import ScramClient, ScramError, md5_response

if TYPE_CHECKING:
    from proxy.base.tls import UpstreamTls

Settings = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where Postgres listens: TCP host/port, or a unix socket directory as host."""

    host: str
    port: int
    tls: UpstreamTls | None = None  # None: plain (server_tls_mode = disable, or a unix socket)

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")


@dataclass(slots=True)
class Credentials:
    """What pgsluice can present to Postgres for one user."""

    password: str | None = None
    md5: str | None = None
    scram_keys: tuple[bytes, bytes] | None = None

    def any(self) -> bool:
        return bool(self.password is not None or self.md5 or self.scram_keys)


class LoginError(Exception):
    """Postgres refused the login; `raw` is its ErrorResponse, forwarded as-is to the client."""

    def __init__(self, raw: bytes, fields: dict[str, str], after_auth: bool = False) -> None:
        super().__init__(fields.get("M", "login failed"))
        self.raw = raw
        self.fields = fields
        self.after_auth = after_auth  # Postgres had said AuthenticationOk first


class NeedPassword(Exception):
    """Postgres asked for a password and no credential is known."""


@dataclass(slots=True)
class InternalResult:
    status: int
    error: dict[str, str] | None = None
    error_raw: bytes = b""
    params: dict[str, str] = field(default_factory=dict)
    tags: list[bytes] = field(default_factory=list)


class Backend(asyncio.Protocol):
    """A server connection; see the module docstring for who owns `on_data`."""

    def __init__(self, pool_key: tuple[str, str]) -> None:
        self.pool_key = pool_key
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.on_data: Callable[[], None] = self.idle_data
        self.on_lost: Callable[[Backend], None] | None = None
        self.closed = False
        self.pid = 0
        self.secret = b""
        self.params: dict[str, str] = {}
        self.status = codes.TXN_IDLE
        # ReadyForQuery messages owed for what was sent (each Query, Sync, FunctionCall), and
        # whether extended-protocol messages went out after the last of those: then Postgres
        # may hold an implicit transaction (with its snapshot) or be skipping to a Sync.
        self.ready_owed = 0
        self.unsynced = False
        # Server-side prepared statements present on this connection, oldest first.
        self.prepared: dict[bytes, None] = {}
        # Statements that may exist but must not be trusted (stale plan, or a skipped Close).
        self.maybe_prepared: set[bytes] = set()
        self.unnamed_owner: object = None
        self.applied: Settings | None = ()
        self.created = time.monotonic()
        self.last_used = self.created
        self.uses = 0
        self.holder: Any = None
        self.last_holder = 0  # the BackendKeyData process id of the client it last served
        self._writing = asyncio.Event()
        self._writing.set()
        self._login_waiter: asyncio.Future[None] | None = None
        self._lost_exc: BaseException | None = None

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.on_data()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost_exc = exc
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(PgError(CONNECTION_FAILURE, "server closed the connection"))
        if self.on_lost is not None:
            self.on_lost(self)
        self.on_data()

    def pause_writing(self) -> None:
        self._writing.clear()
        holder = self.holder
        if holder is not None:
            holder.pause_reading()

    def resume_writing(self) -> None:
        self._writing.set()
        holder = self.holder
        if holder is not None:
            holder.resume_reading()

    @property
    def clean(self) -> bool:
        """Idle, and every message sent has been answered up to a ReadyForQuery 'I': the one
        state in which this connection may serve another client (Pool.release checks it)."""
        return (not self.closed and self.status == codes.TXN_IDLE and self.ready_owed == 0
                and not self.unsynced and not self.buf)

    # ---- plumbing ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """Terminate politely and drop the connection."""
        if not self.closed and self.transport is not None:
            self.transport.write(encode.terminate())
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def idle_data(self) -> None:
        """Bytes while nobody holds us: an async notice, or a FATAL before the server goes."""
        if self.closed:
            return
        framer = _BufFramer(self.buf)
        try:
            while (msg := framer.next()) is not None:
                code, body = msg
                if code == codes.B_ERROR_RESPONSE:
                    self.abort()
                elif code == codes.B_PARAMETER_STATUS:
                    name, value = parse_parameter_status(body)
                    self.params[name] = value
        except ProtocolError:
            self.abort()

    # ---- login ---------------------------------------------------------------------------------

    async def _next_message(self, framer: _BufFramer) -> tuple[int, bytes]:
        while True:
            msg = framer.next()
            if msg is not None:
                return msg
            await self._wait_data()

    async def _wait_data(self) -> None:
        if self.closed:
            raise PgError(CONNECTION_FAILURE, "server closed the connection during login")
        self._login_waiter = asyncio.get_running_loop().create_future()
        self.on_data = self._wake_login
        try:
            await self._login_waiter
        finally:
            self._login_waiter = None

    async def negotiate_tls(self, tls: UpstreamTls, host: str) -> None:
        """SSLRequest, then the handshake on 'S' (the transport is replaced); on 'N' go on in
        plain text unless TLS is required (libpq's messages)."""
        self.write(encode.ssl_request())
        while not self.buf:
            await self._wait_data()
        answer = self.buf[0]
        if answer == ord("S"):
            if len(self.buf) > 1:  # CVE-2021-23222: nothing may come before the handshake
                raise PgError(PROTOCOL_VIOLATION, "received unencrypted data after SSL response")
            self.buf.clear()
            assert self.transport is not None
            transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, tls.context, server_hostname=host)
            if transport is None:
                raise PgError(CONNECTION_FAILURE, "server closed the connection during SSL negotiation")
            self.transport = transport
        elif answer == ord("N"):
            self.buf.clear()
            if tls.required:
                raise PgError(UNABLE_TO_CONNECT, "server does not support SSL, but SSL was required "
                              f"(server_tls_mode = {tls.mode})")
        else:
            raise PgError(UNABLE_TO_CONNECT, f"received invalid response to SSL negotiation: {chr(answer)}")

    def _wake_login(self) -> None:
        waiter = self._login_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def login(self, user: str, database: str, creds: Credentials) -> None:
        self.write(encode.startup_message({"user": user, "database": database}))
        framer = _BufFramer(self.buf)
        scram: ScramClient | None = None
        authed = False
        while True:
            code, body = await self._next_message(framer)
            if code == codes.B_ERROR_RESPONSE:
                raise LoginError(encode.message(code, body), parse_error_fields(body), authed)
            if code == codes.B_AUTHENTICATION:
                kind, extra = parse_auth(body)
                authed = authed or kind == codes.AUTH_OK
                scram = self._answer_auth(kind, extra, user, creds, scram)
            elif code == codes.B_PARAMETER_STATUS:
                name, value = parse_parameter_status(body)
                self.params[name] = value
            elif code == codes.B_BACKEND_KEY_DATA:
                self.pid, self.secret = parse_backend_key(body)
            elif code == codes.B_READY_FOR_QUERY:
                self.status = body[0]
                self.on_data = self.idle_data
                return
            elif code == codes.B_NEGOTIATE_PROTOCOL_VERSION or code == codes.B_NOTICE_RESPONSE:
                continue
            else:
                raise ProtocolError(f"unexpected message {chr(code)!r} during server login")

    def _answer_auth(self, kind: int, extra: bytes, user: str, creds: Credentials,
                     scram: ScramClient | None) -> ScramClient | None:
        if kind == codes.AUTH_OK:
            return scram
        if kind == codes.AUTH_CLEARTEXT:
            if creds.password is None:
                raise NeedPassword()
            self.write(encode.password(creds.password.encode()))
            return scram
        if kind == codes.AUTH_MD5:
            secret = creds.password if creds.password is not None else creds.md5
            if secret is None:
                raise NeedPassword()
            self.write(encode.password(md5_response(user, secret, extra[:4])))
            return scram
        if kind == codes.AUTH_SASL:
            mechanisms = extra.split(b"\x00")
            if b"SCRAM-SHA-256" not in mechanisms:
                raise PgError(UNABLE_TO_CONNECT, "server offers no SASL mechanism pgsluice supports")
            if creds.password is not None:
                scram = ScramClient(creds.password)
            elif creds.scram_keys is not None:
                scram = ScramClient(client_key=creds.scram_keys[0], server_key=creds.scram_keys[1])
            else:
                raise NeedPassword()
            self.write(encode.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
            return scram
        if kind == codes.AUTH_SASL_CONTINUE and scram is not None:
            try:
                self.write(encode.sasl_response(scram.client_final(extra)))
            except ScramError as exc:
                raise PgError(UNABLE_TO_CONNECT, f"SCRAM exchange with server failed: {exc}") from exc
            return scram
        if kind == codes.AUTH_SASL_FINAL and scram is not None:
            try:
                scram.verify_server_final(extra)
            except ScramError as exc:
                raise PgError(UNABLE_TO_CONNECT, f"server failed SCRAM verification: {exc}") from exc
            return scram
        raise PgError(UNABLE_TO_CONNECT, f"server asked for unsupported authentication {kind}")

    # ---- internal queries ----------------------------------------------------------------------

    async def run(self, sql: str) -> InternalResult:
        """Run a simple query for pgsluice itself; the caller must hold the connection."""
        self.write(encode.query(sql))
        self.ready_owed += 1
        framer = _BufFramer(self.buf)
        result = InternalResult(status=self.status)
        while True:
            code, body = await self._next_message(framer)
            if code == codes.B_ERROR_RESPONSE:
                result.error = parse_error_fields(body)
                result.error_raw = encode.message(code, body)
            elif code == codes.B_PARAMETER_STATUS:
                name, value = parse_parameter_status(body)
                self.params[name] = value
                result.params[name] = value
            elif code == codes.B_COMMAND_COMPLETE:
                result.tags.append(read_cstr(body, 0)[0])
            elif code == codes.B_READY_FOR_QUERY:
                self.status = result.status = body[0]
                self.ready_owed -= 1
                self.on_data = self.idle_data
                return result


class _BufFramer(Framer):
    """A Framer reading the Backend's own buffer in place."""

    __slots__ = ()

    def __init__(self, buf: bytearray) -> None:
        super().__init__(codes.DEFAULT_MAX_MESSAGE * 4)
        self._buf = buf


async def connect(upstream: Upstream, user: str, database: str, creds: Credentials,
                  timeout: float) -> Backend:
    """Open and log in a server connection, or raise PgError/LoginError/NeedPassword."""
    loop = asyncio.get_running_loop()
    backend = Backend((database, user))
    try:
        async with asyncio.timeout(timeout):
            if upstream.is_unix:
                path = os.path.join(upstream.host, f".s.PGSQL.{upstream.port}")
                await loop.create_unix_connection(lambda: backend, path)
            else:
                await loop.create_connection(lambda: backend, upstream.host, upstream.port)
                if upstream.tls is not None:
                    await backend.negotiate_tls(upstream.tls, upstream.host)
            await backend.login(user, database, creds)
    except TimeoutError as exc:
        backend.abort()
        raise PgError(UNABLE_TO_CONNECT,
                      f"could not connect to upstream {upstream.host}:{upstream.port}: "
                      f"timed out after {timeout:g} s") from exc
    except OSError as exc:
        backend.abort()
        raise PgError(UNABLE_TO_CONNECT,
                      f"could not connect to upstream {upstream.host}:{upstream.port}: "
                      f"{exc.strerror or exc}") from exc
    except BaseException:
        backend.abort()
        raise
    return backend


async def send_cancel(upstream: Upstream, pid: int, secret: bytes, timeout: float = 5.0,
                      still: Callable[[], bool] | None = None) -> None:
    """Forward a CancelRequest to Postgres for one backend; errors are ignored, as Postgres does.
    `still`, asked once connected, says whether the cancel is still wanted."""
    try:
        async with asyncio.timeout(timeout):
            if upstream.is_unix:
                path = os.path.join(upstream.host, f".s.PGSQL.{upstream.port}")
                reader, writer = await asyncio.open_unix_connection(path)
            else:
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
                if upstream.tls is not None:  # the key travels encrypted like the session did
                    writer.write(encode.ssl_request())
                    answer = await reader.readexactly(1)
                    if answer == b"S":
                        await writer.start_tls(upstream.tls.context, server_hostname=upstream.host)
                    elif upstream.tls.required:
                        writer.close()
                        return
            if still is not None and not still():
                writer.close()
                return
            writer.write(encode.cancel_request(pid, secret))
            await writer.drain()
            await reader.read()  # Postgres closes when done
            writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
