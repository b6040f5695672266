"""Burst batching's statement, sans I/O: reading a request's key value exactly as Postgres would,
the batch's statement made from one of its reads, and the batch's reply split per key.

Rules: a key value is read only when the reading is certain (else None: the read runs alone);
the reply is split only when it is exactly a RowDescription, DataRows and a CommandComplete.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Hashable
from typing import TYPE_CHECKING

from planner.batch import Batchable
from planner.normalize import tokens
from proxy.pgwire import codes, encode

if TYPE_CHECKING:
    from proxy.pipeline.cacheable import Request
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
_H = struct.Struct("!h")
_i = struct.Struct("!i")
_INT_LIMITS = {21: 1 << 15, 23: 1 << 31, 20: 1 << 63}
_INT_SIZES = {21: 2, 23: 4, 20: 8}
_INT_TEXT = re.compile(r"[ \t\n\r\f\v]*[+-]?[0-9]+[ \t\n\r\f\v]*")  # what int4in takes (no '_')
_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_TEXT_TYPES = (0, 25, 1043)
_IGNORED = frozenset({codes.B_PARAMETER_STATUS, codes.B_PARSE_COMPLETE, codes.B_BIND_COMPLETE,
                      codes.B_NOTIFICATION_RESPONSE})


# ---- key values ----------------------------------------------------------------------------

def key_of(s: Session, req: Request, batch: Batchable) -> tuple[Hashable, object, str] | None:
    """(the group this read batches with, its key value normalized, as an array element)."""
    plan = req.plan
    if "\ufffd" in plan.sql:
        return None  # maybe bytes that were not UTF-8 (decoded with "replace"): Postgres's error
    own = plan.reach.own_params if plan.reach is not None else 0
    params: tuple[str, ...] = plan.params
    got: tuple[object, str] | None
    if not batch.own:
        index = batch.placeholder - own - 1
        if not 0 <= index < len(params):
            return None
        got = _literal(params[index], batch.type_oid)
        params = (*params[:index], "", *params[index + 1:])
    if req.bind is None:  # a simple Query
        if batch.own:
            return None
        head: tuple[Hashable, ...] = (b"Q",)
    else:
        parts = _bind_parts(req.bind)
        if parts is None:
            return None
        formats, values, results = parts
        if batch.own:
            k = batch.placeholder - 1
            if k >= len(values) or values[k] is None:
                return None
            fmt = formats[0] if len(formats) == 1 else formats[k] if formats else 0
            got = _bound(values[k] or b"", fmt, _declared(req.types, k), batch.type_oid)
            values = [*values[:k], None, *values[k + 1:]]
        head = (b"X", req.types, tuple(formats), tuple(values), tuple(results),
                req.fmt[3], req.fmt[2][-4:])  # type: ignore[index]  # Describe?, max_rows
    if got is None:
        return None
    gkey = (s.database, s.user, s.facts.role_policy, req.settings, plan.fingerprint, params, *head)
    return gkey, got[0], got[1]


def _literal(text: str, type_oid: int) -> tuple[object, str] | None:
    """A lifted literal (canonical SQL text) as a key value: a plain integer for an integer
    key, a string for a text or uuid key (anything else runs alone: casts decide those)."""
    if type_oid in _INT_LIMITS:
        if not re.fullmatch(r"-?[0-9]+", text):
            return None
        return _int(int(text), type_oid, 0)
    if len(text) < 2 or text[0] != "'" or text[-1] != "'":
        return None
    return _text(text[1:-1].replace("''", "'").encode(), type_oid)


def _bound(value: bytes, fmt: int, declared: int, type_oid: int) -> tuple[object, str] | None:
    if type_oid in _INT_LIMITS:
        if declared not in (0, *_INT_LIMITS):
            return None
        if fmt == 1:
            size = _INT_SIZES[declared or type_oid]
            return _int(int.from_bytes(value, "big", signed=True), type_oid, declared) \
                if len(value) == size else None
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        return _int(int(text), type_oid, declared) if _INT_TEXT.fullmatch(text) else None
    if type_oid == 2950:
        if declared not in (0, 2950):
            return None
        if fmt == 1:
            return (u := uuid.UUID(bytes=value), str(u)) if len(value) == 16 else None
        return _text(value, type_oid)
    if declared not in _TEXT_TYPES or fmt not in (0, 1):
        return None
    return _text(value, type_oid)


def _int(v: int, type_oid: int, declared: int) -> tuple[object, str] | None:
    for oid in (type_oid, declared):
        limit = _INT_LIMITS.get(oid)
        if limit is not None and not -limit <= v < limit:
            return None  # out of range: Postgres's own error (or no row), alone
    return v, str(v)


def _text(raw: bytes, type_oid: int) -> tuple[object, str] | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    if type_oid == 2950:
        if not _UUID_TEXT.fullmatch(text):
            return None
        u = uuid.UUID(text)
        return u, str(u)
    return raw, '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _declared(types: bytes, k: int) -> int:
    count = _H.unpack_from(types)[0] if len(types) >= 2 else 0
    return int(_I.unpack_from(types, 2 + 4 * k)[0]) if k < count else 0


def _bind_parts(raw: bytes) -> tuple[list[int], list[bytes | None], list[int]] | None:
    """A Bind after its names: (parameter formats, values, result formats)."""
    try:
        (n,) = _H.unpack_from(raw, 0)
        formats = [_H.unpack_from(raw, 2 + 2 * i)[0] for i in range(n)]
        pos = 2 + 2 * n
        (count,) = _H.unpack_from(raw, pos)
        pos += 2
        values: list[bytes | None] = []
        for _ in range(count):
            (length,) = _i.unpack_from(raw, pos)
            pos += 4
            values.append(None if length < 0 else raw[pos:pos + length])
            pos += max(length, 0)
        (n,) = _H.unpack_from(raw, pos)
        results = [_H.unpack_from(raw, pos + 2 + 2 * i)[0] for i in range(n)]
    except struct.error:
        return None
    if len(formats) not in (0, 1, count) or any(f not in (0, 1) for f in formats + results):
        return None
    return formats, values, results


# ---- the batch statement -------------------------------------------------------------------

def rewrite(sql: str, column: str, own: int, array: int) -> str | None:
    """`sql` with the key column appended to its select list and its one `column = value`
    (value: the placeholder $own, or else a literal) made `column = ANY($array)`; None when the
    text does not have exactly that shape."""
    try:
        toks = [(kind, s, e) for kind, s, e in tokens(sql) if kind not in ("ws", "line", "block")]
    except ValueError:
        return None
    words = [sql[s:e].lower() if kind == "word" else sql[s:e] for kind, s, e in toks]
    if not words or words[0] != "select":
        return None
    depth, from_at = 0, -1
    for i, w in enumerate(words):
        if w in ("(", "["):
            depth += 1
        elif w in (")", "]"):
            depth -= 1
        elif depth == 0 and w == "from" and toks[i][0] == "word":
            from_at = i
            break
    quoted = '"' + column.replace('"', '""') + '"'
    names = {quoted} | ({column} if re.fullmatch(r"[a-z_][a-z0-9_]*", column) else set())
    value_kinds = ("param",) if own else ("num", "str", "estr")
    found = []
    for i in range(2, len(toks)):
        kind = toks[i][0]
        if kind not in value_kinds or words[i - 1] != "=" or words[i - 2] not in names:
            continue
        if own and words[i] != f"${own}":
            continue
        before = i - 3
        if before >= 1 and words[before] == "." and toks[before - 1][0] in ("word", "qid"):
            before -= 2  # a qualified column
        after = words[i + 1] if i + 1 < len(toks) else ";"
        if before >= 0 and words[before] in ("where", "and", "(") and after in (";", ")", "and", "order"):
            found.append(i)
    if from_at < 0 or len(found) != 1 or found[0] < from_at:
        return None
    _, vs, ve = toks[found[0]]
    fs = toks[from_at][1]
    return f"{sql[:fs]}, {quoted} {sql[fs:vs]}ANY(${array}){sql[ve:]}"


def statement(req: Request, sql_text: str, values: list[str]) -> bytes | None:
    """Parse, Bind, Describe, Execute, Sync of the batch, from one of its reads: its request
    and its text, with the batch's key values (array elements)."""
    batch = req.plan.batch
    assert batch is not None
    array_text = ("{" + ",".join(values) + "}").encode()
    formats: list[int] = []
    params: list[bytes | None] = []
    results: list[int] = []
    types: list[int] = []
    if req.bind is not None:
        parts = _bind_parts(req.bind)
        if parts is None:
            return None
        formats, params, results = parts
        count = _H.unpack_from(req.types)[0] if len(req.types) >= 2 else 0
        types = [int(_I.unpack_from(req.types, 2 + 4 * k)[0]) for k in range(count)]
    n = len(params)
    array = batch.placeholder if batch.own else n + 1
    sql = rewrite(sql_text, batch.column, batch.placeholder if batch.own else 0, array)
    if sql is None:
        return None
    if formats and (len(formats) > 1 or formats[0]):
        formats = (formats if len(formats) > 1 else formats * n) + [0] * (array - n)
        formats[array - 1] = 0
    params += [None] * (array - len(params))
    params[array - 1] = array_text
    types += [0] * (array - len(types))
    types[array - 1] = batch.array_oid
    if len(results) > 1:
        results.append(0)
    bind = [b"\x00\x00", _H.pack(len(formats)), *(_H.pack(f) for f in formats), _H.pack(len(params))]
    bind += [_i.pack(-1) if p is None else _i.pack(len(p)) + p for p in params]
    bind += [_H.pack(len(results)), *(_H.pack(f) for f in results)]
    return b"".join((
        encode.parse(b"", sql.encode(), _H.pack(len(types)) + b"".join(_I.pack(t) for t in types)),
        encode.message(codes.F_BIND, b"".join(bind)), encode.message(codes.F_DESCRIBE, b"P\x00"),
        encode.message(codes.F_EXECUTE, b"\x00" + _i.pack(0)), encode.sync()))


