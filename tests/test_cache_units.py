"""The cache's building blocks: the byte-bounded local tier and single-flight."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Hashable

import asyncpg
import pytest

from cache.keys import make_key
from cache.local import SERIAL, LocalCache, entry_size
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


def _alias_of(cache: LocalCache, key: Hashable, holder: dict[Hashable, object], hid: int,
              alias_key: Hashable, size: int = 100) -> None:
    """What the fast path does: store an alias (a tuple led by the entry's serial), then tell
    the cache (proxy/pipeline/fastpath.remember)."""
    entry = cache.entry(key)
    assert entry is not None
    holder[alias_key] = (entry[SERIAL], b"reply", 0, None, ("t",), ("gen", (1,)), 0, 0, 1.0, 2.0)
    cache.alias(key, entry, hid, alias_key, size)


def test_aliases_leave_with_their_entry_and_only_theirs() -> None:
    cache = LocalCache()
    holder: dict[Hashable, object] = {}
    hid = cache.register(holder)
    cache.put("a", b"1")
    cache.put("b", b"2")
    bytes_ab = cache.stats.bytes
    _alias_of(cache, "a", holder, hid, b"raw-a")
    _alias_of(cache, "a", holder, hid, b"raw-x")
    _alias_of(cache, "b", holder, hid, b"raw-b")
    assert cache.stats.bytes == bytes_ab + 300
    _alias_of(cache, "b", holder, hid, b"raw-x")  # raw-x now answers from b
    cache.discard("a")
    assert set(holder) == {b"raw-b", b"raw-x"}, "a's own alias went, not the one b took over"
    cache.put("b", b"new")  # a new entry at b's key: b's aliases leave with the old one
    assert holder == {}
    assert cache.stats.bytes == entry_size("b", b"new")
    gone = cache.entry("b")
    assert gone is not None
    cache.discard("b")
    holder[b"late"] = (gone[SERIAL],)
    cache.alias("b", gone, hid, b"late", 100)  # the entry left meanwhile: so does the alias
    assert holder == {} and cache.stats.bytes == 0
    cache.put("c", b"3")
    _alias_of(cache, "c", holder, hid, b"raw-c")
    cache.unregister(hid)  # a holder that is gone is not touched any more
    cache.clear()
    assert holder and cache.stats.bytes == 0


def test_an_entry_hit_through_an_alias_gets_a_second_chance() -> None:
    size = entry_size("a", b"x" * 100)
    cache = LocalCache(max_bytes=3 * size + 100, max_entry=150)
    holder: dict[Hashable, object] = {}
    hid = cache.register(holder)
    for k in "abc":
        cache.put(k, b"x" * 100)
    _alias_of(cache, "a", holder, hid, b"raw-a")
    assert cache.get("b") and cache.get("c")  # a is the least recently used by key
    cache.touched.add(holder[b"raw-a"][0])  # type: ignore[index]  # a fast hit on a
    cache.put("d", b"y" * 100)
    assert cache.get("b") is None, "b went: a, hit through its alias, had a second chance"
    assert b"raw-a" in holder
    cache.put("e", b"z" * 100)  # c goes (a moved behind it)
    cache.put("f", b"z" * 100)  # a's second chance is spent
    assert cache.get("c") is None and holder == {} and cache.stats.evictions == 3
    assert [k for k in "abcdef" if cache.get(k) is not None] == ["d", "e", "f"]


def test_entries_and_aliases_are_not_tracked_by_the_collector() -> None:
    """A large cache must not lengthen CPython's full collections (a full collection walks every
    tracked object while every request waits): entries and aliases are plain tuples the
    collector stops tracking, whatever their number."""
    cache = LocalCache()
    holder: dict[Hashable, object] = {}
    hid = cache.register(holder)
    for i in range(2000):
        key = _key(i, extended=bool(i % 2))
        cache.put(key, b"%d" % i + bytes(200))
        _alias_of(cache, key, holder, hid, (b"P" + bytes(i), b"B%d" % i))
    for _ in range(3):  # a tuple is untracked once the tuples in it are (one level per pass)
        gc.collect()
    entries = [cache.entry(_key(i, extended=bool(i % 2))) for i in range(2000)]
    assert all(e is not None for e in entries)
    tracked = sum(map(gc.is_tracked, entries)) + sum(map(gc.is_tracked, holder.values())) \
        + sum(map(gc.is_tracked, holder))
    assert tracked == 0, f"{tracked} of 6000 entries, aliases and alias keys are tracked"


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
