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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .config import split_host_port
from .stats import BUCKETS, AgentStats, Histogram

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .server import Server

log = logging.getLogger("pgsluice.metrics")
TOP_AGENTS = 20


def _agents(server: Server) -> list[tuple[str, AgentStats]]:
    """The busiest TOP_AGENTS by name, and "other" for the rest."""
    ranked = sorted(server.stats.agents.items(), key=lambda kv: -kv[1].queries)
    top = ranked[:TOP_AGENTS]
    rest = [a for _, a in ranked[TOP_AGENTS:]]
    if rest:
        other = AgentStats()
        for a in rest:
            other.queries += a.queries
            other.hits += a.hits
            other.misses += a.misses
            other.coalesced += a.coalesced
            other.bypassed += a.bypassed
            other.rejected += a.rejected
            for i, n in enumerate(a.latency.counts):
                other.latency.counts[i] += n
            other.latency.count += a.latency.count
            other.latency.sum += a.latency.sum
        top.append(("other", other))
    return top


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip(BUCKETS, h.counts, strict=False):
        total += n
        out.append((repr(bound), float(total)))
    out.append(("+Inf", float(h.count)))
    return out


class ServerCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        yield from self._agents()
        yield from self._server()
        yield from self._pools()
        yield from self._cache()

    def _agents(self) -> Iterable[Metric]:
        agents = _agents(self.server)
        families = {
            "queries": CounterMetricFamily("pgsluice_queries", "Queries received (Query messages and "
                                           "extended-protocol statements)", labels=["agent"]),
            "hits": CounterMetricFamily("pgsluice_cache_hits", "Answered from cache", labels=["agent"]),
            "misses": CounterMetricFamily("pgsluice_cache_misses", "Looked up, not found: run upstream",
                                          labels=["agent"]),
            "coalesced": CounterMetricFamily("pgsluice_cache_coalesced", "Waited for an identical query "
                                             "in flight", labels=["agent"]),
            "bypassed": CounterMetricFamily("pgsluice_cache_bypassed", "Not looked up in the cache",
                                            labels=["agent"]),
            "rejected": CounterMetricFamily("pgsluice_rejected", "Refused by a guardrail", labels=["agent"]),
        }
        latency = HistogramMetricFamily("pgsluice_request_duration_seconds",
                                        "Request received to ReadyForQuery sent", labels=["agent"])
        for name, a in agents:
            for attr, fam in families.items():
                fam.add_metric([name], getattr(a, attr))
            latency.add_metric([name], _buckets(a.latency), a.latency.sum)
        yield from families.values()
        yield latency

    def _server(self) -> Iterable[Metric]:
        st = self.server.stats
        yield CounterMetricFamily("pgsluice_upstream_queries", "Query and Execute messages sent to "
                                  "Postgres for clients", value=st.upstream_queries)
        yield GaugeMetricFamily("pgsluice_clients", "Client connections now", value=len(self.server.clients))
        yield CounterMetricFamily("pgsluice_clients_accepted", "Client connections since start",
                                  value=st.clients_total)
        yield CounterMetricFamily("pgsluice_cancels", "Cancel requests routed", value=st.cancels)
        errors = CounterMetricFamily("pgsluice_errors", "ErrorResponses sent to clients, by SQLSTATE class",
                                     labels=["sqlstate_class"])
        for cls, n in sorted(st.errors.items()):
            errors.add_metric([cls], n)
        yield errors
        plans = CounterMetricFamily("pgsluice_planner_plans", "Planner look-ups by outcome",
                                    labels=["database", "outcome"])
        for db, planner in sorted(self.server.planners.items()):
            ps = planner.stats
            for outcome, n in (("hit", ps.hits), ("shape_hit", ps.shape_hits), ("parsed", ps.misses)):
                plans.add_metric([db, outcome], n)
        yield plans

    def _pools(self) -> Iterable[Metric]:
        conns = GaugeMetricFamily("pgsluice_pool_server_connections", "Server connections",
                                  labels=["database", "user", "state"])
        waiting = GaugeMetricFamily("pgsluice_pool_waiting_clients", "Clients waiting for a server "
                                    "connection", labels=["database", "user"])
        wait = CounterMetricFamily("pgsluice_pool_wait_seconds", "Time clients waited for a server "
                                   "connection", labels=["database", "user"])
        timeouts = CounterMetricFamily("pgsluice_pool_timeouts", "Waits that ended in 53300",
                                       labels=["database", "user"])
        for (db, user), p in sorted(self.server.pools.items()):
            conns.add_metric([db, user, "active"], p.held)
            conns.add_metric([db, user, "idle"], len(p.idle))
            waiting.add_metric([db, user], sum(1 for w in p.waiters if not w.done()))
            wait.add_metric([db, user], p.stats.wait_time)
            timeouts.add_metric([db, user], p.stats.timeouts)
        yield from (conns, waiting, wait, timeouts)

    def _cache(self) -> Iterable[Metric]:
        cache = self.server.cache
        if cache is None:
            return
        ls, cs = cache.local.stats, cache.stats
        yield GaugeMetricFamily("pgsluice_cache_bytes", "Bytes held by the in-process tier", value=ls.bytes)
        yield GaugeMetricFamily("pgsluice_cache_entries", "Entries in the in-process tier", value=ls.entries)
        yield CounterMetricFamily("pgsluice_cache_evictions", "Entries evicted for room", value=ls.evictions)
        yield CounterMetricFamily("pgsluice_cache_stores", "Replies stored", value=cs.stores)
        yield CounterMetricFamily("pgsluice_cache_version_bumps", "Table version bumps (writes and feed)",
                                  value=cs.bumps)
        reasons = CounterMetricFamily("pgsluice_cache_bypass_reasons", "Reads not looked up, by reason",
                                      labels=["reason"])
        for reason, n in sorted(cs.bypass.items()):
            reasons.add_metric([reason], n)
        yield reasons
        if cache.redis is not None:
            yield GaugeMetricFamily("pgsluice_redis_up", "1 if Redis is reachable", value=int(cache.redis.up))
        feeds = GaugeMetricFamily("pgsluice_change_feed_up", "1 if the change feed is listening",
                                  labels=["database"])
        for db, feed in sorted(cache.feeds.items()):
            feeds.add_metric([db], int(feed.up and feed.installed))
        yield feeds


class MetricsServer:
    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        self._server: asyncio.Server | None = None

    async def start(self, listen: str) -> None:
        host, port = split_host_port(listen)
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        log.info("metrics on http://%s:%d/metrics", host, port)

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
