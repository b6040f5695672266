"""Client -> backend: the client's messages framed, looked at and sent on to the server
connection it holds, with an Entry (entries.py) for each one that gets a response.

forward takes every complete message in the client's buffer: simple Queries are read here
(session state they change, writes for the cache, pgsluice's own commands, guardrails);
Parse, Bind, Describe and Close go through prepared.py, which keeps the client's prepared
statements on the backends; everything else is passed through as ranges of the original
bytes. replies.py is the way back; commands.py reads what the texts say to pgsluice.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from planner import sqlscan
from proxy.pgwire import codes, encode
from proxy.pgwire.errors import ProtocolError
from proxy.pipeline import commands, fastpath, guardrails, tracking
from proxy.pipeline.entries import (
    BIND,
    CLOSE,
    COPY_IN,
    DESCRIBE,
    EXECUTE,
    FUNC,
    PARSE,
    QUERY,
    SWALLOW_QUERY,
    SYNC,
    Chunks,
    QueryInfo,
)
from proxy.pipeline.prepared import (
    rewrite_bind_or_describe,
    rewrite_close,
    rewrite_parse,
    sql_deallocate,
    sql_execute,
)

if TYPE_CHECKING:
    from proxy.backends.backend import Backend
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")

# extended-protocol messages whose content pgsluice reads (their parsers raise before
# changing any state), with the entry kind of each
_EXTENDED = {codes.F_PARSE: PARSE, codes.F_BIND: BIND, codes.F_DESCRIBE: DESCRIBE, codes.F_CLOSE: CLOSE}
_TXN_WORDS = re.compile(rb"(?i)\b(begin|start|commit|rollback|end|abort|savepoint|release|prepare)\b")
_COPY_IN = re.compile(rb"(?is)copy\b.*\bfrom\s+stdin\b")
_IN_COPY = frozenset({codes.F_COPY_DATA, codes.F_COPY_DONE, codes.F_COPY_FAIL, codes.F_FLUSH, codes.F_SYNC,
                      codes.F_TERMINATE})


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
                    out.extend(rewrite_parse(s, backend, msg) if code == codes.F_PARSE else
                               rewrite_close(s, msg) if code == codes.F_CLOSE else
                               rewrite_bind_or_describe(s, backend, code, msg))
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
    swap = sql_deallocate(s, backend, sql) if head_word == b"deallocate" else \
        _show(s, backend, sql) if head_word[:4] == b"show" else None
    names: frozenset[str] = frozenset()
    ddl = False
    if swap is None and s.server.tracks_writes:
        names, ddl = tracking.note_writes(s, sql, head.plan if head is not None else None)
    if swap is None and s.policy is not None:
        swap = _guarded_query(s, backend, sql)
    if swap is None and head_word[:7] == b"execute":
        swap = sql_execute(s, backend, sql)
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


def _guarded_query(s: Session, backend: Backend, sql: bytes) -> Chunks | None:
    """A simple Query under a role policy: refused (never reaching Postgres) or rewritten."""
    plan = guardrails.plan(s, sql)
    if not plan.verdict.allowed:
        s.unnamed = None
        backend.unnamed_owner = None
        rejected = guardrails.rejected(s, plan.verdict)
        s.entries.append((QUERY, rejected))
        return [encode.query(rejected.sql)]
    if plan.rewrites:
        new = plan.sql.encode()
        s.entries.append((QUERY, _query(s, backend, new)))
        return [encode.query(new)]
    return None
