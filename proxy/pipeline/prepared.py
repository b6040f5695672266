"""A client's prepared statements, kept by pgsluice on the backends under server-side names.

A named statement lives on a backend as `sluice_<digest of text, types, search_path>`, so
clients preparing the same text share it and a client can move between backends: its Parse,
Bind, Describe and Close are rewritten to the server-side name, the statement is re-prepared
(its responses swallowed) on a backend that lacks it, and a Close is answered by pgsluice
itself while the statement stays for the next client. SQL `EXECUTE` and `DEALLOCATE` of such a
statement are rewritten the same way. relay.forward calls in here for each of those messages.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from planner import Verdict, sqlscan
from planner.guard import extended_verdict
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_bind_names, parse_parse, parse_target
from proxy.pipeline import commands, guardrails, tracking
from proxy.pipeline.entries import (
    BIND,
    CLOSE,
    DESCRIBE,
    EXECUTE,
    FAKE_BYTES,
    FAKE_CLOSE,
    PARSE,
    QUERY,
    SWALLOW_BIND,
    SWALLOW_CLOSE,
    SWALLOW_PARSE,
    Chunks,
)
from proxy.pipeline.guardrails import Rejected

if TYPE_CHECKING:
    from proxy.backends.backend import Backend
    from proxy.pipeline.session import Session

_BIND_UNNAMED = encode.message(codes.F_BIND, b"\x00\x00" + b"\x00\x00" * 3)
_EXECUTE_UNNAMED = encode.message(codes.F_EXECUTE, b"\x00" + b"\x00" * 4)
_DEALLOCATE = re.compile(rb'(?is)deallocate\s+(?:prepare\s+)?("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\s*;?\s*')


class Statement:
    """A client's named prepared statement, kept on backends under `server_name`."""

    __slots__ = ("parse_msg", "server_name", "writes")

    def __init__(self, server_name: bytes, parse_msg: bytes,
                 writes: tracking.Writes = tracking.NO_WRITES) -> None:
        self.server_name = server_name
        self.parse_msg = parse_msg
        self.writes = writes  # what an execution may change (cache versions to bump)


def server_name(sql: bytes, types: bytes, search_path: bytes = b"") -> bytes:
    """Backend-side name: equal text, parameter types and search_path share one statement."""
    digest = hashlib.blake2b(sql + b"\x00" + types + b"\x00" + search_path, digest_size=12)
    return b"sluice_" + digest.hexdigest().encode()


def _search_path(s: Session) -> bytes:
    for name, sql in s.settings:
        if name == "search_path":
            return sql.encode()
    return b""


# ---- SQL over protocol-level statements (simple Query) ------------------------------------------

