"""Agents that write: issue 12's mix through Postgres, PgBouncer, pgpool-II's query cache and pgsluice.

    python -m loadtest.writes_bench [--duration 10] [--warmup 3] [--modes simple,extended] \\
        [--find-max] [--upstream postgresql://u:p@127.0.0.1:5432/scratch] [--json out.json]

An embedded PostgreSQL (pg_stat_statements preloaded; database `shop`) gets the shop schema
(loadtest/sample.py: customers <- orders <- order_items -> products, plain foreign keys,
10,000 customers, 200 products, 50,000 orders, 100,000 items at --scale 1) and pgsluice's
change feed. pgbench then runs the same weighted scripts, the same clients and duration after
the same warm-up, against each target in turn (each pooler runs only while it is measured):

- direct: Postgres itself;
- pgbouncer: PgBouncer (/usr/sbin/pgbouncer), transaction mode, --pool-size connections;
- pgpool: pgpool-II (/usr/sbin/pgpool, Debian's pgpool2) with its in-memory query cache in shared
  memory, invalidated per table by the writes that pass through it (one child and one backend
  connection per client: it has no transaction pooling);
- pgsluice, pgsluice-w2: pgsluice with one worker and with two, in-process cache, no Redis,
  --pool-size connections per worker.

Workloads: `writes` (5 % `UPDATE customers SET last_seen = now() WHERE id = :id`, ids uniform;
35 % point reads of customers by id that do not read last_seen, customer ids Zipf s=1.1; 12 %
catalog look-ups; 24 % one customer's recent orders; 10 % one customer's order count and total;
6 % one customer's totals per product category, order_items joined with products; 6 % status
counts over all orders; 2 % `SELECT now()`) and `no-writes` (the same reads without the
UPDATEs). Category totals over all 100,000 items take 40-65 ms on the 2-core VM: at any share,
direct Postgres could not hold one agent at 100 queries/s within a 50 ms p99, so the join is
per customer (under a millisecond) and the heaviest statement is the status count (~10 ms).
Every transaction is one statement. "reached PG" is what Postgres executed of them
(pg_stat_statements deltas) over what pgbench completed; "hit %" is pgsluice's hits / (hits +
misses) from its /metrics (summed over workers) and pgpool-II's num_cache_hits /
(num_cache_hits + num_selects) from SHOW POOL_CACHE; "pooler CPU" is the CPU time of all the
pooler's processes per transaction.

--find-max also runs `pgsluice load --find-max` with the `agent-writes` profile (the same mix)
against direct Postgres and pgsluice: the agents each sustains at --rate queries/s per agent
within a --slo-ms p99. With --upstream (a scratch database: its tables are replaced) no
embedded server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest import agents_bench, benchrun, load, run_script
from loadtest.benchrun import loadavg
from loadtest.cache_bench import prepare, psql_rows, server
from loadtest.passthrough import fmt, pgbouncer, pgsluice, tree_cpu_seconds, versions
from loadtest.pgbench import Endpoint, PgbenchResult, find_pg_tool, pgbench_scripts
from loadtest.pgbouncer import free_port
from loadtest.pgpool import PgPool, pgpool_version

TARGETS = ("direct", "pgbouncer", "pgpool", "pgsluice", "pgsluice-w2")
WORKERS = {"pgsluice": 1, "pgsluice-w2": 2}
PROFILE = "agent-writes"  # loadtest/profiles/agent-writes.toml: the same mix for `pgsluice load`
# pg_stat_statements texts (constants normalized to $n) of the statements of both workloads
PGSS_MATCH = r"^\s*(select|update)\M.*\m(customers|orders|order_items|products|information_schema|now)\M"
Counters = Callable[[], dict[str, float]]


def workloads(scale: int) -> dict[str, list[tuple[str, int]]]:
    """name -> [(pgbench script, weight)]; the weights are percentages of the `writes` mix."""
    n = 10_000 * scale
    zipf = f"\\set c random_zipfian(1, {n}, 1.1)\n"
    reads = [
        (f"{zipf}SELECT id, name, email, country FROM customers WHERE id = :c;\n", 35),
        *((f"SELECT column_name, data_type FROM information_schema.columns WHERE table_name = '{t}'\n"
           "  ORDER BY ordinal_position;\n", 3) for t in ("customers", "orders", "order_items", "products")),
        (f"{zipf}SELECT id, status, ordered_at, total FROM orders WHERE customer_id = :c\n"
         "  ORDER BY ordered_at DESC LIMIT 5;\n", 24),
        (f"{zipf}SELECT count(*), sum(total) FROM orders WHERE customer_id = :c;\n", 10),
        ("SELECT status, count(*) FROM orders GROUP BY status ORDER BY 1;\n", 6),
        (f"{zipf}SELECT p.category, sum(oi.qty), sum(oi.qty * oi.price) FROM orders o\n"
         "  JOIN order_items oi ON oi.order_id = o.id JOIN products p ON p.id = oi.product_id\n"
         "  WHERE o.customer_id = :c GROUP BY 1 ORDER BY 1;\n", 6),
        ("SELECT now();\n", 2),
    ]
    update = f"\\set id random(1, {n})\nUPDATE customers SET last_seen = now() WHERE id = :id;\n"
    return {"writes": [(update, 5), *reads], "no-writes": reads}


def prefill_script(scale: int) -> str:
    """Every read of the mix in one transaction, its customer uniform: run about three times
    per customer through a caching target before its first measured run (--prefill), so that
    the run measures a warm cache, not the Zipf tail's first reads (which a 10 s run is still
    filling, and which no write causes)."""
    n = 10_000 * scale
    body = "".join(script.split("\n", 1)[1] for script, _ in workloads(scale)["no-writes"]
                   if ":c" in script)  # (the others are a handful of texts: the warm-up reads them)
    return f"\\set c random(1, {n})\n{body}"


@dataclass
class Row:
    workload: str
    mode: str
    target: str
    ok: bool
    tps: float | None = None
    avg_ms: float | None = None
    p99_ms: float | None = None
    transactions: int | None = None
    reached_pg: float | None = None  # statements Postgres executed / transactions (1 statement each)
    hit_ratio: float | None = None
    cache: dict[str, float] = field(default_factory=dict)  # the cache's counters over the run
    cpu_us: float | None = None  # the pooler's CPU (user + system, all its processes) per transaction
    error: str | None = None
    command: str | None = None


def pgss_calls(psql: Path, up: Endpoint) -> int:
    sql = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE toplevel AND dbid = "
           "(SELECT oid FROM pg_database WHERE datname = current_database()) "
           f"AND query ~* '{PGSS_MATCH}'")  # fmt: skip
    return int(psql_rows(psql, up, sql)[0][0])


@contextlib.contextmanager
def endpoint(target: str, up: Endpoint, psql: Path, args: argparse.Namespace
             ) -> Iterator[tuple[Endpoint, int | None, Counters | None]]:
    """Start one target: (where pgbench connects, the pooler's pid, its cache counters)."""
    if target == "direct":
        yield up, None, None
    elif target == "pgbouncer":
        with pgbouncer(up, args.pool_size, args.modes) as (ep, pid):
            yield ep, pid, None
    elif target == "pgpool":
        with PgPool(upstream_host=up.host, upstream_port=up.port, user=up.user, password=up.password,
                    children=args.clients + 2) as pool:  # fmt: skip
            ep = Endpoint(pool.host, pool.port, up.user, up.password, up.database)

            def show_pool_cache() -> dict[str, float]:  # num_cache_hits | num_selects | ...
                row = psql_rows(psql, ep, "SHOW POOL_CACHE")[0]
                return {"hits": float(row[0]), "selects": float(row[1])}

            try:
                yield ep, pool.proc.pid if pool.proc else None, show_pool_cache
            finally:
                if errors := pool.errors():
                    print(f"  pgpool-II logged {len(errors)} errors, the first: {errors[0]}", flush=True)
    else:
        mport, workers = free_port(), WORKERS[target]
        flags = ("--workers", str(workers), "--metrics-listen", f"127.0.0.1:{mport}")
        with pgsluice(up, args.pool_size, extra=flags) as (ep, pid):
            def metrics() -> dict[str, float]:
                if workers > 1:  # the other workers' counters reach /metrics once a second
                    time.sleep(1.5)
                return load.scrape(f"http://127.0.0.1:{mport}/metrics")

            yield ep, pid, metrics


def hit_ratio(target: str, d: dict[str, float]) -> float | None:
    hits = d.get("hits", 0.0)
    total = hits + (d.get("selects", 0.0) if target == "pgpool" else d.get("misses", 0.0))
    return hits / total if total else None


@dataclass
class Run:
    """What one pass needs: the tools, Postgres (for pg_stat_statements) and the target."""

    pgbench: Path
    psql: Path
    up: Endpoint
    pgss: bool
    target: str
    ep: Endpoint
    pid: int | None
    counters: Counters | None


def one_pass(args: argparse.Namespace, r: Run, workload: str, mode: str, logs: Path) -> Row:
    """Warm up, then one measured pgbench run of a workload, with what it cost and reached."""
    mix = workloads(args.scale)[workload]

    def pgbench(seconds: int, log: Path | None) -> tuple[list[str], PgbenchResult, list[float]]:
        return pgbench_scripts(r.pgbench, r.ep, mix, clients=args.clients, jobs=args.jobs, seconds=seconds,
                               mode=mode, log_prefix=log)

    if args.warmup:
        pgbench(args.warmup, None)
    before = r.counters() if r.counters else {}
    calls, cpu = (pgss_calls(r.psql, r.up) if r.pgss else 0), tree_cpu_seconds(r.pid)
    cmd, res, lat = pgbench(args.duration, logs / "txn")
    cpu_after = tree_cpu_seconds(r.pid)
    row = Row(workload, mode, r.target, res.ok and bool(lat), res.tps, transactions=res.transactions,
              command=shlex.join(cmd))
    if lat:
        lat.sort()
        row.avg_ms = sum(lat) / len(lat)
        row.p99_ms = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]
    if r.pgss and res.transactions:
        row.reached_pg = (pgss_calls(r.psql, r.up) - calls) / res.transactions
    if r.counters:
        after = r.counters()
        row.cache = {k: v - before.get(k, 0.0) for k, v in after.items()}
        row.hit_ratio = hit_ratio(r.target, row.cache)
    if cpu is not None and cpu_after is not None and res.transactions:
        row.cpu_us = (cpu_after - cpu) * 1e6 / res.transactions
    if not row.ok:
        row.error = "; ".join(res.errors) or ("no transaction log" if res.ok else "run failed")
    return row


