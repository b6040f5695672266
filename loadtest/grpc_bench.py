"""How many agents each door sustains on cached point reads: the wire door, the gRPC door's
Session stream, unary gRPC calls, and a canned grpc.aio server (the unary ceiling), in one run.

    python -m loadtest.grpc_bench [--targets wire,stream,unary,canned] [--rate 100] \\
        [--duration 10] [--warmup 3] [--slo-ms 50] [--json out.json]

Embedded PostgreSQL with the shop schema (10,000 customers) and the change feed; pgsluice with
one worker and an agent token; loadtest/grpc_canned.py on its own port. For each target,
`pgsluice load --find-max` (loadtest.findmax) with the `customer-reads` profile (Zipf point
reads of customers by id, nearly all answered from cache after the warm-up), `--rate` queries
per second per agent, p99 within `--slo-ms`, one generator process (so the generator's own
cost per query counts, as it does for agents), through asyncpg (wire: its statement cache on)
or proxy.client.SluiceClient (stream: one Session per agent; unary and canned: a unary Query
per query). Before its find-max, every key of the profile is read once through the target's
own client, so the cache holds all of them (pgsluice's cache_ttl is an hour here: the run
measures a door, not misses). Each step also reads the serving process's CPU time from /proc
over the recorded part: CPU per answered query at the largest step that held the SLO.
`canned-stream` (not run unless named) is the canned server answering on Session streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadtest import run_script
from loadtest.agents import Plan, _Conn, cpu_seconds, run
from loadtest.cache_bench import prepare, server
from loadtest.findmax import Slo, find_max
from loadtest.load import _run_loop
from loadtest.passthrough import REPO_ROOT, pgsluice, tree_cpu_seconds
from loadtest.pgbouncer import free_port, stop_process, wait_for_port
from loadtest.profiles import Profile, load_profile

TARGETS = ("wire", "stream", "unary", "canned")
PROFILE = "customer-reads"
TOKEN = "bench-token"


@contextlib.contextmanager
def canned(port: int) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.grpc_canned", "--port", str(port)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, proc, 30, "canned gRPC server")
        yield proc.pid
    finally:
        stop_process(proc)


async def prime(url: str, connections: int = 16) -> int:
    """Read every key the profile can draw once, through `url`'s own kind of client."""
    profile = load_profile(PROFILE)
    assert isinstance(profile, Profile)
    work = [(t.sql, [key]) for t in profile.templates for p in t.params for key in range(p.low, p.high + 1)]

    async def worker(share: list[tuple[str, list[Any]]]) -> None:
        conn = _Conn(url)
        await conn.open()
        try:
            for sql, params in share:
                await conn.query(sql, params)
        finally:
            await conn.close()

    await asyncio.gather(*(worker(work[i::connections]) for i in range(connections)))
    return len(work)


