"""Simulated agents: open-loop schedules, one connection (wire) or channel (gRPC) each,
latency from each query's intended start into HdrHistograms, optionally over several processes.

A query's latency runs from the moment the schedule meant to send it: when the target stalls,
later queries queue behind the agent's connection and the stall shows as latency, not as fewer
samples (no coordinated omission). A run starts with `warmup` seconds on the same connections
that are not recorded (connections open, statements get prepared, caches fill: agents are
long-lived), then `duration` seconds that are. It stops at `warmup + duration + grace`: what is
still in flight is cancelled and counted as an error, what was never sent as `unsent`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import asyncpg
from hdrh.histogram import HdrHistogram

from .profiles import AnyProfile, load_profile

if TYPE_CHECKING:
    from proxy.client import SluiceClient

MAX_US = 600_000_000


def schedule(rng: random.Random, rate: float, duration: float, burst: int, pause: float) -> list[float]:
    """Intended start times (seconds from the start) for one agent: Poisson at `rate`, or
    bursts of `burst` queries back to back (Poisson inside) with `pause` between them."""
    out: list[float] = []
    t = rng.expovariate(rate) if rate > 0 else duration
    while t < duration:
        out.append(t)
        if burst > 1 and len(out) % burst == 0:
            t += pause
        t += rng.expovariate(rate)
    return out


@dataclass(frozen=True)
class Plan:
    """What one run does; picklable, so a child process can run its share of the agents."""

    url: str
    profile: str  # a name or a path: children load it themselves
    agents: int
    rate: float
    duration: float
    seed: int = 1
    burst: int = 1
    pause: float = 0.0
    grace: float = 5.0
    warmup: float = 0.0  # seconds run first and not recorded

    def schedules(self, first: int = 0, count: int | None = None) -> list[list[float]]:
        """Intended starts relative to the start of the recorded part (warm-up ones negative)."""
        ids = range(first, self.agents if count is None else first + count)
        return [[t - self.warmup for t in schedule(random.Random(self.seed * 1000 + i), self.rate,
                                                   self.warmup + self.duration, self.burst, self.pause)]
                for i in ids]


@dataclass
class Result:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    unsent: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # of `errors` only
    unsent_kinds: dict[str, int] = field(default_factory=dict)  # why queries were never sent
    late_connects: int = 0  # agents whose connection opened after the run started
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_US, 3))  # µs
    seconds: dict[int, list[Any]] = field(default_factory=dict)  # second -> [ok, errors, hist]

    def record(self, second: int, latency_us: int | None, error: str | None = None) -> None:
        slot = self.seconds.get(second)
        if slot is None:
            slot = self.seconds[second] = [0, 0, HdrHistogram(1, MAX_US, 2)]
        if error is None:
            self.ok += 1
            slot[0] += 1
            value = max(1, min(MAX_US, latency_us or 1))
            self.hist.record_value(value)
            slot[2].record_value(value)
        else:
            self.errors += 1
            slot[1] += 1
            self.error_kinds[error] = self.error_kinds.get(error, 0) + 1

    def encode(self) -> dict[str, Any]:
        return {"sent": self.sent, "ok": self.ok, "errors": self.errors, "unsent": self.unsent,
                "error_kinds": self.error_kinds, "unsent_kinds": self.unsent_kinds,
                "late_connects": self.late_connects, "hist": self.hist.encode(),
                "seconds": {s: [v[0], v[1], v[2].encode()] for s, v in self.seconds.items()}}

    def merge(self, data: dict[str, Any]) -> None:
        for key in ("sent", "ok", "errors", "unsent", "late_connects"):
            setattr(self, key, getattr(self, key) + data[key])
        pairs = ((self.error_kinds, data["error_kinds"]), (self.unsent_kinds, data["unsent_kinds"]))
        for mine, theirs in pairs:
            for kind, n in theirs.items():
                mine[kind] = mine.get(kind, 0) + n
        self.hist.decode_and_add(data["hist"])
        for second, (ok, errors, hist) in data["seconds"].items():
            slot = self.seconds.setdefault(int(second), [0, 0, HdrHistogram(1, MAX_US, 2)])
            slot[0] += ok
            slot[1] += errors
            slot[2].decode_and_add(hist)

    def summary(self, plan: Plan, elapsed: float, cpu: float) -> dict[str, Any]:
        h, ms = self.hist, 1000.0
        pct = {f"p{q:g}": h.get_value_at_percentile(q) / ms for q in (50, 90, 99, 99.9)} if self.ok else {}
        cdf = [[float(p), h.get_value_at_percentile(p) / ms]
               for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100)] if self.ok else []
        timeline = [{"t": s, "sent": v[0] + v[1], "ok": v[0], "errors": v[1],
                     "p50_ms": v[2].get_value_at_percentile(50) / ms if v[0] else None,
                     "p99_ms": v[2].get_value_at_percentile(99) / ms if v[0] else None}
                    for s, v in sorted(self.seconds.items())]
        scheduled = self.sent + self.unsent
        return {"sent": self.sent, "ok": self.ok, "errors": self.errors, "unsent": self.unsent,
                "scheduled": scheduled, "error_kinds": self.error_kinds, "unsent_kinds": self.unsent_kinds,
                "late_connects": self.late_connects,
                "error_rate": (self.errors + self.unsent) / scheduled if scheduled else 0.0,
                # what the schedule offered (bursts and pauses included), not agents x rate
                "offered_qps": scheduled / plan.duration,
                "achieved_qps": self.ok / max(plan.duration, elapsed) if elapsed else 0.0,
                "latency_ms": {**pct, "max": h.get_max_value() / ms if self.ok else None,
                               "mean": h.get_mean_value() / ms if self.ok else None},
                "cdf": cdf, "timeline": timeline, "generator_cpu_fraction": cpu,
                "agents": plan.agents, "rate_per_agent": plan.rate, "duration_s": plan.duration,
                "seed": plan.seed}


class Counters:
    """Live sent/ok/errors per process in shared memory, for the progress display."""

    def __init__(self, processes: int) -> None:
        self.array = multiprocessing.get_context("spawn").Array("q", 3 * processes, lock=False)

    def totals(self) -> tuple[int, int, int]:
        a = self.array
        return sum(a[0::3]), sum(a[1::3]), sum(a[2::3])


class _Conn:
    """One agent's connection: asyncpg on the wire (statement cache on, as its users run it) or
    pgsluice's gRPC client for grpc://TOKEN@host:port/database, one Session stream per agent
    as the client does by default (`?calls=unary`: a unary call per query; `?format=typed`:
    typed replies instead of WIRE ones)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg: asyncpg.Connection | None = None
        self.grpc: SluiceClient | None = None

    async def open(self) -> None:
        if self.url.startswith("grpc://"):
            from proxy.client import SluiceClient
            parts = urlsplit(self.url)
            options = dict(parse_qsl(parts.query))
            self.grpc = SluiceClient(f"{parts.hostname}:{parts.port}", unquote(parts.username or ""),
                                     parts.path.lstrip("/"), stream=options.get("calls", "stream") != "unary",
                                     wire=options.get("format", "wire") != "typed")
        else:  # ?statement_cache_size=0 for poolers without prepared statements (PgBouncer < 1.21)
            parts = urlsplit(self.url)
            query = dict(parse_qsl(parts.query))
            cache = int(query.pop("statement_cache_size", 100))
            url = parts._replace(query=urlencode(query)).geturl()
            self.pg = await asyncpg.connect(url, statement_cache_size=cache)

    async def query(self, sql: str, params: list[Any]) -> None:
        if self.grpc is not None:
            await self.grpc.query(sql, *params)
        else:
            assert self.pg is not None
            await self.pg.fetch(sql, *params)

    async def close(self) -> None:
        if self.grpc is not None:
            await self.grpc.close()
        if self.pg is not None:
            self.pg.terminate()  # the run may have cancelled a query mid-flight


