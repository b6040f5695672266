"""`pgsluice load` (or `python -m loadtest.load`): an open-loop, agent-shaped load generator.

    pgsluice load --target direct=postgresql://u:p@127.0.0.1:5432/db \\
        --target pgsluice=postgresql://u:p@127.0.0.1:6543/db \\
        --metrics pgsluice=http://127.0.0.1:9187/metrics \\
        --profile agent-explore --agents 10 --rate 100 --duration 10 --warmup 3 \\
        [--find-max] [--processes 2] [--json out.json] [--report report.html]

Every target gets the same seed and schedule in turn and the results are printed side by
side; each run starts with `--warmup` seconds on its connections that are not recorded. With
`--metrics` the report states how many queries reached Postgres through pgsluice (read from
its /metrics). `--find-max` ramps the number of agents per target until p99 crosses `--slo-ms`
or errors pass `--max-error-rate`. Targets are postgresql:// URLs or
grpc://TOKEN@host:port/database for pgsluice's gRPC door (one Session stream per agent, as
proxy.client.SluiceClient does; `?calls=unary` for a unary call per query, `?format=typed`
for typed replies instead of WIRE ones). Profiles: loadtest/profiles/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .agents import Counters, Plan, run, schedule
from .findmax import Slo, find_max
from .profiles import PROFILES, ProfileError, load_profile

__all__ = ["PROFILES", "Plan", "ProfileError", "Target", "load_profile", "main", "measure", "run", "schedule"]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    metrics: str | None = None  # pgsluice's /metrics URL: what reached Postgres

    @property
    def kind(self) -> str | None:
        if self.url.startswith("grpc://"):
            return "grpc"
        if self.metrics:
            return "pgsluice"
        for kind in ("direct", "postgres", "pgbouncer"):
            if self.name.lower().startswith(kind):
                return "direct" if kind == "postgres" else kind
        return None


def scrape(url: str) -> dict[str, float]:
    """pgsluice's counters that say what reached Postgres, summed over agents."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    want = {"pgsluice_upstream_queries_total": "upstream", "pgsluice_cache_hits_total": "hits",
            "pgsluice_cache_coalesced_total": "coalesced", "pgsluice_cache_misses_total": "misses",
            "pgsluice_cache_bypassed_total": "bypassed"}
    out = dict.fromkeys(want.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in want:
                out[want[sample.name]] += sample.value
    return out


async def measure(target: Target, plan: Plan, processes: int = 1,
                  counters: Counters | None = None) -> dict[str, Any]:
    """One run against one target, with what reached Postgres when that is known."""
    before: dict[str, float] = {}
    failed: list[str] = []
    metrics = target.metrics

    def read() -> dict[str, float]:
        try:
            return scrape(metrics) if metrics else {}
        except Exception as exc:  # unreachable, not HTTP, not Prometheus text: say so, keep the run
            failed.append(f"{target.name}: cannot read {metrics}: {exc}")
            return {}

    def mark() -> None:  # when the warm-up ends: what the recorded part sends is counted
        before.update(read())

    out = await run(replace(plan, url=target.url), processes, counters, at_record_start=mark)
    out["kind"] = target.kind
    after = read() if before else {}
    if failed:
        out["metrics_error"] = failed[0]
    if before and after:
        delta = {k: after[k] - before[k] for k in after}
        out["pgsluice"] = delta
        out["reached_postgres"] = delta["upstream"] / out["sent"] if out["sent"] else None
        out["upstream_qps"] = delta["upstream"] / plan.duration
    elif target.kind in ("direct", "pgbouncer"):
        out["reached_postgres"] = 1.0 if out["sent"] else None
        out["upstream_qps"] = out["sent"] / plan.duration
    return out


class Progress:
    """A live line per phase on a terminal (rich); silent otherwise."""

    def __init__(self, counters: Counters, enabled: bool) -> None:
        self.counters, self.enabled, self.label, self.started = counters, enabled, "", time.monotonic()

    def phase(self, label: str) -> None:
        self.label, self.started = label, time.monotonic()
        self.counters.array[:] = [0] * len(self.counters.array)

    @contextlib.asynccontextmanager
    async def shown(self) -> AsyncIterator[None]:
        if not self.enabled:
            yield
            return
        from rich.console import Console
        from rich.live import Live
        with Live(self._render(), console=Console(stderr=True), refresh_per_second=4, transient=True) as live:
            async def refresh() -> None:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(self._render())
            task = asyncio.create_task(refresh())
            try:
                yield
            finally:
                task.cancel()

    def _render(self) -> Any:
        from rich.text import Text
        sent, ok, errors = self.counters.totals()
        elapsed = time.monotonic() - self.started
        rate = ok / elapsed if elapsed > 0 else 0.0
        return Text(f"{self.label}  {elapsed:5.1f} s  sent {sent:,}  ok {ok:,}  errors {errors:,}  "
                    f"{rate:,.0f} ok/s", style="bold" if errors == 0 else "bold red")


async def execute(targets: list[Target], plan: Plan, args: argparse.Namespace,
                  note: Callable[[str], None]) -> dict[str, Any]:
    counters = Counters(max(1, args.processes))
    progress = Progress(counters, enabled=args.progress)
    results: dict[str, Any] = {}
    capacity: dict[str, Any] = {}
    async with progress.shown():
        for n, target in enumerate(targets):
            if n:
                await asyncio.sleep(1.0)  # let the previous target's connections go
            if args.find_max:
                async def runner(step: Plan, target: Target = target) -> dict[str, Any]:
                    progress.phase(f"{target.name}: {step.agents} agents")
                    return await measure(target, step, args.processes, counters)

                def show(row: dict[str, Any], name: str = target.name) -> None:
                    p99 = row["p99_ms"]
                    note(f"{name}: {row['agents']} agents  p99 {'-' if p99 is None else f'{p99:.1f}'} ms  "
                         f"errors {row['error_rate']:.2%}  {'ok' if row['passed'] else 'over the SLO'}")

                capacity[target.name] = await find_max(
                    plan, runner, Slo(args.slo_ms, args.max_error_rate), start=args.start_agents,
                    limit=args.max_agents, on_step=show)
                # the per-target figures: the largest step that held the SLO (else the first step)
                results[target.name] = capacity[target.name].pop("best_run")
            else:
                progress.phase(f"{target.name}: {plan.agents} agents")
                results[target.name] = await measure(target, plan, args.processes, counters)
    return {"targets": results, **({"find_max": capacity} if capacity else {})}


def warnings_for(results: dict[str, Any]) -> list[str]:
    out = []
    for name, r in results.items():
        cpu, achieved, offered = r["generator_cpu_fraction"], r["achieved_qps"], r["offered_qps"]
        if cpu > 0.9:
            out.append(f"{name}: the generator's own CPU was saturated ({cpu:.0%}); "
                       "figures understate the target (try --processes)")
        if achieved < 0.95 * offered:
            out.append(f"{name}: achieved {achieved:.0f} queries/s of {offered:.0f} offered")
        if "metrics_error" in r:
            out.append(r["metrics_error"] + " (queries that reached Postgres unknown)")
        kinds = {**r["error_kinds"], **{f"unsent: {k}": n for k, n in r.get("unsent_kinds", {}).items()}}
        if r["ok"] == 0:
            out.append(f"{name}: no query succeeded ({', '.join(f'{k} x{n}' for k, n in kinds.items())})")
        elif r["error_rate"] > 0.001:
            out.append(f"{name}: {r['error_rate']:.1%} of scheduled queries failed or were never sent "
                       f"({', '.join(f'{k} x{n}' for k, n in kinds.items())}); latencies cover answered "
                       "queries only, so they understate what agents saw")
        if r.get("late_connects"):
            out.append(f"{name}: {r['late_connects']} agents connected after their first query was due "
                       "(that wait counts as latency; a longer --warmup keeps it out of the recorded part)")
        if (reached := r.get("reached_postgres")) is not None and reached > 1:
            out.append(f"{name}: more queries reached Postgres than were sent in the recorded part "
                       "(warm-up backlog, or another client of the same pgsluice)")
    return out


def print_table(data: dict[str, Any]) -> None:
    print(f"{'target':<12} {'sent':>8} {'ok':>8} {'errors':>7} {'unsent':>7} {'achieved/s':>11} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>9} {'reached PG':>11}")
    for name, out in data["targets"].items():
        lat, reached = out["latency_ms"], out.get("reached_postgres")
        print(f"{name:<12} {out['sent']:>8} {out['ok']:>8} {out['errors']:>7} {out['unsent']:>7} "
              f"{out['achieved_qps']:>11.0f} {_ms(lat.get('p50')):>8} {_ms(lat.get('p99')):>8} "
              f"{_ms(lat.get('max')):>9} {'-' if reached is None else f'{reached:.1%}':>11}")
    if "find_max" in data:
        print(f"\n{'target':<12} {'max agents':>11} {'queries/s':>10} {'reached PG/s':>13}   (p99 <= SLO)")
        for name, cap in data["find_max"].items():
            up = cap["upstream_qps_at_max"]
            most = f"{cap['max_agents']}{'+' if cap['limit_reached'] else ''}"
            print(f"{name:<12} {most:>11} {cap['max_agents'] * cap['rate_per_agent']:>10.0f} "
                  f"{'-' if up is None else f'{up:.0f}':>13}")


def _named(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, value in enumerate(values):
        name, sep, url = value.partition("=")
        out.append((name, url) if sep and "://" not in name else (f"target{i + 1}", value))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgsluice load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True,
                   help="[name=]postgresql://... or grpc://TOKEN@host:port/db[?calls=unary] "
                        "(repeat to compare)")
    p.add_argument("--compare", action="store_true",
                   help="accepted for clarity: several --target are always run in turn and compared")
    p.add_argument("--metrics", action="append", default=[],
                   help="name=http://host:9187/metrics of a pgsluice target: count what reached Postgres")
    p.add_argument("--profile", default="agent-explore", help="a name in loadtest/profiles or a .toml file")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0, help="queries per second per agent")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (per step with --find-max)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds at the start of every run (and step) on the same connections, not recorded")
    p.add_argument("--burst", type=int, default=1, help="queries per think-burst (1: plain Poisson)")
    p.add_argument("--pause", type=float, default=0.0, help="seconds of thinking between bursts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--processes", type=int, default=1, help="generator processes to spread agents over")
    p.add_argument("--find-max", action="store_true", help="ramp agents until the SLO breaks")
    p.add_argument("--slo-ms", type=float, default=50.0, help="p99 SLO for --find-max")
    p.add_argument("--max-error-rate", type=float, default=0.001)
    p.add_argument("--start-agents", type=int, default=1)
    p.add_argument("--max-agents", type=int, default=4096)
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--report", type=Path, help="write an HTML report here (and PNG plots beside it)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if min(args.agents, args.burst, args.start_agents, args.max_agents) < 1 or args.processes < 0:
        p.error("--agents, --burst, --start-agents, --max-agents must be >= 1; --processes >= 0")
    if args.start_agents > args.max_agents:
        p.error("--start-agents must not be above --max-agents")
    if min(args.rate, args.duration, args.slo_ms) <= 0:
        p.error("--rate, --duration and --slo-ms must be positive")
    if min(args.warmup, args.pause, args.max_error_rate) < 0:
        p.error("--warmup, --pause and --max-error-rate must not be negative")
    args.progress = args.progress and sys.stderr.isatty()
    args.processes = args.processes or os.cpu_count() or 1
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    metrics = dict(_named(args.metrics))
    targets = [Target(name, url, metrics.get(name)) for name, url in _named(args.target)]
    if len({t.name for t in targets}) < len(targets):
        print("load: two --target share a name", file=sys.stderr)
        return 2
    unknown = set(metrics) - {t.name for t in targets}
    if unknown:
        print(f"load: --metrics for unknown targets: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    plan = Plan("", args.profile, args.agents, args.rate, args.duration, args.seed, args.burst, args.pause,
                grace=max(2.0, args.duration / 2), warmup=args.warmup)
    agents = "ramping agents" if args.find_max else f"{args.agents} agents"
    print(f"{profile.name}: {agents} x {args.rate:g}/s "
          f"for {args.duration:g} s, seed {args.seed}, {args.processes} generator process(es), "
          f"{os.cpu_count()} cores; latency from each query's intended start", flush=True)
    try:
        data = _run_loop(execute(targets, plan, args, lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print("load: interrupted", file=sys.stderr)
        return 130
    data = {"profile": profile.name,
            "config": {"agents": args.agents, "rate_per_agent": args.rate, "duration_s": args.duration,
                       "warmup_s": args.warmup, "seed": args.seed, "burst": args.burst, "pause_s": args.pause,
                       "processes": args.processes, "cores": os.cpu_count(), "find_max": args.find_max,
                       "slo_p99_ms": args.slo_ms},
            "warnings": warnings_for(data["targets"]), **data}
    print_table(data)
    for line in data["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    if args.report:
        from .report import write_report
        written = write_report(data, args.report)
        print(f"report: {', '.join(str(p) for p in written)}")
    return 1 if any(r["ok"] == 0 for r in data["targets"].values()) else 0  # a target answered nothing


def _run_loop(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """uvloop where it installs: the generator's own cost per query is mostly its event loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency wherever it builds
        return asyncio.run(main)
    return uvloop.run(main)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
