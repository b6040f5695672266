"""TLS cost benchmark: what TLS adds per connection and per cached point read, through pgsluice
and, for reference, straight to PostgreSQL.

    python -m loadtest.tls_bench [--connections 200] [--clients 4] [--seconds 5] [--json out.json]

One PostgreSQL with ssl = on (Debian's server binaries: the embedded wheel has no OpenSSL;
without them the direct TLS rows are left out) and one pgsluice (one worker, a throw-away
certificate, plain towards Postgres) serve four targets: pgsluice plain / TLS and direct plain /
TLS, all with asyncpg and SCRAM. Handshake: connections opened one after another (connect, log
in, SELECT 1, close), ms per connection and pgsluice's CPU per connection. Point reads: --clients
connections each reading 50 hot rows of `customers` in a closed loop, so through pgsluice every
read after the first pass is a cache hit; queries/s, latency and pgsluice's CPU per query.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

from loadtest import run_script
from loadtest.passthrough import cpu_seconds, pgsluice
from loadtest.pgbench import Endpoint
from loadtest.sample import schema_sql

POINT = "SELECT id, name, country FROM customers WHERE id = $1"
HOT = 50


@dataclass
class Row:
    target: str
    tls: bool
    connect_ms_p50: float | None = None
    connect_ms_p99: float | None = None
    connect_cpu_ms: float | None = None  # pgsluice's CPU per connection
    qps: float | None = None
    query_us_p50: float | None = None
    query_us_p99: float | None = None
    query_cpu_us: float | None = None  # pgsluice's CPU per query
    error: str | None = None


@contextmanager
def postgres(folder: Path) -> Iterator[tuple[Endpoint, bool]]:
    """A PostgreSQL with ssl = on when a build with OpenSSL is installed; (endpoint, has TLS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from proxy.ops.certs import Authority
        from proxy.ops.embedded import EmbeddedPostgres, system_bin_dir
    bin_dir = system_bin_dir()
    pair = Authority().issue("postgres", ["127.0.0.1"])
    pg = EmbeddedPostgres(folder / "data", bin_dir=bin_dir, tls=(pair.cert, pair.key) if bin_dir else None,
                          extra_conf={"max_connections": "300"})
    try:
        pg.start()
        yield Endpoint(pg.host, pg.port, pg.user, pg.password, "postgres"), bin_dir is not None
    finally:
        pg.stop()


def _ssl(tls: bool) -> ssl.SSLContext | bool:
    if not tls:
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # encryption as sslmode=require: no CA check
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


async def _connect(ep: Endpoint, tls: bool) -> asyncpg.Connection:
    return await asyncpg.connect(host=ep.host, port=ep.port, user=ep.user, password=ep.password,
                                 database=ep.database, ssl=_ssl(tls))


async def handshakes(ep: Endpoint, tls: bool, n: int, pid: int | None) -> tuple[float, float, float | None]:
    await (await _connect(ep, tls)).close()  # warm: pools, auth query connection, caches
    times = []
    cpu0 = cpu_seconds(pid)
    for _ in range(n):
        started = time.perf_counter()
        conn = await _connect(ep, tls)
        await conn.fetchval("SELECT 1")
        await conn.close()
        times.append((time.perf_counter() - started) * 1000)
    cpu1 = cpu_seconds(pid)
    cpu = (cpu1 - cpu0) * 1000 / n if cpu0 is not None and cpu1 is not None else None
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1], cpu


