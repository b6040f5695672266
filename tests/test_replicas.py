"""Read replicas with causal reads (issue 15), against a real primary and two streaming replicas
made with pg_basebackup -R from the same binaries; `slow` replays 300 ms late
(recovery_min_apply_delay), so a read routed without regard to write positions sees the past.

Each test names the mechanism it checks; removing that mechanism makes it fail (checked once
by hand, see the commit message).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests.conftest import _start_proxy, _stop_proxies, make_traversable_tmpdir
from tests.util import ProxyHandle

TABLES = 20  # one per writer: a table's write position is what its reads wait for
_CONF = {"shared_preload_libraries": "pg_stat_statements", "synchronous_commit": "on",
         "wal_receiver_status_interval": "1s"}


@dataclass
class Cluster:
    primary: EmbeddedPostgres
    fast: EmbeddedPostgres
    slow: EmbeddedPostgres
    logs: Path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = make_traversable_tmpdir("pgsluice-replicas-")
    primary = EmbeddedPostgres(base / "primary", extra_conf=_CONF)
    servers = [primary]
    try:
        primary.start()
        from cache.feed import INSTALL
        primary.psql("CREATE EXTENSION pg_stat_statements;"
                     + "".join(f"CREATE TABLE kv{i} (id int PRIMARY KEY, v int); INSERT INTO kv{i} "
                               "SELECT g, 0 FROM generate_series(1, 10) g;" for i in range(TABLES))
                     + "CREATE TABLE static (id int PRIMARY KEY, v text);"
                       "INSERT INTO static SELECT g, 'original' FROM generate_series(1, 100) g;")
        primary.psql(INSTALL)
        fast = primary.replica(base / "fast")
        slow = primary.replica(base / "slow", extra_conf={"recovery_min_apply_delay": "300ms"})
        for replica in (fast, slow):
            servers.append(replica)
            replica.start()
        logs = base / "logs"
        logs.mkdir()
        yield Cluster(primary, fast, slow, logs)
    finally:
        for server in reversed(servers):
            server.stop()
        import shutil
        shutil.rmtree(base, ignore_errors=True)


def _proxy(cluster: Cluster, started: list[ProxyHandle], *args: str) -> ProxyHandle:
    return _start_proxy(cluster.primary, cluster.logs, started, "--replicas",
                        f"{cluster.fast.dsn()},{cluster.slow.dsn()}", *args)


@pytest.fixture
def proxies(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[list[ProxyHandle]]:
    from tests.conftest import request_failed
    started: list[ProxyHandle] = []
    yield started
    _stop_proxies(started, request_failed(request))


async def _admin(proxy: ProxyHandle, command: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(proxy.dsn(database="pgsluice"))
    try:
        return list(await conn.fetch(command))
    finally:
        await conn.close()


async def _replicas(proxy: ProxyHandle) -> dict[str, asyncpg.Record]:
    return {r["server"]: r for r in await _admin(proxy, "SHOW REPLICAS")}


async def _stat(proxy: ProxyHandle, name: str) -> int:
    return next(int(r["value"]) for r in await _admin(proxy, "SHOW STATS") if r["stat"] == name)


async def _wait_rotation(proxy: ProxyHandle, cluster: Cluster, want: tuple[str, ...] = ("up", "up")) -> None:
    names = (f"127.0.0.1:{cluster.fast.port}", f"127.0.0.1:{cluster.slow.port}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = await _replicas(proxy)
        if tuple(rows[n]["state"] if n in rows else "" for n in names) == want:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"replicas not {want}: {await _replicas(proxy)}")


def _calls(server: EmbeddedPostgres, like: str) -> int:
    out = server.psql(f"SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE '{like}'")
    return int(out.strip() or 0)


# ---- read your writes ----------------------------------------------------------------------------

async def _pairs(proxy: ProxyHandle, table: int, n: int, cache: bool) -> tuple[int, int]:
    """`n` write-then-read pairs on one table; (old values read, reads)."""
    conn = await asyncpg.connect(proxy.dsn())
    stale = 0
    try:
        for i in range(1, n + 1):
            await conn.execute(f"UPDATE kv{table} SET v = $1 WHERE id = 1", i)
            if random.random() < 0.5:  # let the replicas catch up now and then
                await asyncio.sleep(random.random() * 0.02)
            if await conn.fetchval(f"SELECT v FROM kv{table} WHERE id = 1") != i:
                stale += 1
            if cache and await conn.fetchval(f"SELECT v FROM kv{table} WHERE id = 1") != i:
                stale += 1
    finally:
        await conn.close()
    return stale, n


@pytest.mark.parametrize("cache", [False, True], ids=["cache-off", "cache-on"])
async def test_read_your_writes_asyncpg(cluster: Cluster, proxies: list[ProxyHandle], cache: bool) -> None:
    """2,000 write-then-read pairs (20 connections, a table each): no old value. Mechanism: the
    commit's WAL position, read before the client sees the commit (tracking.commit ->
    Replicas.record); without it the reads go to the replica 300 ms behind. With the cache on,
    each read is a miss filled from wherever it ran (the write moved its version), then read
    again: a fill from a replica that had not replayed the write would be served again."""
    proxy = _proxy(cluster, proxies, "--cache" if cache else "--no-cache")
    await _wait_rotation(proxy, cluster)
    def on_replicas() -> int:
        return _calls(cluster.fast, "SELECT v FROM kv%") + _calls(cluster.slow, "SELECT v FROM kv%")

    before = on_replicas()
    results = await asyncio.gather(*(_pairs(proxy, t, 100, cache) for t in range(TABLES)))
    stale = sum(s for s, _ in results)
    assert sum(n for _, n in results) == 2000
    assert stale == 0, f"{stale} reads returned the past"
    assert on_replicas() > before, "no read went to a replica: the test proves nothing"
    assert await _stat(proxy, "write_positions_own") >= 2000


async def test_read_your_writes_across_workers(cluster: Cluster, proxies: list[ProxyHandle]) -> None:
    """Two workers: a write through one connection, then a read through another (on either
    worker). Mechanism: the write positions in shared memory (SharedLsns)."""
    proxy = _start_proxy(cluster.primary, cluster.logs, proxies, "--replicas",
                         f"{cluster.fast.dsn()},{cluster.slow.dsn()}", "--no-cache",
                         env={"PGSLUICE_WORKERS": "2"})
    await _wait_rotation(proxy, cluster)

    async def pairs(table: int) -> int:
        writer, reader = await asyncpg.connect(proxy.dsn()), await asyncpg.connect(proxy.dsn())
        stale = 0
        try:
            for i in range(1, 101):
                await writer.execute(f"UPDATE kv{table} SET v = $1 WHERE id = 3", i)
                if random.random() < 0.5:
                    await asyncio.sleep(random.random() * 0.02)
                stale += await reader.fetchval(f"SELECT v FROM kv{table} WHERE id = 3") != i
        finally:
            await writer.close()
            await reader.close()
        return stale

    stale = sum(await asyncio.gather(*(pairs(t) for t in range(10))))
    assert stale == 0, f"{stale} reads returned the past"
    assert await _stat(proxy, "workers_reporting") == 2


def test_read_your_writes_psql(cluster: Cluster, proxies: list[ProxyHandle]) -> None:
    """500 pairs in one psql session (simple protocol), a pause after some of them."""
    proxy = _proxy(cluster, proxies, "--no-cache")
    asyncio.run(_wait_rotation(proxy, cluster))
    script = []
    for i in range(1, 501):
        script.append(f"UPDATE kv0 SET v = {i} WHERE id = 2;\nSELECT 'v=' || v FROM kv0 WHERE id = 2;\n")
        if i % 5 == 0:
            script.append("\\! sleep 0.01\n")
    res = subprocess.run([str(cluster.primary.bin_dir / "psql"), "-X", "-A", "-t", "-q", proxy.dsn()],
                         input="".join(script), capture_output=True, text=True, timeout=300, check=True)
    seen = [int(line[2:]) for line in res.stdout.splitlines() if line.startswith("v=")]
    assert seen == list(range(1, 501))


async def test_writes_seen_through_the_change_feed(cluster: Cluster, proxies: list[ProxyHandle]) -> None:
    """A write made on the primary directly, then, once pgsluice has the feed's notice, a read
    through pgsluice: never the old value. Mechanism: the feed's position (Runtime._feed_change
    -> Replicas.record, before the versions move)."""
    proxy = _proxy(cluster, proxies)  # the cache on: the read bypasses it (max_staleness=0)
    await _wait_rotation(proxy, cluster)
    direct = await asyncpg.connect(cluster.primary.dsn())
    conn = await asyncpg.connect(proxy.dsn())
    stale = replica_reads = 0
    try:
        for i in range(1, 301):
            seen = await _stat(proxy, "write_positions_feed")
            await direct.execute("UPDATE kv1 SET v = $1 WHERE id = 1", i)
            deadline = time.monotonic() + 10
            while await _stat(proxy, "write_positions_feed") == seen:
                assert time.monotonic() < deadline, "the feed's notice never came"
                await asyncio.sleep(0.002)
            before = sum(r["reads"] for n, r in (await _replicas(proxy)).items() if n != "primary")
            if random.random() < 0.5:
                await asyncio.sleep(random.random() * 0.02)
            if await conn.fetchval("/* pgsluice: max_staleness=0 */ SELECT v FROM kv1 WHERE id = 1") != i:
                stale += 1
            after = sum(r["reads"] for n, r in (await _replicas(proxy)).items() if n != "primary")
            replica_reads += after - before
    finally:
        await direct.close()
        await conn.close()
    assert stale == 0, f"{stale} reads returned the past"
    assert replica_reads > 0, "no read went to a replica: the test proves nothing"


# ---- routing -------------------------------------------------------------------------------------

async def test_reads_spread_over_replicas_and_hints_keep_the_primary(cluster: Cluster,
                                                                      proxies: list[ProxyHandle]) -> None:
    """Plain reads go to the replicas (least outstanding first); writes, the primary hint,
    SET pgsluice.route = primary and read-write transactions stay on the primary."""
    proxy = _proxy(cluster, proxies, "--no-cache")
    await _wait_rotation(proxy, cluster)
    # pg_stat_statements counts by shape (aliases and constants do not count): one shape each
    shapes = {"plain": "max(id)", "hint": "min(id)", "set": "sum(id)", "txn": "avg(id)", "ro": "count(v)"}

    def calls(server: EmbeddedPostgres, what: str) -> int:
        return _calls(server, f"SELECT {shapes[what]} FROM static%")

    servers = (cluster.primary, cluster.fast, cluster.slow)
    before = {(i, what): calls(server, what) for i, server in enumerate(servers) for what in shapes}

    async def reader() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            for _ in range(100):
                await conn.fetchval("SELECT max(id) FROM static")
                await conn.fetchval("SELECT min(id) FROM static /* pgsluice: primary */")
            await conn.execute("SET pgsluice.route = primary")
            for _ in range(20):
                await conn.fetchval("SELECT sum(id) FROM static")
            await conn.execute("RESET pgsluice.route")
            async with conn.transaction():
                await conn.fetchval("SELECT avg(id) FROM static")
            async with conn.transaction(readonly=True):
                await conn.fetchval("SELECT count(v) FROM static")
        finally:
            await conn.close()

    await asyncio.gather(*(reader() for _ in range(8)))
    got = {(i, what): calls(server, what) - before[i, what] for i, server in enumerate(servers)
           for what in shapes}
    assert got[1, "plain"] > 0 and got[2, "plain"] > 0, got
    assert sum(got[i, "plain"] for i in range(3)) == 800
    assert (got[0, "hint"], got[0, "set"], got[0, "txn"]) == (800, 160, 8), got
    assert got[1, "ro"] + got[2, "ro"] == 8, got


# ---- health --------------------------------------------------------------------------------------

async def test_a_replica_stopped_mid_load(cluster: Cluster, proxies: list[ProxyHandle]) -> None:
    """The fast replica stops under a read load and comes back: clients see at most their
    in-flight reads fail, with SQLSTATE 08006, keep their connections, and the replica is read
    again once it is back."""
    proxy = _proxy(cluster, proxies, "--no-cache")
    await _wait_rotation(proxy, cluster)
    fast = f"127.0.0.1:{cluster.fast.port}"
    stop = asyncio.Event()
    errors: list[str] = []
    done = 0

    async def reader() -> None:
        nonlocal done
        conn = await asyncpg.connect(proxy.dsn())
        try:
            while not stop.is_set():
                try:
                    # long enough (~20 ms) that some are running when the replica stops
                    await conn.fetchval("SELECT count(*) FROM generate_series(1, 200000)")
                    done += 1
                except asyncpg.PostgresError as exc:
                    errors.append(exc.sqlstate)
        finally:
            await conn.close()

    tasks = [asyncio.create_task(reader()) for _ in range(6)]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(cluster.fast.stop)
    await _wait_rotation(proxy, cluster, ("down", "up"))
    during = done
    await asyncio.sleep(1.0)
    assert done > during, "reads stopped while a replica was down"
    await asyncio.to_thread(cluster.fast.start)
    await _wait_rotation(proxy, cluster)
    reads = (await _replicas(proxy))[fast]["reads"]
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)  # a client error other than those below fails here
    assert (await _replicas(proxy))[fast]["reads"] > reads, "the replica is not read again"
    assert set(errors) <= {"08006"}, errors
    assert len(errors) <= 6, f"{len(errors)} errors for 6 clients"


async def test_a_promoted_replica_is_not_read(cluster: Cluster, proxies: list[ProxyHandle]) -> None:
    """The fast replica is promoted (and then written to directly): out of rotation within a
    second, and no read through pgsluice ever sees what was written there. Mechanism: the
    pg_is_in_recovery() check of the replica's poll."""
    proxy = _proxy(cluster, proxies, "--no-cache")
    await _wait_rotation(proxy, cluster)
    fast = f"127.0.0.1:{cluster.fast.port}"
    await asyncio.to_thread(cluster.fast.promote)
    await asyncio.to_thread(cluster.fast.psql, "UPDATE static SET v = 'diverged' WHERE id = 1")
    started = time.monotonic()
    await _wait_rotation(proxy, cluster, ("promoted", "up"))
    assert time.monotonic() - started < 2.0
    reads = (await _replicas(proxy))[fast]["reads"]
    conn = await asyncpg.connect(proxy.dsn())
    try:
        values = [await conn.fetchval("SELECT v FROM static WHERE id = 1") for _ in range(300)]
    finally:
        await conn.close()
    assert "diverged" not in values
    assert (await _replicas(proxy))[fast]["reads"] == reads
