"""An open-loop, agent-shaped load generator (issue 7, first part).

    python -m loadtest.load --target direct=postgresql://...:5432/db \\
        --target pgsluice=postgresql://...:6543/db --metrics pgsluice=http://127.0.0.1:9187/metrics \\
        --profile agent-explore --agents 10 --rate 100 --duration 10 --warmup 2 [--json out.json]

Each agent has its own connection and issues queries at `rate` per second with Poisson
arrivals (optionally in bursts of k separated by a pause: how agents think). The schedule is
fixed in advance from the seed, and latency is measured from each query's *intended* start:
when the target stalls, queries queue behind the agent's connection and the stall shows as
latency, not as fewer samples (no coordinated omission). Latencies go into an HdrHistogram.
Profiles are TOML files (loadtest/profiles/): query templates with weights and parameter
distributions (uniform, zipf, choice).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import random
import resource
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from hdrh.histogram import HdrHistogram

PROFILES = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Param:
    dist: str
    low: int = 1
    high: int = 1
    s: float = 1.1
    values: tuple[str, ...] = ()

    def draw(self, rng: random.Random, zipf: list[float] | None) -> Any:
        if self.dist == "uniform":
            return rng.randint(self.low, self.high)
        if self.dist == "choice":
            return rng.choice(self.values)
        assert zipf is not None  # zipf: a precomputed cumulative distribution over low..high
        return self.low + bisect.bisect_left(zipf, rng.random() * zipf[-1])


@dataclass(frozen=True)
class Template:
    sql: str
    weight: float
    params: tuple[Param, ...] = ()


@dataclass
class Profile:
    name: str
    description: str
    templates: list[Template]
    _cum: list[float] = field(default_factory=list)
    _zipf: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = 0.0
        for t in self.templates:
            total += t.weight
            self._cum.append(total)
            for p in t.params:
                if p.dist == "zipf" and id(p) not in self._zipf:
                    weights = [1.0 / (k ** p.s) for k in range(1, p.high - p.low + 2)]
                    acc, out = 0.0, []
                    for w in weights:
                        acc += w
                        out.append(acc)
                    self._zipf[id(p)] = out

    def draw(self, rng: random.Random) -> tuple[str, list[Any]]:
        t = self.templates[bisect.bisect_left(self._cum, rng.random() * self._cum[-1])]
        return t.sql, [p.draw(rng, self._zipf.get(id(p))) for p in t.params]


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: {exc}") from None
    templates = []
    for i, q in enumerate(data.get("query", [])):
        where = f"{path}: query {i + 1}"
        if not isinstance(q.get("sql"), str) or not q["sql"].strip():
            raise ProfileError(f"{where}: needs sql")
        weight = q.get("weight", 1)
        if not isinstance(weight, int | float) or weight <= 0:
            raise ProfileError(f"{where}: weight must be positive")
        params = []
        for spec in q.get("params", []):
            dist = spec.get("dist")
            if dist in ("uniform", "zipf"):
                low, high = int(spec.get("min", 1)), int(spec.get("max", 0))
                if high < low:
                    raise ProfileError(f"{where}: {dist} needs min <= max")
                params.append(Param(dist, low, high, float(spec.get("s", 1.1))))
            elif dist == "choice" and spec.get("values"):
                params.append(Param(dist, values=tuple(str(v) for v in spec["values"])))
            else:
                raise ProfileError(f"{where}: unknown parameter distribution {spec!r}")
        placeholders = sum(1 for n in range(1, 10) if f"${n}" in q["sql"])
        if placeholders != len(params):
            raise ProfileError(f"{where}: {placeholders} placeholders but {len(params)} params")
        templates.append(Template(q["sql"], float(weight), tuple(params)))
    if not templates:
        raise ProfileError(f"{path}: no [[query]]")
    return Profile(str(data.get("name", path.stem)), str(data.get("description", "")), templates)


def schedule(rng: random.Random, rate: float, duration: float, burst: int, pause: float) -> list[float]:
    """Intended start times (seconds from the start) for one agent: Poisson at `rate`, or
    bursts of `burst` queries back to back (Poisson inside) with `pause` between them, at the
    same average rate."""
    out: list[float] = []
    t = rng.expovariate(rate) if rate > 0 else duration
    while t < duration:
        out.append(t)
        if burst > 1 and len(out) % burst == 0:
            t += pause
        t += rng.expovariate(rate)
    return out


@dataclass
class Result:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 600_000_000, 3))  # µs

    def summary(self, offered: float, duration: float, cpu: float) -> dict[str, Any]:
        h = self.hist
        pct = {f"p{q}": h.get_value_at_percentile(q) / 1000 for q in (50, 90, 99, 99.9)} if self.ok else {}
        return {"sent": self.sent, "ok": self.ok, "errors": self.errors, "error_kinds": self.error_kinds,
                "offered_qps": offered, "achieved_qps": self.sent / duration if duration else 0.0,
                "latency_ms": {**pct, "max": h.get_max_value() / 1000 if self.ok else None,
                               "mean": h.get_mean_value() / 1000 if self.ok else None},
                "generator_cpu_fraction": cpu}


async def _agent(dsn: str, profile: Profile, times: list[float], seed: int, t0: float,
                 result: Result) -> None:
    rng = random.Random(seed)
    conn = await asyncpg.connect(dsn)  # prepared statements cached, as asyncpg users run it
    try:
        for intended in times:
            sql, params = profile.draw(rng)
            delay = t0 + intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.sent += 1
            try:
                await conn.fetch(sql, *params)
                result.ok += 1
                # from the intended start: time spent queued behind a slow reply counts
                result.hist.record_value(max(1, int((time.perf_counter() - (t0 + intended)) * 1e6)))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                result.errors += 1
                kind = getattr(exc, "sqlstate", None) or type(exc).__name__
                result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1
    finally:
        await conn.close()


async def run(dsn: str, profile: Profile, agents: int, rate: float, duration: float, seed: int = 1,
              burst: int = 1, pause: float = 0.0) -> dict[str, Any]:
    schedules = [schedule(random.Random(seed * 1000 + i), rate, duration, burst, pause)
                 for i in range(agents)]
    result = Result()
    cpu0, wall0 = _cpu(), time.perf_counter()
    t0 = time.perf_counter() + 0.5  # connections open first
    await asyncio.gather(*(_agent(dsn, profile, times, seed * 7919 + i, t0, result)
                           for i, times in enumerate(schedules)))
    wall = time.perf_counter() - wall0
    out = result.summary(agents * rate, duration, (_cpu() - cpu0) / wall if wall else 0.0)
    out.update({"profile": profile.name, "agents": agents, "rate_per_agent": rate, "duration_s": duration,
                "seed": seed, "scheduled": sum(len(s) for s in schedules)})
    return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _named(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, value in enumerate(values):
        name, sep, url = value.partition("=")
        out.append((name, url) if sep and "://" not in name else (f"target{i + 1}", value))
    return out


def scrape(url: str) -> dict[str, float]:
    """pgsluice's counters that say what reached Postgres, summed over agents."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    want = {"pgsluice_upstream_queries_total": "upstream", "pgsluice_cache_hits_total": "hits",
            "pgsluice_cache_coalesced_total": "coalesced"}
    out = dict.fromkeys(want.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in want:
                out[want[sample.name]] += sample.value
    return out


async def compare(targets: list[tuple[str, str]], metrics: dict[str, str], profile: Profile,
                  args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The same seed and schedule against each target in turn (after a warm-up)."""
    results: dict[str, dict[str, Any]] = {}
    for name, url in targets:
        if args.warmup > 0:
            await run(url, profile, args.agents, args.rate, args.warmup, args.seed + 1, args.burst,
                      args.pause)
        before = scrape(metrics[name]) if name in metrics else None
        out = await run(url, profile, args.agents, args.rate, args.duration, args.seed, args.burst,
                        args.pause)
        if before is not None:
            after = scrape(metrics[name])
            delta = {k: after[k] - before[k] for k in after}
            out["pgsluice"] = delta
            out["reached_postgres"] = delta["upstream"] / out["sent"] if out["sent"] else None
        results[name] = out
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True,
                   help="[name=]postgresql://... (repeat to compare targets side by side)")
    p.add_argument("--metrics", action="append", default=[],
                   help="name=http://host:9187/metrics of a pgsluice target: count what reached Postgres")
    p.add_argument("--profile", default="agent-explore", help="a name in loadtest/profiles or a file")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0, help="queries per second per agent")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of warm-up per target")
    p.add_argument("--burst", type=int, default=1, help="queries per burst (1: plain Poisson)")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between bursts")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    targets = _named(args.target)
    metrics = dict(_named(args.metrics))
    results = asyncio.run(compare(targets, metrics, profile, args))
    print(f"{profile.name}: {args.agents} agents x {args.rate:g}/s for {args.duration:g} s, "
          f"seed {args.seed}, {os.cpu_count()} cores; latency from each query's intended start")
    print(f"{'target':<12} {'sent':>8} {'ok':>8} {'errors':>7} {'achieved/s':>11} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>9} {'reached PG':>11}")
    for name, out in results.items():
        lat = out["latency_ms"]
        reached = out.get("reached_postgres")
        print(f"{name:<12} {out['sent']:>8} {out['ok']:>8} {out['errors']:>7} {out['achieved_qps']:>11.0f} "
              f"{_ms(lat.get('p50')):>8} {_ms(lat.get('p99')):>8} {_ms(lat.get('max')):>9} "
              f"{'-' if reached is None else f'{reached:.1%}':>11}")
        if out["generator_cpu_fraction"] > 0.9:
            print(f"warning: {name}: the generator's own CPU was saturated: figures understate the target",
                  file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"profile": profile.name, "targets": results}, indent=2))
    return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