def measure(args: argparse.Namespace, tools: tuple[Path, Path], up: Endpoint, pgss: bool,
            target: str) -> list[Row]:
    rows: list[Row] = []
    try:
        with endpoint(target, up, tools[1], args) as (ep, pid, counters), \
                tempfile.TemporaryDirectory(prefix="pgsluice-writes-bench-") as logs:
            run = Run(*tools, up, pgss, target, ep, pid, counters)
            if args.prefill and target not in ("direct", "pgbouncer"):
                n = 10_000 * args.scale
                started = time.monotonic()
                pgbench_scripts(run.pgbench, ep, [(prefill_script(args.scale), 1)], clients=args.clients,
                                jobs=args.jobs, seconds=600, transactions=-(-3 * n // args.clients))
                print(f"  {target}: prefilled ({3 * n:,} transactions of every read) in "
                      f"{time.monotonic() - started:.0f} s", flush=True)
            for mode in args.modes:
                for wl in args.workloads:
                    rows.append(row := one_pass(args, run, wl, mode, Path(logs)))
                    print(f"  {wl:<9} {mode:<8} {target:<11} {fmt(row.tps, 1):>10} tps"
                          f"{'' if row.ok else '  FAILED: ' + (row.error or '?')}", flush=True)
    except Exception as exc:  # a target that cannot start must not hide the others
        print(f"  {target}: could not run: {type(exc).__name__}: {exc}", flush=True)
        done = {(r.workload, r.mode) for r in rows}
        rows += [Row(w, m, target, False, error=f"{type(exc).__name__}: {exc}")
                 for m in args.modes for w in args.workloads if (w, m) not in done]  # fmt: skip
    return rows


def ratio(a: Row | None, b: Row | None) -> float | None:
    return a.tps / b.tps if a and b and a.ok and b.ok and a.tps and b.tps else None


def pct(x: float | None) -> str:
    return fmt(None if x is None else 100 * x, 1)


def report(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    find = {(r.workload, r.mode, r.target): r for r in rows}
    print(f"\n{'workload':<9} {'mode':<8} {'target':<11} {'tps':>9} {'avg ms':>7} {'p99 ms':>8} "
          f"{'x direct':>8} {'x pgpool':>8} {'reached PG %':>12} {'hit %':>6} {'pooler CPU us/txn':>17}")
    for r in rows:
        d, p = find.get((r.workload, r.mode, "direct")), find.get((r.workload, r.mode, "pgpool"))
        print(f"{r.workload:<9} {r.mode:<8} {r.target:<11} {fmt(r.tps, 1):>9} {fmt(r.avg_ms, 3):>7} "
              f"{fmt(r.p99_ms, 2):>8} {fmt(ratio(r, d), 2):>8} {fmt(ratio(r, p), 2):>8} "
              f"{pct(r.reached_pg):>12} {pct(r.hit_ratio):>6} {fmt(r.cpu_us, 1):>17}"
              + ("" if r.ok else f"   FAILED: {(r.error or '?').splitlines()[0][:80]}"))
    for r in rows:
        if r.cache:
            print(f"  {r.workload}/{r.mode} via {r.target}, cache counters over the run: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r.cache.items()))
    out: dict[str, dict[str, float | None]] = {}
    print()
    for wl, mode in dict.fromkeys((r.workload, r.mode) for r in rows):
        d, p = find.get((wl, mode, "direct")), find.get((wl, mode, "pgpool"))
        out[f"{wl}/{mode}"] = {f"{t}/{b}": ratio(find.get((wl, mode, t)), base)
                               for t in WORKERS for b, base in (("direct", d), ("pgpool", p))}  # fmt: skip
        line = "   ".join(f"{k} {fmt(v, 2)}" for k, v in out[f"{wl}/{mode}"].items())
        print(f"{wl + '/' + mode:<17} {line}")
    return out


def find_max(args: argparse.Namespace, up: Endpoint) -> dict[str, Any] | None:
    """`pgsluice load --find-max` with the agent-writes profile; its JSON (None if it failed)."""
    print(f"\nfind-max: {PROFILE} profile, {args.rate:g} queries/s per agent, p99 <= {args.slo_ms:g} ms, "
          f"{args.find_max_duration:g} s steps (+{args.find_max_warmup:g} s warm-up)", flush=True)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="pgsluice-findmax-") as tmp:
        cmd = [arg for name in args.find_max_targets
               for arg in agents_bench.target_args(name, up, args.pool_size, stack, WORKERS.get(name, 1))]
        out = Path(tmp) / "find-max.json"
        cmd += ["--profile", PROFILE, "--rate", str(args.rate), "--duration", str(args.find_max_duration),
                "--warmup", str(args.find_max_warmup), "--find-max", "--slo-ms", str(args.slo_ms),
                "--max-agents", str(args.max_agents), "--processes", "1", "--json", str(out)]
        status = load.main(cmd)
        if not out.exists():
            print(f"find-max: pgsluice load exited with status {status} and wrote no result", flush=True)
            return None
        data: dict[str, Any] = json.loads(out.read_text())
    caps = {name: cap["max_agents"] for name, cap in data.get("find_max", {}).items()}
    if caps.get("direct"):
        print("agents within the SLO, relative to direct Postgres: "
              + ", ".join(f"{n} {c / caps['direct']:.2f}x" for n, c in caps.items() if n != "direct"))
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.writes_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--upstream", help="a scratch database (default: an embedded PostgreSQL)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of %(default)s ('' = none)")
    p.add_argument("--workloads", default="writes,no-writes", help="comma list of %(default)s")
    p.add_argument("--modes", default="simple", help="pgbench -M: simple and/or extended (default simple)")
    p.add_argument("--clients", type=int, default=32, help="pgbench -c (default 32)")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--duration", type=int, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds before each run (default 3)")
    p.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="read every customer's rows about 3 times through each caching target (pgpool, "
                        "pgsluice) before its first run, so runs measure a warm cache (default on)")
    p.add_argument("--scale", type=int, default=1, help="shop schema scale (default 1)")
    p.add_argument("--pool-size", type=int, default=10, help="PgBouncer's and each pgsluice worker's pool")
    p.add_argument("--find-max", action="store_true", help=f"also run pgsluice load --find-max ({PROFILE})")
    p.add_argument("--find-max-targets", default="direct,pgsluice",
                   help="comma list of direct, pgbouncer, pgsluice, pgsluice-w2 (default %(default)s)")
    p.add_argument("--find-max-duration", type=float, default=10.0, help="seconds per find-max step")
    p.add_argument("--find-max-warmup", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=100.0, help="queries/s per agent (find-max)")
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 SLO (find-max)")
    p.add_argument("--max-agents", type=int, default=1024, help="find-max stops here")
    p.add_argument("--json", type=Path, help="also write all figures as JSON here")
    a = p.parse_args(argv)

    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    a.targets, a.workloads, a.modes = split(a.targets), split(a.workloads), split(a.modes)
    a.find_max_targets = split(a.find_max_targets)
    bad = ([t for t in a.targets if t not in TARGETS] + [w for w in a.workloads if w not in workloads(1)]
           + [m for m in a.modes if m not in ("simple", "extended")]
           + [t for t in a.find_max_targets if t not in ("direct", "pgbouncer", *WORKERS)])
    if bad:
        p.error(f"unknown target(s)/workload(s)/mode(s) {bad}")
    if min(a.duration, a.scale, a.pool_size, a.clients, a.jobs) < 1 or a.warmup < 0:
        p.error("--duration/--scale/--pool-size/--clients/--jobs must be >= 1, --warmup >= 0")
    if not a.targets and not a.find_max:
        p.error("nothing to run: no --targets and no --find-max")
    return a


@contextlib.contextmanager
def shop_server(dsn: str | None) -> Iterator[tuple[Endpoint, Path | None]]:
    """--upstream as is, else the embedded server's database `shop` (pgpool-II does not keep
    its connections to a database named postgres)."""
    with server(dsn) as (up, bin_dir):
        if not dsn:
            psql_rows(find_pg_tool("psql", bin_dir), up, "CREATE DATABASE shop")
            up = Endpoint(up.host, up.port, up.user, up.password, "shop")
        yield up, bin_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = benchrun.start("loadtest.writes_bench")
    with shop_server(args.upstream) as (up, bin_dir):
        tools = find_pg_tool("pgbench", bin_dir), find_pg_tool("psql", bin_dir)
        info = versions(*tools, up)
        info["pgpool"] = pgpool_version()
        for k, val in info.items():
            print(f"{k:>12}: {val}")
        started = time.monotonic()
        watched, pgss = asyncio.run(prepare(up, args.scale, "shop"))
        print(f"upstream {up.host}:{up.port}/{up.database}: shop schema scale {args.scale} loaded in "
              f"{time.monotonic() - started:.1f} s, change feed on {watched} tables, pg_stat_statements "
              f"{'on' if pgss else 'unavailable'}; {args.clients} clients, -j {args.jobs}, "
              f"{args.duration} s (+{args.warmup} s warm-up) per run, pool size {args.pool_size}",
              flush=True)  # fmt: skip
        rows = [r for t in args.targets for r in measure(args, tools, up, pgss, t)]
        ratios = report(rows) if rows else {}
        if rows:
            print(f"\nreached PG %: statements of the mix Postgres executed (pg_stat_statements) / "
                  f"transactions pgbench completed; hit %: the cache's hits / (hits + misses).\n"
                  f"Postgres, the poolers and pgbench share this {os.cpu_count()}-core machine; "
                  "loadavg now: " + loadavg())
        capacity = find_max(args, up) if args.find_max else None
    if args.json:
        doc = {"command": command, "versions": info, "pg_stat_statements": pgss,
               "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": [asdict(r) for r in rows], "ratios": ratios,
               "find_max": capacity}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in rows) and (capacity is not None or not args.find_max) else 1


if __name__ == "__main__":
    run_script(main)
