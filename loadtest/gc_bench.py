"""Full-collection pauses against cache size: how long CPython's full garbage collection stops
pgsluice's event loop (every request waits for it) once the cache holds N entries.

    python -m loadtest.gc_bench [--before TREE] [--sizes 20000,80000,160000] [--json out.json]

One worker (its cache 1 GiB, so nothing is evicted), an embedded PostgreSQL with the change
feed. Per step, the next ids of a 1-row-per-id table are read twice each from 8 connections
(`SELECT id, v FROM gc_bench WHERE id = $1` prepared for even ids, the same with a literal
over the simple protocol for odd ids): a miss that fills the entry, then a hit that leaves
the fast path's alias. Then loadtest/gc_probe.py runs three full collections inside the proxy:
printed are the median pause, the objects the collector tracks, and SHOW CACHE's entries.
With --before (another checkout with its own .venv), the same steps run there first, and
the last column is the ratio of the pauses (before / this checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

from cache.feed import install
from loadtest import benchrun, run_script
from loadtest.passthrough import REPO_ROOT, upstream
from loadtest.pgbench import Endpoint
from loadtest.pgbouncer import free_port, stop_process, wait_for_port

CONNECTIONS = 8


@contextlib.contextmanager
def proxy(tree: Path, up: Endpoint) -> Iterator[tuple[Endpoint, int]]:
    """pgsluice from `tree` (with its .venv, or this interpreter for this checkout), under the
    probe; yields its endpoint and the probe's port."""
    port, probe_port = free_port(), free_port()
    python = sys.executable if tree == REPO_ROOT else str(tree / ".venv" / "bin" / "python")
    cmd = [python, str(REPO_ROOT / "loadtest" / "gc_probe.py"), "serve", "--upstream", up.dsn(),
           "--listen", f"127.0.0.1:{port}", "--workers", "1", "--pool-max-size", "8",
           "--cache-max-bytes", str(1 << 30), "--metrics-listen", "", "--grpc-listen", ""]
    with tempfile.TemporaryDirectory(prefix="pgsluice-gc-bench-") as tmp:
        log = Path(tmp) / "pgsluice.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=tree, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    env={**os.environ, "GC_PROBE_PORT": str(probe_port)},
                                    start_new_session=True)
        try:
            wait_for_port("127.0.0.1", port, proc, 30, "pgsluice")
            yield Endpoint("127.0.0.1", port, up.user, up.password, up.database), probe_port
        finally:
            if proc.poll() is not None:
                print(log.read_text(errors="replace")[-3000:], flush=True)
            stop_process(proc)


def collect(probe_port: int) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", probe_port), timeout=60) as conn:
        return dict(json.loads(conn.makefile().readline()))


async def fill(dsn: str, start: int, end: int) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(CONNECTIONS)]
    ids = iter(range(start, end))

    async def worker(conn: asyncpg.Connection) -> None:
        for n in ids:
            for _ in range(2):  # a miss, then a hit that leaves the alias
                if n % 2:
                    await conn.execute(f"SELECT id, v FROM gc_bench WHERE id = {n}")
                else:
                    await conn.fetch("SELECT id, v FROM gc_bench WHERE id = $1", n)

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            await c.close()


async def entries(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int({r[0]: r[1] for r in await conn.fetch("SHOW CACHE")}.get("entries", 0))
    finally:
        await conn.close()


async def prepare(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP TABLE IF EXISTS gc_bench")
        await conn.execute("CREATE TABLE gc_bench AS SELECT g AS id, 'value ' || g AS v"
                           f" FROM generate_series(0, {rows - 1}) g")
        await conn.execute("ALTER TABLE gc_bench ADD PRIMARY KEY (id)")
        await install(conn)
    finally:
        await conn.close()


def measure(tree: Path, up: Endpoint, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    with proxy(tree, up) as (ep, probe_port):
        asyncio.run(entries(ep.dsn()))  # the planner and the feed of the database start
        time.sleep(2)
        done = 0
        for size in [0, *sizes]:
            asyncio.run(fill(ep.dsn(), done, size))
            done = size
            probes = [collect(probe_port) for _ in range(3)]
            row = {"ids": size, "entries": asyncio.run(entries(ep.dsn())),
                   "full_ms": round(statistics.median(p["full_ms"] for p in probes), 1),
                   "tracked": int(statistics.median(p["tracked"] for p in probes))}
            print(f"  {tree.name or tree}: {row}", flush=True)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", help="a scratch database (default: an embedded PostgreSQL)")
    ap.add_argument("--before", type=Path, help="another checkout (with .venv) to compare with")
    ap.add_argument("--sizes", default="20000,80000,160000", help="cumulative ids read, per step")
    ap.add_argument("--json")
    args = ap.parse_args()
    command = benchrun.start("loadtest.gc_bench")
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = {"this": REPO_ROOT}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    results: dict[str, list[dict[str, Any]]] = {}
    with upstream(args.upstream) as (up, _):
        asyncio.run(prepare(up.dsn(), max(sizes)))
        for name, tree in trees.items():
            results[name] = measure(tree, up, sizes)
    print("\nfull collection pause (median of 3), objects the collector tracks; "
          f"load {benchrun.loadavg()}")
    print(f"{'ids read':>9} {'entries':>8}" + "".join(f" {n + ' ms':>10} {n + ' tracked':>14}" for n in trees)
          + ("  before/this" if len(trees) == 2 else ""))
    for i, size in enumerate([0, *sizes]):
        line = f"{size:>9} {results['this'][i]['entries']:>8}"
        for name in trees:
            line += f" {results[name][i]['full_ms']:>10} {results[name][i]['tracked']:>14}"
        if len(trees) == 2:
            line += f"  {results['before'][i]['full_ms'] / max(results['this'][i]['full_ms'], 0.01):>10.1f}x"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_script(main)
