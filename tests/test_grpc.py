"""The gRPC door against real Postgres: typed values equal asyncpg's, a wire query then the same
over gRPC is a cache hit, auth, error mapping with SQLSTATE in trailing metadata, health,
reflection, Explain/Invalidate/Stats."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pgsluice.v1 import sluice_pb2 as pb
from protos.pgsluice.v1 import sluice_pb2_grpc
from proxy.ops.embedded import EmbeddedPostgres, free_port
from proxy.pgwire import values
from tests import cachedb
from tests.util import ProxyFactory, ProxyHandle, wait_until_async

DB = "grpctest"
TOKEN = "agent-token-123"


@pytest.fixture(scope="module")
def door(pg: EmbeddedPostgres, proxy_factory_module: ProxyFactory,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyHandle, int]]:
    cachedb.create(pg, DB)
    pg.psql("CREATE TABLE uniq (k int PRIMARY KEY); INSERT INTO uniq VALUES (1)", db=DB)
    config = tmp_path_factory.mktemp("grpc") / "pgsluice.toml"
    config.write_text(f'[pgsluice.agents.analyst]\ntoken = "{TOKEN}"\nuser = "postgres"\n'
                      f'password = "postgres"\ndatabase = "{DB}"\n'
                      f'[pgsluice.agents.reader]\ntoken = "reader-token"\nuser = "postgres"\n'
                      f'password = "postgres"\ndatabase = "{DB}"\n'
                      '[pgsluice.roles.readonly]\nmatch_application_names = ["reader"]\nread_only = true\n')
    port = free_port()
    handle = proxy_factory_module("--config", str(config), "--grpc-listen", f"127.0.0.1:{port}")
    cachedb.start_feed(handle, DB)
    yield handle, port


@pytest.fixture
async def stub(door: tuple[ProxyHandle, int]) -> AsyncIterator[Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{door[1]}")
    yield sluice_pb2_grpc.SluiceStub(channel)
    await channel.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)
TYPED = """SELECT true AS b, 32767::int2 AS i2, 2147483647 AS i4, 9223372036854775807::int8 AS i8,
 1.5::float8 AS f, 'NaN'::float8 AS nan, '-Infinity'::float8 AS ninf, 12345.678900::numeric AS n,
 'héllo'::text AS t, 'x'::varchar(3) AS vc, '\\x00ff10'::bytea AS by, '2024-02-29'::date AS d,
 '13:45:01.5'::time AS tm, '2024-02-29 13:45:01'::timestamp AS ts,
 '2024-02-29 13:45:01+02'::timestamptz AS tstz, '1 day 02:03:04'::interval AS iv,
 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '{"a": [1, 2]}'::jsonb AS j,
 ARRAY[[1, 2], [3, NULL]]::int[] AS arr, ARRAY['a b', 'q"u', NULL]::text[] AS tarr,
 '10.0.0.1/8'::inet AS other, NULL::int AS nothing"""


def _plain(v: pb.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "null":
        return None
    if kind == "array":
        return [_plain(x) for x in v.array.values]
    if kind == "other":
        return v.other.text
    return getattr(v, kind)


async def ask(stub: Any, request: pb.QueryRequest, transport: str) -> pb.QueryResponse:
    """One query as a unary call, or as the one request of a Session stream."""
    if transport == "unary":
        reply: pb.QueryResponse = await stub.Query(request, metadata=AUTH)
        return reply
    call = stub.Session(metadata=AUTH)
    await call.write(pb.SessionRequest(id=77, query=request))
    await call.done_writing()
    answers = [a async for a in call]
    assert len(answers) == 1 and answers[0].id == 77, answers
    assert answers[0].WhichOneof("outcome") == "result", answers[0].error
    assert await call.code() == grpc.StatusCode.OK
    return answers[0].result


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_typed_values_match_asyncpg(pg: EmbeddedPostgres, stub: Any, transport: str) -> None:
    reply = await ask(stub, pb.QueryRequest(sql=TYPED), transport)
    got = {c.name: _plain(v) for c, v in zip(reply.columns, reply.rows[0].values, strict=True)}
    conn = await asyncpg.connect(pg.dsn(database=DB))
    await conn.execute("SET TimeZone = 'UTC'")
    row = await conn.fetchrow(TYPED)
    await conn.close()
    assert got["b"] is True and got["i2"] == row["i2"] and got["i4"] == row["i4"] and got["i8"] == row["i8"]
    assert got["f"] == 1.5 and math.isnan(got["nan"]) and got["ninf"] == -math.inf
    assert got["n"] == "12345.678900" and str(row["n"]) == "12345.678900"
    assert got["t"] == row["t"] == "héllo" and got["vc"] == "x"
    assert got["by"] == row["by"] == b"\x00\xff\x10"
    import datetime as dt
    assert dt.date.fromisoformat(got["d"]) == row["d"] and dt.time.fromisoformat(got["tm"]) == row["tm"]
    assert dt.datetime.fromisoformat(got["ts"]) == row["ts"]
    assert got["tstz"].startswith("2024-02-29 11:45:01")  # the session's TimeZone (UTC here)
    assert got["iv"] == "1 day 02:03:04" and got["u"] == str(row["u"])
    assert got["j"] == row["j"] == '{"a": [1, 2]}'
    assert got["arr"] == [[1, 2], [3, None]] and got["tarr"] == ["a b", 'q"u', None]
    assert got["other"] == "10.0.0.1/8" and got["nothing"] is None
    types = {c.name: c.type_name for c in reply.columns}
    assert types["i8"] == "int8" and types["arr"] == "_int4" and types["other"].startswith("oid ")


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_parameters_are_bound_and_typed_both_ways(stub: Any, transport: str) -> None:
    params = [pb.Value(int64=7), pb.Value(text="it's"), pb.Value(null=True), pb.Value(bytea=b"\x01\x02"),
              pb.Value(array=pb.Array(values=[pb.Value(int64=1), pb.Value(null=True)])),
              pb.Value(double=math.inf)]
    reply = await ask(stub, pb.QueryRequest(
        sql="SELECT $1::int8 + 1 AS a, $2::text AS b, $3::text AS c, $4::bytea AS d, $5::int[] AS e, "
            "$6::float8 AS f", params=params), transport)
    assert [_plain(v) for v in reply.rows[0].values] == [8, "it's", None, b"\x01\x02", [1, None], math.inf]
    assert values.encode(pb.Value(text='a"b')) == 'a"b'


async def test_wire_then_grpc_is_a_cache_hit(pg: EmbeddedPostgres, door: tuple[ProxyHandle, int],
                                           stub: Any) -> None:
    proxy = door[0]
    sql = "SELECT id, v FROM items WHERE id = $1"
    env = {**os.environ, "PGPASSWORD": "postgres", "PGCLIENTENCODING": "UTF8"}
    out = await asyncio.to_thread(
        subprocess.run, [str(pg.bin_dir / "psql"), "-X", "-At", "-h", proxy.host, "-p", str(proxy.port),
                         "-U", "postgres", "-d", DB, "-f", "-"],
        input=f"{sql} \\bind 33 \\g\n", env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "33|v33", out.stderr
    reply = await stub.Query(pb.QueryRequest(sql=sql, params=[pb.Value(text="33")]), metadata=AUTH)
    assert reply.served == pb.CACHE_HIT
    assert [_plain(v) for v in reply.rows[0].values] == [33, "v33"]
    again = await stub.Query(pb.QueryRequest(sql=sql, params=[pb.Value(text="33")],
                                             hints=pb.Hints(max_staleness_seconds=0)), metadata=AUTH)
    assert again.served == pb.EXECUTED


async def test_auth(stub: Any) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(pb.QueryRequest(sql="SELECT 1"), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("sql", "code", "sqlstate"), [
    ("SELEC 1", grpc.StatusCode.INVALID_ARGUMENT, "42601"),
    ("INSERT INTO uniq VALUES (1)", grpc.StatusCode.ALREADY_EXISTS, "23505"),
    ("SELECT 1/0", grpc.StatusCode.INVALID_ARGUMENT, "22012"),
])
async def test_errors_map_to_status_codes(stub: Any, sql: str, code: grpc.StatusCode, sqlstate: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Query(pb.QueryRequest(sql=sql), metadata=AUTH)
    assert info.value.code() == code
    trailers = dict(info.value.trailing_metadata() or ())
    assert trailers["pgsluice-sqlstate"] == sqlstate and trailers["pgsluice-message-bin"]
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    rich = rpc_status.from_call(info.value)  # the standard rich status details
    assert rich is not None and rich.code == code.value[0]
    detail = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(detail)
    assert detail.domain == "postgresql" and detail.reason == sqlstate and detail.metadata["message"]
    if sqlstate == "42601":
        assert detail.metadata["position"] == "1"


async def test_timeout_hint_cancels_the_statement(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Query(pb.QueryRequest(sql="SELECT pg_sleep(5)", hints=pb.Hints(timeout_seconds=0.3)),
                         metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(info.value.trailing_metadata() or ())["pgsluice-sqlstate"] == "57014"
    ok = await stub.Query(pb.QueryRequest(sql="SELECT 2"), metadata=AUTH)  # the session goes on
    assert _plain(ok.rows[0].values[0]) == 2


async def test_explain_invalidate_stats_health_reflection(door: tuple[ProxyHandle, int], stub: Any) -> None:
    ex = await stub.Explain(pb.ExplainRequest(sql="SELECT v FROM items WHERE id = 3", postgres_explain=True),
                            metadata=AUTH)
    assert ex.cacheable and ex.kind == "read" and list(ex.tables_read) == ["public.items"]
    assert '"Plan"' in ex.postgres_plan_json
    sql = "SELECT v FROM items WHERE id = 4"
    await stub.Query(pb.QueryRequest(sql=sql), metadata=AUTH)
    assert (await stub.Query(pb.QueryRequest(sql=sql), metadata=AUTH)).served == pb.CACHE_HIT
    assert (await stub.Invalidate(pb.InvalidateRequest(tables=["public.items"]), metadata=AUTH)).tables == 1
    assert (await stub.Query(pb.QueryRequest(sql=sql), metadata=AUTH)).served == pb.EXECUTED
    stats = await stub.Stats(pb.StatsRequest(), metadata=AUTH)
    assert any(a.agent == "analyst" and a.queries > 0 for a in stats.agents)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{door[1]}")
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="pgsluice.v1.Sluice"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for resp in refl.ServerReflectionInfo(iter([request])):
        names = {s.name for s in resp.list_services_response.service}
        assert "pgsluice.v1.Sluice" in names
        break
    await channel.close()


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run([str(root / "scripts" / "gen-protos"), str(tmp_path)], check=True, cwd=root,
                   env={**os.environ, "PYTHON": str(Path(os.sys.executable))})
    for name in ("sluice_pb2.py", "sluice_pb2.pyi", "sluice_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / "pgsluice" / "v1" / name).read_text()
        committed = (root / "protos" / "pgsluice" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen-protos"


async def test_the_python_client(door: tuple[ProxyHandle, int]) -> None:
    from proxy.client import SluiceClient, SluiceError
    async with SluiceClient(f"127.0.0.1:{door[1]}", token=TOKEN) as db:
        rows = await db.query("SELECT id, v, $2::int[] AS tags FROM items WHERE id = $1", 12, [1, 2])
        assert rows == [{"id": 12, "v": "v12", "tags": [1, 2]}]
        await db.query("SELECT id, v, $2::int[] AS tags FROM items WHERE id = $1", 12, [1, 2])
        assert db.last is not None and db.last.served == pb.CACHE_HIT
        with pytest.raises(SluiceError) as info:
            await db.query("SELECT nope FROM items")
        assert info.value.sqlstate == "42703" and info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_of_200_with_20_distinct_executes_20(pg: EmbeddedPostgres, stub: Any) -> None:
    def calls() -> int:  # alone, or in a burst batch (`... AS batch_tag , "id" FROM items ...`)
        out = pg.psql("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                      "WHERE query LIKE '%AS batch_tag%FROM items%'", db=DB)
        return int(out.strip())

    before = calls()
    # (pg_stat_statements folds queries differing only in aliases: a shape of its own)
    statements = [pb.QueryRequest(sql=f"SELECT v, 'probe' AS batch_tag FROM items WHERE id = {i % 20 + 1}")
                  for i in range(200)]
    reply = await stub.Batch(pb.BatchRequest(statements=statements), metadata=AUTH)
    assert len(reply.items) == 200
    for i, item in enumerate(reply.items):
        assert item.WhichOneof("outcome") == "result"
        assert [_plain(v) for v in item.result.rows[0].values] == [f"v{i % 20 + 1}", "probe"]
    # each distinct statement reached Postgres once: alone, or with others of its shape in one
    # burst batch (issue 16); the other 180 were cache hits or coalesced
    executed = sum(1 for item in reply.items if item.result.served == pb.EXECUTED)
    assert sum(1 for item in reply.items if item.result.served in (pb.EXECUTED, pb.BATCHED)) == 20
    assert executed <= calls() - before <= 20
    bad = await stub.Batch(pb.BatchRequest(statements=[pb.QueryRequest(sql="SELECT 1"),
                                                       pb.QueryRequest(sql="SELECT nope")]), metadata=AUTH)
    assert bad.items[0].WhichOneof("outcome") == "result" and bad.items[1].error.sqlstate == "42703"


async def test_batch_transaction_is_all_or_nothing(pg: EmbeddedPostgres, stub: Any) -> None:
    failing = [pb.QueryRequest(sql="INSERT INTO uniq VALUES (10)"),
               pb.QueryRequest(sql="INSERT INTO uniq VALUES (1)"),
               pb.QueryRequest(sql="INSERT INTO uniq VALUES (11)")]
    reply = await stub.Batch(pb.BatchRequest(statements=failing, transaction=True), metadata=AUTH)
    assert not reply.committed
    assert [i.WhichOneof("outcome") for i in reply.items] == ["result", "error", "error"]
    assert reply.items[1].error.sqlstate == "23505" and reply.items[2].error.sqlstate == "25P02"
    assert pg.psql("SELECT count(*) FROM uniq WHERE k IN (10, 11)", db=DB).strip() == "0"
    good = [pb.QueryRequest(sql="INSERT INTO uniq VALUES (12)"),
            pb.QueryRequest(sql="SELECT count(*) FROM uniq WHERE k = 12")]
    reply = await stub.Batch(pb.BatchRequest(statements=good, transaction=True), metadata=AUTH)
    assert reply.committed and _plain(reply.items[1].result.rows[0].values[0]) == 1
    assert pg.psql("SELECT count(*) FROM uniq WHERE k = 12", db=DB).strip() == "1"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_stream_a_million_rows_with_bounded_proxy_memory(door: tuple[ProxyHandle, int],
                                                               stub: Any) -> None:
    pid = door[0].proc.pid
    before = _rss_mb(pid)
    peak, rows, chunks, tag = before, 0, 0, ""
    call = stub.QueryStream(pb.QueryRequest(
        sql="SELECT g, repeat('x', 40) AS pad FROM generate_series(1, 1000000) AS g"), metadata=AUTH)
    async for chunk in call:
        rows += len(chunk.rows)
        chunks += 1
        if chunk.command_tag:
            tag = chunk.command_tag
        if chunks % 50 == 0:
            peak = max(peak, _rss_mb(pid))
            if chunks < 300:
                await asyncio.sleep(0.05)  # a slow reader for a while: pgsluice must not buffer it all
    assert rows == 1_000_000 and tag == "SELECT 1000000"
    # the whole result is ~60 MB of rows (and several times that as Python objects): bounded
    # memory means the proxy grew by a small fraction of it
    assert peak - before < 80, f"pgsluice grew from {before:.0f} MB to {peak:.0f} MB while streaming"
    first = stub.QueryStream(pb.QueryRequest(sql="SELECT 1 AS one"), metadata=AUTH)
    got = [c async for c in first]
    assert got[0].columns[0].name == "one" and _plain(got[1].rows[0].values[0]) == 1


async def test_idempotent_writes_run_once_under_concurrent_retries(pg: EmbeddedPostgres, stub: Any) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS idem_log (n serial PRIMARY KEY, note text)", db=DB)
    request = pb.QueryRequest(sql="INSERT INTO idem_log (note) VALUES ($1) RETURNING n",
                              params=[pb.Value(text="once")], idempotency_key="order-42")
    replies = await asyncio.gather(*(stub.Query(request, metadata=AUTH) for _ in range(10)))
    assert len({_plain(r.rows[0].values[0]) for r in replies}) == 1  # one original result for all
    assert pg.psql("SELECT count(*) FROM idem_log WHERE note = 'once'", db=DB).strip() == "1"
    again = await stub.Query(request, metadata=AUTH)  # a retry later: the same answer, no insert
    assert _plain(again.rows[0].values[0]) == _plain(replies[0].rows[0].values[0])
    assert pg.psql("SELECT count(*) FROM idem_log WHERE note = 'once'", db=DB).strip() == "1"
    other = pb.QueryRequest(sql=request.sql, params=request.params, idempotency_key="order-43")
    await stub.Query(other, metadata=AUTH)
    assert pg.psql("SELECT count(*) FROM idem_log WHERE note = 'once'", db=DB).strip() == "2"
    failing = pb.QueryRequest(sql="INSERT INTO uniq VALUES (1)", idempotency_key="dup-1")
    for _ in range(2):  # failures are not remembered: each retry runs and fails the same way
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(failing, metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_health_flips_when_postgres_stops(pg_tmp_dir: Path) -> None:
    """NOT_SERVING while Postgres cannot be reached, SERVING again once it is back."""
    import sys
    import time

    own = EmbeddedPostgres(pg_tmp_dir / "data")
    own.start()
    port, gport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--upstream", own.dsn(),
                             "--listen", f"127.0.0.1:{port}", "--grpc-listen", f"127.0.0.1:{gport}",
                             "--metrics-listen", "", "--workers", "1"],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
    stub = health_pb2_grpc.HealthStub(channel)

    def status() -> int:
        try:
            request = health_pb2.HealthCheckRequest(service="pgsluice.v1.Sluice")
            return int(stub.Check(request, timeout=2).status)
        except grpc.RpcError:
            return -1

    def wait_for(want: int) -> None:
        deadline = time.monotonic() + 20
        while status() != want:
            assert time.monotonic() < deadline, f"health never became {want}"
            time.sleep(0.1)

    try:
        wait_for(health_pb2.HealthCheckResponse.SERVING)
        own.stop()
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        own.start()
        wait_for(health_pb2.HealthCheckResponse.SERVING)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(20)
        own.stop()


async def test_read_only_role_is_permission_denied_and_priority_batch_runs(stub: Any) -> None:
    reader = (("authorization", "Bearer reader-token"),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Query(pb.QueryRequest(sql="INSERT INTO uniq VALUES (99)"), metadata=reader)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(info.value.trailing_metadata() or ())["pgsluice-sqlstate"] == "25006"
    ok = await stub.Query(pb.QueryRequest(sql="SELECT count(*) FROM uniq WHERE k = 99"), metadata=reader)
    assert _plain(ok.rows[0].values[0]) == 0
    slow = [stub.Query(pb.QueryRequest(sql=f"SELECT {i}, pg_sleep(0.2)", hints=pb.Hints(priority=pb.BATCH)),
                       metadata=AUTH) for i in range(3)]
    replies = await asyncio.gather(*slow)
    assert [_plain(r.rows[0].values[0]) for r in replies] == [0, 1, 2]


@pytest.mark.parametrize(("request_", "code", "sqlstate"), [
    (pb.QueryRequest(sql="select 1\x00"), grpc.StatusCode.INVALID_ARGUMENT, "22021"),
    (pb.QueryRequest(sql="select 1\x00; select 2", params=[pb.Value(int64=1)]),
     grpc.StatusCode.INVALID_ARGUMENT, "22021"),
    (pb.QueryRequest(sql="SELECT $1::int + $2::int", params=[pb.Value(int64=1)]),
     grpc.StatusCode.INVALID_ARGUMENT, "08P01"),
    (pb.QueryRequest(sql="SELECT 1", database="grpc_no_such_db"), grpc.StatusCode.NOT_FOUND, "3D000"),
], ids=["nul", "nul-with-params", "parameter-count", "unknown-database"])
async def test_bad_requests_are_invalid_argument_at_once(stub: Any, request_: pb.QueryRequest,
                                                         code: grpc.StatusCode, sqlstate: str) -> None:
    """A request the caller got wrong is answered at once with a status a client does not
    retry (not UNAVAILABLE, not a wait until its deadline)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Query(request_, metadata=AUTH, timeout=5)
    assert info.value.code() == code, info.value.details()
    assert dict(info.value.trailing_metadata() or ())["pgsluice-sqlstate"] == sqlstate
    ok = await stub.Query(pb.QueryRequest(sql="SELECT 3"), metadata=AUTH, timeout=5)
    assert _plain(ok.rows[0].values[0]) == 3


