"""A connection storm: many more simultaneous connects than max_client_conn. About
max_client_conn get in (in total over workers), the rest get a prompt 53300, and those in
go on working."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest

from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_error_fields
from tests.util import ProxyFactory

LIMIT, CONNECTS = 60, 240
STARTUP = encode.startup_message({"user": "trusted_user", "database": "postgres"})  # trust: no password


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def one(host: str, port: int, go: asyncio.Event) -> tuple[str, Conn | None, float]:
    """('in' | SQLSTATE | 'closed', the open connection if in, seconds to the answer)."""
    reader, writer = await asyncio.open_connection(host, port)
    await go.wait()
    started = time.monotonic()
    writer.write(STARTUP)
    try:
        async with asyncio.timeout(30):
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack_from("!I", head, 1)[0] - 4)
                if head[0] == codes.B_READY_FOR_QUERY:
                    return "in", (reader, writer), time.monotonic() - started
                if head[0] == codes.B_ERROR_RESPONSE:
                    writer.close()
                    return parse_error_fields(body).get("C", "?"), None, time.monotonic() - started
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return "closed", None, time.monotonic() - started


async def storm(host: str, port: int) -> list[tuple[str, Conn | None, float]]:
    go = asyncio.Event()
    tasks = [asyncio.create_task(one(host, port, go)) for _ in range(CONNECTS)]
    await asyncio.sleep(0.5)  # every socket accepted, none logged in: the storm's worst moment
    go.set()
    return await asyncio.gather(*tasks)


async def query_works(conn: Conn) -> bool:
    reader, writer = conn
    writer.write(encode.query("SELECT 1"))
    while True:
        head = await reader.readexactly(5)
        await reader.readexactly(struct.unpack_from("!I", head, 1)[0] - 4)
        if head[0] == codes.B_READY_FOR_QUERY:
            return True


@pytest.mark.parametrize("workers", [1, 2])
async def test_storm_admits_about_max_client_conn(proxy_factory: ProxyFactory, workers: int) -> None:
    proxy = proxy_factory("--max-client-conn", str(LIMIT), env={"PGSLUICE_WORKERS": str(workers)})
    results = await storm(proxy.host, proxy.port)
    try:
        outcomes = [r[0] for r in results]
        admitted = outcomes.count("in")
        refused = outcomes.count("53300")
        assert admitted + refused == CONNECTS, sorted(set(outcomes))
        # one worker: exactly the limit; several: two may pass it at the same instant
        assert LIMIT - 5 <= admitted <= LIMIT + workers - 1, f"{admitted} admitted of {CONNECTS}"
        slowest_refusal = max(t for o, _, t in results if o == "53300")
        assert slowest_refusal < 10.0, f"a refusal took {slowest_refusal:.1f} s"
        async with asyncio.timeout(20):
            assert all(await asyncio.gather(*(query_works(c) for o, c, _ in results if c is not None)))
    finally:
        for _, conn, _ in results:
            if conn is not None:
                conn[1].close()
    # the places come back when the clients go
    await asyncio.sleep(0.5)
    again = await storm(proxy.host, proxy.port)
    assert LIMIT - 5 <= [r[0] for r in again].count("in") <= LIMIT + workers - 1
    for _, conn, _ in again:
        if conn is not None:
            conn[1].close()
