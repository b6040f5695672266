"""Agents of the non-wire doors (gRPC, MCP): who a bearer token is, and the internal sessions
each agent's calls run on.

A token names one [pgsluice.agents.NAME] (compared in constant time); the agent's calls run
as its Postgres user with application_name = NAME, so the role policy that matches either
applies to them exactly as to a wire client. An agent's sessions are kept for IDLE_KEEP
seconds after a call, so a burst of calls reuses a few of them.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import deque
from typing import TYPE_CHECKING

from planner import SessionFacts
from proxy.base.config import AgentAuth, Config
from proxy.pipeline.internal import InternalClient
from proxy.pipeline.session import session_facts

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

IDLE_KEEP = 1.0  # seconds an idle internal session waits for the agent's next call
MAX_IDLE = 64  # idle sessions kept per (agent, database)


def agent_for_token(agents: tuple[AgentAuth, ...], token: str) -> AgentAuth | None:
    """The agent whose token this is (every token compared, in constant time), or None."""
    found = None
    given = token.encode()
    for agent in agents:
        if hmac.compare_digest(agent.token.encode(), given):
            found = agent
    return found


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class AgentSessions:
    """Internal sessions per (agent, database): taken for a call, given back after it. A session
    waits about IDLE_KEEP seconds (one timer sweeps them all, not one per call: an idle session
    would linger in SHOW CLIENTS and clients_now), at most MAX_IDLE per agent and database, and
    the most recently returned is taken first (its caches are the warmest)."""

    def __init__(self, server: Runtime, keep: float = IDLE_KEEP, most: int = MAX_IDLE) -> None:
        self.server, self.keep, self.most = server, keep, most
        self._idle: dict[tuple[str, str], deque[tuple[InternalClient, float]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._facts: dict[tuple[str, str], SessionFacts] = {}
        self._facts_of: Config | None = None

    def facts(self, agent: AgentAuth, database: str) -> SessionFacts:
        """The planner's facts of the agent's sessions on `database`, role policy included (what
        its statements are planned and judged with), for plans a door makes outside a session."""
        config = self.server.config
        if config is not self._facts_of:  # reloaded: the roles may have changed
            self._facts, self._facts_of = {}, config
        facts = self._facts.get((agent.name, database))
        if facts is None:
            facts, _ = session_facts(config, agent.user, database, {"application_name": agent.name})
            self._facts[(agent.name, database)] = facts
        return facts

    def database(self, agent: AgentAuth, requested: str = "") -> str:
        return requested or agent.database or self.server.admin_database()

    def take(self, agent: AgentAuth, database: str) -> InternalClient:
        idle = self._idle.get((agent.name, database))
        while idle:
            client, _ = idle.pop()
            if not client.session.closed:
                return client
        return InternalClient(self.server, agent.user, database, password=agent.password,
                              application_name=agent.name, settings={"client_encoding": "UTF8"})

    def give_back(self, agent: AgentAuth, database: str, client: InternalClient) -> None:
        if client.session.closed:
            return
        idle = self._idle.setdefault((agent.name, database), deque())
        if len(idle) >= self.most:
            client.close()
            return
        loop = asyncio.get_running_loop()
        idle.append((client, loop.time()))
        client.returned += 1
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.keep / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        old = loop.time() - self.keep
        for key, idle in list(self._idle.items()):
            while idle and idle[0][1] <= old:
                idle.popleft()[0].close()
            if not idle:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(self.keep / 2, self._sweep)

    def close(self) -> None:
        """Close every idle session (the door stops)."""
        for idle in self._idle.values():
            for client, _ in idle:
                client.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
