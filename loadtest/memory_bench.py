"""Memory benchmark: pgsluice's resident memory (RSS) under many distinct query texts, per
cache_max_bytes. Each text is a distinct cached result; the cache fills, then evicts.

    python -m loadtest.memory_bench [--sizes 16,64,256] [--texts 300000] [--payload 500] [--json out.json]

One worker, an embedded PostgreSQL with the change feed installed; `--texts` distinct
simple-protocol queries (`SELECT <n> AS n, pad FROM mem_bench WHERE id = <n % 1000>`, a reply
of about `--payload` + 100 bytes) from 8 connections. Printed per size: RSS before the
queries and at the end (with its peak), and what SHOW CACHE says the cache holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import asyncpg

from cache.feed import install
from loadtest import run_script
from loadtest.passthrough import pgsluice, upstream

CONNECTIONS = 8


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def cache_rows(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0]: r[1] for r in await conn.fetch("SHOW CACHE")}
    finally:
        await conn.close()


async def drive(dsn: str, texts: int, pid: int) -> tuple[float, float]:
    """Send the texts; returns (peak RSS MB, seconds)."""
    conns = [await asyncpg.connect(dsn) for _ in range(CONNECTIONS)]
    peak = rss_mb(pid)
    started = time.monotonic()
    counter = iter(range(texts))

    async def worker(conn: asyncpg.Connection) -> None:
        for n in counter:
            await conn.execute(f"SELECT {n} AS n, pad FROM mem_bench WHERE id = {n % 1000}")

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        sampler.cancel()
        for c in conns:
            await c.close()
    return max(peak, rss_mb(pid)), time.monotonic() - started


async def prepare(dsn: str, payload: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS mem_bench")
        await conn.execute(f"CREATE TABLE mem_bench AS SELECT g AS id, repeat('x', {payload}) AS pad"
                           " FROM generate_series(0, 999) g")
        await conn.execute("ALTER TABLE mem_bench ADD PRIMARY KEY (id)")
        await install(conn)
    finally:
        await conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", help="a scratch database (default: an embedded PostgreSQL)")
    ap.add_argument("--sizes", default="16,64,256", help="cache_max_bytes values, MiB")
    ap.add_argument("--texts", type=int, default=300_000)
    ap.add_argument("--payload", type=int, default=500)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    print(f"load average {os.getloadavg()[0]:.2f}; {args.texts} distinct texts, payload {args.payload} B")
    with upstream(args.upstream) as (up, _):
        asyncio.run(prepare(up.dsn(), args.payload))
        for size in (int(s) for s in args.sizes.split(",")):
            extra = ("--cache-max-bytes", str(size << 20), "--metrics-listen", "", "--grpc-listen", "")
            with pgsluice(up, 8, extra=extra) as (ep, pid):
                assert pid is not None
                asyncio.run(cache_rows(ep.dsn()))  # the planner and the feed of the database start
                time.sleep(2)
                before = rss_mb(pid)
                peak, seconds = asyncio.run(drive(ep.dsn(), args.texts, pid))
                end = rss_mb(pid)
                rows = asyncio.run(cache_rows(ep.dsn()))
            row = {"cache_max_mib": size, "rss_before_mb": round(before, 1), "rss_end_mb": round(end, 1),
                   "rss_peak_mb": round(peak, 1), "cache_mb": round(int(rows.get("bytes", 0)) / 2**20, 1),
                   "entries": int(rows.get("entries", 0)), "seconds": round(seconds, 1),
                   "load_average": round(os.getloadavg()[0], 2)}
            results.append(row)
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