def _error_kind(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    return str(sqlstate) if sqlstate else type(exc).__name__


async def _agent(plan: Plan, profile: AnyProfile, times: list[float], index: int, t0: float,
                 result: Result, live: Any, slot: int) -> None:
    rng = random.Random(plan.seed * 7919 + index)
    stream = profile.stream(rng)
    conn = _Conn(plan.url)
    deadline = t0 + plan.duration + plan.grace
    recorded = sum(1 for t in times if t >= 0)
    try:
        await asyncio.wait_for(conn.open(), max(1.0, deadline - time.perf_counter()))
    except Exception as exc:
        kind = f"connect: {_error_kind(exc)}"
        result.unsent += recorded
        if recorded:
            result.unsent_kinds[kind] = result.unsent_kinds.get(kind, 0) + recorded
        await conn.close()
        return
    if time.perf_counter() > t0 + (times[0] if times else 0.0):
        result.late_connects += 1  # its first queries waited for the connection: that counts as latency
    loop = asyncio.get_running_loop()
    in_flight = measured = False
    try:  # one timer per agent for the whole run (not one per query: the generator must stay cheap)
        async with asyncio.timeout_at(loop.time() + deadline - time.perf_counter()):
            for intended in times:
                sql, params = next(stream)
                now = time.perf_counter()
                if t0 + intended > now:
                    await asyncio.sleep(t0 + intended - now)
                measured = intended >= 0
                live[slot] += 1  # the live display counts the warm-up too
                if measured:
                    result.sent += 1
                    recorded -= 1
                in_flight = True
                try:
                    await conn.query(sql, params)
                except Exception as exc:
                    in_flight = False
                    live[slot + 2] += 1
                    if measured:
                        result.record(int(time.perf_counter() - t0), None, _error_kind(exc))
                    continue
                in_flight = False
                live[slot + 1] += 1
                if measured:
                    done = time.perf_counter()
                    result.record(int(done - t0), int((done - (t0 + intended)) * 1e6))
    except TimeoutError:  # the run's end: the query in flight is cut, the rest never sent
        if in_flight:
            live[slot + 2] += 1
            if measured:
                result.record(int(time.perf_counter() - t0), None, "deadline")
    finally:
        result.unsent += recorded
        if recorded:
            result.unsent_kinds["deadline"] = result.unsent_kinds.get("deadline", 0) + recorded
        await conn.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_share(plan: Plan, first: int, count: int, start_epoch: float, live: Any,
                    slot: int) -> tuple[Result, float, float]:
    """Run agents first..first+count of the plan from `start_epoch` (wall clock): the result,
    the elapsed seconds until the last answer, and this process's CPU seconds."""
    profile = load_profile(plan.profile)
    schedules = plan.schedules(first, count)
    result, cpu0 = Result(), cpu_seconds()
    t0 = time.perf_counter() + (start_epoch - time.time()) + plan.warmup  # the recorded part
    await asyncio.gather(*(_agent(plan, profile, times, first + i, t0, result, live, slot)
                           for i, times in enumerate(schedules)))
    return result, time.perf_counter() - t0, cpu_seconds() - cpu0


def _child(plan: Plan, first: int, count: int, start_epoch: float, live: Any, slot: int,
           out: Any) -> None:
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
        runner = asyncio.run
    try:
        result, elapsed, cpu = runner(run_share(plan, first, count, start_epoch, live, slot))
    except BaseException as exc:  # the parent must hear of it, not wait for a result
        out.put(f"{type(exc).__name__}: {exc}")
        raise
    out.put((result.encode(), elapsed, cpu))


async def run(plan: Plan, processes: int = 1, counters: Counters | None = None,
              at_record_start: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run the plan, its agents spread over `processes` processes, and summarise it.
    `at_record_start` is called (in a thread) when the warm-up ends and recording begins."""
    processes = max(1, min(processes, plan.agents))
    live = (counters or Counters(processes)).array
    start = time.time() + (0.5 if processes == 1 else 2.0)  # children import and connect first
    mark = asyncio.create_task(_call_at(start + plan.warmup, at_record_start)) if at_record_start else None
    try:
        if processes == 1:
            result, elapsed, cpu = await run_share(plan, 0, plan.agents, start, live, 0)
            return result.summary(plan, elapsed, cpu / (elapsed + plan.warmup) if elapsed > 0 else 0.0)
        return await _run_processes(plan, processes, live, start)
    finally:
        if mark is not None:
            await mark


async def _call_at(epoch: float, fn: Callable[[], Any] | None) -> None:
    await asyncio.sleep(max(0.0, epoch - time.time()))
    if fn is not None:
        await asyncio.get_running_loop().run_in_executor(None, fn)


async def _next_result(queue: Any, children: list[Any], limit: float) -> Any:
    """The next child's result; a child that died without one, or the time limit, is an error
    (polled, so neither a dead child nor Ctrl-C leaves the parent blocked in queue.get)."""
    import queue as queues
    while True:
        try:
            return queue.get_nowait()
        except queues.Empty:
            pass
        dead = [c for c in children if c.exitcode not in (None, 0)]
        if dead:
            await asyncio.sleep(0.2)  # its last words may still be in the pipe
            try:
                return queue.get_nowait()
            except queues.Empty:
                raise RuntimeError(f"a generator process exited with status {dead[0].exitcode}") from None
        if time.monotonic() > limit:
            raise RuntimeError("the generator processes did not report in time")
        await asyncio.sleep(0.05)


async def _run_processes(plan: Plan, processes: int, live: Any, start: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    shares = [(plan.agents * i // processes, plan.agents * (i + 1) // processes) for i in range(processes)]
    children = [ctx.Process(target=_child, args=(plan, lo, hi - lo, start, live, 3 * i, queue), daemon=True)
                for i, (lo, hi) in enumerate(shares)]
    for child in children:
        child.start()
    total, elapsed, cpu = Result(), 0.0, 0.0
    limit = time.monotonic() + start - time.time() + plan.warmup + plan.duration + plan.grace + 30
    try:
        for _ in children:
            got = await _next_result(queue, children, limit)
            if isinstance(got, str):
                raise RuntimeError(f"a generator process failed: {got}")
            data, child_elapsed, child_cpu = got
            total.merge(data)
            elapsed, cpu = max(elapsed, child_elapsed), cpu + child_cpu
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    busy = cpu / (elapsed + plan.warmup) / processes if elapsed > 0 else 0.0
    return total.summary(plan, elapsed, busy)
