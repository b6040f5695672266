"""A client connection on the wire door: sockets, TLS, the startup packet, login and the admin
console; once logged in, its requests go through the pipeline's Session it extends.

The pipeline never calls back into this module: the door owns reading before login (the
startup reader, SSLRequest, authentication) and the admin console's state, and hands the
session over with Session.start once login is done.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct

from proxy.backends.backend import LoginError
from proxy.base import tls
from proxy.base.logs import fields, peer_text
from proxy.doors.wire import admin
from proxy.doors.wire.login import CancelOnly, login
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import StartupReader
from proxy.pgwire.errors import PROTOCOL_VIOLATION, TOO_MANY_CONNECTIONS, PgError, ProtocolError
from proxy.pipeline.runtime import Runtime
from proxy.pipeline.session import LoginResult, Session

log = logging.getLogger("pgsluice.session")
_I = struct.Struct("!I")


class WireSession(Session):
    """A Postgres wire client. States: login -> ready | admin -> closed."""

    def __init__(self, server: Runtime) -> None:
        super().__init__(server)
        self.tls: tls.TlsChannel | None = None  # the transport, once the client chose TLS
        self._fresh = True  # nothing received yet: a TLS handshake byte means direct TLS
        self._direct = False
        self.startup = StartupReader()
        self._waiter: asyncio.Future[None] | None = None
        self.placed = False  # holds one of the max_client_conn places (admission.py)
        self._logging_in = False  # counted among the connections still logging in
        self.admin_failed = False
        self.admin_busy = False  # PAUSE waits for transactions before it replies
        self.admin_statements: dict[bytes, str] = {}
        self.admin_portals: dict[bytes, str] = {}
        self.admin_formats: dict[bytes, tuple[int, ...]] = {}

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        admission = self.server.admission
        admission.logging_in += 1
        self._logging_in = True
        if admission.logging_in > self.server.config.max_client_conn:
            self.fatal(TOO_MANY_CONNECTIONS, "sorry, too many clients already",
                       detail="Too many connections are logging in at once.")
            return
        self._task = asyncio.get_running_loop().create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._fresh:
            self._fresh = False
            if data[:1] == bytes((tls.HANDSHAKE,)) and not self._direct_tls():
                return
        if self.tls is not None:
            data = self._decrypt(data)
            if not data:
                return
        state = self.state
        if state == "ready":
            Session.data_received(self, data)
        elif state == "login":
            try:
                if not self._startup_done:
                    self.startup.feed(data)
                else:
                    self.inbuf += data
            except ProtocolError as exc:
                self.fatal(exc.sqlstate, exc.message)
                return
            self._wake()
        elif state == "admin":
            self.inbuf += data
            self._admin()

    def connection_lost(self, exc: Exception | None) -> None:
        self._logged_in()
        if self.placed:
            self.placed = False
            self.server.admission.leave()
        super().connection_lost(exc)
        self._wake()

    # ---- TLS (tls.py): the session's transport becomes a TlsChannel over the socket ----------

    def _direct_tls(self) -> bool:
        """The client opened with a TLS ClientHello (Postgres 17's sslnegotiation=direct)."""
        if self.server.tls is None:
            log.info("login refused", extra=fields(peer=peer_text(self.peer),
                                                   error="direct TLS, but no certificate configured"))
            self.close()
            return False
        self._use_tls()
        self._direct = True
        return True

    def _use_tls(self) -> None:
        assert self.transport is not None and self.server.tls is not None
        self.tls = tls.TlsChannel(self.server.tls.context, self.transport)
        self.transport = self.tls

    async def start_tls(self) -> None:
        """SSLRequest: 'S', then the handshake, before anything else is read."""
        if self.startup.take_rest():  # CVE-2021-23214: bytes sent before the handshake
            raise PgError(PROTOCOL_VIOLATION, "received unencrypted data after SSL request",
                          severity="FATAL", detail="This could be either a client-software bug or "
                          "evidence of an attempted man-in-the-middle attack.")
        self.write(b"S")
        self._use_tls()
        while self.tls is not None and not self.tls.ready:
            await self._wait()

    def _decrypt(self, data: bytes) -> bytes:
        channel = self.tls
        assert channel is not None
        was_ready = channel.ready
        try:
            plain = channel.receive(data)
        except ssl.SSLError as exc:
            log.info("login refused" if self.state == "login" else "TLS error, connection closed",
                     extra=fields(peer=peer_text(self.peer), error=f"TLS: {exc.reason or exc}"))
            channel.raw.close()
            self.closed = True
            return b""
        if channel.ready and not was_ready:
            if self._direct and channel.obj.selected_alpn_protocol() != tls.ALPN:
                self.fatal(PROTOCOL_VIOLATION, "received direct SSL connection request without ALPN "
                           "protocol negotiation extension")
                return b""
            self._wake()  # start_tls waits for the handshake
        return plain

    # ---- login ---------------------------------------------------------------------------------

    _startup_done = False

    def take_place(self) -> bool:
        """One of the max_client_conn places (over all workers), kept until this client goes."""
        if not self.placed:
            self.placed = self.server.admission.admit(self.server.config.max_client_conn)
        return self.placed

    def _logged_in(self) -> None:
        """No longer among the connections still logging in."""
        if self._logging_in:
            self._logging_in = False
            self.server.admission.logging_in -= 1

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise ConnectionResetError("client went away")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.closed:
            raise ConnectionResetError("client went away")

    async def read_packet(self) -> bytes:
        while (body := self.startup.next()) is None:
            await self._wait()
        if len(body) >= 4 and _I.unpack_from(body)[0] >> 16 != 1234:
            # a StartupMessage: what follows are typed messages, maybe already pipelined
            self._startup_done = True
            self.inbuf += self.startup.take_rest()
        return body

    async def read_message(self) -> tuple[int, bytes]:
        if not self._startup_done:
            self._startup_done = True
            self.inbuf += self.startup.take_rest()
        while True:
            if len(self.inbuf) >= 5:
                length = _I.unpack_from(self.inbuf, 1)[0]
                if length < 4 or length > codes.MAX_STARTUP_PACKET:
                    raise ProtocolError("invalid message length during authentication")
                if len(self.inbuf) >= length + 1:
                    code = self.inbuf[0]
                    body = bytes(self.inbuf[5:length + 1])
                    del self.inbuf[:length + 1]
                    return code, body
            await self._wait()

    def _refused(self, sqlstate: str, message: str) -> None:
        log.info("login refused", extra=fields(peer=peer_text(self.peer), sqlstate=sqlstate, error=message))

    async def _login(self) -> None:
        try:
            await self._log_in()
        finally:
            self._logged_in()

    async def _log_in(self) -> None:
        try:
            async with asyncio.timeout(self.server.config.login_timeout):
                result = await login(self, self.server)
        except CancelOnly:
            self.close()
            return
        except LoginError as err:
            self._refused(err.fields.get("C", ""), err.fields.get("M", ""))
            self.write(err.raw)
            self.close()
            return
        except PgError as err:
            self._refused(err.sqlstate, err.message)
            self.write(encode.error_response(err.sqlstate, err.message, severity="FATAL",
                                             detail=err.detail, hint=err.hint))
            self.close()
            return
        except ProtocolError as err:
            self.fatal(err.sqlstate, err.message)
            return
        except TimeoutError:
            self.fatal(PROTOCOL_VIOLATION, "pgsluice: client did not complete login in time")
            return
        except (ConnectionError, asyncio.CancelledError):
            self.close()
            return
        self._start(result)


    def _start(self, result: LoginResult) -> None:
        if not self._startup_done:
            self._startup_done = True
            self.inbuf += self.startup.take_rest()
        if result.pool is None:  # the admin console
            log.info("client connected", extra=fields(client=self.token, peer=peer_text(self.peer),
                                                      user=result.user, database=result.database,
                                                      agent=result.params.get("application_name", "")))
            self._start_admin(result)
            return
        self.start(result)

    def _start_admin(self, result: LoginResult) -> None:
        self.user, self.database = result.user, result.database
        self.set_agent("pgsluice admin")
        self.welcome(result, "admin")
        self._admin()

    def _admin(self) -> None:
        try:
            admin.handle(self)
        except ProtocolError as exc:
            self.fatal(exc.sqlstate, exc.message)
        except Exception:
            log.exception("admin console failed")
            self.fatal("XX000", "pgsluice: internal error in the admin console")
