"""Counters the server keeps: global, and per agent (what SHOW STATS / SHOW AGENTS and
/metrics read). Cheap to update on the hot path: integer adds, and latencies appended to be
put into buckets in bulk."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# latency buckets (seconds): 50 µs doubling up to ~52 s
BUCKETS: tuple[float, ...] = tuple(0.00005 * 2 ** i for i in range(21))


class Histogram:
    """Request latencies. Observations are kept as they come and put into buckets in bulk, when
    the histogram is read or every FOLD of them: the hot path only appends."""

    __slots__ = ("_count", "_counts", "_instant", "_pending", "_sum")
    FOLD = 512

    def __init__(self) -> None:
        self._counts = [0] * (len(BUCKETS) + 1)
        self._count = 0
        self._sum = 0.0
        self._pending: list[float] = []
        self._instant = 0

    def observe(self, seconds: float) -> None:
        pending = self._pending
        pending.append(seconds)
        if len(pending) >= self.FOLD:
            self._fold()

    def instant(self) -> None:
        """A request answered in the very callback that received it (the fast path's cache
        hits): in the first bucket, without reading the clock (its few microseconds are left
        out of `sum`)."""
        self._instant += 1

    def _fold(self) -> None:
        counts, pending = self._counts, self._pending
        for seconds in pending:
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        counts[0] += self._instant
        self._count += len(pending) + self._instant
        self._sum += sum(pending)
        pending.clear()
        self._instant = 0

    @property
    def counts(self) -> list[int]:
        self._fold()
        return self._counts

    @property
    def count(self) -> int:
        self._fold()
        return self._count

    @property
    def sum(self) -> float:
        self._fold()
        return self._sum

    def quantile(self, q: float) -> float | None:
        return quantile(self.counts, q)


def quantile(counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of a histogram (None when empty)."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank and n:
            return BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1] * 2
    return BUCKETS[-1] * 2


@dataclass(slots=True)
class AgentStats:
    """Per agent (a `/* agent=... */` tag, else application_name, else user)."""

    queries: int = 0  # Query messages and extended-protocol executions
    rejected: int = 0  # refused by a guardrail
    hits: int = 0  # answered from cache
    misses: int = 0  # looked up, not found: ran upstream as the leader
    coalesced: int = 0  # waited for an identical query in flight
    batched: int = 0  # answered by a burst batch (batching.py)
    bypassed: int = 0  # not looked up (not cacheable, max_staleness=0, feed or Redis down...)
    latency: Histogram = field(default_factory=Histogram)  # request in -> reply out
    _second: int = 0
    _recent: list[int] = field(default_factory=lambda: [0] * 11)  # queries per second, ring

    def count(self, now: float) -> None:
        """One query, for the rate over the last 10 s."""
        sec = int(now)
        if sec != self._second:
            self._advance(sec)
        self._recent[sec % 11] += 1

    def _advance(self, sec: int) -> None:
        gap = sec - self._second
        for i in range(1, min(gap, 11) + 1):
            self._recent[(self._second + i) % 11] = 0
        self._second = sec

    def rate(self, now: float) -> float:
        """Queries per second over the last 10 complete seconds."""
        sec = int(now)
        if sec != self._second:
            self._advance(sec)
        return sum(self._recent[(sec - i) % 11] for i in range(1, 11)) / 10.0


@dataclass(slots=True)
class ServerStats:
    clients_total: int = 0
    pinned: int = 0
    cancels: int = 0
    rejected: int = 0
    upstream_queries: int = 0  # Query and Execute messages sent to Postgres for clients
    batches: int = 0  # burst batches run (batching.py)
    batch_fallbacks: int = 0  # batches that failed: their reads ran alone
    errors: dict[str, int] = field(default_factory=dict)  # ErrorResponses to clients by SQLSTATE class
    agents: dict[str, AgentStats] = field(default_factory=dict)

    def agent(self, name: str) -> AgentStats:
        stats = self.agents.get(name)
        if stats is None:
            stats = self.agents[name] = AgentStats()
        return stats

    def error(self, body: bytes | bytearray) -> None:
        """Count an ErrorResponse (its body) by SQLSTATE class."""
        pos = 0
        while pos < len(body) and body[pos]:
            end = body.find(b"\x00", pos + 1)
            if end < 0:
                break
            if body[pos] == 0x43:  # 'C'
                cls = bytes(body[pos + 1:pos + 3]).decode("ascii", "replace")
                self.errors[cls] = self.errors.get(cls, 0) + 1
                return
            pos = end + 1