@pytest.mark.parametrize("method", ["Query", "QueryStream", "Explain"])
async def test_undecodable_request_is_invalid_argument(door: tuple[ProxyHandle, int], method: str) -> None:
    """Bytes that are not the request message (here: invalid UTF-8 in the sql string)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{door[1]}") as channel:
        bad = b"\x0a\x02\xff\xfe"  # field 1 (sql), length 2, not UTF-8
        if method == "QueryStream":
            call: Any = channel.unary_stream(f"/pgsluice.v1.Sluice/{method}")(bad, metadata=AUTH, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/pgsluice.v1.Sluice/{method}")(bad, metadata=AUTH, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_idle_internal_sessions_leave_show_clients(door: tuple[ProxyHandle, int], stub: Any) -> None:
    """The sessions gRPC calls ran on are gone from SHOW CLIENTS (and clients_now) within a
    couple of seconds of the last call."""
    proxy, _ = door
    await asyncio.gather(*(stub.Query(pb.QueryRequest(sql=f"SELECT {i}, pg_sleep(0.05)"), metadata=AUTH)
                           for i in range(20)))
    admin = await asyncpg.connect(proxy.dsn(database="pgsluice"), statement_cache_size=0)
    try:
        async def internal_sessions() -> int:
            rows = await admin.fetch("SHOW CLIENTS")
            return sum(1 for r in rows if r["peer"].startswith("internal"))

        assert await internal_sessions() > 0
        async def gone() -> bool:
            return await internal_sessions() == 0

        await wait_until_async(gone, timeout=3, interval=0.1, message="internal sessions gone")
        stats = {r["stat"]: r["value"] for r in await admin.fetch("SHOW STATS")}
        assert stats["clients_now"] == 1  # this admin session
    finally:
        await admin.close()


async def test_explain_judges_with_the_agents_role_policy(stub: Any) -> None:
    """Explain's verdict is the one the agent's statement gets when run: the reader agent's
    read-only role refuses a write (before: Explain planned without the role policy and said
    "allow" for what Query then refused)."""
    reader = (("authorization", "Bearer reader-token"),)
    sql = "INSERT INTO uniq VALUES (98)"
    ex = await stub.Explain(pb.ExplainRequest(sql=sql), metadata=reader)
    assert ex.verdict.startswith("reject 25006 "), ex.verdict
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Query(pb.QueryRequest(sql=sql), metadata=reader)
    assert dict(info.value.trailing_metadata() or ())["pgsluice-sqlstate"] == "25006"
    assert (await stub.Explain(pb.ExplainRequest(sql=sql), metadata=AUTH)).verdict == "allow"
    read = await stub.Explain(pb.ExplainRequest(sql="SELECT k FROM uniq"), metadata=reader)
    assert read.verdict == "allow"


@pytest.mark.parametrize("transport", ["unary", "stream", "batch", "querystream"])
@pytest.mark.parametrize("sql", ["COPY uniq FROM STDIN", "copy (select k from uniq) to stdout",
                                 "COPY uniq TO STDOUT (FORMAT csv)"])
async def test_copy_is_refused_not_hung(stub: Any, sql: str, transport: str) -> None:
    """COPY FROM STDIN / TO STDOUT need the copy sub-protocol, which a request/reply door cannot
    carry: a clear 0A000 at once (not a call waiting for CopyData that never comes, nor an
    empty result standing for the rows)."""
    if transport == "unary":
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(pb.QueryRequest(sql=sql), metadata=AUTH, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value.details()
        assert dict(info.value.trailing_metadata() or ())["pgsluice-sqlstate"] == "0A000"
    elif transport == "batch":
        batch = await stub.Batch(pb.BatchRequest(statements=[pb.QueryRequest(sql=sql),
                                                             pb.QueryRequest(sql="SELECT 2")]),
                                 metadata=AUTH, timeout=10)
        assert batch.items[0].error.sqlstate == "0A000", batch
        assert _plain(batch.items[1].result.rows[0].values[0]) == 2
    elif transport == "querystream":
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [chunk async for chunk in stub.QueryStream(pb.QueryRequest(sql=sql), metadata=AUTH, timeout=10)]
        assert dict(info.value.trailing_metadata() or ())["pgsluice-sqlstate"] == "0A000"
    else:
        call = stub.Session(metadata=AUTH, timeout=10)
        await call.write(pb.SessionRequest(id=1, query=pb.QueryRequest(sql=sql)))
        await call.write(pb.SessionRequest(id=2, query=pb.QueryRequest(sql="SELECT 2")))
        await call.done_writing()
        answers = {a.id: a async for a in call}
        assert answers[1].WhichOneof("outcome") == "error" and answers[1].error.sqlstate == "0A000", answers
        assert _plain(answers[2].result.rows[0].values[0]) == 2
        assert await call.code() == grpc.StatusCode.OK
    ok = await stub.Query(pb.QueryRequest(sql="SELECT 3"), metadata=AUTH, timeout=5)
    assert _plain(ok.rows[0].values[0]) == 3


async def test_burst_of_point_reads_is_served_batched(pg: EmbeddedPostgres, door: tuple[ProxyHandle, int],
                                                      stub: Any) -> None:
    """Point reads of one shape arriving while the first is in flight run as one batch: their
    replies say BATCHED (the first, which ran alone, EXECUTED) and carry each one's own row."""
    proxy, _ = door
    sql = "SELECT v, id FROM items WHERE id = $1"
    lock = await asyncpg.connect(pg.dsn(database=DB))
    admin = await asyncpg.connect(proxy.dsn(database="pgsluice"), statement_cache_size=0)
    try:
        async with lock.transaction():
            await lock.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            async def read(key: int) -> Any:
                return await stub.Query(pb.QueryRequest(sql=sql, params=[pb.Value(int64=key)]), metadata=AUTH)

            calls = [asyncio.create_task(read(150))]

            async def lock_waiter() -> bool:
                return bool(await lock.fetchval("SELECT count(*) FROM pg_stat_activity WHERE "
                                                "wait_event_type = 'Lock' AND datname = $1", DB))

            await wait_until_async(lock_waiter, timeout=10, message="the first read waits for the lock")
            calls += [asyncio.create_task(read(k)) for k in (151, 152, 153, 999)]

            async def queued() -> bool:
                rows = await admin.fetch("SHOW CLIENTS")
                return sum(1 for r in rows if r["peer"].startswith("internal") and r["state"] == "waiting") \
                    >= 4

            await wait_until_async(queued, timeout=10, message="four reads queued")
        replies = await asyncio.gather(*calls)
    finally:
        await admin.close()
        await lock.close()
    assert [r.served for r in replies] == [pb.EXECUTED] + [pb.BATCHED] * 4
    assert [[_plain(v) for v in row.values] for r in replies for row in r.rows] == \
        [["v150", 150], ["v151", 151], ["v152", 152], ["v153", 153]]
    assert replies[-1].command_tag == "SELECT 0"
