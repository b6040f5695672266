"""Byte relay between a client and the backend it holds, with per-message response tracking.

Every message sent to the backend that produces a response gets an Entry, in
order. A backend message ends the head Entry when it is that Entry's terminal
response (ParseComplete for Parse, ReadyForQuery for Sync or Query...). This is
what lets pgsluice (a) answer CloseComplete itself for prepared statements it
keeps on the backend, in the right place, and (b) swallow the responses to
messages it injected (re-preparing a client's statement on another backend). An
ErrorResponse to an extended-protocol message voids the Entries up to the next
Sync, as Postgres skips those messages. This module is the way there (client ->
backend); replies.py the way back; commands.py reads what the texts say to pgsluice.

Everything else is passed through as ranges of the original bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from typing import TYPE_CHECKING

from planner import Kind, Plan, Verdict, sqlscan
from planner.guard import extended_verdict
from proxy.base.logs import fields
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import (
    parse_bind_names,
    parse_parse,
    parse_target,
)
from proxy.pgwire.errors import ProtocolError
from proxy.pipeline import commands, fastpath, tracking

if TYPE_CHECKING:
    from proxy.backends.backend import Backend
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
log = logging.getLogger("pgsluice.queries")

# Entry kinds.
QUERY, SYNC, FUNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE = range(8)
FAKE_CLOSE, SWALLOW_PARSE, SWALLOW_CLOSE, SWALLOW_BIND, SWALLOW_QUERY = range(8, 13)
_SWALLOWED = (SWALLOW_PARSE, SWALLOW_CLOSE, SWALLOW_BIND)
_ENDS_AT_READY = (QUERY, SYNC, FUNC)
assert tracking._ENDS_AT_READY == _ENDS_AT_READY
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


def has_message(buf: bytearray, limit: int = codes.DEFAULT_MAX_MESSAGE) -> bool:
    """Whether buf starts with a complete message; a bad length raises at the header."""
    if len(buf) < 5:
        return False
    length = _I.unpack_from(buf, 1)[0]
    if length < 4 or length > limit:
        raise ProtocolError(f"invalid message length {length} for message type {buf[0]}")
    return bool(len(buf) >= length + 1)


# ---- client -> backend -------------------------------------------------------------------------

def forward(s: Session) -> None:
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
                head = fastpath.take_head(s, buf, pos, end)
                if isinstance(head, fastpath.Pass):
                    _plain_query(s, backend, head)
                else:
                    start, more = _query_message(s, backend, buf, pos, end, out, start, head)
                    owed += more
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
                tracking.mark_everything(s, True)  # a FunctionCall: anything
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


def send_known(s: Session, known: fastpath.Pass) -> None:
    """s.inbuf is exactly one Query known to need nothing but sending (fastpath.known_whole):
    what forward does with it, without looking at it again."""
    backend = s.backend
    assert backend is not None
    s.head = None
    _plain_query(s, backend, known)
    s.inbuf.clear()
    backend.write(known.key)
    backend.ready_owed += 1
    backend.unsynced = False


def _plain_query(s: Session, backend: Backend, known: fastpath.Pass) -> None:
    """A Query known to need nothing but sending (fastpath.Pass): what _query_message does for
    such a text, without working it out again."""
    fastpath.count_pass(s, known)
    s.note_query()
    s.server.stats.upstream_queries += 1
    s.last_sql = known.last_sql
    if known.names:
        tracking.mark(s, known.names)
    s.unnamed = None  # a simple Query destroys the unnamed statement
    backend.unnamed_owner = None
    s.queries += 1
    s.entries.append((QUERY, None))


def _query_message(s: Session, backend: Backend, buf: bytearray, pos: int, end: int, out: Chunks,
                   start: int, head: fastpath.Head | None) -> tuple[int, int]:
    """A Query (at buf[pos:end]): (where the bytes still to copy start, ReadyForQuery messages
    owed besides its own). `head`: what try_query worked out for it; when nothing in it needs
    more than sending, it is remembered as such (fastpath.Pass)."""
    entries = s.entries
    sql = bytes(buf[pos + 5:end - 1])
    tagged = b"agent=" in sql
    if tagged:
        commands.tag_agent(s, sql)
    s.note_query()
    s.server.stats.upstream_queries += 1
    s.last_sql = sql[:300]
    head_word = sql[:10].lower()
    if head_word[:3] == b"set" and b"pgsluice.route" in sql:
        fixed = _route_setting(sql)
        if fixed is not None:  # sent quoted: PRIMARY is a reserved word to Postgres
            out.append(buf[start:pos])
            out.append(encode.query(fixed))
            start, sql, head = end, fixed, None
    swap = _deallocate(s, backend, sql) if head_word == b"deallocate" else \
        _show(s, backend, sql) if head_word[:4] == b"show" else None
    names: frozenset[str] = frozenset()
    ddl = False
    if swap is None and s.server.tracks_writes:
        names, ddl = tracking.note_writes(s, sql, head.plan if head is not None else None)
    if swap is None and s.policy is not None:
        swap = _guarded_query(s, backend, sql)
    if swap is None and head_word[:7] == b"execute":
        swap = _execute(s, backend, sql)
    elif head_word[:4] == b"drop" or head_word[:5] == b"alter":
        commands.database_ddl(s, sql)
    if head_word[:7] == b"execute" or head_word == b"deallocate" or head_word[:4] == b"drop" \
            or head_word[:5] == b"alter":
        head = None  # what they do depends on the session's statements, or on other databases
    if swap is not None:
        out.append(buf[start:pos])
        out.extend(swap)
        return end, 0
    info = _query(s, backend, sql)
    if info is None and head_word[:4] == b"copy" and _COPY_IN.match(sql):
        s.copy_in = True
        entries.append((QUERY, COPY_IN))
        return start, 0
    entries.append((QUERY, info))
    restore = commands.restore_startup(s, sql) if info is not None or s.pinned else None
    if restore is not None:  # RESET of startup parameters: put them back
        out.append(buf[start:end])
        out.append(restore)
        entries.append((SWALLOW_QUERY, None))
        return end, 1
    if head is not None and info is None and not tagged and not ddl and s.fast_ok:
        fastpath.remember_pass(s, head, names, s.last_sql)
    return start, 0


def _query(s: Session, backend: Backend, sql: bytes) -> QueryInfo | None:
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


def _deallocate(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
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


def _execute(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
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


def _show(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
    """`SHOW CACHE` and `SHOW PLAN 'query'` (not Postgres syntax, so nothing is shadowed):
    Postgres answers a VALUES list of pgsluice's rows, so the reply and the transaction
    state are exactly those of a query."""
    text = commands.show_sql(s, sql)
    if text is None:
        return None
    s.unnamed = None  # a simple Query destroys the unnamed statement
    backend.unnamed_owner = None
    s.entries.append((QUERY, None))
    return [encode.query(text)]


def _plan(s: Session, sql: bytes) -> Plan:
    assert s.planner is not None
    plan = s.planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    if plan.kind is Kind.DDL:
        s.server.ddl_seen(s.database)
    return plan


def _rejected(s: Session, verdict: Verdict) -> Rejected:
    s.agent_stats.rejected += 1
    s.server.stats.rejected += 1
    log.info("query rejected", extra=fields(client=s.token, agent=s.agent, rule=verdict.rule,
                                            sqlstate=verdict.sqlstate, sql=s.last_statement))
    return Rejected(verdict)


def _guarded_query(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
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
        s.write(_FAKE_BYTES[kind])


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


def _parse(s: Session, backend: Backend, msg: bytes) -> Chunks:
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
        plan = _plan(s, sql)
        verdict = plan.verdict if not plan.verdict.allowed else extended_verdict(plan, s.policy)
        if verdict is not None and not verdict.allowed:
            return _refuse_parse(s, backend, name, _rejected(s, verdict))
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


def _bind_or_describe(s: Session, backend: Backend, code: int, msg: bytes) -> Chunks:
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


def _close(s: Session, msg: bytes) -> Chunks:
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


