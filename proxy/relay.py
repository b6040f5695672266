"""Byte relay between a client and the backend it holds, with per-message response tracking.

Every message sent to the backend that produces a response gets an Entry, in
order. A backend message ends the head Entry when it is that Entry's terminal
response (ParseComplete for Parse, ReadyForQuery for Sync or Query...). This is
what lets pgsluice (a) answer CloseComplete itself for prepared statements it
keeps on the backend, in the right place, and (b) swallow the responses to
messages it injected (re-preparing a client's statement on another backend). An
ErrorResponse to an extended-protocol message voids the Entries up to the next
Sync, as Postgres skips those messages.

Everything else is passed through as ranges of the original bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from planner import Kind, Plan, Verdict
from planner.explain import describe
from planner.guard import extended_verdict
from planner.normalize import comment_hints

from . import caching, sqlscan
from .logs import fields
from .pgwire import codes, encode
from .pgwire.decode import (
    parse_bind_names,
    parse_error_fields,
    parse_parameter_status,
    parse_parse,
    parse_target,
)
from .pgwire.errors import ProtocolError
from .settings import apply_changes

if TYPE_CHECKING:
    from .backend import Backend
    from .session import ClientSession

_I = struct.Struct("!I")
log = logging.getLogger("pgsluice.queries")

# Entry kinds.
QUERY, SYNC, FUNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE = range(8)
FAKE_CLOSE, SWALLOW_PARSE, SWALLOW_CLOSE, SWALLOW_BIND, SWALLOW_QUERY = range(8, 13)
_SWALLOWED = (SWALLOW_PARSE, SWALLOW_CLOSE, SWALLOW_BIND)
_ENDS_AT_READY = (QUERY, SYNC, FUNC)
assert caching._ENDS_AT_READY == _ENDS_AT_READY
_FAKE_BYTES = {FAKE_CLOSE: encode.CLOSE_COMPLETE}
# "cached plan must not change result type": the statement predates a schema change
_STALE_PLAN = b"\x00C0A000\x00"

# backend message code -> the entry kinds it terminates
_TERMINAL: dict[int, tuple[int, ...]] = {
    codes.B_PARSE_COMPLETE: (PARSE, SWALLOW_PARSE),
    codes.B_BIND_COMPLETE: (BIND, SWALLOW_BIND),
    codes.B_CLOSE_COMPLETE: (CLOSE, SWALLOW_CLOSE),
    codes.B_ROW_DESCRIPTION: (DESCRIBE,),
    codes.B_NO_DATA: (DESCRIBE,),
    codes.B_COMMAND_COMPLETE: (EXECUTE,),
    codes.B_EMPTY_QUERY_RESPONSE: (EXECUTE,),
    codes.B_PORTAL_SUSPENDED: (EXECUTE,),
}
# extended-protocol messages whose content pgsluice reads (their parsers raise before
# changing any state), with the entry kind of each
_EXTENDED = {codes.F_PARSE: PARSE, codes.F_BIND: BIND, codes.F_DESCRIBE: DESCRIBE, codes.F_CLOSE: CLOSE}
_TXN_WORDS = re.compile(rb"(?i)\b(begin|start|commit|rollback|end|abort|savepoint|release|prepare)\b")
_STREAM_MIN = 256 * 1024  # pass a partial DataRow/CopyData through once this much is buffered


class QueryInfo:
    """What a simple Query will change in session state if it succeeds."""

    __slots__ = ("changes", "discard_seen", "discards", "failed")

    def __init__(self, changes: tuple[tuple[str, str | None], ...], discards: bool) -> None:
        self.changes = changes
        self.discards = discards
        self.discard_seen = False
        self.failed = False


class Rejected:
    """A statement a guardrail refused: Postgres runs a DO block raising the same SQLSTATE
    (so transaction state follows exactly), and the client gets this clean ErrorResponse."""

    __slots__ = ("code", "error", "sql")

    def __init__(self, verdict: Verdict) -> None:
        self.code = b"\x00C" + verdict.sqlstate.encode() + b"\x00"
        self.error = encode.error_response(verdict.sqlstate, verdict.message, hint=verdict.hint or None)
        code, message = encode.quote_literal(verdict.sqlstate), encode.quote_literal(verdict.message)
        self.sql = (f"DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = {code}, MESSAGE = {message};"
                    " END$pgsluice$").encode()


# The mark of a Query entry for COPY ... FROM STDIN, and of the Syncs the client sent after it
# before its CopyDone / CopyFail: once the COPY has started (CopyInResponse), Postgres ignores
# those Syncs, so no ReadyForQuery is owed for them; if it never started, they count.
COPY_IN = object()
_COPY_IN = re.compile(rb"(?is)copy\b.*\bfrom\s+stdin\b")
_IN_COPY = frozenset({codes.F_COPY_DATA, codes.F_COPY_DONE, codes.F_COPY_FAIL, codes.F_FLUSH, codes.F_SYNC,
                      codes.F_TERMINATE})

_BIND_UNNAMED = encode.message(codes.F_BIND, b"\x00\x00" + b"\x00\x00" * 3)
_EXECUTE_UNNAMED = encode.message(codes.F_EXECUTE, b"\x00" + b"\x00" * 4)

Entry = tuple[int, object]
Chunks = list[bytes | bytearray]


class Statement:
    """A client's named prepared statement, kept on backends under `server_name`."""

    __slots__ = ("parse_msg", "server_name", "writes")

    def __init__(self, server_name: bytes, parse_msg: bytes,
                 writes: caching.Writes = caching.NO_WRITES) -> None:
        self.server_name = server_name
        self.parse_msg = parse_msg
        self.writes = writes  # what an execution may change (cache versions to bump)


