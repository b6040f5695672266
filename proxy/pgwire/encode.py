"""Encoders: pure functions from values to wire bytes, for both directions.

Every function returns one complete message (type byte, int32 length, body).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from proxy.pgwire import codes

_I = struct.Struct("!I")
_HEAD = struct.Struct("!cI")
_II = struct.Struct("!II")


def message(code: int, body: bytes = b"") -> bytes:
    """Frame `body` as a typed message.

    >>> message(ord("Z"), b"I")
    b'Z\\x00\\x00\\x00\\x05I'
    """
    return _HEAD.pack(bytes((code,)), len(body) + 4) + body


def cstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return raw + b"\x00"


# ---- backend -> client ---------------------------------------------------------------------

def error_fields(fields: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(k.encode() + cstr(v) for k, v in fields) + b"\x00"


def error_response(sqlstate: str, msg: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    """An ErrorResponse as Postgres words it (S, V, C, M, then D and H when given)."""
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", msg)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return message(codes.B_ERROR_RESPONSE, error_fields(fields))


def notice_response(sqlstate: str, msg: str, *, severity: str = "NOTICE") -> bytes:
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", msg)]
    return message(codes.B_NOTICE_RESPONSE, error_fields(fields))


def auth_request(kind: int, extra: bytes = b"") -> bytes:
    return message(codes.B_AUTHENTICATION, _I.pack(kind) + extra)


def auth_ok() -> bytes:
    return auth_request(codes.AUTH_OK)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(codes.AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return message(codes.B_PARAMETER_STATUS, cstr(name) + cstr(value))


def parameter_statuses(params: Mapping[str, str]) -> bytes:
    return b"".join(parameter_status(k, v) for k, v in params.items())


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(codes.B_BACKEND_KEY_DATA, _II.pack(pid, secret))


def ready_for_query(status: int = codes.TXN_IDLE) -> bytes:
    return message(codes.B_READY_FOR_QUERY, bytes((status,)))


def negotiate_protocol_version(minor: int, unrecognized: Iterable[str]) -> bytes:
    names = list(unrecognized)
    body = _I.pack(minor) + _I.pack(len(names)) + b"".join(cstr(n) for n in names)
    return message(codes.B_NEGOTIATE_PROTOCOL_VERSION, body)


def row_description(columns: Iterable[tuple[str, int]], formats: Sequence[int] = ()) -> bytes:
    """RowDescription: (name, type OID) per column; formats as a Bind gives them (none: text,
    one: all columns, else one per column)."""
    cols = list(columns)
    out = [struct.pack("!h", len(cols))]
    for i, (name, oid) in enumerate(cols):
        fmt = formats[0] if len(formats) == 1 else formats[i] if len(formats) > i else 0
        out.append(cstr(name) + struct.pack("!IhIhih", 0, 0, oid, -1, -1, fmt))
    return message(codes.B_ROW_DESCRIPTION, b"".join(out))


def data_row(values: Iterable[bytes | None]) -> bytes:
    vals = list(values)
    out = [struct.pack("!h", len(vals))]
    for v in vals:
        out.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return message(codes.B_DATA_ROW, b"".join(out))


def command_complete(tag: str) -> bytes:
    return message(codes.B_COMMAND_COMPLETE, cstr(tag))


PARSE_COMPLETE = message(codes.B_PARSE_COMPLETE)
CLOSE_COMPLETE = message(codes.B_CLOSE_COMPLETE)
BIND_COMPLETE = message(codes.B_BIND_COMPLETE)


# ---- client -> server ----------------------------------------------------------------------

def startup_message(params: Mapping[str, str], version: int = codes.PROTOCOL_3_0) -> bytes:
    body = _I.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _II.pack(8, codes.SSL_REQUEST)


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = _I.pack(codes.CANCEL_REQUEST) + _I.pack(pid) + secret
    return _I.pack(len(body) + 4) + body


def query(sql: str | bytes) -> bytes:
    return message(codes.F_QUERY, cstr(sql))


def password(payload: bytes) -> bytes:
    """A PasswordMessage (cleartext/md5): the payload gets its terminating NUL here."""
    return message(codes.F_PASSWORD, payload + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(codes.F_PASSWORD, cstr(mechanism) + _I.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(codes.F_PASSWORD, data)


def parse(name: bytes, sql: bytes, param_types: bytes = b"\x00\x00") -> bytes:
    """Parse; `param_types` is the raw int16 count + int32 OIDs tail of the message."""
    return message(codes.F_PARSE, name + b"\x00" + sql + b"\x00" + param_types)


def close_statement(name: bytes) -> bytes:
    return message(codes.F_CLOSE, b"S" + name + b"\x00")


def sync() -> bytes:
    return message(codes.F_SYNC)


def terminate() -> bytes:
    return message(codes.F_TERMINATE)


def quote_literal(value: str) -> str:
    """SQL string literal for a GUC value (standard_conforming_strings on).

    >>> quote_literal("it's")
    "'it''s'"
    """
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
