"""The relay's way back: backend bytes to the client, ending the Entries relay.forward made
(entries.py).

A backend message ends the head Entry when it is that Entry's terminal response;
ReadyForQuery ends a Query/Sync/FunctionCall (and whatever Postgres skipped before it),
applies what a Query changed in the session, and gives the server connection back at the
end of a transaction. An ErrorResponse to an extended-protocol message voids the Entries up
to the next Sync. Everything else is passed through as ranges of the original bytes.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from proxy.backends.settings import apply_changes
from proxy.base.logs import fields
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_error_fields, parse_parameter_status
from proxy.pgwire.errors import ProtocolError
from proxy.pipeline import cacheable, caching, tracking
from proxy.pipeline.entries import (
    BIND,
    CLOSE,
    COPY_IN,
    DESCRIBE,
    ENDS_AT_READY,
    EXECUTE,
    FAKE_BYTES,
    PARSE,
    QUERY,
    SWALLOW_BIND,
    SWALLOW_CLOSE,
    SWALLOW_PARSE,
    SWALLOW_QUERY,
    SYNC,
    Chunks,
    QueryInfo,
)
from proxy.pipeline.guardrails import Rejected

if TYPE_CHECKING:
    from proxy.backends.backend import Backend
    from proxy.pipeline.session import Session

_I = struct.Struct("!I")
log = logging.getLogger("pgsluice.queries")
_PLAIN_QUERY = (QUERY, None)
_SWALLOWED = (SWALLOW_PARSE, SWALLOW_CLOSE, SWALLOW_BIND)
# "cached plan must not change result type": the statement predates a schema change
_STALE_PLAN = b"\x00C0A000\x00"
_STREAM_MIN = 256 * 1024  # pass a partial DataRow/CopyData through once this much is buffered

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


_PLAIN = frozenset({codes.B_ROW_DESCRIPTION, codes.B_DATA_ROW, codes.B_COMMAND_COMPLETE,
                    codes.B_EMPTY_QUERY_RESPONSE})


def _plain_reply(s: Session, backend: Backend) -> bool:
    """The reply to one simple Query with nothing to watch (no fill, row cap or stream, nothing
    held): as PgBouncer, look only at message boundaries, and at ReadyForQuery. False, having
    done nothing, when anything else comes (an error, a notice, a parameter...)."""
    buf = backend.buf
    n = len(buf)
    pos = 0
    completed = False
    while n - pos >= 5:
        code = buf[pos]
        length = _I.unpack_from(buf, pos + 1)[0]
        if length < 4:
            raise ProtocolError(f"invalid message length {length} from server")
        end = pos + 1 + length
        if end > n:
            if n - pos >= _STREAM_MIN:
                return False  # a large message, passed through in pieces
            break
        if code == codes.B_READY_FOR_QUERY:
            if end != n:
                return False
            status = backend.status = buf[pos + 5]
            backend.ready_owed -= 1
            ended = tracking.ready(s, status == codes.TXN_IDLE)
            s.entries.popleft()
            data = bytes(buf)
            buf.clear()
            if ended:
                tracking.commit(s)  # before the client sees the commit (gated with Redis)
            s.write(data)
            now = s.request_done()
            if not s.pinned and status == codes.TXN_IDLE and s.backend is backend:
                s.release(now)
            elif status != codes.TXN_IDLE:
                s.idle_in_transaction()
            return True
        if code not in _PLAIN:
            return False
        completed |= code == codes.B_COMMAND_COMPLETE
        pos = end
    if completed:
        return False  # a write's CommandComplete may have to wait for its ReadyForQuery
    if pos:  # rows so far
        data = bytes(buf[:pos])
        del buf[:pos]
        s.write(data)
    return True


def backward(s: Session, backend: Backend) -> None:
    """Forward backend bytes to the client, ending entries, and release at transaction end."""
    entries = s.entries
    if len(entries) == 1 and entries[0] == _PLAIN_QUERY and s.fill is None and not s.row_cap \
            and not s.stream_left and not s.held and _plain_reply(s, backend):
        return
    buf = backend.buf
    n = len(buf)
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
            ended |= tracking.ready(s, backend.status == codes.TXN_IDLE)
            _end_at_ready(s, backend)
            if entries and entries[0][0] in FAKE_BYTES:
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
                if entries and entries[0][0] in FAKE_BYTES:
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
            if entries and entries[0][0] in FAKE_BYTES:
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
        tracking.commit(s)  # before the client sees the commit (gated with Redis)
    elif (completed or s.held) and backend.status == codes.TXN_IDLE and tracking.write_due(s) \
            and any(kind in ENDS_AT_READY for kind, _ in entries):
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
        now = s.request_done()
        if not s.pinned and backend.status == codes.TXN_IDLE and s.backend is backend:
            s.release(now)
        elif backend.status != codes.TXN_IDLE:
            s.idle_in_transaction()


def _log_failure(s: Session, body: bytes) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    err = parse_error_fields(body)
    log.info("query failed", extra=fields(client=s.token, agent=s.agent, sqlstate=err.get("C", ""),
                                          error=err.get("M", ""), sql=s.last_statement))


def _cut_notice(s: Session, tag: bytes) -> Chunks:
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
    while entries and entries[0][0] in FAKE_BYTES:
        out.append(FAKE_BYTES[entries.popleft()[0]])


def _end_at_ready(s: Session, backend: Backend) -> None:
    """ReadyForQuery ends the oldest Sync/Query/FunctionCall; anything before it was skipped."""
    entries = s.entries
    while entries:
        kind, arg = entries.popleft()
        if kind in ENDS_AT_READY:
            if isinstance(arg, QueryInfo):
                _apply_query(s, backend, arg)
            elif arg is COPY_IN:
                s.copy_in = False  # the COPY is over (or never started)
            return
        _void(s, backend, kind, arg)


def _apply_query(s: Session, backend: Backend, info: QueryInfo) -> None:
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
        cacheable.settings_changed(s)
        resets = any(value is None for _, value in info.changes)
        backend.applied = None if resets else s.settings


def _void(s: Session, backend: Backend, kind: int, arg: object) -> None:
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


def _on_error(s: Session, backend: Backend, body: bytes | bytearray) -> None:
    entries = s.entries
    if not entries:
        return
    kind, arg = entries[0]
    if (kind == BIND or kind == DESCRIBE) and isinstance(arg, bytes) and _STALE_PLAN in body:
        # The client sees the error, as it would from Postgres; the next Parse or
        # re-prepare of this text on this backend closes the stale statement first.
        backend.prepared.pop(arg, None)
        backend.maybe_prepared.add(arg)
    if kind in ENDS_AT_READY:
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


def fail_pending(s: Session, err: Exception) -> None:
    """No backend could be had: answer each buffered request with the error, as Postgres would."""
    from proxy.pgwire.errors import PgError
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


def skip_to_sync(s: Session) -> None:
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
