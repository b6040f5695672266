"""The Python ceiling for a cache hit: a uvloop server that answers every request from a dict.

    python -m loadtest.dict_server PORT

It speaks just enough of the wire protocol for pgbench (trust login; simple, extended and
prepared requests) and answers each request chunk (a Query, or messages up to a Sync) with
the reply it made the first time it saw those bytes: one dict look-up and one write per hit,
the least a Python proxy can do. Every query gets the same row, shaped like a customer's
(loadtest/hotpath_bench.py compares pgsluice's CPU per cached hit with this server's).
"""

from __future__ import annotations

import asyncio
import struct
import sys

import uvloop

_I = struct.Struct("!I")


def msg(code: bytes, body: bytes) -> bytes:
    return code + _I.pack(len(body) + 4) + body


def _row() -> tuple[bytes, bytes]:
    cols = (b"id", b"name", b"email", b"country")
    desc = struct.pack("!h", len(cols)) + b"".join(c + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
                                                   for c in cols)
    values = (b"4711", b"customer 4711", b"c4711@example.com", b"DE")
    data = struct.pack("!h", len(values)) + b"".join(_I.pack(len(v)) + v for v in values)
    return msg(b"T", desc), msg(b"D", data) + msg(b"C", b"SELECT 1\0")


DESCRIBE, ROWS = _row()
READY = msg(b"Z", b"I")
WELCOME = (msg(b"R", _I.pack(0)) + b"".join(msg(b"S", k + b"\0" + v + b"\0") for k, v in (
    (b"server_version", b"18.0"), (b"server_encoding", b"UTF8"), (b"client_encoding", b"UTF8"),
    (b"DateStyle", b"ISO, MDY"), (b"integer_datetimes", b"on"), (b"standard_conforming_strings", b"on")))
    + msg(b"K", _I.pack(1) + _I.pack(2)) + READY)
# per frontend message: the reply (Describe of a statement also says it has no parameters)
REPLY = {ord("Q"): DESCRIBE + ROWS + READY, ord("P"): msg(b"1", b""), ord("B"): msg(b"2", b""),
         ord("E"): ROWS, ord("S"): READY, ord("C"): msg(b"3", b""), ord("H"): b"", ord("X"): b""}


def answer(chunk: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(chunk):
        code, end = chunk[pos], pos + 1 + _I.unpack_from(chunk, pos + 1)[0]
        if code == ord("D"):
            out.append(DESCRIBE if chunk[pos + 5] == ord("P") else msg(b"t", b"\0\0") + DESCRIBE)
        else:
            out.append(REPLY[code])
        pos = end
    return b"".join(out)


class DictServer(asyncio.Protocol):
    replies: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""
        self.started = False

    def data_received(self, data: bytes) -> None:
        reply = self.replies.get(data) if self.started and not self.buf else None
        if reply is not None:  # the hot path: one look-up, one write
            self.transport.write(reply)  # type: ignore[attr-defined]
            return
        buf = self.buf = self.buf + data
        if not self.started:  # StartupMessage (no SSL: pgbench runs with sslmode=disable)
            if len(buf) >= 4 and len(buf) >= _I.unpack_from(buf)[0]:
                self.buf, self.started = buf[_I.unpack_from(buf)[0]:], True
                self.transport.write(WELCOME)  # type: ignore[attr-defined]
            return
        last, pos = 0, 0
        while pos + 5 <= len(buf) and pos + 1 + _I.unpack_from(buf, pos + 1)[0] <= len(buf):
            last, pos = buf[pos], pos + 1 + _I.unpack_from(buf, pos + 1)[0]
        if pos != len(buf) or last not in b"QSX":
            return  # a request ends with a Sync, or is a Query
        self.buf = b""
        if last == ord("X"):
            self.transport.close()
        else:
            self.transport.write(self.replies.setdefault(buf, answer(buf)))  # type: ignore[attr-defined]


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(DictServer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
