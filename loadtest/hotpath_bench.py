"""The hot path (issue 13): what a cache hit and a passed-through query cost, side by side.

    python -m loadtest.hotpath_bench [--duration 10] [--warmup 3] [--json out.json]

Targets, one after another against the same embedded PostgreSQL (database `shop`, the shop
schema of loadtest/sample.py, pgsluice's change feed installed):

- dict: loadtest/dict_server.py, a uvloop server answering every request from a dict: the
  Python ceiling for a cache hit (it has no passthrough);
- direct: PostgreSQL itself;
- pgbouncer: PgBouncer (transaction mode; 1.18 has no prepared statements in that mode);
- pgpool: pgpool-II with its in-memory query cache (loadtest/pgpool.py);
- pgsluice: one worker, in-process cache, no Redis.

Workloads (pgbench, 32 clients and -j 2 unless said; ids Zipf s=1.1 over the customers):

- hit-simple / hit-extended / hit-prepared: `SELECT id, name, email, country FROM customers
  WHERE id = :id` in -M simple / extended / prepared: cached point reads (before the warm-up,
  each id is read about five times, uniformly, so the run measures hits);
- hit-1: the same, one client, -M simple: a hit's round trip;
- pass-32 / pass-1: `SELECT name, now() FROM customers WHERE id = :id` (ids uniform), which
  no cache may answer, 32 clients / one client (pass-32 first sends each text about five
  times, for every target: the run measures a proxy that has seen its texts before).

"CPU us" is the target's own CPU (user + system of all its processes, from /proc) per
transaction. The targets the issue set are checked at the end, as ratios from this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest import benchrun, run_script
from loadtest.benchrun import loadavg
from loadtest.cache_bench import cache_counters, prepare
from loadtest.passthrough import REPO_ROOT, fmt, pgbouncer, pgsluice, tree_cpu_seconds, versions
from loadtest.pgbench import Endpoint, PgbenchResult, find_pg_tool, pgbench_scripts
from loadtest.pgbouncer import free_port, stop_process, wait_for_port
from loadtest.pgpool import PgPool, pgpool_version
from loadtest.writes_bench import shop_server

TARGETS = ("dict", "direct", "pgbouncer", "pgpool", "pgsluice")
HIT = "\\set id random_zipfian(1, {n}, 1.1)\nSELECT id, name, email, country FROM customers WHERE id = :id;\n"
WARM = "\\set id random(1, {n})\nSELECT id, name, email, country FROM customers WHERE id = :id;\n"
PASS = "\\set id random(1, {n})\nSELECT name, now() FROM customers WHERE id = :id;\n"
# name -> (script, -M mode, clients)
WORKLOADS: dict[str, tuple[str, str, int]] = {
    "hit-simple": (HIT, "simple", 32), "hit-extended": (HIT, "extended", 32),
    "hit-prepared": (HIT, "prepared", 32), "hit-1": (HIT, "simple", 1),
    "pass-32": (PASS, "simple", 32), "pass-1": (PASS, "simple", 1),
}  # fmt: skip


@dataclass
class Row:
    workload: str
    target: str
    ok: bool
    tps: float | None = None
    latency_ms: float | None = None  # pgbench's average
    cpu_us: float | None = None  # the target's CPU per transaction
    hits: float | None = None  # pgsluice: hits / (hits + misses + bypasses) over the run
    error: str | None = None
    command: str | None = None


def skipped(target: str, workload: str) -> str | None:
    """Why a pair is not run (None: it is)."""
    if target == "dict" and workload.startswith("pass"):
        return "the dict server has no passthrough"
    if target == "pgbouncer" and WORKLOADS[workload][1] == "prepared":
        return "PgBouncer < 1.21: no prepared statements in transaction mode"
    return None


@contextlib.contextmanager
def dict_server() -> Iterator[tuple[Endpoint, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.dict_server", str(port)], cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, proc, 15, "dict server")
        yield Endpoint("127.0.0.1", port, "bench", "", "bench"), proc.pid
    finally:
        stop_process(proc)


@contextlib.contextmanager
def endpoint(target: str, up: Endpoint, args: argparse.Namespace) -> Iterator[tuple[Endpoint, int | None]]:
    if target == "dict":
        with dict_server() as got:
            yield got
    elif target == "direct":
        yield up, None
    elif target == "pgbouncer":
        with pgbouncer(up, args.pool_size, ["simple"]) as got:
            yield got
    elif target == "pgpool":
        with PgPool(upstream_host=up.host, upstream_port=up.port, user=up.user, password=up.password,
                    children=34) as pool:  # fmt: skip
            try:
                yield (Endpoint(pool.host, pool.port, up.user, up.password, up.database),
                       pool.proc.pid if pool.proc else None)
            finally:
                if errors := pool.errors():
                    print(f"  pgpool-II logged {len(errors)} errors, the first: {errors[0]}", flush=True)
    else:
        # entries must outlive the run: the hit workloads measure hits, and later ones would
        # otherwise meet the misses of entries stored by the first one's warm-up (TTL 60 s)
        flags = ("--metrics-listen", "", "--grpc-listen", "", "--cache-ttl", "3600")
        with pgsluice(up, args.pool_size, extra=flags) as got:
            yield got


def run_one(args: argparse.Namespace, tools: tuple[Path, Path], target: str, ep: Endpoint,
            pid: int | None, workload: str) -> Row:
    pgbench, psql = tools
    script, mode, clients = WORKLOADS[workload]
    script = script.format(n=10_000 * args.scale)
    jobs = min(clients, 2)

    def run(seconds: int, text: str = script, transactions: int = 0
            ) -> tuple[list[str], PgbenchResult, list[float]]:
        return pgbench_scripts(pgbench, ep, [(text, 1)], clients=clients, jobs=jobs, seconds=seconds,
                               mode=mode, transactions=transactions)  # fmt: skip

    n = 10_000 * args.scale
    if workload.startswith("hit") and target not in ("direct", "pgbouncer"):
        # every id, about 5 times (uniform): the run measures hits
        run(120, WARM.format(n=n), transactions=-(-5 * n // clients))
    elif workload == "pass-32":  # every text seen before, as by a proxy that has been up a while
        run(120, script, transactions=-(-5 * n // clients))
    if args.warmup:
        run(args.warmup)
    before = cache_counters(psql, ep) if target == "pgsluice" else {}
    cpu = tree_cpu_seconds(pid)
    cmd, res, _ = run(args.duration)
    cpu_after = tree_cpu_seconds(pid)
    row = Row(workload, target, res.ok, res.tps, res.latency_ms, command=shlex.join(cmd))
    if cpu is not None and cpu_after is not None and res.transactions:
        row.cpu_us = (cpu_after - cpu) * 1e6 / res.transactions
    if target == "pgsluice":
        after = cache_counters(psql, ep, own=False)
        d = {k: v - before.get(k, 0) for k, v in after.items()}
        looked = d.get("hits", 0) + d.get("misses", 0) + d.get("coalesced", 0) + sum(
            v for k, v in d.items() if k.startswith("bypass: "))
        row.hits = d.get("hits", 0) / looked if looked else None
    if not row.ok:
        row.error = "; ".join(res.errors) or "run failed"
    return row


def measure(args: argparse.Namespace, tools: tuple[Path, Path], up: Endpoint, target: str) -> list[Row]:
    rows: list[Row] = []
    todo = [w for w in args.workloads if skipped(target, w) is None]
    try:
        with endpoint(target, up, args) as (ep, pid):
            for wl in todo:
                rows.append(row := run_one(args, tools, target, ep, pid, wl))
                print(f"  {wl:<13} {target:<10} {fmt(row.tps, 0):>8} tps {fmt(row.latency_ms, 3):>7} ms "
                      f"{fmt(row.cpu_us, 1):>6} us CPU/txn"
                      + ("" if row.ok else f"  FAILED: {row.error}"), flush=True)  # fmt: skip
    except Exception as exc:  # a target that cannot start must not hide the others
        print(f"  {target}: could not run: {type(exc).__name__}: {exc}", flush=True)
        done = {r.workload for r in rows}
        rows += [Row(w, target, False, error=f"{type(exc).__name__}: {exc}") for w in todo if w not in done]
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(rows: list[Row], workloads: list[str]) -> dict[str, float | None]:
    find = {(r.workload, r.target): r for r in rows if r.ok}
    targets = [t for t in TARGETS if any(r.target == t for r in rows)]
    print(f"\n{'workload':<13}" + "".join(f"{t:>22}" for t in targets))
    print(f"{'':<13}" + "".join(f"{'tps / avg ms / CPU us':>22}" for _ in targets))
    for wl in workloads:
        cells = []
        for t in targets:
            r = find.get((wl, t))
            why = skipped(t, wl)
            cells.append("n/a" if why else "FAILED" if r is None else
                         f"{fmt(r.tps, 0)} / {fmt(r.latency_ms, 3)} / {fmt(r.cpu_us, 1)}")
        print(f"{wl:<13}" + "".join(f"{c:>22}" for c in cells))
    for r in rows:
        if r.target == "pgsluice" and r.hits is not None:
            print(f"  pgsluice {r.workload}: {100 * r.hits:.1f} % of look-ups were hits")

    def get(wl: str, t: str, attr: str) -> float | None:
        r = find.get((wl, t))
        return getattr(r, attr) if r is not None else None

    s = "pgsluice"
    checks = {  # name -> (value, target, higher is better)
        "CPU per cached simple hit, pgsluice / dict server": (
            ratio(get("hit-simple", s, "cpu_us"), get("hit-simple", "dict", "cpu_us")), 1.8, False),
        "extended hits tps / simple hits tps": (
            ratio(get("hit-extended", s, "tps"), get("hit-simple", s, "tps")), 0.9, True),
        "prepared hits tps / simple hits tps": (
            ratio(get("hit-prepared", s, "tps"), get("hit-simple", s, "tps")), 0.9, True),
        "single-client hit latency, pgsluice / direct": (
            ratio(get("hit-1", s, "latency_ms"), get("hit-1", "direct", "latency_ms")), 1.0, False),
        "passthrough tps at 32 clients, pgsluice / PgBouncer": (
            ratio(get("pass-32", s, "tps"), get("pass-32", "pgbouncer", "tps")), 0.8, True),
        "single-client passthrough latency, pgsluice / PgBouncer": (
            ratio(get("pass-1", s, "latency_ms"), get("pass-1", "pgbouncer", "latency_ms")), 1.25, False),
    }  # fmt: skip
    print("\nissue 13's targets (ratios from this run):")
    out: dict[str, float | None] = {}
    for name, (value, goal, higher) in checks.items():
        out[name] = value
        met = "-" if value is None else "met" if (value >= goal if higher else value <= goal) else "MISSED"
        print(f"  {name:<58} {fmt(value, 3):>6}  (target {'>=' if higher else '<='} {goal})  {met}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.hotpath_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--upstream", help="existing server DSN (default: embedded PostgreSQL, database shop)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of %(default)s")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of %(default)s")
    p.add_argument("--duration", type=int, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds per run (default 3)")
    p.add_argument("--scale", type=int, default=1, help="shop schema scale (default 1: 10,000 customers)")
    p.add_argument("--pool-size", type=int, default=10, help="PgBouncer's and pgsluice's (default 10)")
    p.add_argument("--json", type=Path, help="also write all figures as JSON here")
    a = p.parse_args(argv)
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if bad := [t for t in a.targets if t not in TARGETS] + [w for w in a.workloads if w not in WORKLOADS]:
        p.error(f"unknown target(s)/workload(s) {bad}")
    if min(a.duration, a.scale, a.pool_size) < 1 or a.warmup < 0:
        p.error("--duration/--scale/--pool-size must be >= 1, --warmup >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = benchrun.start("loadtest.hotpath_bench")
    with shop_server(args.upstream) as (up, bin_dir):
        tools = find_pg_tool("pgbench", bin_dir), find_pg_tool("psql", bin_dir)
        info = versions(*tools, up)
        info["pgpool"] = pgpool_version()
        for k, val in info.items():
            print(f"{k:>12}: {val}")
        started = time.monotonic()
        watched, _pgss = asyncio.run(prepare(up, args.scale, "shop"))
        print(f"upstream {up.host}:{up.port}/{up.database}: shop schema scale {args.scale} loaded in "
              f"{time.monotonic() - started:.1f} s, change feed on {watched} tables; {args.duration} s "
              f"(+{args.warmup} s warm-up) per run, pool size {args.pool_size}", flush=True)  # fmt: skip
        rows = [r for t in args.targets for r in measure(args, tools, up, t)]
    ratios = report(rows, args.workloads)
    end_load = loadavg()
    print(f"\nPostgres, the targets and pgbench share this {os.cpu_count()}-core machine; loadavg now: "
          f"{end_load}")  # fmt: skip
    if args.json:
        doc = {"command": command, "versions": info, "loadavg_end": end_load,
               "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": [asdict(r) for r in rows], "ratios": ratios}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    run_script(main)
