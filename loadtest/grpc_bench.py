"""Cached Query calls over the gRPC door vs the same query over the wire door, in one run.

    python -m loadtest.grpc_bench [--duration 10] [--concurrency 16]

Embedded Postgres with the sample schema and the change feed; pgsluice (one worker) with an
agent token. The same cached point read (`SELECT * FROM orders WHERE id = $1`, 1,000 keys)
is issued by `concurrency` coroutines for `duration` seconds through asyncpg (wire door,
extended protocol) and through proxy.client.SluiceClient (gRPC door). Both clients run in
this one Python process, so the figures include each client library's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from loadtest.cache_bench import prepare, server
from loadtest.passthrough import pgsluice
from loadtest.pgbouncer import free_port
from proxy.client import SluiceClient

SQL = "SELECT * FROM orders WHERE id = $1"


async def drive(call: Callable[[int], Awaitable[object]], concurrency: int,
                seconds: float) -> tuple[int, float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await call(rng.randint(1, 1000))
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(i) for i in range(concurrency)))
    latencies.sort()
    return len(latencies), latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0


async def measure(dsn: str, target: str, args: argparse.Namespace) -> dict[str, float]:
    pool = await asyncpg.create_pool(dsn, min_size=args.concurrency, max_size=args.concurrency)
    client = SluiceClient(target, token="bench-token")
    try:
        async def wire(key: int) -> object:
            return await pool.fetch(SQL, key)

        async def grpc(key: int) -> object:
            return await client.query(SQL, key)

        out: dict[str, float] = {}
        for name, call in (("wire", wire), ("grpc", grpc)):
            await drive(call, args.concurrency, 2.0)  # warm-up: every key cached
            calls, p99 = await drive(call, args.concurrency, args.duration)
            out[f"{name}_qps"], out[f"{name}_p99_ms"] = calls / args.duration, p99
            print(f"  {name:<5} {calls / args.duration:>10.1f} calls/s  p99 {p99:.3f} ms", flush=True)
        return out
    finally:
        await pool.close()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.grpc_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    print(f"command: {' '.join([sys.executable, '-m', 'loadtest.grpc_bench', *sys.argv[1:]])}\n"
          f"cores: {os.cpu_count()}  loadavg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with server(None) as (up, _bin), tempfile.TemporaryDirectory() as tmp:
        asyncio.run(prepare(up, 1))
        config = Path(tmp) / "pgsluice.toml"
        config.write_text(f'[pgsluice.agents.bench]\ntoken = "bench-token"\nuser = "{up.user}"\n'
                          f'password = "{up.password}"\ndatabase = "{up.database}"\n')
        port = free_port()
        with pgsluice(up, 10, extra=("--config", str(config), "--grpc-listen", f"127.0.0.1:{port}",
                                     "--metrics-listen", "")) as (ep, _pid):
            time.sleep(1.0)  # catalog and change feed
            result = asyncio.run(measure(ep.dsn(), f"127.0.0.1:{port}", args))
    print(f"\ngrpc/wire calls per second: {result['grpc_qps'] / result['wire_qps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
