"""Counters as plain data, summed over workers for the admin console and /metrics.

Each worker of `--workers N` writes its snapshot to a directory the parent made, once a
second (write, then rename: readers never see half a file). Whichever worker serves SHOW
STATS / SHOW AGENTS / SHOW POOLS or a scrape sums its live counters with the other
workers' latest snapshots (at most about a second old; a snapshot older than 5 s is a
worker that is gone and is left out). With one worker, only the live counters count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.pipeline.runtime import Runtime

Snap = dict[str, Any]
STALE = 5.0


def snapshot(server: Runtime) -> Snap:
    now = time.monotonic()
    st = server.stats
    agents = {name: {"queries": a.queries, "rejected": a.rejected, "hits": a.hits, "misses": a.misses,
                     "coalesced": a.coalesced, "batched": a.batched, "bypassed": a.bypassed,
                     "rate": a.rate(now),
                     "lat_counts": list(a.latency.counts), "lat_count": a.latency.count,
                     "lat_sum": a.latency.sum}
              for name, a in st.agents.items()}
    pools = {f"{db}\x00{user}": _pool(p) for (db, user), p in server.pools.items()}
    replicas: dict[str, Any] = {}
    if server.replicas is not None:
        for r in server.replicas.list:
            # a replica's pools: database "db@host:port" in SHOW POOLS and the metrics
            pools.update({f"{db}@{r.name}\x00{user}": _pool(p) for (db, user), p in r.pools.items()})
            replicas[r.name] = {"state": r.state, "up": int(r.state == "up"), "lag_s": r.lag,
                                "replay_lsn": r.replay, "reads": r.reads, "outstanding": r.outstanding}
        replicas["primary"] = {"state": "primary", "up": 1, "lag_s": 0.0,
                               "replay_lsn": server.replicas.primary.last,
                               "reads": server.replicas.primary_reads, "outstanding": 0}
    snap: Snap = {
        "workers": 1, "clients": len(server.clients),
        "totals": {"clients_total": st.clients_total, "pinned": st.pinned, "cancels": st.cancels,
                   "rejected": st.rejected, "upstream_queries": st.upstream_queries,
                   "batches": st.batches, "batch_fallbacks": st.batch_fallbacks,
                   **({f"positions_{k}": n for k, n in server.replicas.recorded.items()}
                      if server.replicas is not None else {})},
        "errors": dict(st.errors), "agents": agents, "pools": pools, "replicas": replicas,
        "planners": {db: {"hit": p.stats.hits, "shape_hit": p.stats.shape_hits, "parsed": p.stats.misses}
                     for db, p in server.planners.items()},
    }
    cache = server.cache
    if cache is not None:
        ls, cs = cache.local.stats, cache.stats
        snap["cache"] = {"bytes": ls.bytes, "entries": ls.entries, "evictions": ls.evictions,
                         "stores": cs.stores, "bumps": cs.bumps, "bypass": dict(cs.bypass),
                         "feeds": {db: int(f.up and f.installed) for db, f in cache.feeds.items()},
                         "active": {db: int(f.checked and cache.active(db)) for db, f in cache.feeds.items()},
                         "feed_bumps": cs.feed_bumps, "feed_own": cs.feed_own}
        if cache.redis is not None:
            snap["cache"]["redis_up"] = int(cache.redis.up)
    return snap


def _pool(p: Pool) -> dict[str, Any]:
    return {"size": p.size, "held": p.held, "idle": len(p.idle),
            "waiting": sum(1 for w in p.waiters if not w.done()),
            "max_size": p.settings.max_size, "acquires": p.stats.acquires,
            "waits": p.stats.waits, "wait_time": p.stats.wait_time,
            "timeouts": p.stats.timeouts, "connects": p.stats.connects}


def merge(snaps: list[Snap]) -> Snap:
    """Sum numbers (and lists of numbers) key by key; gauges that are states take the minimum."""
    out: Snap = {}
    for snap in snaps:
        _add(out, snap)
    return out


# states, and a setting all workers share
_MIN_KEYS = frozenset({"redis_up", "max_size", "up", "lag_s", "replay_lsn"})


def _add(into: Snap, other: Snap) -> None:
    for key, value in other.items():
        if key not in into:
            into[key] = json.loads(json.dumps(value))  # a deep copy
        elif isinstance(value, dict):
            _add(into[key], value)
        elif isinstance(value, list):
            into[key] = [a + b for a, b in zip(into[key], value, strict=False)]
        elif key in _MIN_KEYS or isinstance(into[key], bool):
            into[key] = min(into[key], value)
        elif isinstance(value, int | float):
            into[key] += value


def view(server: Runtime) -> Snap:
    """This worker's live counters plus the other workers' latest snapshots."""
    own = snapshot(server)
    if server.stats_dir is None:
        return own
    others = []
    now = time.time()
    for path in Path(server.stats_dir).glob("worker-*.json"):
        if path.name == f"worker-{server.worker}.json":
            continue
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            if now - float(data.get("time", 0)) <= STALE:
                others.append(data["snap"])
    return merge([own, *others])


async def publish(server: Runtime, interval: float = 1.0) -> None:
    """Write this worker's snapshot every `interval` seconds while it runs."""
    assert server.stats_dir is not None
    path = Path(server.stats_dir) / f"worker-{server.worker}.json"
    tmp = path.with_suffix(".tmp")
    while True:
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"time": time.time(), "pid": os.getpid(), "snap": snapshot(server)}))
            tmp.replace(path)
        await asyncio.sleep(interval)