async def point_reads(ep: Endpoint, tls: bool, clients: int, seconds: float,
                      pid: int | None) -> tuple[float, float, float, float | None]:
    conns = [await _connect(ep, tls) for _ in range(clients)]
    for conn in conns:  # warm: prepared statements, and every hot row in the cache
        for key in range(1, HOT + 1):
            await conn.fetchrow(POINT, key)
    latencies: list[float] = []

    async def run(conn: asyncpg.Connection, offset: int, deadline: float) -> None:
        key = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await conn.fetchrow(POINT, key % HOT + 1)
            latencies.append(time.perf_counter() - started)
            key += 1

    cpu0 = cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(run(c, i * 7, started + seconds) for i, c in enumerate(conns)))
    elapsed = time.perf_counter() - started
    cpu1 = cpu_seconds(pid)
    for conn in conns:
        await conn.close()
    latencies.sort()
    n = len(latencies)
    cpu = (cpu1 - cpu0) * 1e6 / n if cpu0 is not None and cpu1 is not None else None
    return n / elapsed, latencies[n // 2] * 1e6, latencies[int(n * 0.99) - 1] * 1e6, cpu


async def measure(target: str, ep: Endpoint, tls: bool, args: argparse.Namespace, pid: int | None) -> Row:
    row = Row(target, tls)
    try:
        row.connect_ms_p50, row.connect_ms_p99, row.connect_cpu_ms = await handshakes(
            ep, tls, args.connections, pid)
        row.qps, row.query_us_p50, row.query_us_p99, row.query_cpu_us = await point_reads(
            ep, tls, args.clients, args.seconds, pid)
    except (OSError, asyncpg.PostgresError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(rows: list[Row]) -> None:
    print(f"\n{'target':<10} {'TLS':<4} {'connect p50':>12} {'p99':>8} {'CPU/conn':>9} "
          f"{'reads/s':>9} {'read p50':>9} {'p99':>8} {'CPU/read':>9}")
    print(f"{'':<10} {'':<4} {'ms':>12} {'ms':>8} {'ms':>9} {'':>9} {'µs':>9} {'µs':>8} {'µs':>9}")
    for r in rows:
        if r.error:
            print(f"{r.target:<10} {'yes' if r.tls else 'no':<4} error: {r.error}")
            continue
        print(f"{r.target:<10} {'yes' if r.tls else 'no':<4} {fmt(r.connect_ms_p50):>12} "
              f"{fmt(r.connect_ms_p99):>8} {fmt(r.connect_cpu_ms):>9} {fmt(r.qps, ',.0f'):>9} "
              f"{fmt(r.query_us_p50, '.0f'):>9} {fmt(r.query_us_p99, '.0f'):>8} "
              f"{fmt(r.query_cpu_us, '.1f'):>9}")
    by = {(r.target, r.tls): r for r in rows if not r.error}
    for target in ("pgsluice", "direct"):
        plain, tls = by.get((target, False)), by.get((target, True))
        if plain and tls and plain.connect_ms_p50 and tls.connect_ms_p50 and plain.query_us_p50 \
                and tls.query_us_p50:
            print(f"TLS adds, {target}: {tls.connect_ms_p50 - plain.connect_ms_p50:+.2f} ms per connection "
                  f"(p50), {tls.query_us_p50 - plain.query_us_p50:+.0f} µs per read (p50)"
                  + (f", {tls.query_cpu_us - plain.query_cpu_us:+.1f} µs of pgsluice CPU per read"
                     if tls.query_cpu_us is not None and plain.query_cpu_us is not None else ""))
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end; "
          "the client, pgsluice and PostgreSQL share this machine.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.tls_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=200, help="connections opened per target")
    p.add_argument("--clients", type=int, default=4, help="connections reading at once")
    p.add_argument("--seconds", type=float, default=5.0, help="point reads per target")
    p.add_argument("--json", help="write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cache.feed import INSTALL
    from proxy.ops.certs import make_server_files

    with tempfile.TemporaryDirectory(prefix="pgsluice-tls-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # Postgres may run as another OS user
        with postgres(folder) as (up, pg_tls):
            asyncio.run(_setup(up, schema_sql(1) + INSTALL))
            files = make_server_files(folder / "certs", ["127.0.0.1"])
            rows: list[Row] = []
            with pgsluice(up, 8, extra=("--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                                        "--server-tls-mode", "disable", "--metrics-listen", "",
                                        "--grpc-listen", "")) as (ep, pid):
                for tls in (False, True):
                    rows.append(asyncio.run(measure("pgsluice", ep, tls, args, pid)))
            for tls in (False, True) if pg_tls else (False,):
                rows.append(asyncio.run(measure("direct", up, tls, args, None)))
    print(f"python {platform.python_version()}, {args.connections} connections, {args.clients} clients "
          f"x {args.seconds:g} s of point reads per target")
    report(rows)
    if not pg_tls:
        print("direct TLS left out: no PostgreSQL built with OpenSSL here "
              "(Debian: apt-get install postgresql)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 1 if any(r.error for r in rows) else 0


async def _setup(up: Endpoint, sql: str) -> None:
    conn = await _connect(up, False)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    run_script(main)