def server_name(sql: bytes, types: bytes, search_path: bytes = b"") -> bytes:
    """Backend-side name: equal text, parameter types and search_path share one statement."""
    digest = hashlib.blake2b(sql + b"\x00" + types + b"\x00" + search_path, digest_size=12)
    return b"sluice_" + digest.hexdigest().encode()


def _search_path(s: ClientSession) -> bytes:
    for name, sql in s.settings:
        if name == "search_path":
            return sql.encode()
    return b""


def has_message(buf: bytearray, limit: int = codes.DEFAULT_MAX_MESSAGE) -> bool:
    """Whether buf starts with a complete message; a bad length raises at the header."""
    if len(buf) < 5:
        return False
    length = _I.unpack_from(buf, 1)[0]
    if length < 4 or length > limit:
        raise ProtocolError(f"invalid message length {length} for message type {buf[0]}")
    return bool(len(buf) >= length + 1)


# ---- client -> backend -------------------------------------------------------------------------

def forward(s: ClientSession) -> None:
    """Send every complete client message in s.inbuf to s.backend, rewriting as needed."""
    backend = s.backend
    assert backend is not None
    buf = s.inbuf
    n = len(buf)
    limit = s.server.config.max_message_size
    entries = s.entries
    out: Chunks = []
    start = pos = 0
    terminate = False
    owed = 0  # ReadyForQuery messages this batch will be answered with
    unsynced: bool | None = None  # whether it ends with extended messages after its last Sync
    while n - pos >= 5:
        code = buf[pos]
        length = _I.unpack_from(buf, pos + 1)[0]
        if length < 4 or length > limit:
            raise ProtocolError(f"invalid message length {length} for message type {code}")
        end = pos + 1 + length
        if end > n:
            break
        if s.copy_in and code not in _IN_COPY:
            # Postgres would end the COPY with an error and take this message with it: no
            # client does that, and pgsluice could not tell what is answered any more
            raise ProtocolError(f"unexpected message type {code} during COPY FROM STDIN")
        if code == codes.F_EXECUTE:
            unsynced = True
            if not s.skipping:
                entries.append((EXECUTE, None))
                s.server.stats.upstream_queries += 1
        elif code == codes.F_SYNC:
            # in COPY FROM STDIN Postgres ignores it; the CopyInResponse tells (relay.backward)
            entries.append((SYNC, COPY_IN if s.copy_in else None))
            s.skipping = False
            owed += 1
            unsynced = False
        elif code == codes.F_QUERY:
            if not s.skipping:  # else Postgres drops it unanswered, still skipping to a Sync
                owed += 1
                unsynced = False
                sql = bytes(buf[pos + 5:end - 1])
                if b"agent=" in sql:
                    _tag_agent(s, sql)
                s.note_query()
                s.server.stats.upstream_queries += 1
                s.last_sql = sql[:300]
                head = sql[:10].lower()
                if head[:3] == b"set" and b"pgsluice.route" in sql:
                    fixed = _route_setting(sql)
                    if fixed is not None:  # sent quoted: PRIMARY is a reserved word to Postgres
                        out.append(buf[start:pos])
                        out.append(encode.query(fixed))
                        start, sql = end, fixed
                swap = _deallocate(s, backend, sql) if head == b"deallocate" else \
                    _show(s, backend, sql) if head[:4] == b"show" else None
                if swap is None and s.server.tracks_writes:
                    caching.note_writes(s, sql)
                if swap is None and s.policy is not None:
                    swap = _guarded_query(s, backend, sql)
                if swap is None and head[:7] == b"execute":
                    swap = _execute(s, backend, sql)
                elif head[:4] == b"drop" or head[:5] == b"alter":
                    _database_ddl(s, sql)
                if swap is not None:
                    out.append(buf[start:pos])
                    out.extend(swap)
                    start = end
                else:
                    info = _query(s, backend, sql)
                    if info is None and head[:4] == b"copy" and _COPY_IN.match(sql):
                        s.copy_in = True
                        entries.append((QUERY, COPY_IN))
                    else:
                        entries.append((QUERY, info))
                    restore = _restore_startup(s, sql) if info is not None or s.pinned else None
                    if restore is not None:  # RESET of startup parameters: put them back
                        out.append(buf[start:end])
                        out.append(restore)
                        entries.append((SWALLOW_QUERY, None))
                        owed += 1
                        start = end
        elif code in _EXTENDED:
            unsynced = True
            if not s.skipping:
                out.append(buf[start:pos])
                msg = bytes(buf[pos:end])
                try:
                    out.extend(_parse(s, backend, msg) if code == codes.F_PARSE else
                               _close(s, msg) if code == codes.F_CLOSE else
                               _bind_or_describe(s, backend, code, msg))
                except ProtocolError:
                    # malformed inside: Postgres answers it with its own error (08P01) and
                    # skips to the next Sync, as for any failed extended-protocol message
                    entries.append((_EXTENDED[code], None))
                    out.append(msg)
                start = end
        elif code == codes.F_COPY_DONE or code == codes.F_COPY_FAIL:
            s.copy_in = False
        elif code == codes.F_COPY_DATA or code == codes.F_FLUSH:
            pass
        elif code == codes.F_FUNCTION_CALL:
            if not s.skipping:
                owed += 1
                unsynced = False
                entries.append((FUNC, None))
                caching.mark_everything(s, True)  # a FunctionCall: anything
        elif code == codes.F_TERMINATE:
            terminate = True
            break
        else:
            raise ProtocolError(f"invalid frontend message type {code}")
        pos = end
    out.append(buf[start:pos])
    del buf[:pos]
    data = b"".join(out)
    if data:
        backend.write(data)
    backend.ready_owed += owed
    if unsynced is not None:
        backend.unsynced = unsynced
    if terminate:
        s.close()


