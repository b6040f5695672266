"""InternalClient: a door without a socket goes through the same pipeline as the wire door
(cache, single-flight, writes bumping versions, errors) — what the gRPC door will use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.base.config import Config
from proxy.ops.embedded import EmbeddedPostgres
from proxy.ops.server import Server
from proxy.pipeline.internal import InternalClient
from tests import cachedb

DB = "internaltest"


@pytest.fixture
async def server(pg: EmbeddedPostgres) -> AsyncIterator[Server]:
    cachedb.create(pg, DB)
    srv = Server(Config(upstream=pg.dsn(), listen="127.0.0.1:0", metrics_listen="", grpc_listen="",
                        workers=1))
    await srv.start()
    srv.planner_for(DB)
    for _ in range(200):  # catalog facts and change feed, as a first client would wait for
        feed = srv.cache.feeds.get(DB) if srv.cache is not None else None
        if srv.planners[DB].catalog.loaded and feed is not None and feed.up:
            break
        await asyncio.sleep(0.05)
    yield srv
    await srv.shutdown(timeout=1)


async def test_same_rows_as_postgres_and_cached_on_repeat(pg: EmbeddedPostgres, server: Server) -> None:
    client = InternalClient(server, "postgres", DB, password="postgres", application_name="internal-agent")
    direct = await asyncpg.connect(pg.dsn(database=DB))
    try:
        sql = "SELECT id, v, NULL::text AS nothing FROM items WHERE id = ANY($1::int[]) ORDER BY id"
        first = await client.query(sql, ["{5,6}"])
        assert first.error is None and first.served == "executed"
        assert [c.name for c in first.columns] == ["id", "v", "nothing"]
        assert [c.type_oid for c in first.columns] == [23, 25, 25]
        want = [[str(r["id"]).encode(), r["v"].encode(), None]
                for r in await direct.fetch(sql.replace("$1::int[]", "'{5,6}'::int[]"))]
        assert first.rows == want and first.tag == "SELECT 2"
        again = await client.query(sql, ["{5,6}"])
        assert again.served == "cache" and again.rows == want
        # a write through the pipeline is seen by the next read
        assert (await client.query("UPDATE items SET v = 'internal' WHERE id = 5")).tag == "UPDATE 1"
        after = await client.query(sql, ["{5,6}"])
        assert after.served == "executed" and after.rows[0][1] == b"internal"
        assert server.stats.agents["internal-agent"].hits >= 1
    finally:
        client.close()
        await direct.close()


async def test_errors_come_back_with_their_fields(server: Server) -> None:
    client = InternalClient(server, "postgres", DB, password="postgres")
    try:
        bad = await client.query("SELECT * FROM no_such_table")
        assert bad.error is not None and bad.error["C"] == "42P01"
        ok = await client.query("SELECT 1 AS one")  # the session goes on after an error
        assert ok.rows == [[b"1"]]
    finally:
        client.close()


async def test_identical_queries_from_internal_clients_coalesce(pg: EmbeddedPostgres, server: Server) -> None:
    clients = [InternalClient(server, "postgres", DB, password="postgres") for _ in range(10)]
    try:
        before = int(pg.psql("SELECT coalesce((SELECT last_value FROM leader_runs WHERE is_called), 0)",
                             db=DB).strip())
        first = asyncio.ensure_future(clients[0].query("SELECT slow_answer(8)"))
        await asyncio.sleep(0.2)
        replies = await asyncio.gather(first, *(c.query("SELECT slow_answer(8)") for c in clients[1:]))
        assert all(r.rows == [[b"16"]] for r in replies)
        assert sorted(r.served for r in replies) == ["coalesced"] * 9 + ["executed"]
        after = int(pg.psql("SELECT last_value FROM leader_runs", db=DB).strip())
        assert after - before == 1
    finally:
        for c in clients:
            c.close()


async def test_send_wire_keeps_the_messages_and_the_limits(server: Server) -> None:
    """send(wire=True): the reply's own RowDescription/DataRow/CommandComplete bytes, answered
    synchronously from cache; max_rows and max_bytes cut what is kept; the transaction status."""
    client = InternalClient(server, "postgres", DB, password="postgres")
    try:
        sql = "SELECT id, v FROM items WHERE id <= $1 ORDER BY id"
        first = await client.send(sql, ["3"], wire=True)
        assert first.error is None and first.tag == "SELECT 3" and first.rows == []
        assert first.wire[:1] == b"T" and first.wire.count(b"D\x00") == 3
        assert first.wire.endswith(b"SELECT 3\x00")
        again = client.send(sql, ["3"], wire=True)
        assert again.done() and again.result().served == "cache"  # no task, no wait
        assert again.result().wire == first.wire
        cut = await client.send(sql, ["3"], wire=True, max_rows=2)
        assert cut.truncated and cut.wire.count(b"D\x00") == 2 and cut.tag == "SELECT 3"
        big = await client.send("SELECT g, repeat('z', 1000) FROM generate_series(1, 500) g", wire=True,
                                max_bytes=100_000)
        assert big.oversize and b"D\x00" not in big.wire and big.tag == "SELECT 500"
        huge = await client.send("SELECT repeat('q', 5000000) AS q", wire=True)  # arrives in pieces
        assert huge.wire.count(b"q") >= 5_000_000 and huge.tag == "SELECT 1"
        assert (await client.send("BEGIN", wire=True)).status == "T"
        assert (await client.send("SELECT 1/0", wire=True)).status == "E"
        assert (await client.send("ROLLBACK", wire=True)).status == "I"
        pending = client.send("SELECT pg_sleep(5)", wire=True)
        with pytest.raises(RuntimeError):
            client.send("SELECT 1")  # one request at a time
        client.close()
        with pytest.raises(ConnectionError):
            await pending  # a request in flight hears that its client closed
    finally:
        client.close()
