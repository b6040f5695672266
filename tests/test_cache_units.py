"""The cache's building blocks: the byte-bounded local tier and single-flight."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Hashable

import asyncpg
import pytest

from cache.keys import make_key
from cache.local import LocalCache, entry_size
from cache.singleflight import SingleFlight
from proxy.ops.embedded import EmbeddedPostgres


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_bounded_in_bytes() -> None:
    size = entry_size("a", b"x" * 100)
    cache = LocalCache(max_bytes=3 * size, max_entry=150)
    for k in "abc":
        assert cache.put(k, b"x" * 100)
    assert cache.get("a") == b"x" * 100  # a is now the most recent
    assert cache.put("d", b"y" * 100)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.stats.evictions == 1 and cache.stats.bytes == 3 * size
    assert not cache.put("big", b"z" * 151) and cache.stats.too_large == 1
    assert cache.put("a", b"w" * 10)  # replacing frees the old bytes
    assert cache.stats.bytes == 2 * size + entry_size("a", b"w" * 10)


def _key(i: int, extended: bool) -> Hashable:
    """A key as the wire door makes it: per session parts shared, per query parts its own."""
    fmt: Hashable = (b"X", b"", b"\x00\x01\x00\x00\x00\x06" + str(i).encode(), False) if extended else b"Q"
    return make_key("app", "alice", "", _SETTINGS, f"{i:016x}{i:016x}", (str(i), f"'name {i}'"), fmt,
                    ("gen-1", (3, i % 500)))


_SETTINGS = (("timezone", "SELECT pg_catalog.set_config('TimeZone', 'UTC', false)"),)


@pytest.mark.parametrize("payload", [16, 80, 600, 5000])
@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_max_bytes_bounds_what_the_cache_holds(payload: int, extended: bool) -> None:
    """Many distinct small results: what the cache holds in memory (keys, values, bookkeeping,
    measured by tracemalloc) stays within 20 % of max_bytes once it is full."""
    max_bytes = 4 * 1024 * 1024
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = LocalCache(max_bytes=max_bytes, max_entry=1 << 20)
        i = 0
        while cache.stats.evictions < 2000:
            cache.put(_key(i, extended), b"%d" % i + bytes(payload))
            i += 1
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.stats.bytes <= max_bytes
    assert 0.8 * max_bytes <= held <= 1.2 * max_bytes, f"holds {held / max_bytes:.2f} x max_bytes"


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