_ROUTE_SET = re.compile(rb"(?is)(\s*set\s+(?:session\s+|local\s+)?pgsluice\.route\s*(?:=|to)\s*)"
                        rb"([a-z_]+)(\s*;?\s*)")


def _route_setting(sql: bytes) -> bytes | None:
    """`SET pgsluice.route = primary` with its value quoted, else None."""
    m = _ROUTE_SET.fullmatch(sql)
    if m is None or m.group(2).lower() == b"default":
        return None
    return m.group(1) + b"'" + m.group(2).lower() + b"'" + m.group(3)


def _query(s: ClientSession, backend: Backend, sql: bytes) -> QueryInfo | None:
    s.unnamed = None  # a simple Query destroys the unnamed statement
    backend.unnamed_owner = None
    s.queries += 1
    effect = sqlscan.scan_cached(sql.decode("utf-8", "replace"))
    if effect is sqlscan.PLAIN:
        return None
    if effect.pin_reason is not None:
        s.pin(effect.pin_reason)
        return None
    # Outside a transaction a Query (even multi-statement: one implicit transaction)
    # either applies all its SETs or none; explicit transaction control inside breaks that.
    if effect.settings and not s.pinned and (
            s.entries or backend.status != codes.TXN_IDLE
            or (effect.statements > 1 and _TXN_WORDS.search(sql))):
        s.pin("SET inside a transaction")
        return None
    if effect.settings or effect.discards:
        return QueryInfo(effect.settings, effect.discards)
    return None


_DEALLOCATE = re.compile(rb'(?is)deallocate\s+(?:prepare\s+)?("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)\s*;?\s*')


def _deallocate(s: ClientSession, backend: Backend, sql: bytes) -> Chunks | None:
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


_EXECUTE = re.compile(rb'(?is)execute\s+("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)(\s*\(.*\))?\s*;?\s*')


