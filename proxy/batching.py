"""Burst batching: point reads of one shape that differ only in the key run as one statement.

Natural batching, like group commit — no added delay. The first cache miss of a batchable shape
(planner/batch.py; same fingerprint, other values, settings, role and formats) runs alone as
usual; misses of that shape with other keys arriving while it is in flight queue here. When it
lands, the queue runs as one statement: the text of the first queued read with its key value
replaced by `ANY($n)` (an array of every queued key) and the key column appended to the select
list. Each client then gets what its own statement would have got from Postgres: the
RowDescription without the added column, only the rows of its key (at most one: the key is
unique), `SELECT n`, in its formats. Each answer lands in the client's own single-flight and
cache entry. Reads arriving while a batch runs form the next one.

Rules: a request is batched only when its key value can be read here exactly as Postgres would
read it (else it runs alone); anything unexpected in the batch's reply (an error, a notice)
makes every client of the batch run its own statement, so no client sees an error its own
statement would not have produced.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import uuid
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from planner.batch import Batchable
from planner.normalize import tokens

from . import caching
from .login import LoginResult
from .pgwire import codes, encode
from .session import ClientSession

if TYPE_CHECKING:
    from cache.engine import Flight

    from .server import Server

log = logging.getLogger("pgsluice.batching")
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
MAX_IDLE_RUNNERS = 4  # per user, database and settings
MAX_RUNNER_KEYS = 256


class Waiter:
    """One queued read."""

    __slots__ = ("flight", "future", "gone", "norm", "req", "s", "sql", "value")

    def __init__(self, s: ClientSession, req: caching.Request, flight: Flight, norm: object,
                 value: str) -> None:
        self.s, self.req, self.flight = s, req, flight
        self.norm = norm  # the key value, as compared with the rows' (int, UUID or bytes)
        self.value = value  # ... as an element of the array literal
        self.sql = req.plan.sql
        self.future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.gone = False  # the client stopped waiting (cancelled, or left)


class Group:
    __slots__ = ("queue", "running")

    def __init__(self) -> None:
        self.queue: list[Waiter] = []
        self.running = False


class Batcher:
    def __init__(self, server: Server, max_size: int) -> None:
        self.server = server
        self.max_size = max_size
        self.groups: dict[Hashable, Group] = {}
        self._runners: dict[Hashable, list[_Runner]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- called by caching._lookup on a miss with no identical read in flight ----

    def offer(self, s: ClientSession, req: caching.Request, key: Hashable) -> tuple[bool, Hashable | None]:
        """(True, group): queued behind the shape's read in flight (an ASYNC outcome); (False,
        group): this read leads its shape (call `lead` with its flight); (False, None): not
        batched."""
        batch = req.plan.batch
        if batch is None or s.reported.get("client_encoding", "UTF8").upper() not in ("UTF8", "UTF-8"):
            return False, None
        found = _key_of(s, req, batch)
        if found is None:
            return False, None
        gkey, norm, value = found
        group = self.groups.get(gkey)
        if group is None:
            self.groups[gkey] = Group()
            return False, gkey
        cache = s.server.cache
        assert cache is not None
        waiter = Waiter(s, req, cache.lead(key), norm, value)
        group.queue.append(waiter)
        s.spawn_task(self._wait(waiter))
        return True, gkey

    def lead(self, gkey: Hashable, flight: Flight) -> None:
        flight.future.add_done_callback(lambda _f: self._leader_done(gkey))

    def _leader_done(self, gkey: Hashable) -> None:
        group = self.groups.get(gkey)
        if group is None or group.running:
            return
        if not group.queue:
            del self.groups[gkey]
            return
        group.running = True
        task = asyncio.get_running_loop().create_task(self._drain(gkey, group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, gkey: Hashable, group: Group) -> None:
        try:
            while group.queue:
                batch, group.queue = group.queue[:self.max_size], group.queue[self.max_size:]
                await self._run(batch)
        finally:
            for waiter in group.queue:  # only if cancelled (shutdown): let them run alone
                _resolve(waiter, None)
            self.groups.pop(gkey, None)

    # ---- the waiting client ----

    async def _wait(self, w: Waiter) -> None:
        s, req = w.s, w.req
        cache = s.server.cache
        assert cache is not None
        s.waiting = True
        try:
            payload = await asyncio.shield(w.future)
        except asyncio.CancelledError:
            w.gone = True
            if s.closed:
                raise
            del s.inbuf[:req.end]  # a CancelRequest: answered as Postgres answers it
            s.write(req.prefix + encode.error_response("57014", "canceling statement due to user request")
                    + caching._RFQ_IDLE)
            s.resume_pump(cache_done=False)
            return
        finally:
            s.waiting = False
        if payload is None:  # run alone: this client leads its own flight
            s.fill = caching.Fill(w.flight, cache.settings.max_entry, extended=bool(req.prefix))
            s.resume_pump(cache_done=True)
            return
        s.agent_stats.batched += 1
        s.served = "batched"
        caching._reply(s, payload, req)
        s.resume_pump(cache_done=False)

    # ---- the batch ----

    async def _run(self, batch: list[Waiter]) -> None:
        values: dict[object, str] = {}
        for w in batch:
            values.setdefault(w.norm, w.value)
        array = list(values.values())
        # the statement is any one's text (they differ in spelling only); one whose key is not a
        # plain `key = value` (`id = -5`) cannot be rewritten: the next one is tried
        rep, request = batch[0], None
        for w in batch[:8]:
            request = _statement(w, array)
            if request is not None:
                rep = w
                break
        answers: dict[object, list[bytes]] | None = None
        rd = b""
        if request is not None:
            runner = self._runner(rep)
            try:
                messages = await runner.run(request)
            except (TimeoutError, ConnectionError):
                messages = None
                runner.close()
            else:
                self._give_back(runner)
            split = _split(messages, rep.req.plan.batch) if messages is not None else None
            if split is not None:
                rd, answers = split
        stats = self.server.stats
        if answers is None:
            stats.batch_fallbacks += 1
            for w in batch:
                if w.gone or w.s.closed:
                    w.s.server.cache.land(w.flight, None, False)  # type: ignore[union-attr]
                _resolve(w, None)
            return
        stats.batches += 1
        simple = not rep.req.prefix
        for w in batch:
            rows = answers.get(w.norm, [])
            head = rd if simple or w.req.fmt[3] else b""  # type: ignore[index]
            payload = head + b"".join(rows) + encode.command_complete(f"SELECT {len(rows)}")
            cache = w.s.server.cache
            assert cache is not None
            cache.land(w.flight, payload, True)
            _resolve(w, payload)

    def _runner(self, w: Waiter) -> _Runner:
        # the settings that can change a result (the group's): application_name and the like
        # do not make a runner of their own
        key = (w.s.database, w.s.user, w.req.settings)
        idle = self._runners.get(key)
        if idle:
            return idle.pop()
        return _Runner(self.server, w.s, key)

    def _give_back(self, runner: _Runner) -> None:
        idle = self._runners.setdefault(runner.key, [])
        keep = len(idle) < MAX_IDLE_RUNNERS and len(self._runners) <= MAX_RUNNER_KEYS
        if keep and not runner.session.closed:
            idle.append(runner)
        else:
            runner.close()
            if not idle:
                del self._runners[runner.key]

    def close(self) -> None:
        for idle in self._runners.values():
            for runner in idle:
                runner.close()
        self._runners.clear()
        for task in list(self._tasks):
            task.cancel()


def _resolve(w: Waiter, payload: bytes | None) -> None:
    if not w.future.done():
        w.future.set_result(payload)


# ---- key values ----------------------------------------------------------------------------

def _key_of(s: ClientSession, req: caching.Request, batch: Batchable) -> tuple[Hashable, object, str] | None:
    """(the group this read batches with, its key value normalized, as an array element)."""
    plan = req.plan
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


def _statement(rep: Waiter, values: list[str]) -> bytes | None:
    """Parse, Bind, Describe, Execute, Sync of the batch (from its first read's statement)."""
    req = rep.req
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
    sql = rewrite(rep.sql, batch.column, batch.placeholder if batch.own else 0, array)
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


def _split(messages: list[tuple[int, bytes]],
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


# ---- where batches run: a session without a socket, like InternalClient's --------------------

class _Sink(asyncio.Transport):
    def __init__(self, runner: _Runner) -> None:
        super().__init__()
        self._runner = runner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._runner.received(bytes(data))

    def close(self) -> None:
        self._runner.lost()

    def abort(self) -> None:
        self._runner.lost()

    def is_closing(self) -> bool:
        return self._runner.session.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("internal", 0) if name == "peername" else default


class _Runner:
    """A session of the client's user, database and settings that runs batch statements on the
    pool like any client (transaction pooling), bypassing the cache."""

    def __init__(self, server: Server, s: ClientSession, key: Hashable) -> None:
        assert s.pool is not None
        self.key = key
        self._buf = bytearray()
        self._welcomed = False
        self._messages: list[tuple[int, bytes]] = []
        self._done: asyncio.Future[list[tuple[int, bytes]]] | None = None
        session = self.session = ClientSession(server)
        session.transport = _Sink(self)
        session.peer = ("internal", 0)
        session.uncached = True
        session._startup_done = True
        params = {"user": s.user, "database": s.database, "application_name": "pgsluice batch"}
        session._start(LoginResult(s.user, s.database, params, s.pool, s.settings, {}))
        # the clients' own settings (their policy's included), no guardrail of its own: the
        # statement is theirs, already allowed
        session.startup_settings = session.settings = s.settings
        session.policy = None
        session.row_cap = 0

    async def run(self, request: bytes) -> list[tuple[int, bytes]]:
        self._messages = []
        self._done = asyncio.get_running_loop().create_future()
        self.session.data_received(request)
        return await self._done

    def received(self, data: bytes) -> None:
        self._buf += data
        buf = self._buf
        while len(buf) >= 5:
            length = _I.unpack_from(buf, 1)[0]
            if len(buf) < length + 1:
                break
            code, body = buf[0], bytes(buf[5:length + 1])
            del buf[:length + 1]
            if not self._welcomed:
                self._welcomed = code == codes.B_READY_FOR_QUERY
                continue
            if code == codes.B_READY_FOR_QUERY:
                if self._done is not None and not self._done.done():
                    self._done.set_result(self._messages)
            else:
                self._messages.append((code, body))

    def lost(self) -> None:
        self.session.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("batch session closed"))

    def close(self) -> None:
        if not self.session.closed:
            self.session.data_received(encode.terminate())
            self.session.connection_lost(None)
