"""The randomized differential test of invalidation (tests/differential.py), seeded and short
for CI: one pgsluice; two instances sharing a real Redis; two workers sharing memory. Every
read through pgsluice is compared with the same read made directly on Postgres after every
write, through pgsluice or straight to Postgres (then seen through the change feed).

The long recorded run (docs/benchmarks.md, "Invalidation") uses the same code:
    python -m tests.differential --direct DSN --proxy DSN --writes 2000 --seed N --setup
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests.differential import Differential
from tests.redisproc import RedisServer
from tests.util import ProxyFactory, ProxyHandle

WRITES = 120  # about 4,000 operations per configuration


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def _run(pg: EmbeddedPostgres, database: str, proxies: list[ProxyHandle], seed: int) -> None:
    pg.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE); CREATE DATABASE {database};")
    run = Differential(pg.dsn(database=database), [p.dsn(database=database) for p in proxies], seed)
    run.setup()
    try:
        stats = run.run(WRITES)
    finally:
        run.close()
    assert stats.mismatches == []
    assert stats.reads > 3000 and stats.direct_writes > 10
    # answered from cache often, or nothing is tested. SHOW STATS sums the workers (SHOW CACHE
    # counts the one a connection lands on, which may hold none of the run's connections)
    distinct = {id(p): p for p in proxies}.values()
    totals = [_admin_stats(p) for p in distinct]
    hits = sum(float(t["cache_hits"]) for t in totals)
    assert hits > (stats.reads - stats.burst_reads) // 20
    # bursts of point reads were batched (burst batching, issue 16): some, or nothing is tested
    batched = sum(float(t["batched_reads"]) for t in totals)
    assert stats.burst_reads >= WRITES * 8 and batched > stats.burst_reads // 10, (batched, stats.burst_reads)


def _admin_stats(proxy: ProxyHandle) -> dict[str, str]:
    conn = psycopg2.connect(proxy.dsn(database="pgsluice"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW STATS")
            return {str(k): str(v) for k, v in cur.fetchall()}
    finally:
        conn.close()


def test_one_instance(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    _run(pg, "diff_one", [proxy_factory()], seed=11)


def test_two_instances_sharing_redis(pg: EmbeddedPostgres, proxy_factory: ProxyFactory,
                                     redis_server: RedisServer) -> None:
    a = proxy_factory("--redis", redis_server.url, "--redis-timeout-ms", "200")
    b = proxy_factory("--redis", redis_server.url, "--redis-timeout-ms", "200")
    _run(pg, "diff_redis", [a, b], seed=12)


def test_two_workers_sharing_memory(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(env={"PGSLUICE_WORKERS": "2"})
    # two connections of each kind: the kernel spreads them over the workers
    _run(pg, "diff_workers", [proxy, proxy], seed=13)