def _executed(s: ClientSession, sql: bytes) -> tuple[bytes, bytes] | None:
    """(client name, arguments) of `EXECUTE name [(args)]` naming one of the client's
    protocol-level statements (kept on backends under another name), else None."""
    m = _EXECUTE.fullmatch(sql)
    if m is None:
        return None
    raw = m.group(1)
    name = raw[1:-1].replace(b'""', b'"') if raw[:1] == b'"' else raw.lower()
    return (name, m.group(2) or b"") if name in s.statements else None


def _execute(s: ClientSession, backend: Backend, sql: bytes) -> Chunks | None:
    """SQL `EXECUTE name` of a statement the client prepared over the protocol (asyncpg's
    prepare(name=...)): run on the backend under its server-side name."""
    found = _executed(s, sql)
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


_NAME = rb'("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)'
_DATABASE_DDL = re.compile(rb"(?is)(?:drop\s+database\s+(?:if\s+exists\s+)?" + _NAME
                           + rb"|alter\s+database\s+" + _NAME + rb"\s+rename\b)")


def _database_ddl(s: ClientSession, sql: bytes) -> None:
    """DROP DATABASE / ALTER DATABASE ... RENAME: pgsluice's idle connections to that
    database must not be in its way."""
    m = _DATABASE_DDL.match(sql)
    if m is not None:
        raw = m.group(1) or m.group(2)
        name = raw[1:-1].replace(b'""', b'"') if raw[:1] == b'"' else raw.lower()
        s.server.database_going(name.decode("utf-8", "replace"))


_SHOW_PLAN = re.compile(rb"(?is)\s*show\s+plan\s+('(?:[^']|'')*')\s*;?\s*")
_SHOW_CACHE = re.compile(rb"(?is)\s*show\s+cache\s*;?\s*")


def _show(s: ClientSession, backend: Backend, sql: bytes) -> Chunks | None:
    """`SHOW CACHE` and `SHOW PLAN 'query'` (not Postgres syntax, so nothing is shadowed):
    Postgres answers a VALUES list of pgsluice's rows, so the reply and the transaction
    state are exactly those of a query."""
    text = show_sql(s, sql)
    if text is None:
        return None
    s.unnamed = None  # a simple Query destroys the unnamed statement
    backend.unnamed_owner = None
    s.entries.append((QUERY, None))
    return [encode.query(text)]


def show_sql(s: ClientSession, sql: bytes) -> bytes | None:
    """The query that answers a pgsluice SHOW (simple or extended protocol), else None."""
    if s.server.cache is not None and _SHOW_CACHE.fullmatch(sql):
        return _values(("name", "value"), s.server.cache_rows())
    m = _SHOW_PLAN.fullmatch(sql)
    if m is None:
        return None
    text = m.group(1)[1:-1].replace(b"''", b"'").decode("utf-8", "replace")
    plan = s.server.planner_for(s.database).analyze(text, s.facts)
    return _values(("plan",), [(line,) for line in describe(plan).splitlines()])


