"""Typed values for the gRPC door: Postgres text-format values <-> pgsluice.v1.Value.

Decoding works on the wire door's own bytes (text format), so a gRPC reply and a wire reply
come from one cache entry. Arrays are parsed from Postgres's array literal, nested for more
dimensions.
"""

from __future__ import annotations

import math

from protos.pgsluice.v1 import sluice_pb2 as pb

# type OID -> name, for the builtin types
TYPE_NAMES: dict[int, str] = {
    16: "bool", 17: "bytea", 18: "char", 19: "name", 20: "int8", 21: "int2", 23: "int4", 25: "text",
    26: "oid", 114: "json", 700: "float4", 701: "float8", 1042: "bpchar", 1043: "varchar",
    1082: "date", 1083: "time", 1114: "timestamp", 1184: "timestamptz", 1186: "interval",
    1266: "timetz", 1700: "numeric", 2950: "uuid", 3802: "jsonb", 0: "unknown",
}
_INTS = frozenset({20, 21, 23, 26})
_FLOATS = frozenset({700, 701})
_TEXTS = frozenset({18, 19, 25, 1042, 1043})
_STRING_KINDS = {1700: "numeric", 1082: "date", 1083: "time", 1266: "time", 1114: "timestamp",
                 1184: "timestamptz", 1186: "interval", 2950: "uuid", 114: "json", 3802: "json"}
ARRAY_ELEMENTS: dict[int, int] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1016: 20, 1005: 21, 1007: 23, 1009: 25, 1028: 26,
    199: 114, 1021: 700, 1022: 701, 1014: 1042, 1015: 1043, 1182: 1082, 1183: 1083, 1115: 1114,
    1185: 1184, 1187: 1186, 1270: 1266, 1231: 1700, 2951: 2950, 3807: 3802,
}
for _array_oid, _element_oid in ARRAY_ELEMENTS.items():
    TYPE_NAMES.setdefault(_array_oid, "_" + TYPE_NAMES[_element_oid])


def type_name(oid: int) -> str:
    return TYPE_NAMES.get(oid, f"oid {oid}")


def decode(raw: bytes | None, oid: int) -> pb.Value:
    if raw is None:
        return pb.Value(null=True)
    if oid in ARRAY_ELEMENTS:
        return _array(raw.decode(), ARRAY_ELEMENTS[oid])
    return _scalar(raw.decode(), oid)


def _scalar(text: str, oid: int) -> pb.Value:
    if oid == 16:
        return pb.Value(bool=text == "t")
    if oid in _INTS:
        return pb.Value(int64=int(text))
    if oid in _FLOATS:
        return pb.Value(double=float(text))  # "NaN", "Infinity", "-Infinity" parse as such
    if oid in _TEXTS:
        return pb.Value(text=text)
    if oid == 17:
        return pb.Value(bytea=_bytea(text))
    kind = _STRING_KINDS.get(oid)
    if kind is not None:
        value = pb.Value()
        setattr(value, kind, text)
        return value
    return pb.Value(other=pb.Other(type_name=type_name(oid), text=text))


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    out = bytearray()  # escape format
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if text[i + 1] == "\\":
                out.append(0x5C)
                i += 2
            else:
                out.append(int(text[i + 1:i + 4], 8))
                i += 4
        else:
            out += text[i].encode()
            i += 1
    return bytes(out)


def _array(text: str, element: int) -> pb.Value:
    pos = text.index("{") if not text.startswith("{") else 0  # "[1:2]={...}": bounds dropped
    value, _ = _parse_array(text, pos, element)
    return value


def _parse_array(text: str, pos: int, element: int) -> tuple[pb.Value, int]:
    assert text[pos] == "{"
    pos += 1
    items: list[pb.Value] = []
    while pos < len(text):
        ch = text[pos]
        if ch == "}":
            return pb.Value(array=pb.Array(values=items)), pos + 1
        if ch == ",":
            pos += 1
            continue
        if ch == "{":
            item, pos = _parse_array(text, pos, element)
            items.append(item)
            continue
        if ch == '"':
            pos += 1
            buf = []
            while text[pos] != '"':
                if text[pos] == "\\":
                    pos += 1
                buf.append(text[pos])
                pos += 1
            pos += 1
            items.append(_scalar("".join(buf), element))
            continue
        end = pos
        while text[end] not in ",}":
            end += 1
        word = text[pos:end]
        items.append(pb.Value(null=True) if word == "NULL" else _scalar(word, element))
        pos = end
    raise ValueError(f"unterminated array literal: {text[:80]}")


def encode(value: pb.Value) -> str | None:
    """A parameter's text form (None for NULL), as Postgres parses it."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    if kind == "bool":
        return "true" if value.bool else "false"
    if kind == "int64":
        return str(value.int64)
    if kind == "double":
        d = value.double
        if math.isnan(d):
            return "NaN"
        return ("Infinity" if d > 0 else "-Infinity") if math.isinf(d) else repr(d)
    if kind == "bytea":
        return "\\x" + value.bytea.hex()
    if kind == "array":
        return "{" + ",".join(_element(v) for v in value.array.values) + "}"
    if kind == "other":
        return value.other.text
    return str(getattr(value, kind))


def _element(value: pb.Value) -> str:
    if value.WhichOneof("kind") == "array":
        return encode(value) or "NULL"
    text = encode(value)
    if text is None:
        return "NULL"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
