"""Prometheus text exposition on `metrics_listen` (GET /metrics), with prometheus-client.

Nothing is counted twice: a collector reads the server's own counters at scrape time (the
hot path only does integer adds). Per-agent series are bounded: the `TOP_AGENTS` busiest
agents by name, everyone else summed under agent="other", so a flood of agent names cannot
blow up the series count. Served by a tiny asyncio HTTP handler on the server's own loop
(no thread reads state the loop is changing).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from proxy.base.config import split_host_port
from proxy.base.stats import BUCKETS
from proxy.pipeline.snapshot import Snap, merge, view

if TYPE_CHECKING:
    from prometheus_client import Metric

    from proxy.ops.server import Server

log = logging.getLogger("pgsluice.metrics")
TOP_AGENTS = 20


def _agents(agents: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The busiest TOP_AGENTS by name, and "other" for the rest."""
    ranked = sorted(agents.items(), key=lambda kv: -kv[1]["queries"])
    top = ranked[:TOP_AGENTS]
    rest = [a for _, a in ranked[TOP_AGENTS:]]
    if rest:
        top.append(("other", merge(rest)))
    return top


def _buckets(counts: list[int], count: int) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip(BUCKETS, counts, strict=False):
        total += n
        out.append((repr(bound), float(total)))
    out.append(("+Inf", float(count)))
    return out


_AGENT_COUNTERS = (
    ("queries", "pgsluice_queries", "Queries received (Query messages and extended-protocol statements)"),
    ("hits", "pgsluice_cache_hits", "Answered from cache"),
    ("misses", "pgsluice_cache_misses", "Looked up, not found: run upstream"),
    ("coalesced", "pgsluice_cache_coalesced", "Waited for an identical query in flight"),
    ("batched", "pgsluice_batched_reads", "Answered by a burst batch (one statement for many keys)"),
    ("bypassed", "pgsluice_cache_bypassed", "Not looked up in the cache"),
    ("rejected", "pgsluice_rejected", "Refused by a guardrail"),
)


