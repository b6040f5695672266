"""Burst batching (issue 16): uniform random point reads over a 1M-row table through Postgres,
PgBouncer and pgsluice with and without batching.

    python -m loadtest.batch_bench [--duration 10] [--clients 1,64,256] [--mode simple]
        [--rows 1000000] [--pool-size 20] [--upstream postgresql://u:p@127.0.0.1:5432/scratch]
        [--json out.json]

An embedded PostgreSQL (pg_stat_statements preloaded, max_connections 300) gets `kv` (id int
primary key, v text, n int) with --rows rows. pgbench runs `SELECT v, n FROM kv WHERE id = :id`
with :id uniform over the table, the same clients and duration, against each target in turn
(each pooler runs only while it is measured):

- direct: Postgres itself (one backend per client);
- pgbouncer: PgBouncer (/usr/sbin/pgbouncer, skipped when absent), transaction mode;
- pgsluice: pgsluice --no-batching;  pgsluice-batch: pgsluice (batching on, the default).
  Both with one worker, --pool-size server connections, and --cache-max-entry 1: no answer is
  ever stored, so nothing is answered from cache — only single-flight (identical keys in flight)
  and batching change what reaches Postgres.

"stmts/query" is what Postgres executed on kv (pg_stat_statements calls) over what pgbench
completed; p99 from pgbench's per-transaction log. The machine's load average is printed with
the figures: on a shared machine they are indicative only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest import run_script
from loadtest.cache_bench import psql_rows
from loadtest.passthrough import pgbouncer, pgsluice, upstream
from loadtest.pgbench import Endpoint, find_pg_tool, pgbench_scripts, psql_scalar
from loadtest.pgbouncer import PGBOUNCER_BIN

TARGETS = ("direct", "pgbouncer", "pgsluice", "pgsluice-batch")
SQL = "SELECT v, n FROM kv WHERE id = :id;"
_NO_STORE = ("--cache-max-entry", "1", "--no-cache-requires-feed")


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[tuple[Endpoint, Path | None]]:
    if dsn:
        with upstream(dsn) as got:
            yield got
        return
    from proxy.ops.embedded import EmbeddedPostgres
    with tempfile.TemporaryDirectory(prefix="pgsluice-batch-bench-pg-") as tmp:
        conf = {"shared_preload_libraries": "pg_stat_statements", "max_connections": "300"}
        pg = EmbeddedPostgres(Path(tmp) / "data", extra_conf=conf)
        try:
            pg.start()
            yield Endpoint(pg.host, pg.port, pg.user, pg.password, "postgres"), Path(pg.bin_dir)
        finally:
            pg.stop()


def prepare(psql: Path, ep: Endpoint, rows: int) -> None:
    psql_scalar(psql, ep, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; DROP TABLE IF EXISTS kv; "
                f"CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL); "
                f"INSERT INTO kv SELECT g, md5(g::text), g % 1000 FROM generate_series(1, {rows}) g; "
                "SELECT 1", timeout=600)
    psql_scalar(psql, ep, "VACUUM ANALYZE kv", timeout=600)


def kv_calls(psql: Path, ep: Endpoint) -> int:
    rows = psql_rows(psql, ep, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE "
                     "'%FROM kv WHERE id%'")
    return int(rows[0][0])


def target(name: str, up: Endpoint, args: argparse.Namespace
           ) -> contextlib.AbstractContextManager[tuple[Endpoint, int | None]]:
    if name == "direct":
        return contextlib.nullcontext((up, None))
    if name == "pgbouncer":
        return pgbouncer(up, args.pool_size, [args.mode])
    extra = _NO_STORE + (("--no-batching",) if name == "pgsluice" else ())
    return pgsluice(up, args.pool_size, extra=(*extra, "--max-client-conn", "2000"))


def p99(latencies: list[float]) -> float | None:
    if len(latencies) < 100:
        return None
    return statistics.quantiles(latencies, n=100)[98]


def measure(args: argparse.Namespace, psql: Path, pgbench: Path, up: Endpoint,
            name: str) -> list[dict[str, Any]]:
    out = []
    script = f"\\set id random(1, {args.rows})\n{SQL}\n"
    with target(name, up, args) as (ep, _pid), tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        pgbench_scripts(pgbench, ep, [(script, 1)], clients=8, jobs=2, seconds=args.warmup, mode=args.mode)
        for clients in args.clients:
            before = kv_calls(psql, up)
            load = os.getloadavg()[0]
            cmd, res, lat = pgbench_scripts(pgbench, ep, [(script, 1)], clients=clients, jobs=min(clients, 2),
                                            seconds=args.duration, mode=args.mode,
                                            log_prefix=Path(tmp) / f"{name}-{clients}")
            executed = kv_calls(psql, up) - before  # (its own text has the pattern as a $1)
            if not res.transactions and not res.errors:  # e.g. 256 logins took the whole run
                res.errors.append("no transaction completed")
            row = {"target": name, "clients": clients, "tps": res.tps, "p99_ms": p99(lat),
                   "mean_ms": statistics.fmean(lat) if lat else None, "transactions": res.transactions,
                   "stmts_per_query": executed / res.transactions if res.transactions else None,
                   "load_before": round(load, 2), "errors": res.errors[:2], "cmd": " ".join(cmd)}
            out.append(row)
            print(_line(row), flush=True)
    return out


def _line(r: dict[str, Any]) -> str:
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)
    return (f"  {r['target']:<15} {r['clients']:>4} clients  {f(r['tps'], ',.0f'):>8} tps  "
            f"p99 {f(r['p99_ms'], '.2f'):>7} ms  stmts/query {f(r['stmts_per_query'], '.3f'):>6}  "
            f"load {r['load_before']}" + (f"  ERRORS {r['errors']}" if r["errors"] else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    p.add_argument("--mode", default="simple", choices=("simple", "extended", "prepared"))
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--pool-size", type=int, default=20)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--upstream", default=None, help="a scratch database (its table kv is replaced)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    if "pgbouncer" in names and shutil.which(PGBOUNCER_BIN) is None and not Path(PGBOUNCER_BIN).exists():
        print("pgbouncer not installed: skipped", flush=True)
        names.remove("pgbouncer")
    rows: list[dict[str, Any]] = []
    with server(args.upstream) as (up, bin_dir):
        psql, pgbench = find_pg_tool("psql", bin_dir), find_pg_tool("pgbench", bin_dir)
        started = time.monotonic()
        prepare(psql, up, args.rows)
        print(f"kv: {args.rows:,} rows in {time.monotonic() - started:.0f} s; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; mode {args.mode}", flush=True)
        for name in names:
            rows += measure(args, psql, pgbench, up, name)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
    return 0 if all(not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    run_script(main)
