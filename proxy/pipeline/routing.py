"""Routing a request to a read replica or the primary (issue 15; the replicas and their
positions are backends/replicas.py's): which requests are plain single-statement reads, and
which of their tables' writes a replica must have replayed.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from planner import Flag, Kind, Plan, sqlscan
from proxy.backends.replicas import Replicas, any_name
from proxy.pgwire import codes

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
_NOT_YET = object()
_READ_ONLY_TXN = re.compile(r"(?is)\s*(?:begin|start\s+transaction)\b[^;]*\bread\s+only\b[^;]*;?\s*")
_PRIMARY_HINT = re.compile(r"(?i)/\*\s*pgsluice:\s*primary\s*\*/")
_UNSAFE = frozenset({Flag.VOLATILE_FUNCTION, Flag.SIDE_EFFECT_FUNCTION, Flag.DANGEROUS_FUNCTION,
                     Flag.LOCKING, Flag.TEMP_TABLE, Flag.SELECT_INTO, Flag.WRITABLE_CTE,
                     Flag.EXPLAIN_ANALYZE, Flag.COPY_PROGRAM, Flag.COPY_FILE, Flag.MULTI_STATEMENT,
                     Flag.SET_ROLE})


def route(replicas: Replicas, s: Session) -> Pool | None:
    """The replica pool the request at the head of s.inbuf may run on, or None (primary)."""
    primary = s.pool
    if s.pinned or s.gated or primary is None or s.route_primary():
        return None
    code = s.inbuf[0]
    if code == codes.F_QUERY:
        sql = bytes(s.inbuf[5:_I.unpack_from(s.inbuf, 1)[0]])
    elif code == codes.F_PARSE or code == codes.F_BIND:
        found = _group_sql(s)
        if found is None:
            return None
        sql = found
    else:
        return None
    planner = s.planner or s.server.planner_for(s.database)
    key = (sql, code == codes.F_QUERY, s.facts, planner.catalog.generation)
    names = replicas.memo.get(key, _NOT_YET)
    if names is _NOT_YET:
        if len(replicas.memo) > 50_000:
            replicas.memo.clear()
        names = replicas.memo[key] = read_names(s, sql.decode("utf-8", "replace"), key[1])
    if names is None:
        return None
    r = replicas.choose(s.database, names)
    if r is None:
        replicas.primary_reads += 1
        return None
    r.reads += 1
    return replicas.pool(r, primary)

def read_names(s: Session, sql: str, simple: bool) -> list[str] | None:
    """The names whose positions a replica must have passed for this statement, or None:
    it must run on the primary."""
    db = s.database
    if "pgsluice" in sql and _PRIMARY_HINT.search(sql):
        return None
    if simple and sql.lstrip()[:5].lower() in ("begin", "start") and _READ_ONLY_TXN.fullmatch(sql) \
            and not re.search(r"(?i)\bread\s+write\b", sql):
        return [any_name(db)]  # BEGIN READ ONLY: whatever the transaction reads
    if sqlscan.scan_cached(sql) is not sqlscan.PLAIN:
        return None  # it changes session state (or pins the client): the primary keeps it
    planner = s.planner or s.server.planner_for(db)
    plan: Plan = planner.analyze(sql, s.facts)
    if plan.kind is not Kind.READ or not plan.parsed or plan.tables_written or plan.statements != 1 \
            or not plan.verdict.allowed or plan.flags & _UNSAFE:
        return None
    tables = plan.tables_read
    if any("." not in t for t in tables) or any(not f.startswith("pg_catalog.") for f in plan.functions):
        return [any_name(db)]  # a table we cannot name, or a function that may read anything
    return [f"{db}/*", *(f"{db}/{t}" for t in tables)]


def _group_sql(s: Session) -> bytes | None:
    """The statement text of a complete [Parse (unnamed)] Bind [Describe] Execute Sync group at
    the head of s.inbuf (unnamed portal, one Execute), else None."""
    buf = s.inbuf
    n = len(buf)
    pos = 0
    sql: bytes | None = None
    bound = executed = False
    while n - pos >= 5:
        code = buf[pos]
        end = pos + 1 + _I.unpack_from(buf, pos + 1)[0]
        if end > n:
            return None
        if (code == codes.F_PARSE or code == codes.F_BIND) and end - pos < 7:
            return None  # malformed: Postgres answers it
        if code == codes.F_PARSE and pos == 0:
            if buf[pos + 5] != 0:
                return None  # a named statement: Postgres keeps it where it is parsed
            sql = _cstr(buf, pos + 6, end)
        elif code == codes.F_BIND and not bound:
            if buf[pos + 5] != 0:
                return None  # a named portal
            name = _cstr(buf, pos + 6, end)
            if name is None or (sql is not None and name):
                return None
            if sql is None:
                msg = s.unnamed if not name else \
                    (stmt.parse_msg if (stmt := s.statements.get(name)) is not None else None)
                if msg is None:
                    return None
                at = msg.find(b"\x00", 5) + 1
                sql = _cstr(msg, at, len(msg))
            bound = True
        elif code == codes.F_DESCRIBE and bound and not executed:
            pass
        elif code == codes.F_EXECUTE and bound and not executed:
            executed = True
        elif code == codes.F_SYNC and executed:
            return sql
        else:
            return None
        pos = end
    return None


def _cstr(buf: bytes | bytearray, start: int, end: int) -> bytes | None:
    zero = buf.find(b"\x00", start, end)
    return bytes(buf[start:zero]) if zero >= 0 else None
