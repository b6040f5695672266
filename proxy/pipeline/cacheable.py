"""A cacheable request at the head of s.inbuf, and what its plan and cache key are worked out under.

`Request` is what the cache look-up (caching.py), the fast path (fastpath.py) and burst batching
(batching.py) pass around: a simple Query, or a [Parse (unnamed)] Bind [Describe portal] Execute
Sync group, read here from the wire only when it is complete and on the unnamed portal (anything
else goes to Postgres as it is). The session's side: the settings a key holds and max_staleness
(`key_settings`), and the planner's search_path (`settings_changed`).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING

from cache.keys import parse_duration, relevant_settings, setting_value
from planner import Plan, SessionFacts
from proxy.pgwire import codes
from proxy.pgwire.decode import parse_bind_names, parse_parse
from proxy.pgwire.errors import ProtocolError

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
_H = struct.Struct("!h")
_i = struct.Struct("!i")


class Request:
    """One cacheable request at the head of s.inbuf: a Query, or a Bind..Execute..Sync group."""

    __slots__ = ("bind", "bypass", "end", "fmt", "max_age", "names", "parse_msg", "plan", "prefix",
                 "settings", "stmt_parse", "types")

    def __init__(self, plan: Plan, end: int, fmt: object, prefix: bytes = b"",
                 parse_msg: bytes | None = None, bind: bytes | None = None, types: bytes = b"",
                 stmt_parse: bytes | None = None) -> None:
        self.plan = plan
        self.end = end  # bytes of s.inbuf it takes
        self.fmt = fmt  # what else shapes the reply: protocol, parameters, formats
        self.prefix = prefix  # replies of the group's Parse/Bind, before the cached part
        self.parse_msg = parse_msg  # an unnamed Parse the group carries (it replaces s.unnamed)
        self.settings: object = ()
        self.names: tuple[str, ...] = ()
        self.max_age: float | None = None
        self.bind = bind  # the group's Bind after its names: the values a key may be pinned to
        self.types = types  # the statement's declared parameter types (Parse)
        self.stmt_parse = stmt_parse  # a group without Parse: the Parse of the statement it binds
        self.bypass: str | None = None  # not looked up: why ("" uncounted: not a plain read)


def key_settings(s: Session) -> tuple[tuple[tuple[str, str], ...], float | None]:
    """The settings a cache key holds and the session's max_staleness (worked out again only
    when s.settings moved)."""
    if s.key_source is not s.settings:
        s.key_source = s.settings
        s.key_settings = relevant_settings(s.settings)
        staleness = None
        for name, statement in s.settings:
            if name == "pgsluice.max_staleness":
                staleness = parse_duration(setting_value(statement))
        s.max_staleness = staleness
    return s.key_settings, s.max_staleness


def settings_changed(s: Session) -> None:
    """s.settings moved (SET/RESET outside a transaction): names resolve through the new
    search_path, so the planner's facts follow it."""
    path = SessionFacts().search_path
    for name, statement in s.settings:
        if name == "search_path":
            path = tuple(p.strip().strip("'\"") for p in setting_value(statement).split(",")
                         if p.strip()) or path
    if path != s.facts.search_path:
        s.facts = dataclasses.replace(s.facts, search_path=path)


def group(s: Session
          ) -> tuple[int, bytes | None, bytes | None, bytes, bytes, bytes, bool, bytes] | None:
    """A cacheable group at the head of s.inbuf, with its statement: (end, unnamed Parse message
    or None, the Parse of the statement it binds when it carries none, SQL, parameter types,
    Bind parameters and formats (for the key), Describe portal?, the Bind after its names); None
    if there is none, or the statement is not known here. A malformed message raises
    ProtocolError."""
    found = _messages(s)
    if found is None:
        return None
    end, parse_msg, stmt, bind_rest, describe, raw_bind = found
    stmt_parse = None
    if parse_msg is not None:
        _name, sql, types = parse_parse(parse_msg[5:])
    elif not stmt:
        if s.unnamed is None:
            return None
        stmt_parse = s.unnamed
        _name, sql, types = parse_parse(s.unnamed[5:])
    else:
        known = s.statements.get(stmt)
        if known is None:
            return None  # SQL-level PREPARE: Postgres knows it, we do not
        stmt_parse = known.parse_msg
        _name, sql, types = parse_parse(known.parse_msg[5:])
    return end, parse_msg, stmt_parse, sql, types, bind_rest, describe, raw_bind


def _normal_bind(rest: bytes) -> bytes:
    """A Bind's formats, parameters and result formats, with the all-text spellings made one
    (libpq sends one result format 0, others none: the same reply), for the cache key.
    A malformed Bind raises ProtocolError: it goes to Postgres, which answers it."""
    try:
        return _normal_bind_parts(rest)
    except struct.error:
        raise ProtocolError("invalid Bind message") from None


def _normal_bind_parts(rest: bytes) -> bytes:
    pos = 0
    (n,) = _H.unpack_from(rest, pos)
    formats = rest[pos + 2:pos + 2 + 2 * n]
    pos += 2 + 2 * n
    (count,) = _H.unpack_from(rest, pos)
    start = pos
    pos += 2
    for _ in range(count):
        (length,) = _i.unpack_from(rest, pos)
        pos += 4 + max(length, 0)
    params = rest[start:pos]
    (n,) = _H.unpack_from(rest, pos)
    results = rest[pos + 2:pos + 2 + 2 * n]
    if pos + 2 + 2 * n != len(rest):
        raise ProtocolError("invalid Bind message")
    parts = (b"" if formats.strip(b"\x00") == b"" else formats, params,
             b"" if results.replace(b"\x00\x00", b"") == b"" else results)
    return b"".join(_I.pack(len(p)) + p for p in parts)  # length-prefixed: unambiguous


def _messages(s: Session) -> tuple[int, bytes | None, bytes, bytes, bool, bytes] | None:
    """(end, unnamed Parse message or None, statement name, Bind parameters and formats (for
    the key), Describe portal?, the Bind after its names) of a cacheable group at the head of
    s.inbuf, else None."""
    buf = s.inbuf
    n = len(buf)
    pos = 0
    parse_msg: bytes | None = None
    stmt = bind_rest = raw_bind = b""
    bound = described = executed = False
    while n - pos >= 5:
        code = buf[pos]
        end = pos + 1 + _I.unpack_from(buf, pos + 1)[0]
        if end > n:
            return None
        body = bytes(buf[pos + 5:end])
        if code == codes.F_PARSE and pos == 0:
            if body[:1] != b"\x00":
                return None  # a named statement: Postgres must keep it
            parse_msg = bytes(buf[pos:end])
        elif code == codes.F_BIND and not bound:
            portal, stmt, rest = parse_bind_names(body)
            if portal or (parse_msg is not None and stmt):
                return None
            raw_bind = body[rest:]
            bind_rest, bound = _normal_bind(raw_bind), True
        elif code == codes.F_DESCRIBE and bound and not described and not executed:
            if body != b"P\x00":
                return None
            described = True
        elif code == codes.F_EXECUTE and bound and not executed:
            if len(body) != 5 or body[0]:  # the unnamed portal (Sync closes it: the reply is whole)
                return None
            executed = True
            bind_rest += body[1:]  # max_rows (asyncpg's fetchval asks for 1) shapes the reply
        elif code == codes.F_SYNC and executed:
            return end, parse_msg, stmt, bind_rest, described, raw_bind
        else:
            return None
        pos = end
    return None