async def capacity(name: str, url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """find-max for one target, with the serving process's CPU per answered query per step."""
    if not name.startswith("canned"):
        started = time.monotonic()
        keys = await prime(url)
        print(f"  {name}: {keys} keys read once in {time.monotonic() - started:.1f} s", flush=True)
    plan = Plan(url, PROFILE, args.start_agents, args.rate, args.duration, grace=max(2.0, args.duration / 2),
                warmup=args.warmup)

    async def step(p: Plan) -> dict[str, Any]:
        marks: list[tuple[float | None, float]] = []
        out = await run(p, args.processes,
                        at_record_start=lambda: marks.append((tree_cpu_seconds(pid), cpu_seconds())))
        after, mine = tree_cpu_seconds(pid), cpu_seconds()
        before, mine_before = marks[0] if marks else (None, 0.0)
        ok = out["ok"]
        known = before is not None and after is not None and ok > 0
        out["server_cpu_us"] = (after - before) * 1e6 / ok if known else None  # type: ignore[operator]
        # the generator's own CPU, when it runs in this process (after the recorded part it idles)
        mine_known = bool(marks) and ok > 0 and args.processes == 1
        out["generator_cpu_us"] = (mine - mine_before) * 1e6 / ok if mine_known else None
        return out

    def show(row: dict[str, Any]) -> None:
        p99 = row["p99_ms"]
        print(f"  {name}: {row['agents']} agents  p99 {'-' if p99 is None else f'{p99:.1f}'} ms  "
              f"errors {row['error_rate']:.2%}  {'ok' if row['passed'] else 'over the SLO'}", flush=True)

    fixed: dict[str, Any] = {}
    if args.cpu_agents:  # every target at the same load: CPU per query compared like for like
        out = await step(replace(plan, agents=args.cpu_agents))
        fixed = {"agents": args.cpu_agents, "ok": out["ok"], "p99_ms": out["latency_ms"].get("p99"),
                 "server_cpu_us": out["server_cpu_us"], "generator_cpu_us": out["generator_cpu_us"]}
        print(f"  {name}: {args.cpu_agents} agents x {args.rate:g}/s: server "
              f"{_us(fixed['server_cpu_us'])} µs, generator {_us(fixed['generator_cpu_us'])} µs of CPU "
              "per query", flush=True)
    found = await find_max(plan, step, Slo(args.slo_ms, args.max_error_rate), start=args.start_agents,
                           limit=args.max_agents, on_step=show)
    best = found.pop("best_run") or {}
    return {**found, "p99_ms_at_max": best.get("latency_ms", {}).get("p99"),
            "achieved_qps_at_max": best.get("achieved_qps"),
            "server_cpu_us_at_max": best.get("server_cpu_us"),
            "generator_cpu_at_max": best.get("generator_cpu_fraction"), "fixed_load": fixed}


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.grpc_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"of {', '.join(TARGETS)}, canned-stream")
    p.add_argument("--rate", type=float, default=100.0, help="queries per second per agent")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per find-max step")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--max-error-rate", type=float, default=0.001)
    p.add_argument("--start-agents", type=int, default=8)
    p.add_argument("--max-agents", type=int, default=1024)
    p.add_argument("--processes", type=int, default=1, help="generator processes")
    p.add_argument("--cpu-agents", type=int, default=16,
                   help="first a run of this many agents on every target: CPU per query at one load "
                        "(0: none)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - {*TARGETS, "canned-stream"}:
        p.error(f"unknown targets {set(targets) - {*TARGETS, 'canned-stream'}}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([sys.executable, "-m", "loadtest.grpc_bench", *given])
    print(f"command: {command}\ncores: {os.cpu_count()}  loadavg before: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    results: dict[str, Any] = {}
    loads: list[tuple[float, ...]] = []
    with server(None) as (up, _bin), tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        asyncio.run(prepare(up, 1, "shop"))
        config = Path(tmp) / "pgsluice.toml"
        config.write_text(f'[pgsluice.agents.bench]\ntoken = "{TOKEN}"\nuser = "{up.user}"\n'
                          f'password = "{up.password}"\ndatabase = "{up.database}"\n')
        gport, cport = free_port(), free_port()
        ep, pid = stack.enter_context(pgsluice(up, 8, extra=(
            "--config", str(config), "--grpc-listen", f"127.0.0.1:{gport}", "--metrics-listen", "",
            "--max-client-conn", "5000", "--cache-ttl", "3600")))
        wanted = any(t.startswith("canned") for t in targets)
        canned_pid = stack.enter_context(canned(cport)) if wanted else None
        time.sleep(1.0)  # catalog and change feed
        urls = {"wire": (ep.dsn(), pid), "stream": (f"grpc://{TOKEN}@127.0.0.1:{gport}/{up.database}", pid),
                "unary": (f"grpc://{TOKEN}@127.0.0.1:{gport}/{up.database}?calls=unary", pid),
                "canned": (f"grpc://{TOKEN}@127.0.0.1:{cport}/{up.database}?calls=unary", canned_pid),
                "canned-stream": (f"grpc://{TOKEN}@127.0.0.1:{cport}/{up.database}", canned_pid)}
        for name in targets:
            url, serving = urls[name]
            print(f"{name}: {url}", flush=True)
            results[name] = _run_loop(capacity(name, url, serving, args))
            loads.append(os.getloadavg())
            time.sleep(1.0)
    print(f"\n{'target':<14} {'max agents':>10} {'queries/s':>10} {'p99 ms':>7} {'server µs/q at max':>19} "
          f"{'server µs/q':>12} {'generator µs/q':>15}")
    for name, r in results.items():
        p99, fixed = r["p99_ms_at_max"], r["fixed_load"]
        print(f"{name:<14} {r['max_agents']:>9}{'+' if r['limit_reached'] else ' '} "
              f"{r['achieved_qps_at_max'] or 0:>10.0f} {'-' if p99 is None else f'{p99:.1f}':>7} "
              f"{_us(r['server_cpu_us_at_max']):>19} {_us(fixed.get('server_cpu_us')):>12} "
              f"{_us(fixed.get('generator_cpu_us')):>15}")
    if args.cpu_agents:
        print(f"(the last two columns: {args.cpu_agents} agents x {args.rate:g} queries/s on every target)")
    ratios = {}
    for a, b in (("stream", "wire"), ("unary", "canned"), ("stream", "unary")):
        if a in results and b in results and results[b]["max_agents"]:
            ratios[f"{a}/{b}"] = results[a]["max_agents"] / results[b]["max_agents"]
            print(f"{a}/{b} agents: {ratios[f'{a}/{b}']:.2f}")
    print("loadavg after each target: " + "; ".join(" ".join(f"{x:.2f}" for x in la) for la in loads))
    if args.json:
        plan = Plan("", PROFILE, 0, args.rate, args.duration, warmup=args.warmup)
        args.json.write_text(json.dumps({"command": command, "cores": os.cpu_count(), "loadavg": loads,
                                         "config": dataclasses.asdict(plan), "slo_p99_ms": args.slo_ms,
                                         "targets": results, "ratios": ratios}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run_script(main)
