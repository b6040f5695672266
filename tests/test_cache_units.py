"""The cache's building blocks: the byte-bounded local tier and single-flight."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from cache.local import ENTRY_OVERHEAD, LocalCache
from cache.singleflight import SingleFlight
from proxy.embedded import EmbeddedPostgres


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_bounded_in_bytes() -> None:
    cache = LocalCache(max_bytes=3 * (100 + ENTRY_OVERHEAD), max_entry=150)
    for k in "abc":
        assert cache.put(k, b"x" * 100)
    assert cache.get("a") == b"x" * 100  # a is now the most recent
    assert cache.put("d", b"y" * 100)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.stats.evictions == 1 and cache.stats.bytes == 3 * (100 + ENTRY_OVERHEAD)
    assert not cache.put("big", b"z" * 151) and cache.stats.too_large == 1
    assert cache.put("a", b"w" * 10)  # replacing frees the old bytes
    assert cache.stats.bytes == 2 * (100 + ENTRY_OVERHEAD) + 10 + ENTRY_OVERHEAD


def test_ttl_and_max_age() -> None:
    clock = Clock()
    cache = LocalCache(ttl=60, clock=clock)
    cache.put("k", b"v")
    clock.now += 10
    assert cache.get("k") == b"v"
    assert cache.get("k", max_age=5) is None  # too old for this caller
    assert cache.get("k") == b"v"  # still there for others
    clock.now += 50
    assert cache.get("k") is None and cache.stats.expired == 1 and len(cache) == 0


async def test_thousand_identical_reads_run_once(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn(), timeout=10)
    flight: SingleFlight[int] = SingleFlight()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        return int(await conn.fetchval("SELECT count(*) FROM pg_class, pg_sleep(0.2)"))

    try:
        results = await asyncio.gather(*(flight.run("key", work) for _ in range(1000)))
    finally:
        await conn.close()
    assert runs == 1
    assert len({value for value, _ in results}) == 1
    assert sum(joined for _, joined in results) == 999
    assert flight.stats.leaders == 1 and flight.stats.joined == 999 and not flight.in_flight("key")


async def test_failure_reaches_every_waiter(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn(), timeout=10)
    flight: SingleFlight[int] = SingleFlight()

    async def work() -> int:
        await asyncio.sleep(0.05)
        return int(await conn.fetchval("SELECT 1/0"))

    try:
        results = await asyncio.gather(*(flight.run("k", work) for _ in range(50)), return_exceptions=True)
    finally:
        await conn.close()
    assert all(isinstance(r, asyncpg.DivisionByZeroError) for r in results)
    assert len({id(r) for r in results}) == 1  # the same error object
    assert flight.stats.leaders == 1


async def test_a_leaving_waiter_cancels_nobody() -> None:
    flight: SingleFlight[str] = SingleFlight()
    gate = asyncio.Event()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "done"

    leader = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    others = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    leader.cancel()  # the first caller's client went away
    others[0].cancel()
    await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await leader
    with pytest.raises(asyncio.CancelledError):
        await others[0]
    assert [await t for t in others[1:]] == [("done", True), ("done", True)]
    assert runs == 1