def _values(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> bytes:
    values = ", ".join("(" + ", ".join(encode.quote_literal(v) for v in row) + ")" for row in rows)
    return f"SELECT * FROM (VALUES {values}) AS pgsluice({', '.join(columns)})".encode()


def _tag_agent(s: ClientSession, sql: bytes) -> None:
    for key, value in comment_hints(sql.decode("utf-8", "replace")):
        if key == "agent" and value:
            s.set_agent(value[:64])


def _plan(s: ClientSession, sql: bytes) -> Plan:
    assert s.planner is not None
    plan = s.planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    if plan.kind is Kind.DDL:
        s.server.ddl_seen(s.database)
    return plan


def _rejected(s: ClientSession, verdict: Verdict) -> Rejected:
    s.agent_stats.rejected += 1
    s.server.stats.rejected += 1
    log.info("query rejected", extra=fields(client=s.token, agent=s.agent, rule=verdict.rule,
                                            sqlstate=verdict.sqlstate, sql=s.last_statement))
    return Rejected(verdict)


def _guarded_query(s: ClientSession, backend: Backend, sql: bytes) -> Chunks | None:
    """A simple Query under a role policy: refused (never reaching Postgres) or rewritten."""
    plan = _plan(s, sql)
    if not plan.verdict.allowed:
        s.unnamed = None
        backend.unnamed_owner = None
        rejected = _rejected(s, plan.verdict)
        s.entries.append((QUERY, rejected))
        return [encode.query(rejected.sql)]
    if plan.rewrites:
        new = plan.sql.encode()
        s.entries.append((QUERY, _query(s, backend, new)))
        return [encode.query(new)]
    return None


def _restore_startup(s: ClientSession, sql: bytes) -> bytes | None:
    """On the server connection, startup parameters are session SETs, so RESET returns to
    the server's defaults; Postgres would return to the client's startup values. A Query
    that resets any of them is followed by one (its replies swallowed, ParameterStatus
    passed on) that sets them again; it shares the transaction, so a rollback undoes both."""
    effect = sqlscan.scan_cached(sql.decode("utf-8", "replace"))
    startup = dict(s.startup_settings)
    names = [name for name, value in effect.settings if value is None]
    statements = list(startup.values()) if "*" in names else [startup[n] for n in names if n in startup]
    if not statements:
        return None
    return encode.query(";".join(statements))


def _scan_parse(s: ClientSession, sql: bytes) -> None:
    effect = sqlscan.scan_cached(sql.decode("utf-8", "replace"))
    if effect is sqlscan.PLAIN:
        return
    if effect.pin_reason is not None:
        s.pin(effect.pin_reason)
    elif effect.settings or effect.discards:
        s.pin("session state through the extended protocol")


def _fake(s: ClientSession, kind: int) -> None:
    if s.entries:
        s.entries.append((kind, None))
    else:
        s.write(_FAKE_BYTES[kind])


def _make_room(s: ClientSession, backend: Backend, out: Chunks) -> None:
    prepared = backend.prepared
    while len(prepared) >= s.server.config.max_prepared_statements:
        oldest = next(iter(prepared))
        del prepared[oldest]
        out.append(encode.close_statement(oldest))
        s.entries.append((SWALLOW_CLOSE, oldest))


def _close_server(s: ClientSession, backend: Backend, srv: bytes, out: Chunks) -> None:
    """Drop srv from this backend (swallowing CloseComplete) so that it can be parsed anew."""
    backend.prepared.pop(srv, None)
    backend.maybe_prepared.discard(srv)
    out.append(encode.close_statement(srv))
    s.entries.append((SWALLOW_CLOSE, srv))


def _refuse_parse(s: ClientSession, backend: Backend, name: bytes, rejected: Rejected) -> Chunks:
    """Postgres runs (and fails) a DO block in place of the Parse: it skips to Sync as for any
    error, and a transaction block is aborted, exactly as with a real error."""
    backend.unnamed_owner = None
    if not name:
        s.unnamed = None
    s.entries.extend(((SWALLOW_PARSE, None), (SWALLOW_BIND, None), (EXECUTE, rejected)))
    return [encode.parse(b"", rejected.sql), _BIND_UNNAMED, _EXECUTE_UNNAMED]


def _parse(s: ClientSession, backend: Backend, msg: bytes) -> Chunks:
    name, sql, types = parse_parse(msg[5:])
    s.note_query()
    s.last_sql = sql[:300]
    if sql[:4].lower() == b"show" and (shown := show_sql(s, sql)) is not None:
        sql = shown
        msg = encode.parse(name, sql, types)
    if name and name in s.statements:  # as Postgres: the name is taken until Close
        text = name.decode("utf-8", "replace")
        return _refuse_parse(s, backend, name, Rejected(
            Verdict(False, "42P05", f'prepared statement "{text}" already exists')))
    if s.policy is not None:
        plan = _plan(s, sql)
        verdict = plan.verdict if not plan.verdict.allowed else extended_verdict(plan, s.policy)
        if verdict is not None and not verdict.allowed:
            return _refuse_parse(s, backend, name, _rejected(s, verdict))
        if plan.rewrites:
            sql = plan.sql.encode()
            msg = encode.parse(name, sql, types)
    out: Chunks = []
    if sql[:4].lower() == b"drop" or sql[:5].lower() == b"alter":
        _database_ddl(s, sql)
    if sql[:7].lower() == b"execute" and (found := _executed(s, sql)) is not None:
        # the statement it names lives on this backend under its server-side name: the
        # client stays here, where that name will keep meaning it
        s.pin("EXECUTE of a protocol-level statement in a prepared statement")
        sql = b"EXECUTE " + _ensure(s, backend, found[0], out) + found[1]
        msg = encode.parse(name, sql, types)
    _scan_parse(s, sql)
    writes = caching.writes_of(s, sql) if s.server.tracks_writes else caching.NO_WRITES
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


def _ensure(s: ClientSession, backend: Backend, stmt_name: bytes, out: Chunks) -> bytes:
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


def _bind_or_describe(s: ClientSession, backend: Backend, code: int, msg: bytes) -> Chunks:
    out: Chunks = []
    if code == codes.F_BIND:
        portal, stmt_name, rest = parse_bind_names(msg[5:])
        stmt = s.statements.get(stmt_name) if stmt_name else None
        if stmt is None and stmt_name:
            caching.mark_everything(s, False)  # a statement from SQL PREPARE: it may write anything
        else:
            writes = stmt.writes if stmt is not None else s.unnamed_writes
            parse_msg = stmt.parse_msg if stmt is not None else s.unnamed
            if parse_msg is not None and s.server.tracks_writes:
                _name, sql, types = parse_parse(parse_msg[5:])
                writes = caching.current(s, writes, sql)
                if stmt is not None:
                    stmt.writes = writes
                else:
                    s.unnamed_writes = writes
                caching.mark_bound(s, writes, msg[5 + rest:], types)
            else:
                caching.mark(s, writes.names(s.database))
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


def _close(s: ClientSession, msg: bytes) -> Chunks:
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


# ---- backend -> client -------------------------------------------------------------------------

def backward(s: ClientSession, backend: Backend) -> None:
    """Forward backend bytes to the client, ending entries, and release at transaction end."""
    buf = backend.buf
    n = len(buf)
    entries = s.entries
    out: Chunks = []
    start = pos = 0
    if s.stream_left:
        pos = min(s.stream_left, n)
        s.stream_left -= pos
    ready = ended = completed = False
    fill = s.fill
    while n - pos >= 5:
        code = buf[pos]
        length = _I.unpack_from(buf, pos + 1)[0]
        if length < 4:
            raise ProtocolError(f"invalid message length {length} from server")
        end = pos + 1 + length
        if end <= n and entries and entries[0][0] == SWALLOW_QUERY:
            if code == codes.B_PARAMETER_STATUS:  # the client sees its value come back
                name, value = parse_parameter_status(bytes(buf[pos + 5:end]))
                backend.params[name] = value
                s.reported[name] = value
            else:
                out.append(buf[start:pos])
                start = end
                if code == codes.B_READY_FOR_QUERY:
                    backend.status = buf[pos + 5]
                    backend.ready_owed -= 1
                    entries.popleft()
                    ready = not entries
            pos = end
            continue
        if end > n:
            if (code == codes.B_DATA_ROW or code == codes.B_COPY_DATA) and n - pos >= _STREAM_MIN \
                    and not s.row_cap:
                s.stream_left = end - n
                pos = n
                if fill is not None:
                    fill.too_big()
            break
        if fill is not None and code != codes.B_READY_FOR_QUERY:
            fill.add(code, bytes(buf[pos:end]))
        if code == codes.B_DATA_ROW:
            if s.row_cap:
                if s.rows_seen >= s.row_cap:  # max_rows_mode = "cut": drop it
                    out.append(buf[start:pos])
                    start = end
                    s.rows_cut += 1
                else:
                    s.rows_seen += 1
        elif code == codes.B_READY_FOR_QUERY:
            backend.status = buf[pos + 5]
            backend.ready_owed -= 1
            if fill is not None:
                caching.finish(s, fill)
                fill = None
            ended |= caching.ready(s, backend.status == codes.TXN_IDLE)
            _end_at_ready(s, backend)
            if entries and entries[0][0] in _FAKE_BYTES:
                out.append(buf[start:end])
                start = end
                _drain_fakes(entries, out)
            ready = not entries
        elif code in _TERMINAL:
            completed |= code == codes.B_COMMAND_COMPLETE
            if s.row_cap and code != codes.B_PORTAL_SUSPENDED:
                if s.rows_cut and code == codes.B_COMMAND_COMPLETE:
                    out.append(buf[start:pos])
                    out.extend(_cut_notice(s, bytes(buf[pos + 5:end - 1])))
                    start = end
                s.rows_seen = s.rows_cut = 0
            if entries and entries[0][0] in _TERMINAL[code]:
                kind = entries.popleft()[0]
                if kind in _SWALLOWED:
                    out.append(buf[start:pos])
                    start = end
                if entries and entries[0][0] in _FAKE_BYTES:
                    out.append(buf[start:end])
                    start = end
                    _drain_fakes(entries, out)
            elif code == codes.B_COMMAND_COMPLETE and entries and entries[0][0] == QUERY:
                info = entries[0][1]
                if isinstance(info, QueryInfo) and info.discards:
                    tag = bytes(buf[pos + 5:end - 1])
                    info.discard_seen |= tag in (b"DISCARD ALL", b"DEALLOCATE ALL")
        elif code == codes.B_ERROR_RESPONSE:
            if s.bpool is not s.pool and b"VFATAL\x00" in buf[pos + 5:end]:
                # a replica going away (shut down, restarted): the lost connection answers the
                # read with a clean error instead, and the client's connection goes on
                out.append(buf[start:pos])
                start = pos = end
                continue
            s.server.stats.error(buf[pos + 5:end])
            _log_failure(s, bytes(buf[pos + 5:end]))
            rejected = entries[0][1] if entries else None
            if isinstance(rejected, Rejected) and rejected.code in buf[pos + 5:end]:
                out.append(buf[start:pos])  # our guardrail's error, without PL/pgSQL's context
                out.append(rejected.error)
                start = end
            _on_error(s, backend, buf[pos + 5:end])
            if entries and entries[0][0] in _FAKE_BYTES:
                out.append(buf[start:end])
                start = end
                _drain_fakes(entries, out)
        elif code == codes.B_PARAMETER_STATUS:
            name, value = parse_parameter_status(bytes(buf[pos + 5:end]))
            backend.params[name] = value
            s.reported[name] = value
        elif code == codes.B_COPY_IN_RESPONSE and entries and entries[0] == (QUERY, COPY_IN):
            ignored = [e for e in entries if e == (SYNC, COPY_IN)]
            if ignored:
                backend.ready_owed -= len(ignored)
                kept = [e for e in entries if e != (SYNC, COPY_IN)]
                entries.clear()
                entries.extend(kept)
        elif code == codes.B_NOTIFICATION_RESPONSE and end - pos >= 9:
            # the sender as its client knows it: the process id of the BackendKeyData pgsluice
            # gave the client whose server connection sent it (drivers compare the two)
            key = s.server.backend_keys.get(_I.unpack_from(buf, pos + 5)[0])
            if key is not None:
                out.append(buf[start:pos + 5])
                out.append(_I.pack(key))
                start = pos + 9
        pos = end
    if start == 0 and not out:
        data = bytes(buf[:pos])
    else:
        out.append(buf[start:pos])
        data = b"".join(out)
    del buf[:pos]
    if ended:
        caching.commit(s)  # before the client sees the commit (gated with Redis)
    elif (completed or s.held) and backend.status == codes.TXN_IDLE and caching.write_due(s) \
            and any(kind in _ENDS_AT_READY for kind, _ in entries):
        # a write's CommandComplete waits for its ReadyForQuery; only while one is still owed
        # (an error voids what was sent up to the next Sync, and Flush asks for no Sync)
        s.held.append(data)
        return
    if s.held:
        data = b"".join(s.held) + data
        s.held.clear()
    if data:
        s.write(data)
    if ready:
        s.request_done()
        if not s.pinned and backend.status == codes.TXN_IDLE and s.backend is backend:
            s.release()
        elif backend.status != codes.TXN_IDLE:
            s.idle_in_transaction()


def _log_failure(s: ClientSession, body: bytes) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    err = parse_error_fields(body)
    log.info("query failed", extra=fields(client=s.token, agent=s.agent, sqlstate=err.get("C", ""),
                                          error=err.get("M", ""), sql=s.last_statement))


def _cut_notice(s: ClientSession, tag: bytes) -> Chunks:
    """The NOTICE saying rows were cut, and the CommandComplete counting what was sent."""
    head, _, count = tag.rpartition(b" ")
    sent = int(count) - s.rows_cut if count.isdigit() else 0
    policy = s.policy
    notice = encode.notice_response(
        "01000", f"pgsluice: result cut at {s.row_cap} rows ({s.rows_cut} more not sent; max_rows of "
        f"role \"{policy.name if policy else ''}\")")
    return [notice, encode.message(codes.B_COMMAND_COMPLETE, head + b" " + str(sent).encode() + b"\x00")]


def _drain_fakes(entries: object, out: Chunks) -> None:
    from collections import deque
    assert isinstance(entries, deque)
    while entries and entries[0][0] in _FAKE_BYTES:
        out.append(_FAKE_BYTES[entries.popleft()[0]])


def _end_at_ready(s: ClientSession, backend: Backend) -> None:
    """ReadyForQuery ends the oldest Sync/Query/FunctionCall; anything before it was skipped."""
    entries = s.entries
    while entries:
        kind, arg = entries.popleft()
        if kind in _ENDS_AT_READY:
            if isinstance(arg, QueryInfo):
                _apply_query(s, backend, arg)
            elif arg is COPY_IN:
                s.copy_in = False  # the COPY is over (or never started)
            return
        _void(s, backend, kind, arg)


def _apply_query(s: ClientSession, backend: Backend, info: QueryInfo) -> None:
    if info.failed:
        return
    if info.discard_seen:
        backend.prepared.clear()
        backend.maybe_prepared.clear()
        backend.unnamed_owner = None
        s.statements.clear()
        s.unnamed = None
    if info.changes and backend.status == codes.TXN_IDLE:
        s.settings = apply_changes(s.settings, s.startup_settings, info.changes)
        caching.settings_changed(s)
        resets = any(value is None for _, value in info.changes)
        backend.applied = None if resets else s.settings


def _void(s: ClientSession, backend: Backend, kind: int, arg: object) -> None:
    """An entry whose message Postgres skipped (or failed): undo what we assumed."""
    if (kind == PARSE or kind == SWALLOW_PARSE) and isinstance(arg, tuple):
        srv, name = arg
        backend.prepared.pop(srv, None)
        stmt = s.statements.get(name) if name else None
        if stmt is not None and stmt.server_name == srv and kind == PARSE:
            del s.statements[name]
    elif (kind == PARSE or kind == SWALLOW_PARSE) and arg is None:
        backend.unnamed_owner = None
    elif kind == QUERY and arg is COPY_IN:
        s.copy_in = False  # skipped: no COPY
    elif kind == SWALLOW_CLOSE and isinstance(arg, bytes):
        backend.maybe_prepared.add(arg)  # skipped: it may still be there; close before a Parse


def _on_error(s: ClientSession, backend: Backend, body: bytes | bytearray) -> None:
    entries = s.entries
    if not entries:
        return
    kind, arg = entries[0]
    if (kind == BIND or kind == DESCRIBE) and isinstance(arg, bytes) and _STALE_PLAN in body:
        # The client sees the error, as it would from Postgres; the next Parse or
        # re-prepare of this text on this backend closes the stale statement first.
        backend.prepared.pop(arg, None)
        backend.maybe_prepared.add(arg)
    if kind in _ENDS_AT_READY:
        if isinstance(arg, QueryInfo):
            arg.failed = True
        return
    # an extended-protocol message failed: Postgres skips everything up to the next Sync
    entries.popleft()
    _void(s, backend, kind, arg)
    while entries and entries[0][0] != SYNC:
        k, a = entries.popleft()
        _void(s, backend, k, a)
    if not entries:
        s.skipping = True


def fail_pending(s: ClientSession, err: Exception) -> None:
    """No backend could be had: answer each buffered request with the error, as Postgres would."""
    from .pgwire.errors import PgError
    assert isinstance(err, PgError)
    caching.abandon(s)  # a leader that got no server: its waiters look again
    buf = s.inbuf
    n = len(buf)
    pos = 0
    out: Chunks = []
    failed = s.skipping
    while n - pos >= 5:
        code = buf[pos]
        end = pos + 1 + _I.unpack_from(buf, pos + 1)[0]
        if end > n:
            break
        if code == codes.F_TERMINATE:
            s.close()
            return
        if not failed:
            out.append(encode.error_response(err.sqlstate, err.message, detail=err.detail,
                                             hint=err.hint))
            failed = True
        if code in (codes.F_QUERY, codes.F_SYNC, codes.F_FUNCTION_CALL):
            out.append(encode.ready_for_query())
            failed = False
        pos = end
    del buf[:pos]
    s.skipping = failed
    s.write(b"".join(out))


def skip_to_sync(s: ClientSession) -> None:
    """No backend, and an earlier error left us skipping: drop messages up to Sync, answer it."""
    buf = s.inbuf
    n = len(buf)
    pos = 0
    while n - pos >= 5:
        code = buf[pos]
        end = pos + 1 + _I.unpack_from(buf, pos + 1)[0]
        if end > n:
            break
        pos = end
        if code == codes.F_SYNC:
            s.skipping = False
            s.write(encode.ready_for_query())
            break
    del buf[:pos]
