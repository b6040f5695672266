"""The admin console: the virtual database `pgsluice` on the wire door, as PgBouncer's.

    psql postgresql://ADMIN@127.0.0.1:6543/pgsluice -c 'SHOW AGENTS'

Commands (case-insensitive, `;` optional): SHOW STATS | POOLS | CLIENTS | SERVERS | REPLICAS | CACHE |
AGENTS | CONFIG | PLAN '<sql>' | HELP, RELOAD, PAUSE, RESUME, SHUTDOWN. Replies are
ordinary result sets (text columns), over the simple protocol (psql) or the extended one
(asyncpg). Only users in `admin_users` get in; others get 42501.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from planner.explain import describe
from planner.statements import split
from proxy.base.logs import peer_text
from proxy.base.stats import quantile
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_parse
from proxy.pgwire.errors import ProtocolError
from proxy.pipeline.snapshot import view

if TYPE_CHECKING:
    from proxy.doors.wire.session import WireSession
    from proxy.pipeline.runtime import Runtime

ADMIN_DB = "pgsluice"
_I = struct.Struct("!I")
_TEXT, _INT8, _FLOAT8 = 25, 20, 701
Rows = tuple[tuple[str, ...], list[tuple[object, ...]]]  # column names, rows


class AdminError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate, self.message = sqlstate, message


def welcome(server: Runtime) -> dict[str, str]:
    version = next((p.server_params["server_version"] for p in server.pools.values()
                    if p.server_params.get("server_version")), "16.0")
    return {"server_version": version, "server_encoding": "UTF8", "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
            "TimeZone": "UTC", "IntervalStyle": "postgres", "is_superuser": "off",
            "application_name": "", "session_authorization": ""}


# ---- commands ----------------------------------------------------------------------------------

_SHOW_PLAN = re.compile(r"(?is)show\s+plan\s+('(?:[^']|'')*')")


def run(server: Runtime, sql: str, dry: bool = False) -> tuple[str, Rows | None]:
    """(command tag, rows or None) for one admin command; AdminError for a bad one. `dry`:
    only the shape (Describe), actions are not carried out."""
    text = sql.strip().rstrip(";").strip()
    words = text.lower().split()
    if not words:
        return "EMPTY", None
    if words[0] == "show" and len(words) >= 2:
        m = _SHOW_PLAN.fullmatch(text)
        if m is not None:
            query = m.group(1)[1:-1].replace("''", "'")
            plan = server.planner_for(server.admin_database()).analyze(query, server.admin_facts())
            return "SHOW", (("plan",), [(line,) for line in describe(plan).splitlines()])
        show = _SHOWS.get(words[1]) if len(words) == 2 else None
        if show is None:
            raise AdminError("42601", f"unknown admin command: {text[:80]} (try SHOW HELP)")
        return "SHOW", show(server)
    if len(words) == 1 and words[0] in _ACTIONS:
        message = "" if dry else _ACTIONS[words[0]](server)
        return words[0].upper(), (("result",), [(message,)])
    raise AdminError("42601", f"unknown admin command: {text[:80]} (try SHOW HELP)")


def _help(_server: Runtime) -> Rows:
    return ("command", "what"), [
        ("SHOW STATS", "totals since start: clients, queries, cache, upstream, rejections"),
        ("SHOW POOLS", "per (database, user): server connections, waiting clients, wait time"),
        ("SHOW CLIENTS", "one row per client connection"),
        ("SHOW SERVERS", "one row per server connection"),
        ("SHOW CACHE", "cache counters, Redis and change-feed state"),
        ("SHOW REPLICAS", "per replica: state, replay position, lag, reads routed there"),
        ("SHOW AGENTS", "per agent: queries, qps (10 s), hits, coalesced, bypasses, p50/p99, batched"),
        ("SHOW PLAN '<sql>'", "what the planner makes of a query"),
        ("SHOW CONFIG", "the effective configuration, secrets masked"),
        ("RELOAD", "re-read the config file: pool sizes, guardrails, log level"),
        ("PAUSE / RESUME", "let transactions finish, then hold new ones / let them go"),
        ("SHUTDOWN", "drain and stop"),
    ]


def _stats(server: Runtime) -> Rows:
    v = view(server)
    totals, agents = v["totals"], v["agents"].values()
    batched = sum(a.get("batched", 0) for a in agents)
    rows: list[tuple[object, ...]] = [
        ("workers_reporting", v["workers"]), ("worker", server.worker), ("worker_pid", os.getpid()),
        ("uptime_seconds", round(time.monotonic() - server.started, 1)),
        ("clients_now", v["clients"]), ("clients_logged_in", server.admission.total()),
        ("clients_total", totals["clients_total"]),
        ("queries", sum(a["queries"] for a in agents)),
        ("upstream_queries", totals["upstream_queries"]),
        ("cache_hits", sum(a["hits"] for a in agents)), ("cache_misses", sum(a["misses"] for a in agents)),
        ("coalesced", sum(a["coalesced"] for a in agents)), ("bypassed", sum(a["bypassed"] for a in agents)),
        ("batched_reads", batched), ("batches", totals["batches"]),
        ("batch_mean_size", round(batched / totals["batches"], 1) if totals["batches"] else 0),
        ("batch_fallbacks", totals["batch_fallbacks"]),
        ("rejected", totals["rejected"]), ("pinned_clients", totals["pinned"]),
        ("cancels", totals["cancels"]), ("errors", sum(v["errors"].values())),
    ]
    rows += [(f"errors_class_{cls}", n) for cls, n in sorted(v["errors"].items())]
    if server.replicas is not None:  # write positions read for the replicas' causal reads
        rows += [("write_positions_own", totals.get("positions_own", 0)),
                 ("write_positions_feed", totals.get("positions_feed", 0))]
    return ("stat", "value"), rows


def _pools(server: Runtime) -> Rows:
    rows: list[tuple[object, ...]] = []
    for key, p in sorted(view(server)["pools"].items()):
        db, user = key.split("\x00", 1)
        rows.append((db, user, p["size"], p["held"], p["idle"], p["waiting"], p["max_size"], p["acquires"],
                     p["waits"], round(p["wait_time"] * 1000, 1), p["timeouts"], p["connects"]))
    return ("database", "user", "server_conns", "active", "idle", "waiting", "max_size", "acquires",
            "waits", "wait_ms_total", "timeouts", "connects"), rows


def _clients(server: Runtime) -> Rows:
    now = time.monotonic()
    rows: list[tuple[object, ...]] = []
    for c in sorted(server.clients, key=lambda c: c.token):
        state = "admin" if c.state == "admin" else "login" if c.state == "login" else \
            "active" if c.backend is not None else "waiting" if c.busy else "idle"
        rows.append((c.token, peer_text(c.peer), c.user, c.database, c.agent, state, c.pinned or "",
                     c.queries, round(now - c.connected_at, 1),
                     c.backend.pid if c.backend is not None else None))
    return ("id", "peer", "user", "database", "agent", "state", "pinned", "queries", "age_s",
            "server_pid"), rows


def _servers(server: Runtime) -> Rows:
    now = time.monotonic()
    rows: list[tuple[object, ...]] = []
    pools = [(db, user, p) for (db, user), p in server.pools.items()]
    where: dict[int, str] = {}  # a replica's pools: database "db@host:port"
    if server.replicas is not None:
        for r in server.replicas.list:
            pools += [(f"{db}@{r.name}", user, p) for (db, user), p in r.pools.items()]
            where.update({id(p): f"@{r.name}" for p in r.pools.values()})
    for db, user, p in sorted(pools, key=lambda t: (t[0], t[1])):
        for b in p.idle:
            rows.append((b.pid, db, user, "idle", None, b.uses, round(now - b.created, 1)))
    for c in server.clients:
        held = c.backend
        if held is not None:
            rows.append((held.pid, c.database + where.get(id(c.bpool), ""), c.user, "active", c.token,
                         held.uses, round(now - held.created, 1)))
    return ("pid", "database", "user", "state", "client_id", "uses", "age_s"), sorted(
        rows, key=lambda r: (str(r[1]), str(r[2]), int(str(r[0]))))


def _agents(server: Runtime) -> Rows:
    rows: list[tuple[object, ...]] = []
    for name, a in sorted(view(server)["agents"].items()):
        rows.append((name, a["queries"], round(a["rate"], 1), a["hits"], a["coalesced"], a["bypassed"],
                     a["misses"], a["rejected"], _ms(quantile(a["lat_counts"], 0.5)),
                     _ms(quantile(a["lat_counts"], 0.99)), a.get("batched", 0)))
    return ("agent", "queries", "qps_10s", "hits", "coalesced", "bypassed", "misses", "rejected",
            "p50_ms", "p99_ms", "batched"), rows


def _replicas(server: Runtime) -> Rows:
    rows: list[tuple[object, ...]] = [
        (name, r["state"], r["replay_lsn"], round(r["lag_s"], 3), r["reads"], r["outstanding"])
            for name, r in view(server).get("replicas", {}).items()]
    return ("server", "state", "replay_lsn", "lag_s", "reads", "outstanding"), rows


def _cache(server: Runtime) -> Rows:
    if server.cache is None:
        return ("name", "value"), [("cache", "off")]
    return ("name", "value"), list(server.cache_rows())


def _config(server: Runtime) -> Rows:
    return ("setting", "value"), [(k, str(v)) for k, v in server.config.masked().items()]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_SHOWS: dict[str, Callable[[Runtime], Rows]] = {
    "help": _help, "stats": _stats, "pools": _pools, "clients": _clients, "servers": _servers,
    "replicas": _replicas, "agents": _agents, "cache": _cache, "config": _config,
}
_ACTIONS: dict[str, Callable[[Runtime], str]] = {
    "reload": lambda s: s.reload_all(), "pause": lambda s: s.pause(), "resume": lambda s: s.resume(),
    "shutdown": lambda s: s.request_shutdown(),
}


# ---- the wire side -----------------------------------------------------------------------------

def _text(value: object) -> bytes | None:
    if value is None:
        return None
    return str(value).encode()


def _types(rows: Rows) -> list[tuple[str, int]]:
    """Column names with a type: int8 or float8 where every value is one, else text."""
    columns, data = rows
    out = []
    for i, name in enumerate(columns):
        values = [row[i] for row in data if row[i] is not None]
        oid = _TEXT
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            oid = _INT8
        elif values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            oid = _FLOAT8
        out.append((name, oid))
    return out


def _binary(value: object, oid: int) -> bytes | None:
    if value is None:
        return None
    if oid == _INT8:
        return struct.pack("!q", int(str(value)))
    if oid == _FLOAT8:
        return struct.pack("!d", float(str(value)))
    return str(value).encode()


def _bind(body: bytes) -> tuple[bytes, bytes, tuple[int, ...]]:
    """(portal, statement, result format codes) of a Bind body."""
    portal, _, rest = body.partition(b"\x00")
    stmt, _, rest = rest.partition(b"\x00")
    try:
        pos = 0
        (n,) = struct.unpack_from("!h", rest, pos)
        pos += 2 + 2 * n
        (n,) = struct.unpack_from("!h", rest, pos)
        pos += 2
        for _ in range(n):
            (length,) = struct.unpack_from("!i", rest, pos)
            pos += 4 + max(length, 0)
        (n,) = struct.unpack_from("!h", rest, pos)
        formats = struct.unpack_from(f"!{n}h", rest, pos + 2)
    except struct.error:
        raise ProtocolError("invalid Bind message") from None
    return portal, stmt, tuple(formats)


def _reply(tag: str, rows: Rows | None, describe_rows: bool = True, formats: tuple[int, ...] = ()) -> bytes:
    if rows is None:
        return encode.message(codes.B_EMPTY_QUERY_RESPONSE) if tag == "EMPTY" else \
            encode.command_complete(tag)
    data = rows[1]
    types = _types(rows)
    out = [encode.row_description(types)] if describe_rows else []
    if any(formats):
        fmts = [formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0
                for i in range(len(types))]
        out += [encode.data_row([_binary(v, oid) if f else _text(v) for v, (_, oid), f
                                 in zip(row, types, fmts, strict=True)]) for row in data]
    else:
        out += [encode.data_row([_text(v) for v in row]) for row in data]
    out.append(encode.command_complete(f"{tag} {len(data)}" if tag == "SHOW" else tag))
    return b"".join(out)


def _error(err: AdminError) -> bytes:
    return encode.error_response(err.sqlstate, err.message)


def handle(s: WireSession) -> None:
    """Answer every complete message in s.inbuf (simple and extended protocol)."""
    buf = s.inbuf
    out: list[bytes] = []
    while len(buf) >= 5 and not s.admin_busy:
        code = buf[0]
        length = _I.unpack_from(buf, 1)[0]
        if length < 4 or length > codes.DEFAULT_MAX_MESSAGE:
            raise ProtocolError(f"invalid message length {length}")
        if len(buf) < length + 1:
            break
        body = bytes(buf[5:length + 1])
        del buf[:length + 1]
        if code == codes.F_TERMINATE:
            s.write(b"".join(out))
            s.close()
            return
        if code == codes.F_SYNC:
            s.admin_failed = False
            out.append(encode.ready_for_query())
            continue
        if s.admin_failed and code != codes.F_QUERY:
            continue  # after an error, skip to Sync as Postgres does
        if code == codes.F_QUERY and _PAUSE.fullmatch(body.rstrip(b"\x00")):
            # PgBouncer's PAUSE: the reply comes once no transaction is running anywhere
            s.admin_busy = True
            message = s.server.pause()
            s.spawn_task(_pause_reply(s, message))
            break
        try:
            out.append(_message(s, code, body))
        except AdminError as err:
            out.append(_error(err))
            if code == codes.F_QUERY:
                out.append(encode.ready_for_query())
            else:
                s.admin_failed = True
    if out:
        s.write(b"".join(out))


_PAUSE = re.compile(rb"(?is)\s*pause\s*;?\s*")


async def _pause_reply(s: WireSession, message: str) -> None:
    """Wait until no server connection is held (summed over workers), up to shutdown_timeout."""
    server = s.server
    deadline = time.monotonic() + server.config.shutdown_timeout
    busy = _transactions(server)
    while busy and time.monotonic() < deadline and server.paused_anywhere():
        await asyncio.sleep(0.05)
        busy = _transactions(server)
    note = "all transactions finished" if not busy else f"{busy} transactions still running"
    s.admin_busy = False
    s.resume_pump_admin()
    s.write(_reply("PAUSE", (("result",), [(f"{message}; {note}",)])) + encode.ready_for_query())
    handle(s)


def _transactions(server: Runtime) -> int:
    return int(sum(p["held"] for p in view(server)["pools"].values()))


def _message(s: WireSession, code: int, body: bytes) -> bytes:
    server = s.server
    if code == codes.F_QUERY:
        query = body.rstrip(b"\x00").decode("utf-8", "replace")
        parts = list(split(query)) or [""]
        out = []
        for part in parts:
            tag, rows = run(server, part)
            out.append(_reply(tag, rows))
        return b"".join(out) + encode.ready_for_query()
    if code == codes.F_PARSE:
        name, text, _param_types = parse_parse(body)
        s.admin_statements[name] = text.decode("utf-8", "replace")
        return encode.PARSE_COMPLETE
    if code == codes.F_BIND:
        portal, stmt, formats = _bind(body)
        if stmt not in s.admin_statements:
            raise AdminError("26000", f'prepared statement "{stmt.decode(errors="replace")}" does not exist')
        s.admin_portals[portal] = s.admin_statements[stmt]
        s.admin_formats[portal] = formats
        return encode.BIND_COMPLETE
    if code == codes.F_DESCRIBE:
        target, name = body[:1], body[1:].rstrip(b"\x00")
        found = (s.admin_statements if target == b"S" else s.admin_portals).get(name)
        if found is None:
            raise AdminError("26000", "unknown prepared statement or portal")
        tag, rows = run(server, found, dry=True)
        head = encode.message(codes.B_PARAMETER_DESCRIPTION, b"\x00\x00") if target == b"S" else b""
        if rows is None:
            return head + encode.message(codes.B_NO_DATA)
        formats = s.admin_formats.get(name, ()) if target == b"P" else ()
        return head + encode.row_description(_types(rows), formats)
    if code == codes.F_EXECUTE:
        portal = body.split(b"\x00", 1)[0]
        bound = s.admin_portals.get(portal)
        if bound is None:
            raise AdminError("34000", "portal does not exist")
        tag, rows = run(server, bound)
        return _reply(tag, rows, describe_rows=False, formats=s.admin_formats.get(portal, ()))
    if code == codes.F_CLOSE:
        return encode.CLOSE_COMPLETE
    if code == codes.F_FLUSH:
        return b""
    raise AdminError("0A000", f"message type {chr(code)!r} is not supported by the admin console")
