"""A raw protocol-v3 client for tests: bytes in, (type, body) messages out, every read timed.

Works against the proxy and against Postgres directly (trust, cleartext or md5 login), so
tests can compare the two byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_auth, parse_error_fields
from proxy.pgwire.scram import md5_response
from tests.util import ProxyHandle

_I = struct.Struct("!I")
USER, PASSWORD, DB = "postgres", "postgres", "postgres"
STARTUP = encode.startup_message({"user": USER, "database": DB})
Msg = tuple[int, bytes]


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
    rows = []
    for code, body in msgs:
        if code == codes.B_DATA_ROW:
            (n,) = struct.unpack_from("!i", body, 2)
            rows.append(body[6:6 + n])
    return rows
