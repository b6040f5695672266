"""Internal sessions kept between an agent's calls: a door without connections (gRPC's unary
calls, a Session stream's spare sessions) takes one per call and gives it back, so a call
usually finds a session ready instead of making one.

Rules: a session waits about `keep` seconds (one timer sweeps them all, not one per call: an
idle session would linger in SHOW CLIENTS and clients_now), at most `most` per agent and
database, and the most recently returned is taken first (its caches are the warmest).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from .internal import InternalClient

if TYPE_CHECKING:
    from .config import AgentAuth
    from .server import Server


class IdleSessions:
    def __init__(self, server: Server, keep: float = 1.0, most: int = 64) -> None:
        self.server, self.keep, self.most = server, keep, most
        self._idle: dict[tuple[str, str], deque[tuple[InternalClient, float]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

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
        for idle in self._idle.values():
            for client, _ in idle:
                client.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