def split(messages: list[tuple[int, bytes]],
           batch: Batchable | None) -> tuple[bytes, dict[object, list[bytes]]] | None:
    """(the RowDescription without the key column, each key's DataRows without it); None when
    the reply is anything but a RowDescription, rows and SELECT n."""
    assert batch is not None
    rd = b""
    key_binary = False
    rows: dict[object, list[bytes]] = {}
    complete = False
    for code, body in messages:
        if code in _IGNORED:
            continue
        if code == codes.B_ROW_DESCRIPTION and not rd:
            (n,) = _H.unpack_from(body)
            pos = last = 2
            for _ in range(n):
                last = pos
                pos = body.index(b"\x00", pos) + 19
            key_binary = _H.unpack_from(body, pos - 2)[0] == 1
            rd = encode.message(codes.B_ROW_DESCRIPTION, _H.pack(n - 1) + body[2:last])
        elif code == codes.B_DATA_ROW and rd and not complete:
            (n,) = _H.unpack_from(body)
            pos = last = 2
            for _ in range(n):
                last = pos
                (length,) = _i.unpack_from(body, pos)
                pos += 4 + max(length, 0)
            value = body[last + 4:] if _i.unpack_from(body, last)[0] >= 0 else None
            norm = _row_key(value, key_binary, batch.type_oid)
            if norm is None:
                return None
            rows.setdefault(norm, []).append(encode.message(codes.B_DATA_ROW, _H.pack(n - 1) + body[2:last]))
        elif code == codes.B_COMMAND_COMPLETE and rd and not complete:
            complete = True
        else:
            return None  # an error, a notice, anything else: every client runs alone
    return (rd, rows) if complete else None


def _row_key(value: bytes | None, binary: bool, type_oid: int) -> object:
    if value is None:
        return None
    if type_oid in _INT_LIMITS:
        return int.from_bytes(value, "big", signed=True) if binary else int(value)
    if type_oid == 2950:
        return uuid.UUID(bytes=value) if binary else uuid.UUID(value.decode())
    return value