class ServerCollector(Collector):
    """Everything summed over the workers (see snapshot.py)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        v = view(self.server)
        yield from self._agents(v)
        yield from self._server(v)
        yield from self._pools(v)
        yield from self._cache(v)
        yield from self._replicas(v)

    def _replicas(self, v: Snap) -> Iterable[Metric]:
        replicas = v.get("replicas") or {}
        if not replicas:
            return
        up = GaugeMetricFamily("pgsluice_replica_up", "1 while a server is in rotation for reads",
                               labels=["server"])
        lag = GaugeMetricFamily("pgsluice_replica_lag_seconds", "How far a replica's replay is behind "
                                "the primary, in time", labels=["server"])
        reads = CounterMetricFamily("pgsluice_replica_reads", "Reads that could go to a replica, by "
                                    "where they went (primary: no replica had replayed their tables)",
                                    labels=["server"])
        for name, r in sorted(replicas.items()):
            up.add_metric([name], r["up"])
            lag.add_metric([name], r["lag_s"])
            reads.add_metric([name], r["reads"])
        yield from (up, lag, reads)

    def _agents(self, v: Snap) -> Iterable[Metric]:
        families = {attr: CounterMetricFamily(name, doc, labels=["agent"])
                    for attr, name, doc in _AGENT_COUNTERS}
        latency = HistogramMetricFamily("pgsluice_request_duration_seconds",
                                        "Request received to ReadyForQuery sent", labels=["agent"])
        for name, a in _agents(v["agents"]):
            for attr, fam in families.items():
                fam.add_metric([name], a[attr])
            latency.add_metric([name], _buckets(a["lat_counts"], a["lat_count"]), a["lat_sum"])
        yield from families.values()
        yield latency

    def _server(self, v: Snap) -> Iterable[Metric]:
        totals = v["totals"]
        yield GaugeMetricFamily("pgsluice_workers_reporting", "Worker processes summed here",
                                value=v["workers"])
        yield CounterMetricFamily("pgsluice_upstream_queries", "Query and Execute messages sent to "
                                  "Postgres for clients", value=totals["upstream_queries"])
        yield GaugeMetricFamily("pgsluice_clients", "Client connections now", value=v["clients"])
        yield CounterMetricFamily("pgsluice_clients_accepted", "Client connections since start",
                                  value=totals["clients_total"])
        yield CounterMetricFamily("pgsluice_batches", "Burst batches run (mean size: "
                                  "pgsluice_batched_reads / pgsluice_batches)",
                                  value=totals.get("batches", 0))
        yield CounterMetricFamily("pgsluice_batch_fallbacks", "Burst batches that failed: each read "
                                  "ran alone", value=totals.get("batch_fallbacks", 0))
        yield CounterMetricFamily("pgsluice_cancels", "Cancel requests routed", value=totals["cancels"])
        errors = CounterMetricFamily("pgsluice_errors", "ErrorResponses sent to clients, by SQLSTATE class",
                                     labels=["sqlstate_class"])
        for cls, n in sorted(v["errors"].items()):
            errors.add_metric([cls], n)
        yield errors
        plans = CounterMetricFamily("pgsluice_planner_plans", "Planner look-ups by outcome",
                                    labels=["database", "outcome"])
        for db, ps in sorted(v["planners"].items()):
            for outcome, n in sorted(ps.items()):
                plans.add_metric([db, outcome], n)
        yield plans

    def _pools(self, v: Snap) -> Iterable[Metric]:
        conns = GaugeMetricFamily("pgsluice_pool_server_connections", "Server connections",
                                  labels=["database", "user", "state"])
        waiting = GaugeMetricFamily("pgsluice_pool_waiting_clients", "Clients waiting for a server "
                                    "connection", labels=["database", "user"])
        wait = CounterMetricFamily("pgsluice_pool_wait_seconds", "Time clients waited for a server "
                                   "connection", labels=["database", "user"])
        timeouts = CounterMetricFamily("pgsluice_pool_timeouts", "Waits that ended in 53300",
                                       labels=["database", "user"])
        for key, p in sorted(v["pools"].items()):
            db, user = key.split("\x00", 1)
            conns.add_metric([db, user, "active"], p["held"])
            conns.add_metric([db, user, "idle"], p["idle"])
            waiting.add_metric([db, user], p["waiting"])
            wait.add_metric([db, user], p["wait_time"])
            timeouts.add_metric([db, user], p["timeouts"])
        yield from (conns, waiting, wait, timeouts)

    def _cache(self, v: Snap) -> Iterable[Metric]:
        c = v.get("cache")
        if c is None:
            return
        yield GaugeMetricFamily("pgsluice_cache_bytes", "Bytes in the in-process tiers", value=c["bytes"])
        yield GaugeMetricFamily("pgsluice_cache_entries", "Entries in the in-process tiers",
                                value=c["entries"])
        yield CounterMetricFamily("pgsluice_cache_evictions", "Entries evicted for room",
                                  value=c["evictions"])
        yield CounterMetricFamily("pgsluice_cache_stores", "Replies stored", value=c["stores"])
        yield CounterMetricFamily("pgsluice_cache_version_bumps", "Table version bumps (writes and feed)",
                                  value=c["bumps"])
        reasons = CounterMetricFamily("pgsluice_cache_bypass_reasons", "Reads not looked up, by reason",
                                      labels=["reason"])
        for reason, n in sorted(c["bypass"].items()):
            reasons.add_metric([reason], n)
        yield reasons
        if "redis_up" in c:
            yield GaugeMetricFamily("pgsluice_redis_up", "1 if Redis is reachable (by every worker)",
                                    value=c["redis_up"])
        feeds = GaugeMetricFamily("pgsluice_change_feed_up", "Workers whose change feed is listening",
                                  labels=["database"])
        for db, up in sorted(c["feeds"].items()):
            feeds.add_metric([db], up)
        yield feeds
        active = GaugeMetricFamily(
            "pgsluice_cache_active", "Workers caching reads of the database (0: no change feed there, "
            "run `pgsluice install-change-feed`)", labels=["database"])
        for db, n in sorted(c.get("active", {}).items()):
            active.add_metric([db], n)
        yield active
        yield CounterMetricFamily("pgsluice_cache_feed_bumps", "Change-feed notifications that bumped "
                                  "versions", value=c.get("feed_bumps", 0))
        yield CounterMetricFamily("pgsluice_cache_feed_own_writes", "Change-feed notifications of writes "
                                  "made here (bumped by their session)", value=c.get("feed_own", 0))


class MetricsServer:
    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        self._server: asyncio.Server | None = None

    async def start(self, listen: str, reuse_port: bool = False, tls: ssl.SSLContext | None = None) -> None:
        host, port = split_host_port(listen)
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True,
                                                  reuse_port=reuse_port, ssl=tls,
                                                  ssl_handshake_timeout=5 if tls else None)
        log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (b"/metrics", b"/"):
                body, status = generate_latest(self.registry), b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
