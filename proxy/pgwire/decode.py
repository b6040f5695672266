"""Decoders: bytes in, typed messages out, with bounded buffers and no I/O.

Rules: a decoder never holds more than one message's declared length plus one
read; any malformed input raises ProtocolError (and nothing else).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.pgwire import codes
from proxy.pgwire.errors import FEATURE_NOT_SUPPORTED, ProtocolError

_I = struct.Struct("!I")
_i = struct.Struct("!i")
_H = struct.Struct("!H")
_II = struct.Struct("!II")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str]


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def decode_startup(body: bytes) -> StartupPacket:
    """Decode the body (after the length word) of an untyped startup-phase packet."""
    if len(body) < 4:
        raise ProtocolError("invalid length of startup packet")
    (code,) = _I.unpack_from(body)
    if code == codes.SSL_REQUEST and len(body) == 4:
        return SSLRequest()
    if code == codes.GSSENC_REQUEST and len(body) == 4:
        return GSSENCRequest()
    if code == codes.CANCEL_REQUEST:
        if not 8 <= len(body) - 4 <= 4 + 256:
            raise ProtocolError("invalid length of cancel request")
        return CancelRequest(_I.unpack_from(body, 4)[0], bytes(body[8:]))
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: "
            "server supports 3.0 to 3.0", FEATURE_NOT_SUPPORTED)
    params = _decode_params(body[4:])
    return StartupMessage(major, minor, params)


def _decode_params(raw: bytes) -> dict[str, str]:
    if not raw or raw[-1] != 0:
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    parts = bytes(raw[:-1]).split(b"\x00")
    if parts == [b""]:
        return {}
    if parts[-1] != b"" or len(parts) % 2 != 1:
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts) - 1, 2):
            params[parts[i].decode()] = parts[i + 1].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid byte sequence in startup packet") from exc
    return params


class StartupReader:
    """Frames untyped startup-phase packets from a byte stream."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 4:
            (length,) = _I.unpack_from(self._buf)
            if length < 8 or length > codes.MAX_STARTUP_PACKET:
                raise ProtocolError("invalid length of startup packet")

    def next(self) -> bytes | None:
        """The body of the next complete packet, or None when more bytes are needed."""
        if len(self._buf) < 4:
            return None
        (length,) = _I.unpack_from(self._buf)
        if length < 8 or length > codes.MAX_STARTUP_PACKET:
            raise ProtocolError("invalid length of startup packet")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return body

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class Framer:
    """Frames typed messages (1-byte code, int32 length) with a size limit."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = codes.DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def next(self) -> tuple[int, bytes] | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        length = _I.unpack_from(buf, 1)[0]
        if length < 4 or length > self.max_size:
            raise ProtocolError(f"invalid message length {length} for message type {buf[0]!r}")
        end = length + 1
        if len(buf) < end:
            return None
        code = buf[0]
        body = bytes(buf[5:end])
        del buf[:end]
        return code, body


# ---- field parsers (bodies only) -------------------------------------------------------------

def read_cstr(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("invalid string in message")
    return body[pos:end], end + 1


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstr(body, pos + 1)
        fields[code] = value.decode(errors="replace")
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstr(body, 0)
    value, _ = read_cstr(body, pos)
    return name.decode(errors="replace"), value.decode(errors="replace")


def parse_backend_key(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8:
        raise ProtocolError("invalid BackendKeyData")
    return _I.unpack_from(body)[0], bytes(body[4:])


def parse_auth(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("invalid authentication request")
    return _I.unpack_from(body)[0], bytes(body[4:])


def parse_parse(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Parse body -> (statement name, query text, raw parameter-type tail)."""
    name, pos = read_cstr(body, 0)
    sql, pos = read_cstr(body, pos)
    tail = body[pos:]
    if len(tail) < 2 or len(tail) != 2 + 4 * _H.unpack_from(tail)[0]:
        raise ProtocolError("invalid Parse message")
    return name, sql, tail


def parse_bind_names(body: bytes) -> tuple[bytes, bytes, int]:
    """Bind body -> (portal, statement, offset of the rest)."""
    portal, pos = read_cstr(body, 0)
    stmt, pos = read_cstr(body, pos)
    return portal, stmt, pos


def parse_bind_params(rest: bytes, types: bytes) -> list[tuple[int, bytes | None, int]] | None:
    """A Bind's parameters after its two names: (format, value or None for NULL, declared type
    from the Parse's `types` tail, 0 if unspecified) each; None if the message is malformed."""
    try:
        (nfmt,) = _H.unpack_from(rest, 0)
        formats = [_H.unpack_from(rest, 2 + 2 * i)[0] for i in range(nfmt)]
        pos = 2 + 2 * nfmt
        (count,) = _H.unpack_from(rest, pos)
        pos += 2
        ntypes = _H.unpack_from(types, 0)[0] if len(types) >= 2 else 0
        out: list[tuple[int, bytes | None, int]] = []
        for i in range(count):
            (length,) = _i.unpack_from(rest, pos)
            pos += 4
            value = None if length < 0 else rest[pos:pos + length]
            if value is not None and len(value) != length:
                return None
            pos += max(length, 0)
            fmt = formats[0] if nfmt == 1 else formats[i] if i < nfmt else 0
            declared = _I.unpack_from(types, 2 + 4 * i)[0] if i < ntypes else 0
            out.append((fmt, value, declared))
        if nfmt not in (0, 1, count):
            return None
        return out
    except struct.error:
        return None


def parse_target(body: bytes) -> tuple[int, bytes]:
    """Describe/Close body -> (b'S' or b'P' as int, name)."""
    if not body or body[0] not in (0x53, 0x50):
        raise ProtocolError("invalid Describe/Close target")
    name, _ = read_cstr(body, 1)
    return body[0], name


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstr(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("invalid SASLInitialResponse")
    (n,) = _i.unpack_from(body, pos)
    data = body[pos + 4:]
    if n != -1 and n != len(data):
        raise ProtocolError("invalid SASLInitialResponse length")
    return mech.decode(errors="replace"), bytes(data)


def parse_password(body: bytes) -> bytes:
    if not body or body[-1] != 0:
        raise ProtocolError("invalid password packet")
    return bytes(body[:-1])
