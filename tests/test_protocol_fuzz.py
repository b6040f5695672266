"""Protocol-sequence fuzzer (a standing check): seeded random sequences of valid and mutated
frontend messages, in random orders and chunks, on several connections at once, some closed
at random points. Each sequence also goes to Postgres directly, as the oracle.

After every case:
- where Postgres kept the connection, pgsluice answered with as many ReadyForQuery (or said
  why it closed the connection with a FATAL error): nothing is left waiting;
- a fresh client is answered within a second, in a transaction of its own;
- SHOW POOLS, SHOW SERVERS and SHOW CLIENTS agree (no server connection counted active that
  no client holds), and Postgres shows no connection of the fuzzed user left in a
  transaction or running;
and at the end pgsluice logged no unhandled exception. A failing case names its seed:
`pytest tests/test_protocol_fuzz.py -k 'seed-17'` replays it.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_error_fields
from tests.util import ProxyFactory, ProxyHandle

USER, DB = "trusted_user", "postgres"  # trust: the same login directly and through pgsluice
CASES = int(os.environ.get("PGSLUICE_FUZZ_CASES", "40"))
CONNECTIONS = 6  # at once, per case
POOL = int(os.environ.get("PGSLUICE_FUZZ_POOL", "8"))  # more than CONNECTIONS: answers stay comparable
_I, _i, _h = struct.Struct("!I"), struct.Struct("!i"), struct.Struct("!h")

SQL = [
    "select v from fz_t where k = $1::int", "select $1::int + 1", "select 1", "selec 1", "",
    "select pg_sleep(0.01)", "insert into fz_t values ($1::int, 'x') on conflict (k) do update set v = 'y'",
    "begin", "commit", "rollback", "select * from fz_t where k < $1::int", "copy (select 1) to stdout",
    "copy fz_t (k, v) from stdin", "show transaction_isolation", "set application_name = 'fz'",
    "select 1; select 2", "select $1::int, $2::text", "begin isolation level serializable",
]


@dataclass
class Outcome:
    readies: int = 0
    closed: bool = False
    fatal: bool = False
    codes: str = ""


def message(code: int, body: bytes) -> bytes:
    return bytes([code]) + _I.pack(len(body) + 4) + body


class Script:
    """One connection's bytes, from a seeded generator."""

    def __init__(self, rnd: random.Random, base: int) -> None:
        self.rnd = rnd
        self.base = base  # this connection's own keys: no row lock waits between connections
        self.messages = [self._mutate(self._message()) for _ in range(rnd.randint(1, 10))]
        ending = rnd.random()
        self.ending = "read" if ending < 0.7 else "close" if ending < 0.85 else "cut"

    def _value(self) -> bytes:
        return str(self.base + self.rnd.randint(0, 9)).encode()

    def _sql(self, literal: bool) -> bytes:
        sql = self.rnd.choice(SQL)
        if literal:
            sql = sql.replace("$1::int", self._value().decode()).replace("$2::text", "'t'")
        return sql.encode()

    def _message(self) -> bytes:
        r = self.rnd
        kind = r.choice("QQPPBBDEESSSHCFXY")
        names = [b"", b"", b"s1", b"s2"]
        if kind == "Q":
            return message(codes.F_QUERY, self._sql(True) + b"\x00")
        if kind == "P":
            types = r.choice([b"\x00\x00", b"\x00\x01" + _I.pack(23)])
            return message(codes.F_PARSE, r.choice(names) + b"\x00" + self._sql(False) + b"\x00" + types)
        if kind == "B":
            params = [self._value() for _ in range(r.choice([0, 1, 1, 2]))]
            body = r.choice([b"", b"p1"]) + b"\x00" + r.choice(names) + b"\x00" + b"\x00\x00"
            body += _h.pack(len(params)) + b"".join(_i.pack(len(p)) + p for p in params)
            body += r.choice([b"\x00\x00", b"\x00\x01\x00\x00", b"\x00\x01\x00\x01"])
            return message(codes.F_BIND, body)
        if kind == "D":
            return message(codes.F_DESCRIBE, r.choice([b"S", b"P"]) + r.choice([*names, b"p1"]) + b"\x00")
        if kind == "E":
            return message(codes.F_EXECUTE, r.choice([b"", b"p1"]) + b"\x00" + _i.pack(r.choice([0, 0, 1])))
        if kind == "S":
            return encode.sync()
        if kind == "H":
            return message(codes.F_FLUSH, b"")
        if kind == "C":
            return message(codes.F_CLOSE, r.choice([b"S", b"P"]) + r.choice([*names, b"p1"]) + b"\x00")
        if kind == "F":  # a fast-path function call of a function that does not exist
            return message(codes.F_FUNCTION_CALL, _I.pack(0) + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
        if kind == "X":  # COPY data, in or out of a COPY
            return message(codes.F_COPY_DATA, self._value() + b"\tz\n")
        return r.choice([message(codes.F_COPY_DONE, b""), message(codes.F_COPY_FAIL, b"no\x00")])

    def _mutate(self, msg: bytes) -> bytes:
        r = self.rnd
        if r.random() > 0.12 or len(msg) <= 5:
            return msg
        how = r.randrange(5)
        body = msg[5:]
        if how == 0:  # shorter body, consistent length
            return message(msg[0], body[:r.randrange(len(body))])
        if how == 1 and body:  # a byte changed
            i = r.randrange(len(body))
            return message(msg[0], body[:i] + bytes([r.randrange(256)]) + body[i + 1:])
        if how == 2 and msg[0] == codes.F_BIND and len(body) > 4:  # more parameters than sent
            i = body.index(b"\x00", body.index(b"\x00") + 1) + 3
            return message(msg[0], body[:i] + b"\x05" + body[i + 1:])
        if how == 3:  # an unknown message type
            return bytes([r.choice(b"AaZz\x00\xff")]) + msg[1:]
        return msg + bytes(r.randrange(1, 4))  # stray bytes after it (the next "message")

    def data(self) -> bytes:
        return b"".join(self.messages)


async def login(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(encode.startup_message({"user": USER, "database": DB}))
    async with asyncio.timeout(10):
        while True:
            code, body = await read(reader)
            if code == codes.B_ERROR_RESPONSE:
                raise AssertionError(f"login refused: {parse_error_fields(body)}")
            if code == codes.B_READY_FOR_QUERY:
                return reader, writer


async def read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(5)
    return head[0], await reader.readexactly(_I.unpack_from(head, 1)[0] - 4)


async def play(host: str, port: int, script: Script, expect: int | None) -> Outcome:
    """Send the script in random chunks; read until `expect` ReadyForQuery (or, for the oracle,
    until Postgres says nothing for a while); then end as the script says."""
    reader, writer = await login(host, port)
    rnd = random.Random(script.rnd.random())
    data = script.data()
    if script.ending == "cut":
        data = data[:rnd.randrange(len(data) + 1)]
    cuts = sorted(rnd.sample(range(1, len(data)), min(3, len(data) - 1))) if len(data) > 1 else []
    out = Outcome()
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            writer.write(data[a:b])
            await writer.drain()
            await asyncio.sleep(rnd.choice([0, 0, 0.005]))
        if script.ending != "read":
            return out
        deadline = time.monotonic() + 6
        while True:
            if expect is None:
                wait = 0.5  # the oracle: until Postgres has said nothing for a while
            elif out.readies < expect:
                wait = deadline - time.monotonic()
            else:
                wait = 0.3  # whatever comes after what Postgres sent
            try:
                async with asyncio.timeout(max(0.01, wait)):
                    code, body = await read(reader)
            except TimeoutError:
                return out
            out.codes += chr(code)
            if code == codes.B_READY_FOR_QUERY:
                out.readies += 1
            elif code == codes.B_ERROR_RESPONSE and parse_error_fields(body).get("S") == "FATAL":
                out.fatal = True
    except (asyncio.IncompleteReadError, ConnectionError):
        out.closed = True
        return out
    finally:
        if script.ending == "read" and rnd.random() < 0.5:
            writer.write(encode.terminate())
        writer.close()


@pytest.fixture(scope="module")
def fuzz_proxy(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory) -> Iterator[ProxyHandle]:
    pg.psql("DROP TABLE IF EXISTS fz_t; CREATE TABLE fz_t (k int PRIMARY KEY, v text);"
            " INSERT INTO fz_t SELECT g, 'v' FROM generate_series(1, 5) g; GRANT ALL ON fz_t TO trusted_user")
    proxy = proxy_factory_module("--pool-max-size", str(POOL), "--pool-acquire-timeout", "5")
    yield proxy
    log = proxy.log_text()
    for bad in ("Traceback", "exception was never retrieved", "background task failed"):
        assert bad not in log, f"pgsluice logged {bad!r}:\n{log[-3000:]}"
    pg.psql("DROP TABLE fz_t")


async def settled(proxy: ProxyHandle, pg: EmbeddedPostgres) -> str:
    """'' once pgsluice's counts agree and Postgres has nothing of the fuzzed user running or
    in a transaction; else what is off."""
    admin = await asyncpg.connect(proxy.dsn(database="pgsluice"), statement_cache_size=0)
    direct = await asyncpg.connect(pg.dsn())
    try:
        pools = await admin.fetch("SHOW POOLS")
        servers = await admin.fetch("SHOW SERVERS")
        clients = await admin.fetch("SHOW CLIENTS")
        busy = await direct.fetch("SELECT pid, state, query FROM pg_stat_activity WHERE usename = $1"
                                  " AND state <> 'idle'", USER)
    finally:
        await admin.close()
        await direct.close()
    active = sum(int(p["active"]) for p in pools if p["user"] == USER)
    held = sum(1 for s in servers if s["user"] == USER and s["state"] == "active")
    holders = sum(1 for c in clients if c["user"] == USER and c["server_pid"] is not None)
    if not active == held == holders:
        return f"SHOW POOLS active {active}, SHOW SERVERS active {held}, clients holding one {holders}"
    if busy and not holders:
        return f"server connections busy with no client: {[dict(b) for b in busy]}"
    return ""


@pytest.mark.parametrize("seed", range(CASES), ids=[f"seed-{i}" for i in range(CASES)])
async def test_fuzz_case(fuzz_proxy: ProxyHandle, pg: EmbeddedPostgres, seed: int) -> None:
    rnd = random.Random(seed)
    scripts = [Script(random.Random(rnd.random()), 1000 * (i + 1)) for i in range(CONNECTIONS)]
    oracle = await asyncio.gather(*(play(pg.host, pg.port, s, None) for s in _copies(scripts)))
    got = await asyncio.gather(*(play(fuzz_proxy.host, fuzz_proxy.port, s, o.readies)
                                 for s, o in zip(scripts, oracle, strict=True)))
    for i, (s, d, p) in enumerate(zip(scripts, oracle, got, strict=True)):
        if s.ending != "read" or d.closed:
            continue
        assert p.readies == d.readies or (p.closed and p.fatal), (
            f"connection {i}: Postgres answered {d.codes!r}, pgsluice {p.codes!r} "
            f"(closed={p.closed}); messages {[chr(m[0]) for m in s.messages]}\n"
            f"pgsluice's log ends:\n{_tail(fuzz_proxy)}")
    # a fresh client is answered at once, in a transaction of its own
    started = time.monotonic()
    conn = await asyncpg.connect(fuzz_proxy.dsn(USER, None, DB), timeout=5)
    try:
        assert await conn.fetchval("SELECT 12345", timeout=2) == 12345
        async with conn.transaction(isolation="serializable", readonly=True):
            await conn.fetchval("SELECT 1", timeout=2)
    finally:
        await conn.close()
    assert time.monotonic() - started < 1.5, "a fresh client waited"
    problem = "not checked"
    deadline = time.monotonic() + 8  # a client that left mid-query: its query is cancelled first
    while problem and time.monotonic() < deadline:
        problem = await settled(fuzz_proxy, pg)
        if problem:
            await asyncio.sleep(0.1)
    assert not problem, f"seed {seed}: {problem}\npgsluice's log ends:\n{_tail(fuzz_proxy)}"


def _tail(proxy: ProxyHandle) -> str:
    return "\n".join(proxy.log_text().splitlines()[-25:])


def _copies(scripts: list[Script]) -> list[Script]:
    """The same scripts for the oracle (a Script's later randomness comes from its own seed)."""
    out = []
    for s in scripts:
        copy = Script.__new__(Script)
        copy.rnd, copy.base, copy.messages, copy.ending = random.Random(0), s.base, s.messages, s.ending
        out.append(copy)
    return out
