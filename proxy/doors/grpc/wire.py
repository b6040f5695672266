"""Postgres wire messages -> serialized pgsluice.v1 protobuf, without protobuf objects.

The gRPC door's replies are built here as bytes straight from the messages the pipeline
produced (for a cache hit: the cached bytes), with no intermediate Python row list and no
message objects: a typed value is its Value field written out by hand, a WIRE reply is the
messages themselves in one bytes field. Rules kept: fields in field-number order, proto3
defaults left out (so the bytes parse to exactly the message proxy.pgwire.values would build — the
tests compare the two), and any type without a fast path goes through proxy.pgwire.values.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

import grpc

from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.pgwire import values

_H = struct.Struct("!h")
_I = struct.Struct("!I")
_i = struct.Struct("!i")
_DOUBLE = struct.Struct("<d")
_MASK64 = (1 << 64) - 1
_SMALL = [bytes((n,)) for n in range(128)]
_NULL = b"\x0a\x02\x08\x01"  # Row.values entry: a Value with null = true
_SERVED = {"executed": pb.EXECUTED, "cache": pb.CACHE_HIT, "coalesced": pb.COALESCED, "batched": pb.BATCHED}
_COLUMN_CACHE_MAX = 4096

# SQLSTATE -> the gRPC status a unary call fails with (and an error reply's status_code)
_BY_SQLSTATE = {
    # a Bind the request made wrong (a parameter count): the caller's mistake, not a lost link
    "08P01": grpc.StatusCode.INVALID_ARGUMENT, "3D000": grpc.StatusCode.NOT_FOUND,
    "42501": grpc.StatusCode.PERMISSION_DENIED, "25006": grpc.StatusCode.PERMISSION_DENIED,
    "23505": grpc.StatusCode.ALREADY_EXISTS, "57014": grpc.StatusCode.CANCELLED,
    "53300": grpc.StatusCode.RESOURCE_EXHAUSTED, "57P01": grpc.StatusCode.UNAVAILABLE,
    "28P01": grpc.StatusCode.UNAUTHENTICATED, "28000": grpc.StatusCode.UNAUTHENTICATED,
}
_BY_CLASS = {
    "08": grpc.StatusCode.UNAVAILABLE, "0A": grpc.StatusCode.UNIMPLEMENTED,
    "22": grpc.StatusCode.INVALID_ARGUMENT,
    "23": grpc.StatusCode.FAILED_PRECONDITION, "25": grpc.StatusCode.FAILED_PRECONDITION,
    "40": grpc.StatusCode.ABORTED, "42": grpc.StatusCode.INVALID_ARGUMENT,
    "53": grpc.StatusCode.RESOURCE_EXHAUSTED, "54": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "57": grpc.StatusCode.UNAVAILABLE, "XX": grpc.StatusCode.INTERNAL,
}


def status_for(sqlstate: str, timed_out: bool = False) -> grpc.StatusCode:
    if sqlstate == "57014" and timed_out:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return _BY_SQLSTATE.get(sqlstate) or _BY_CLASS.get(sqlstate[:2], grpc.StatusCode.UNKNOWN)


def varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload


# ---- typed values: raw text-format bytes -> a Value message's body ----

Encoder = Callable[[bytes], bytes]


def _bool(raw: bytes) -> bytes:
    return b"\x10\x01" if raw == b"t" else b"\x10\x00"


def _int(raw: bytes) -> bytes:
    n = int(raw)
    return b"\x18" + (_SMALL[n] if 0 <= n < 128 else varint(n & _MASK64))


def _double(raw: bytes) -> bytes:
    return b"\x21" + _DOUBLE.pack(float(raw))  # "NaN", "Infinity", "-Infinity" parse as such


def _string(tag: bytes) -> Encoder:
    def encode(raw: bytes) -> bytes:
        raw.decode()  # a protobuf string must be UTF-8: fail here, not in the client's parser
        return field(tag, raw)
    return encode


def _fallback(oid: int) -> Encoder:
    def encode(raw: bytes) -> bytes:
        return bytes(values.decode(raw, oid).SerializeToString())
    return encode


_ENCODERS: dict[int, Encoder] = {16: _bool, 700: _double, 701: _double}
_ENCODERS.update(dict.fromkeys((20, 21, 23, 26), _int))
_ENCODERS.update(dict.fromkeys((18, 19, 25, 1042, 1043), _string(b"\x32")))  # text = 6
for _oid, _kind in values._STRING_KINDS.items():
    _ENCODERS[_oid] = _string(bytes(((pb.Value.DESCRIPTOR.fields_by_name[_kind].number << 3) | 2,)))


def encoder(oid: int) -> Encoder:
    return _ENCODERS.get(oid) or _fallback(oid)


# ---- replies ----

_columns_cache: dict[bytes, tuple[bytes, list[Encoder]]] = {}


def columns(row_description: bytes) -> tuple[bytes, list[Encoder]]:
    """A RowDescription message -> the QueryResponse.columns fields and each column's encoder.
    Remembered per message: a query shape's RowDescription is the same bytes every time."""
    known = _columns_cache.get(row_description)
    if known is not None:
        return known
    (n,) = _H.unpack_from(row_description, 5)
    pos, out, encoders = 7, [], []
    for _ in range(n):
        end = row_description.index(b"\x00", pos)
        name = row_description[pos:end]
        oid = _I.unpack_from(row_description, end + 7)[0]
        body = (field(b"\x0a", name) if name else b"") + (b"\x10" + varint(oid) if oid else b"") \
            + field(b"\x1a", values.type_name(oid).encode())
        out.append(field(b"\x0a", body))
        encoders.append(encoder(oid))
        pos = end + 19
    result = b"".join(out), encoders
    if len(_columns_cache) >= _COLUMN_CACHE_MAX:
        _columns_cache.clear()
    _columns_cache[row_description] = result
    return result


