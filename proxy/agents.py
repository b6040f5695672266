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
from typing import TYPE_CHECKING

from .config import AgentAuth
from .internal import InternalClient

if TYPE_CHECKING:
    from .server import Server

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
    """Internal sessions per (agent, database): taken for a call, given back after it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._idle: dict[tuple[str, str], list[InternalClient]] = {}

    def database(self, agent: AgentAuth, requested: str = "") -> str:
        return requested or agent.database or self.server.admin_database()

    def take(self, agent: AgentAuth, database: str) -> InternalClient:
        idle = self._idle.get((agent.name, database))
        while idle:
            client = idle.pop()
            if not client.session.closed:
                return client
        return InternalClient(self.server, agent.user, database, password=agent.password,
                              application_name=agent.name, settings={"client_encoding": "UTF8"})

    def give_back(self, agent: AgentAuth, database: str, client: InternalClient) -> None:
        """Keep the session for the agent's next call, for IDLE_KEEP seconds at most (a session
        is cheap to make; an idle one would linger in SHOW CLIENTS and clients_now)."""
        if client.session.closed:
            return
        key = (agent.name, database)
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE:
            idle.append(client)
            client.returned += 1
            asyncio.get_running_loop().call_later(IDLE_KEEP, self._expire, key, client, client.returned)
        else:
            client.close()

    def _expire(self, key: tuple[str, str], client: InternalClient, returned: int) -> None:
        idle = self._idle.get(key)
        if idle is not None and client.returned == returned and client in idle:
            idle.remove(client)
            client.close()
