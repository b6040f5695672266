"""The gRPC door's Session stream against real Postgres: many requests on one stream answered
with their ids and values in any order, errors as replies, a per-request timeout that cancels
its own statement only, transactions in order, auth at open, a reader that stops reading,
graceful shutdown, and proxy.client.SluiceClient on the stream."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from protos.pgsluice.v1 import sluice_pb2 as pb
from protos.pgsluice.v1 import sluice_pb2_grpc
from proxy.client import SluiceClient, SluiceError
from proxy.doors.grpc import wire as grpc_wire
from proxy.ops.embedded import EmbeddedPostgres, free_port
from proxy.pgwire import values
from tests import cachedb
from tests.util import ProxyFactory, ProxyHandle, port_open, wait_until, wait_until_async

DB = "grpcsession"
TOKEN = "session-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CONFIG = (f'[pgsluice.agents.streamer]\ntoken = "{TOKEN}"\nuser = "postgres"\npassword = "postgres"\n'
          f'database = "{DB}"\n')


@pytest.fixture(scope="module")
def door(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyHandle, int]]:
    cachedb.create(pg, DB)
    pg.psql("CREATE TABLE uniq (k int PRIMARY KEY); INSERT INTO uniq VALUES (1); "
            "CREATE TABLE tx_log (n int); CREATE TABLE auth_probe (n int); "
            "CREATE TABLE shutdown_log (n int); CREATE SEQUENCE flow_runs", db=DB)
    config = tmp_path_factory.mktemp("grpc-session") / "pgsluice.toml"
    config.write_text(CONFIG)
    port = free_port()
    handle = proxy_factory_module("--config", str(config), "--grpc-listen", f"127.0.0.1:{port}")
    cachedb.start_feed(handle, DB)
    yield handle, port


@pytest.fixture
async def stub(door: tuple[ProxyHandle, int]) -> AsyncIterator[Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{door[1]}")
    yield sluice_pb2_grpc.SluiceStub(channel)
    await channel.close()


async def count(pg: EmbeddedPostgres, sql: str) -> int:
    """One number, straight from Postgres."""
    conn = await asyncpg.connect(pg.dsn(database=DB))
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


def _plain(v: pb.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "null":
        return None
    if kind == "array":
        return [_plain(x) for x in v.array.values]
    return getattr(v, kind)


def _request(request_id: int, sql: str, *params: pb.Value, **kw: Any) -> pb.SessionRequest:
    return pb.SessionRequest(id=request_id, query=pb.QueryRequest(sql=sql, params=params, **kw))


async def test_many_concurrent_requests_answered_with_their_ids(stub: Any) -> None:
    """200 requests at once on one stream, some slow: every id answered once with its own value,
    the fast ones not held behind the slow ones."""
    call = stub.Session(metadata=AUTH)
    for i in range(200):
        sleep = 0.5 if i % 50 == 0 else 0.0  # four slow ones among cached and uncached reads
        await call.write(_request(i + 1, "SELECT $1::int * 3 AS x, v FROM items WHERE id = $2 AND "
                                         "pg_sleep($3::float8) IS NOT NULL",
                                  pb.Value(int64=i), pb.Value(int64=i % 20 + 1), pb.Value(double=sleep)))
    await call.done_writing()
    order = []
    async for answer in call:
        assert answer.WhichOneof("outcome") == "result", answer.error
        i = answer.id - 1
        assert [_plain(v) for v in answer.result.rows[0].values] == [i * 3, f"v{i % 20 + 1}"]
        order.append(i)
    assert sorted(order) == list(range(200))
    assert order.index(0) > order.index(1), "the slow first request held the others back"
    assert await call.code() == grpc.StatusCode.OK


async def test_errors_are_replies_and_the_stream_goes_on(door: tuple[ProxyHandle, int], stub: Any) -> None:
    call = stub.Session(metadata=AUTH)
    requests = [(1, "SELEC 1", "42601", grpc.StatusCode.INVALID_ARGUMENT),
                (2, "INSERT INTO uniq VALUES (1)", "23505", grpc.StatusCode.ALREADY_EXISTS),
                (3, "SELECT 1/0", "22012", grpc.StatusCode.INVALID_ARGUMENT),
                (4, "SELECT 1\x00", "22021", grpc.StatusCode.INVALID_ARGUMENT),
                (5, "SELECT nope FROM items", "42703", grpc.StatusCode.INVALID_ARGUMENT)]
    for request_id, sql, _, _ in requests:
        await call.write(_request(request_id, sql))
    await call.write(_request(7, "SELECT 1", database="grpc_no_such_db"))
    await call.write(_request(6, "SELECT 6 AS six"))
    await call.done_writing()
    answers = {a.id: a async for a in call}
    assert await call.code() == grpc.StatusCode.OK
    for request_id, _, sqlstate, code in requests:
        error = answers[request_id].error
        assert answers[request_id].WhichOneof("outcome") == "error"
        assert error.sqlstate == sqlstate and error.message and error.status_code == code.value[0]
    assert answers[1].error.position == "1"
    assert answers[7].error.sqlstate == "3D000"
    assert answers[7].error.status_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert _plain(answers[6].result.rows[0].values[0]) == 6
    # bytes that are not a SessionRequest (invalid UTF-8 in the sql): an error reply with the
    # id when it can be read, and the stream goes on
    async with grpc.aio.insecure_channel(f"127.0.0.1:{door[1]}") as channel:
        raw = channel.stream_stream("/pgsluice.v1.Sluice/Session", None, None)(metadata=AUTH)
        await raw.write(b"\x08\x09\x12\x04\x0a\x02\xff\xfe")  # id 9, query.sql = b"\xff\xfe"
        await raw.write(_request(10, "SELECT 10").SerializeToString())
        await raw.done_writing()
        got = {a.id: a for a in [pb.SessionReply.FromString(r) async for r in raw]}
        assert got[9].error.sqlstate == "08P01" and "decoded" in got[9].error.message
        assert got[9].error.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert _plain(got[10].result.rows[0].values[0]) == 10


async def test_a_request_timeout_cancels_its_statement_only(pg: EmbeddedPostgres, stub: Any) -> None:
    call = stub.Session(metadata=AUTH)
    started = time.monotonic()
    await call.write(_request(1, "SELECT pg_sleep(30), 'doomed'", hints=pb.Hints(timeout_seconds=0.5)))
    for i in (2, 3):
        await call.write(_request(i, "SELECT pg_sleep(1.5), $1::text AS who", pb.Value(text=f"r{i}")))
    answers: dict[int, pb.SessionReply] = {}
    while len(answers) < 1:
        answer = await call.read()
        answers[answer.id] = answer
    assert 1 in answers, answers  # the timed-out one comes first, not after the others
    assert answers[1].error.sqlstate == "57014"
    assert answers[1].error.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert time.monotonic() - started < 1.4
    running = await count(pg, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
                              "AND state = 'active' AND pid <> pg_backend_pid()")
    assert running == 0  # cancelled in Postgres, not merely abandoned
    while len(answers) < 3:
        answer = await call.read()
        answers[answer.id] = answer
    for i in (2, 3):  # the others ran to the end
        assert [_plain(v) for v in answers[i].result.rows[0].values][1] == f"r{i}"
    await call.write(_request(4, "SELECT 4"))  # and the stream goes on
    assert _plain((await call.read()).result.rows[0].values[0]) == 4
    await call.done_writing()


async def test_a_client_that_goes_away_cancels_its_statements(pg: EmbeddedPostgres, stub: Any) -> None:
    call = stub.Session(metadata=AUTH)
    await call.write(_request(1, "SELECT pg_sleep(30), 'abandoned'"))

    async def running() -> int:
        return await count(pg, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%''abandoned''%' "
                               "AND state = 'active' AND pid <> pg_backend_pid()")

    await wait_until_async(running, timeout=5, message="the statement runs")
    call.cancel()

    async def stopped() -> bool:
        return await running() == 0

    await wait_until_async(stopped, timeout=5, message="the statement cancelled")


async def test_a_transaction_runs_in_order_on_its_session(pg: EmbeddedPostgres, stub: Any) -> None:
    call = stub.Session(metadata=AUTH)
    steps = ["BEGIN", "INSERT INTO tx_log VALUES (1)", "INSERT INTO tx_log VALUES (2)",
             "SELECT count(*) FROM tx_log", "ROLLBACK", "SELECT count(*) FROM tx_log"]
    for i, sql in enumerate(steps):  # written at once: they must still run in order, inside it
        await call.write(_request(i, sql))
    await call.done_writing()
    answers = {a.id: a async for a in call}
    assert all(a.WhichOneof("outcome") == "result" for a in answers.values()), answers
    assert _plain(answers[3].result.rows[0].values[0]) == 2  # saw its own transaction's rows
    assert answers[4].result.command_tag == "ROLLBACK"
    assert _plain(answers[5].result.rows[0].values[0]) == 0
    assert await count(pg, "SELECT count(*) FROM tx_log") == 0
    # a transaction left open when the stream ends is rolled back
    call = stub.Session(metadata=AUTH)
    await call.write(_request(1, "BEGIN"))
    await call.write(_request(2, "INSERT INTO tx_log VALUES (3)"))
    await call.done_writing()
    assert [a.WhichOneof("outcome") async for a in call] == ["result", "result"]

    async def gone() -> bool:
        return await count(pg, "SELECT count(*) FROM pg_stat_activity WHERE state LIKE "
                               f"'idle in transaction%' AND datname = '{DB}'") == 0

    await wait_until_async(gone, timeout=5, message="the open transaction rolled back")
    assert await count(pg, "SELECT count(*) FROM tx_log") == 0


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)], ids=["none", "wrong"])
async def test_auth_at_stream_open(pg: EmbeddedPostgres, stub: Any, metadata: tuple[Any, ...]) -> None:
    call = stub.Session(metadata=metadata)
    with contextlib.suppress(grpc.aio.AioRpcError):  # the stream may be over before the write
        await call.write(_request(1, "INSERT INTO auth_probe VALUES (1)"))
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in (await call.details() or "")
    assert await count(pg, "SELECT count(*) FROM auth_probe") == 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_a_reader_that_stops_reading_does_not_grow_pgsluice(pg: EmbeddedPostgres,
                                                                  door: tuple[ProxyHandle, int],
                                                                  stub: Any) -> None:
    """2,000 requests of 100 kB replies each (200 MB in all), none read for a while: pgsluice
    stops running them instead of keeping their replies; then every one is answered."""
    pid = door[0].proc.pid
    call = stub.Session(metadata=AUTH)
    await call.write(_request(1, "SELECT 1"))
    await call.read()  # the stream is up
    before = _rss_mb(pid)

    async def write_all() -> None:
        for i in range(2, 2002):  # nextval: volatile, so each one runs (no cache, no single-flight)
            await call.write(_request(i, "SELECT nextval('flow_runs') AS n, repeat('x', 100000) AS pad"))
        await call.done_writing()

    writer = asyncio.ensure_future(write_all())
    peak = before
    for _ in range(30):  # 3 s of not reading
        await asyncio.sleep(0.1)
        peak = max(peak, _rss_mb(pid))
    ran = await count(pg, "SELECT last_value FROM flow_runs")
    assert ran < 200, f"{ran} requests ran while their replies were not read"
    assert peak - before < 60, f"pgsluice grew from {before:.0f} MB to {peak:.0f} MB"
    got = set()
    while (answer := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        assert answer.WhichOneof("outcome") == "result", answer.error
        got.add(answer.id)
        if len(got) % 200 == 0:
            peak = max(peak, _rss_mb(pid))
    await writer
    assert got == set(range(2, 2002)) and await count(pg, "SELECT last_value FROM flow_runs") == 2000
    assert peak - before < 60, f"pgsluice grew from {before:.0f} MB to {peak:.0f} MB"


async def test_an_oversize_reply_is_an_error_reply(door: tuple[ProxyHandle, int], proxy_factory: ProxyFactory,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "pgsluice.toml"
    config.write_text(CONFIG)
    port = free_port()
    proxy_factory("--config", str(config), "--grpc-listen", f"127.0.0.1:{port}",
                  "--max-message-size", "1000000")
    wait_until(lambda: port_open("127.0.0.1", port))  # the gRPC door opens after the wire door
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = sluice_pb2_grpc.SluiceStub(channel).Session(metadata=AUTH)
        await call.write(_request(1, "SELECT g, repeat('y', 1000) FROM generate_series(1, 5000) g"))
        await call.write(_request(2, "SELECT 2"))
        await call.done_writing()
        answers = {a.id: a async for a in call}
    assert answers[1].error.sqlstate == "54000" and "max_message_size" in answers[1].error.message
    assert answers[1].error.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert _plain(answers[2].result.rows[0].values[0]) == 2


async def test_graceful_shutdown_mid_stream(pg: EmbeddedPostgres, door: tuple[ProxyHandle, int],
                                            proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    """SIGTERM while requests are in flight: they finish and are answered, nothing more is
    read, and the stream ends with UNAVAILABLE (ids without a reply were not run)."""
    config = tmp_path / "pgsluice.toml"
    config.write_text(CONFIG)
    port = free_port()
    proxy = proxy_factory("--config", str(config), "--grpc-listen", f"127.0.0.1:{port}")
    wait_until(lambda: port_open("127.0.0.1", port))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = sluice_pb2_grpc.SluiceStub(channel).Session(metadata=AUTH)
        for i in (1, 2, 3):
            await call.write(_request(i, "SELECT pg_sleep(1), $1::int AS n", pb.Value(int64=i)))
        await asyncio.sleep(0.4)  # in flight
        proxy.proc.terminate()
        await asyncio.sleep(0.2)  # pgsluice has stopped reading
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(_request(4, "INSERT INTO shutdown_log VALUES (4)"))
        answers = {}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                answer = await call.read()
                if answer is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                answers[answer.id] = answer
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "shutting down" in (info.value.details() or "")
    assert sorted(answers) == [1, 2, 3]
    assert [_plain(answers[i].result.rows[0].values[1]) for i in (1, 2, 3)] == [1, 2, 3]
    assert proxy.proc.wait(10) == 0
    assert await count(pg, "SELECT count(*) FROM shutdown_log") == 0


async def test_the_client_uses_one_stream(door: tuple[ProxyHandle, int]) -> None:
    async with SluiceClient(f"127.0.0.1:{door[1]}", token=TOKEN) as db:
        rows = await asyncio.gather(*(db.query("SELECT $1::int AS n, pg_sleep(0.2)", i) for i in range(30)))
        assert [r[0]["n"] for r in rows] == list(range(30))
        stream = db._session
        assert stream is not None
        await db.query("SELECT v FROM items WHERE id = $1", 3)
        await db.query("SELECT v FROM items WHERE id = $1", 3)
        assert db.last is not None and db.last.served == pb.CACHE_HIT and db._session is stream
        with pytest.raises(SluiceError) as info:
            await db.query("SELECT nope")
        assert info.value.sqlstate == "42703" and info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert await db.query("SELECT 1 AS one", unary=True) == [{"one": 1}]
        # a caller that gives up does not end the stream under the others
        slow = asyncio.ensure_future(db.query("SELECT pg_sleep(0.5), 'late' AS w"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(db.query("SELECT pg_sleep(2)"), 0.2)
        assert (await slow)[0]["w"] == "late" and db._session is stream
    async with SluiceClient(f"127.0.0.1:{door[1]}", token="nope") as bad:
        with pytest.raises(SluiceError) as info:
            await bad.query("SELECT 1")
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


TYPED = """SELECT true AS b, 32767::int2 AS i2, -2147483648 AS i4, 9223372036854775807::int8 AS i8,
 1.5::float8 AS f, 'NaN'::float8 AS nan, '-Infinity'::float4 AS ninf, 12345.678900::numeric AS n,
 'héllo'::text AS t, ''::text AS empty, 'x'::varchar(3) AS vc, '\\x00ff10'::bytea AS by,
 '2024-02-29'::date AS d, '13:45:01.5'::time AS tm, '2024-02-29 13:45:01+02'::timestamptz AS tstz,
 '1 day 02:03:04'::interval AS iv, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
 '{"a": [1, 2]}'::jsonb AS j, ARRAY[[1, 2], [3, NULL]]::int[] AS arr, '10.0.0.1/8'::inet AS other,
 NULL::int AS nothing, 'q'::"char" AS ch, 'nm'::name AS nm"""


async def test_wire_format_gives_the_same_values(door: tuple[ProxyHandle, int]) -> None:
    """format = WIRE: Postgres's own messages in the reply, decoded by the client to the same
    values as the typed reply."""
    async with SluiceClient(f"127.0.0.1:{door[1]}", token=TOKEN, wire=False) as typed, \
            SluiceClient(f"127.0.0.1:{door[1]}", token=TOKEN) as wire:
        a = (await typed.query(TYPED))[0]
        b = (await wire.query(TYPED))[0]
        assert wire.last is not None and wire.last.wire[:1] == b"T" and not wire.last.rows
        assert typed.last is not None and typed.last.rows and not typed.last.wire
        assert math.isnan(a.pop("nan")) and math.isnan(b.pop("nan"))
        assert a == b and a["i4"] == -2147483648 and a["empty"] == "" and a["by"] == b"\x00\xff\x10"


def test_hand_encoded_replies_equal_the_protobuf_ones() -> None:
    """grpc_wire writes exactly what proxy.pgwire.values would build (no server: the encoder alone)."""
    import struct
    cols = [("b", 16), ("i", 23), ("i8", 20), ("f", 701), ("f4", 700), ("t", 25), ("n", 1700), ("d", 1082),
            ("j", 3802), ("by", 17), ("arr", 1007), ("o", 869), ("", 25), ("u", 2950), ("tz", 1184)]
    rows = [[b"t", b"-5", b"9223372036854775807", b"NaN", b"-Infinity", "héllo".encode(), b"1.50",
             b"2024-01-01", b'{"a":1}', b"\\x00ff", b"{1,NULL}", b"10.0.0.1/8", b"", b"a0eebc99-9c0b-4ef8"
             b"-bb6d-6bb9bd380a11", b"2024-01-01 00:00:00+00"],
            [b"f", b"0", b"-9223372036854775808", b"-0", b"1e-45", None, b"NaN", None, None, None, b"{}",
             None, None, None, None],
            [None] * len(cols)]
    body = struct.pack("!h", len(cols)) + b"".join(name.encode() + b"\x00" + struct.pack("!IhIhih", 0, 0, oid,
                                                                                        -1, -1, 0)
                                                   for name, oid in cols)
    wire = b"T" + struct.pack("!I", len(body) + 4) + body
    for row in rows:
        data = struct.pack("!h", len(row)) + b"".join(struct.pack("!i", -1) if v is None
                                                      else struct.pack("!i", len(v)) + v for v in row)
        wire += b"D" + struct.pack("!I", len(data) + 4) + data
    wire += b"C\x00\x00\x00\x0dSELECT 3\x00"
    got = pb.QueryResponse.FromString(grpc_wire.response(wire, "SELECT 3", "cache", 1.5, "fp", True, True))
    want = pb.QueryResponse(
        columns=[pb.Column(name=n, type_oid=o, type_name=values.type_name(o)) for n, o in cols],
        rows=[pb.Row(values=[values.decode(v, o) for v, (_, o) in zip(r, cols, strict=True)]) for r in rows],
        command_tag="SELECT 3", rows_affected=3, served=pb.CACHE_HIT, elapsed_ms=1.5, fingerprint="fp",
        truncated=True)
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    raw = pb.QueryResponse.FromString(grpc_wire.response(wire, "SELECT 3", "executed", 0.0, "", False, False))
    assert raw.wire == wire and not raw.rows and raw.served == pb.EXECUTED
    reply = pb.SessionReply.FromString(grpc_wire.session_reply(2**64 - 1, err=grpc_wire.error(
        {"C": "42P01", "M": "no", "D": "d", "H": "h", "P": "7"}, 3)))
    assert reply.id == 2**64 - 1 and reply.error == pb.Error(sqlstate="42P01", message="no", detail="d",
                                                             hint="h", position="7", status_code=3)
    assert grpc_wire.request_id(pb.SessionRequest(id=300).SerializeToString()) == 300