def row(data_row: bytes, encoders: list[Encoder]) -> bytes:
    """A DataRow message -> a QueryResponse.rows field."""
    pos, out = 7, []
    for enc in encoders:
        (length,) = _i.unpack_from(data_row, pos)
        pos += 4
        if length < 0:
            out.append(_NULL)
            continue
        value = enc(data_row[pos:pos + length])
        pos += length
        out.append(field(b"\x0a", value))
    return field(b"\x12", b"".join(out))


def _messages(wire: bytes) -> Iterable[bytes]:
    pos, n = 0, len(wire)
    while pos < n:
        end = pos + 1 + _I.unpack_from(wire, pos + 1)[0]
        yield wire[pos:end]
        pos = end


def response(wire: bytes, tag: str, served: str, elapsed_ms: float, fingerprint: str,
             truncated: bool, typed: bool) -> bytes:
    """A serialized QueryResponse from a Reply's wire messages (send(wire=True))."""
    parts: list[bytes] = []
    if typed:
        encoders: list[Encoder] = []
        for message in _messages(wire):
            code = message[0]
            if code == 0x44:  # DataRow
                parts.append(row(message, encoders))
            elif code == 0x54:  # RowDescription
                fields, encoders = columns(message)
                parts.append(fields)
    if tag:
        parts.append(field(b"\x1a", tag.encode()))
        tail = tag.rpartition(" ")[2]
        if tail.isdigit() and tail != "0":
            parts.append(b"\x20" + varint(int(tail)))
    parts.append(b"\x28" + _SMALL[_SERVED.get(served, pb.EXECUTED)])
    if elapsed_ms:
        parts.append(b"\x31" + _DOUBLE.pack(elapsed_ms))
    if fingerprint:
        parts.append(field(b"\x3a", fingerprint.encode()))
    if truncated:
        parts.append(b"\x40\x01")
    if not typed and wire:
        parts.append(field(b"\x4a", wire))
    return b"".join(parts)


def error(fields: dict[str, str], status_code: int) -> bytes:
    """A serialized Error from ErrorResponse fields (C, M, D, H, P)."""
    parts = [field(tag, fields[key].encode()) for key, tag in _ERROR_FIELDS if fields.get(key)]
    if status_code:
        parts.append(b"\x30" + varint(status_code))
    return b"".join(parts)


_ERROR_FIELDS = (("C", b"\x0a"), ("M", b"\x12"), ("D", b"\x1a"), ("H", b"\x22"), ("P", b"\x2a"))


def session_reply(request_id: int, result: bytes | None = None, err: bytes | None = None) -> bytes:
    head = b"\x08" + varint(request_id) if request_id else b""
    if err is not None:
        return head + field(b"\x1a", err)
    return head + field(b"\x12", result or b"")


def batch_response(items: list[tuple[bool, bytes]], committed: bool) -> bytes:
    """items: (ok, serialized QueryResponse or Error) in the statements' order."""
    out = [field(b"\x0a", field(b"\x0a" if ok else b"\x12", body)) for ok, body in items]
    if committed:
        out.append(b"\x10\x01")
    return b"".join(out)


def request_id(raw: bytes) -> int:
    """The id of a SessionRequest that did not decode as a whole, when its first field is the id."""
    if not raw or raw[0] != 0x08:
        return 0
    n, shift = 0, 0
    for byte in raw[1:11]:
        n |= (byte & 0x7F) << shift
        if byte < 128:
            return n & _MASK64
        shift += 7
    return 0


class Outcome(NamedTuple):
    """One statement's answer: a serialized QueryResponse (ok) or Error, and for an error its
    fields (for a unary call's status) and whether the timeout hint cancelled it."""

    ok: bool
    body: bytes
    error: dict[str, str] | None = None
    timed_out: bool = False


def failed(fields: dict[str, str], timed_out: bool = False) -> Outcome:
    code = fields.get("C", "XX000")
    return Outcome(False, error(fields, status_for(code, timed_out).value[0]), fields, timed_out)
