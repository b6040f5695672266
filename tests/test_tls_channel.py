"""proxy.base.tls.TlsChannel without sockets: a client SSLObject on memory BIOs talks to it through a
transport that records what was written (uvicorn's socketless style)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import pytest

from proxy.base.tls import TlsChannel
from proxy.ops.certs import Authority


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    folder: Path = tmp_path_factory.mktemp("chan")
    ca = Authority()
    cert, key = ca.issue("pgsluice", ["localhost"]).write(folder, "server")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cadata=ca.pem.decode())
    return server, client


class Pair:
    def __init__(self, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
        self.raw = Recorder()
        self.channel = TlsChannel(contexts[0], self.raw)
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = contexts[1].wrap_bio(self.c_in, self.c_out, server_hostname="localhost")

    def handshake(self) -> None:
        for _ in range(10):
            with contextlib.suppress(ssl.SSLWantReadError):
                self.client.do_handshake()
            assert self.channel.receive(self.c_out.read()) == b""
            self.c_in.write(self.raw.take())
            if self.channel.ready:
                self.client.do_handshake()
                return
        raise AssertionError("no handshake")

    def send(self, data: bytes, byte_at_a_time: bool = False) -> bytes:
        self.client.write(data)
        wire = self.c_out.read()
        if not byte_at_a_time:
            return self.channel.receive(wire)
        return b"".join(self.channel.receive(wire[i:i + 1]) for i in range(len(wire)))

    def recv(self) -> bytes:
        self.c_in.write(self.raw.take())
        out = b""
        while True:
            try:
                out += self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return out


def test_both_ways_whole_split_and_large(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    pair = Pair(contexts)
    pair.channel.write(b"lost")  # before the handshake nothing can be said
    assert pair.raw.out == b""
    pair.handshake()
    assert pair.send(b"Q\x00\x00\x00\x0dselect 1\x00") == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert pair.send(b"byte by byte", byte_at_a_time=True) == b"byte by byte"
    big = bytes(range(256)) * 1000  # 256 kB: many records, decrypted in one receive
    assert pair.send(big) == big
    pair.channel.write(b"reply")
    pair.channel.writelines([b"two ", b"parts"])
    assert pair.recv() == b"replytwo parts"
    assert pair.channel.get_extra_info("ssl_object") is pair.channel.obj


def test_close_sends_close_notify(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    pair = Pair(contexts)
    pair.handshake()
    pair.channel.close()
    assert pair.raw.closed
    pair.c_in.write(pair.raw.take())
    assert pair.client.read(100) == b""  # the ssl module's way of saying close_notify
    pair.channel.write(b"after close")
    assert pair.raw.out == b""


def test_client_close_notify_closes_the_connection(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    pair = Pair(contexts)
    pair.handshake()
    with contextlib.suppress(ssl.SSLWantReadError):
        pair.client.unwrap()
    assert pair.channel.receive(pair.c_out.read()) == b"" and pair.raw.closed


def test_garbage_raises_after_sending_an_alert(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    pair = Pair(contexts)
    with pytest.raises(ssl.SSLError):
        pair.channel.receive(b"\x16\x03\x01\x00\x05hello, not a ClientHello")
    assert pair.raw.take()[:1] == b"\x15"  # the alert record
