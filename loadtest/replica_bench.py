"""Read replicas (issue 15): a read-heavy agent mix through pgsluice, cache off, against the
primary alone and against the primary with two streaming replicas.

    python -m loadtest.replica_bench [--clients 32] [--duration 10] [--warmup 2] [--json out.json]

An embedded primary (synchronous_commit on, as in production) gets `items` (100,000 rows)
and `notes`, pgsluice's change feed, and two replicas made with pg_basebackup -R from it.
asyncpg clients (closed loop, --clients connections) run each mix for --duration seconds
after --warmup, through pgsluice started with --no-cache (so Postgres does every read), first
without replicas, then with both:

- `writes-elsewhere`: 90 % reads of `items` (60 % a point read by id, 30 % count/sum over 500
  ids), 10 % `INSERT INTO notes` — the writes never touch what is read;
- `writes-same-table`: the same, but the writes are `UPDATE items SET v = v + 1 WHERE id = $1`:
  a read of `items` may go to a replica only once it has replayed the latest write.

Reported: queries/s, p50/p99 of reads and of writes (the writes pay one read of the primary's
WAL position before their client sees the commit), where the reads went (SHOW REPLICAS), the
CPU seconds each Postgres server (postmaster and its children) and pgsluice used, and the
load average. All servers, pgsluice and the clients share the machine's cores: on 2 cores
the absolute gain is bounded by that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from loadtest.passthrough import pgsluice, tree_cpu_seconds
from loadtest.pgbench import Endpoint
from proxy.ops.embedded import EmbeddedPostgres

MIXES = ("writes-elsewhere", "writes-same-table")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v int NOT NULL, payload text NOT NULL);
TRUNCATE items;
INSERT INTO items SELECT g, 0, repeat(md5(g::text), 4) FROM generate_series(1, 100000) g;
CREATE TABLE IF NOT EXISTS notes (id bigserial PRIMARY KEY, agent int, body text);
ANALYZE items;
"""


def postmaster_pid(server: EmbeddedPostgres) -> int:
    return int((server.datadir / "postmaster.pid").read_text().split()[0])


async def client(dsn: str, mix: str, stop: float, lat: dict[str, list[float]], seed: int) -> None:
    rnd = random.Random(seed)
    conn = await asyncpg.connect(dsn)
    try:
        while time.monotonic() < stop:
            x = rnd.random()
            started = time.perf_counter()
            if x < 0.10:
                if mix == "writes-elsewhere":
                    await conn.execute("INSERT INTO notes (agent, body) VALUES ($1, 'seen')", seed)
                else:
                    await conn.execute("UPDATE items SET v = v + 1 WHERE id = $1", rnd.randint(1, 100000))
                kind = "write"
            elif x < 0.70:
                await conn.fetchrow("SELECT id, v, payload FROM items WHERE id = $1", rnd.randint(1, 100000))
                kind = "read"
            else:
                low = rnd.randint(1, 99500)
                await conn.fetchrow("SELECT count(*), sum(v) FROM items WHERE id BETWEEN $1 AND $2",
                                    low, low + 500)
                kind = "read"
            lat[kind].append(time.perf_counter() - started)
    finally:
        await conn.close()


async def run(dsn: str, mix: str, clients: int, seconds: float) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {"read": [], "write": []}
    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(dsn, mix, stop, lat, i) for i in range(clients)))
    return lat


async def where(admin_dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return {r["server"]: int(r["reads"]) for r in await conn.fetch("SHOW REPLICAS")}
    except asyncpg.PostgresError:
        return {}
    finally:
        await conn.close()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def measure(args: argparse.Namespace, servers: list[EmbeddedPostgres], replicas: bool,
            mix: str) -> dict[str, Any]:
    primary = servers[0]
    extra = ["--no-cache", "--grpc-listen", "", "--metrics-listen", ""]
    if replicas:
        extra += ["--replicas", ",".join(s.dsn() for s in servers[1:])]
    with pgsluice(primary_endpoint(primary), args.pool_size, extra=tuple(extra)) as (ep, pid):
        dsn = ep.dsn()
        admin = dsn.rsplit("/", 1)[0] + "/pgsluice"
        time.sleep(1.0)  # the replicas' first polls
        asyncio.run(run(dsn, mix, args.clients, args.warmup))
        cpu0 = {s.datadir.name: tree_cpu_seconds(postmaster_pid(s)) for s in servers}
        proxy0 = tree_cpu_seconds(pid)
        reads0 = asyncio.run(where(admin))
        started = time.monotonic()
        lat = asyncio.run(run(dsn, mix, args.clients, args.duration))
        elapsed = time.monotonic() - started
        reads1 = asyncio.run(where(admin))
        cpu1 = {s.datadir.name: tree_cpu_seconds(postmaster_pid(s)) for s in servers}
        proxy1 = tree_cpu_seconds(pid)
    total = len(lat["read"]) + len(lat["write"])
    return {
        "mix": mix, "replicas": 2 if replicas else 0, "qps": round(total / elapsed),
        "read_p50_ms": round(pct(lat["read"], 0.5), 2), "read_p99_ms": round(pct(lat["read"], 0.99), 2),
        "write_p50_ms": round(pct(lat["write"], 0.5), 2), "write_p99_ms": round(pct(lat["write"], 0.99), 2),
        "reads_to": {k: v - reads0.get(k, 0) for k, v in reads1.items()},
        "pg_cpu_s": {k: round((cpu1[k] or 0) - (cpu0[k] or 0), 1) for k in cpu1},
        "pgsluice_cpu_s": round((proxy1 or 0) - (proxy0 or 0), 1),
        "seconds": round(elapsed, 1), "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def primary_endpoint(primary: EmbeddedPostgres) -> Endpoint:
    return Endpoint(primary.host, primary.port, primary.user, primary.password, "postgres")


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| mix | replicas | queries/s | read p50 / p99 ms | write p50 / p99 ms | reads went to "
             "(primary / replicas) | Postgres CPU s (primary, r1, r2) | pgsluice CPU s | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        to = r["reads_to"]
        went = "all primary" if not to else \
            f"{to.get('primary', 0)} / " + " + ".join(str(v) for k, v in to.items() if k != "primary")
        cpu = ", ".join(str(v) for v in r["pg_cpu_s"].values())
        lines.append(f"| {r['mix']} | {r['replicas']} | {r['qps']} | {r['read_p50_ms']} / {r['read_p99_ms']} "
                     f"| {r['write_p50_ms']} / {r['write_p99_ms']} | {went} | {cpu} | {r['pgsluice_cpu_s']} "
                     f"| {r['loadavg'][0]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="pgsluice-replica-bench-"))
    base.chmod(0o755)
    conf = {"synchronous_commit": "on", "shared_buffers": "128MB"}
    servers: list[EmbeddedPostgres] = []
    try:
        primary = EmbeddedPostgres(base / "primary", extra_conf=conf)
        servers.append(primary)
        primary.start()
        from cache.feed import INSTALL
        primary.psql(_SCHEMA + INSTALL)
        for name in ("r1", "r2"):
            replica = primary.replica(base / name)
            servers.append(replica)
            replica.start()
        rows = []
        for mix in args.mixes.split(","):
            for replicas in (False, True):
                row = measure(args, servers, replicas, mix)
                print(json.dumps(row), flush=True)
                rows.append(row)
        print(report(rows))
        print(f"command: python -m loadtest.replica_bench {' '.join(argv or sys.argv[1:])}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
