"""Counters the server keeps: global, and per agent."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class AgentStats:
    """Per agent (a `/* agent=... */` tag, else application_name, else user)."""

    queries: int = 0  # Query and Parse messages
    rejected: int = 0  # refused by a guardrail
    hits: int = 0  # answered from cache
    misses: int = 0  # looked up, not found: ran upstream as the leader
    coalesced: int = 0  # waited for an identical query in flight
    bypassed: int = 0  # not looked up (not cacheable, max_staleness=0, feed or Redis down...)


@dataclass(slots=True)
class ServerStats:
    clients_total: int = 0
    pinned: int = 0
    cancels: int = 0
    rejected: int = 0
    agents: dict[str, AgentStats] = field(default_factory=dict)

    def agent(self, name: str) -> AgentStats:
        stats = self.agents.get(name)
        if stats is None:
            stats = self.agents[name] = AgentStats()
        return stats
