"""How many agents each target sustains: `pgsluice load --find-max` against direct PostgreSQL,
PgBouncer (transaction mode) and pgsluice, in one run, on the same machine.

    python -m loadtest.agents_bench [--profile agent-explore] [--rate 100] [--duration 10] \\
        [--scale 1] [--pool-size 8] [--upstream postgresql://...] [--json out.json] [--report out.html]

The profile's schema (loadtest/sample.py: the sample schema unless the profile names another)
is (re)created and pgsluice's change feed installed in the target database, so point
--upstream only at a scratch database. Without it an embedded PostgreSQL is started. Agents
reach PgBouncer 1.18 without asyncpg's statement cache (no prepared statements in transaction
mode before 1.21); direct Postgres and pgsluice are reached as asyncpg users do by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

from loadtest import load, run_script
from loadtest.cache_bench import prepare, server
from loadtest.passthrough import pgbouncer, pgsluice
from loadtest.pgbench import Endpoint
from loadtest.pgbouncer import free_port
from loadtest.profiles import load_profile

TARGETS = ("direct", "pgbouncer", "pgsluice")


def target_args(name: str, up: Endpoint, pool_size: int, stack: contextlib.ExitStack,
                workers: int = 1) -> list[str]:
    """`pgsluice load` arguments for one target, starting its pooler (stopped with `stack`):
    `direct`, `pgbouncer` or a name starting with `pgsluice` (`workers` processes, /metrics on)."""
    if name == "direct":
        return ["--target", f"direct={up.dsn()}"]
    if name == "pgbouncer":
        ep, _pid = stack.enter_context(pgbouncer(up, pool_size, []))
        return ["--target", f"pgbouncer={ep.dsn()}?statement_cache_size=0"]
    if not name.startswith("pgsluice"):
        raise ValueError(f"unknown target {name!r}")
    mport = free_port()
    ep, _pid = stack.enter_context(pgsluice(up, pool_size, extra=(
        "--metrics-listen", f"127.0.0.1:{mport}", "--max-client-conn", "5000", "--workers", str(workers))))
    return ["--target", f"{name}={ep.dsn()}", "--metrics", f"{name}=http://127.0.0.1:{mport}/metrics"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.agents_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", help="a scratch database (default: an embedded PostgreSQL)")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--profile", default="agent-explore")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per find-max step")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--pool-size", type=int, default=8, help="server connections of PgBouncer and pgsluice")
    p.add_argument("--processes", type=int, default=1, help="generator processes")
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--max-agents", type=int, default=1024)
    p.add_argument("--json", type=Path)
    p.add_argument("--report", type=Path)
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(TARGETS):
        p.error(f"unknown targets {set(targets) - set(TARGETS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    print("command: " + shlex.join([sys.executable, "-m", "loadtest.agents_bench", *sys.argv[1:]]))
    print(f"cores: {os.cpu_count()}, loadavg before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    schema = load_profile(args.profile).schema
    with server(args.upstream) as (up, _bin), contextlib.ExitStack() as stack:
        watched, _pgss = asyncio.run(prepare(up, args.scale, schema))
        print(f"upstream {up.host}:{up.port}/{up.database}: {schema} schema scale {args.scale}, change feed "
              f"on {watched} tables; PgBouncer and pgsluice pool size {args.pool_size}", flush=True)
        cmd = [arg for name in targets for arg in target_args(name, up, args.pool_size, stack)]
        cmd += ["--profile", args.profile, "--rate", str(args.rate), "--duration", str(args.duration),
                "--warmup", str(args.warmup), "--find-max", "--slo-ms", str(args.slo_ms),
                "--max-agents", str(args.max_agents), "--processes", str(args.processes)]
        if args.json:
            cmd += ["--json", str(args.json)]
        if args.report:
            cmd += ["--report", str(args.report)]
        return load.main(cmd)


if __name__ == "__main__":
    run_script(main)