def sql_deallocate(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
    """`DEALLOCATE name` of a protocol-level statement (psycopg evicting from its cache
    with libpq < 17): runs on the backend under the server-side name, no pinning."""
    m = _DEALLOCATE.fullmatch(sql)
    if m is None:
        return None
    raw = m.group(1)
    name = raw[1:-1].replace(b'""', b'"') if raw[:1] == b'"' else raw.lower()
    if name not in s.statements:
        return None
    s.unnamed = None
    backend.unnamed_owner = None
    s.queries += 1
    out: Chunks = []
    srv = _ensure(s, backend, name, out)
    del s.statements[name]
    backend.prepared.pop(srv, None)
    backend.maybe_prepared.add(srv)  # gone if it succeeds; if not, closed before reuse
    s.entries.append((QUERY, None))
    out.append(encode.query(b"DEALLOCATE " + srv))
    return out


def sql_execute(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
    """SQL `EXECUTE name` of a statement the client prepared over the protocol (asyncpg's
    prepare(name=...)): run on the backend under its server-side name."""
    found = commands.executed(s, sql)
    if found is None:
        return None
    name, args = found
    s.unnamed = None
    backend.unnamed_owner = None
    s.queries += 1
    out: Chunks = []
    srv = _ensure(s, backend, name, out)
    s.entries.append((QUERY, None))
    out.append(encode.query(b"EXECUTE " + srv + args))
    return out


# ---- Parse, Bind, Describe, Close ---------------------------------------------------------------

def _scan_parse(s: Session, sql: bytes) -> None:
    effect = sqlscan.scan_cached(sql.decode("utf-8", "replace"))
    if effect is sqlscan.PLAIN:
        return
    if effect.pin_reason is not None:
        s.pin(effect.pin_reason)
    elif effect.settings or effect.discards:
        s.pin("session state through the extended protocol")


def _fake(s: Session, kind: int) -> None:
    if s.entries:
        s.entries.append((kind, None))
    else:
        s.write(FAKE_BYTES[kind])


def _make_room(s: Session, backend: Backend, out: Chunks) -> None:
    prepared = backend.prepared
    while len(prepared) >= s.server.config.max_prepared_statements:
        oldest = next(iter(prepared))
        del prepared[oldest]
        out.append(encode.close_statement(oldest))
        s.entries.append((SWALLOW_CLOSE, oldest))


def _close_server(s: Session, backend: Backend, srv: bytes, out: Chunks) -> None:
    """Drop srv from this backend (swallowing CloseComplete) so that it can be parsed anew."""
    backend.prepared.pop(srv, None)
    backend.maybe_prepared.discard(srv)
    out.append(encode.close_statement(srv))
    s.entries.append((SWALLOW_CLOSE, srv))


def _refuse_parse(s: Session, backend: Backend, name: bytes, rejected: Rejected) -> Chunks:
    """Postgres runs (and fails) a DO block in place of the Parse: it skips to Sync as for any
    error, and a transaction block is aborted, exactly as with a real error."""
    backend.unnamed_owner = None
    if not name:
        s.unnamed = None
    s.entries.extend(((SWALLOW_PARSE, None), (SWALLOW_BIND, None), (EXECUTE, rejected)))
    return [encode.parse(b"", rejected.sql), _BIND_UNNAMED, _EXECUTE_UNNAMED]


def rewrite_parse(s: Session, backend: Backend, msg: bytes) -> Chunks:
    """What to send for the client's Parse `msg` (its parser raises before changing state)."""
    name, sql, types = parse_parse(msg[5:])
    s.note_query()
    s.last_sql = sql[:300]
    if sql[:4].lower() == b"show" and (shown := commands.show_sql(s, sql)) is not None:
        sql = shown
        msg = encode.parse(name, sql, types)
    if name and name in s.statements:  # as Postgres: the name is taken until Close
        text = name.decode("utf-8", "replace")
        return _refuse_parse(s, backend, name, Rejected(
            Verdict(False, "42P05", f'prepared statement "{text}" already exists')))
    if s.policy is not None:
        plan = guardrails.plan(s, sql)
        verdict = plan.verdict if not plan.verdict.allowed else extended_verdict(plan, s.policy)
        if verdict is not None and not verdict.allowed:
            return _refuse_parse(s, backend, name, guardrails.rejected(s, verdict))
        if plan.rewrites:
            sql = plan.sql.encode()
            msg = encode.parse(name, sql, types)
    out: Chunks = []
    if sql[:4].lower() == b"drop" or sql[:5].lower() == b"alter":
        commands.database_ddl(s, sql)
    if sql[:7].lower() == b"execute" and (found := commands.executed(s, sql)) is not None:
        # the statement it names lives on this backend under its server-side name: the
        # client stays here, where that name will keep meaning it
        s.pin("EXECUTE of a protocol-level statement in a prepared statement")
        sql = b"EXECUTE " + _ensure(s, backend, found[0], out) + found[1]
        msg = encode.parse(name, sql, types)
    _scan_parse(s, sql)
    writes = tracking.writes_of(s, sql) if s.server.tracks_writes else tracking.NO_WRITES
    if not name:
        s.unnamed_writes = writes
        s.unnamed = msg
        s.unnamed_gen += 1
        backend.unnamed_owner = (s.token, s.unnamed_gen)
        s.entries.append((PARSE, None))
        out.append(msg)
        return out
    srv = server_name(sql, types, _search_path(s))
    stmt = Statement(srv, encode.parse(srv, sql, types), writes)
    s.statements[name] = stmt
    prepared = backend.prepared
    # A client's Parse always reaches Postgres, so it is analysed against today's schema
    # (a statement kept from before an ALTER would fail with "cached plan must not change
    # result type"). Re-preparing on another backend at Bind is what sharing saves.
    if srv in prepared or srv in backend.maybe_prepared:
        _close_server(s, backend, srv, out)
    _make_room(s, backend, out)
    prepared[srv] = None
    out.append(stmt.parse_msg)
    s.entries.append((PARSE, (srv, name)))
    return out


def _ensure(s: Session, backend: Backend, stmt_name: bytes, out: Chunks) -> bytes:
    """Make the client's statement exist on this backend; returns the name to use there."""
    if not stmt_name:
        if s.unnamed is not None and backend.unnamed_owner != (s.token, s.unnamed_gen):
            out.append(s.unnamed)
            s.entries.append((SWALLOW_PARSE, None))
            backend.unnamed_owner = (s.token, s.unnamed_gen)
        return stmt_name
    stmt = s.statements.get(stmt_name)
    if stmt is None:
        return stmt_name  # unknown to us: maybe SQL-level PREPARE; Postgres decides
    prepared = backend.prepared
    srv = stmt.server_name
    if srv in prepared:
        del prepared[srv]
        prepared[srv] = None
    else:
        if srv in backend.maybe_prepared:
            _close_server(s, backend, srv, out)
        _make_room(s, backend, out)
        prepared[srv] = None
        out.append(stmt.parse_msg)
        s.entries.append((SWALLOW_PARSE, (srv, None)))
    return srv


def rewrite_bind_or_describe(s: Session, backend: Backend, code: int, msg: bytes) -> Chunks:
    """What to send for the client's Bind or Describe `msg` (its parser raises before changing
    state)."""
    out: Chunks = []
    if code == codes.F_BIND:
        portal, stmt_name, rest = parse_bind_names(msg[5:])
        stmt = s.statements.get(stmt_name) if stmt_name else None
        if stmt is None and stmt_name:
            tracking.mark_everything(s, False)  # a statement from SQL PREPARE: it may write anything
        else:
            writes = stmt.writes if stmt is not None else s.unnamed_writes
            parse_msg = stmt.parse_msg if stmt is not None else s.unnamed
            if parse_msg is not None and s.server.tracks_writes:
                _name, sql, types = parse_parse(parse_msg[5:])
                writes = tracking.current(s, writes, sql)
                if stmt is not None:
                    stmt.writes = writes
                else:
                    s.unnamed_writes = writes
                tracking.mark_bound(s, writes, msg[5 + rest:], types)
            else:
                tracking.mark(s, writes.names(s.database))
        name = _ensure(s, backend, stmt_name, out)
        s.entries.append((BIND, name if name != stmt_name else None))
        if name == stmt_name:
            out.append(msg)
        else:
            out.append(encode.message(code, portal + b"\x00" + name + b"\x00" + msg[5 + rest:]))
        return out
    target, stmt_name = parse_target(msg[5:])
    if target != ord("S"):
        s.entries.append((DESCRIBE, None))
        return [msg]
    name = _ensure(s, backend, stmt_name, out)
    s.entries.append((DESCRIBE, name if name != stmt_name else None))
    out.append(msg if name == stmt_name else encode.message(code, b"S" + name + b"\x00"))
    return out


def rewrite_close(s: Session, msg: bytes) -> Chunks:
    """What to send for the client's Close `msg`: nothing for a statement pgsluice keeps (its
    CloseComplete is pgsluice's, in its place)."""
    target, name = parse_target(msg[5:])
    if target == ord("S") and name in s.statements:
        # the server statement stays on its backends for the next client that needs it
        del s.statements[name]
        _fake(s, FAKE_CLOSE)
        return []
    if target == ord("S") and not name:
        s.unnamed = None
    s.entries.append((CLOSE, None))
    return [msg]
