"""The pgsluice server process: the Runtime (pipeline/runtime.py) and the doors it serves —
the wire listener, gRPC, MCP over HTTP, /metrics — started and shut down in order.

Shutdown (uvicorn's order): stop listening, let clients finish their transactions
up to `shutdown_timeout`, then close the rest with 57P01.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from proxy.base.tls import door_context
from proxy.doors.wire.session import WireSession
from proxy.ops.metrics import MetricsServer
from proxy.pipeline.runtime import Runtime

if TYPE_CHECKING:
    from cache.versions import SharedCounters
    from proxy.base.config import Config
    from proxy.doors.grpc.door import GrpcDoor
    from proxy.doors.mcp.door import McpHttpDoor

log = logging.getLogger("pgsluice.server")


class Server(Runtime):
    """A Runtime serving its doors."""

    def __init__(self, config: Config, shared: SharedCounters | None = None, worker: int = 0,
                 stats_dir: str | None = None) -> None:
        super().__init__(config, shared, worker, stats_dir)
        self._servers: list[asyncio.Server] = []
        self.metrics: MetricsServer | None = None
        self.grpc: GrpcDoor | None = None
        self.mcp: McpHttpDoor | None = None

    async def start(self, wire: bool = True) -> None:
        """Serve the configured doors; without `wire`, no wire listener (`pgsluice mcp`: the
        pipeline for the stdio MCP door only)."""
        loop = asyncio.get_running_loop()
        host, port = self.config.listen_host, self.config.listen_port
        await self.open_channel()  # before a client can come
        if wire:
            server = await loop.create_server(lambda: WireSession(self), host, port, reuse_address=True,
                                              reuse_port=self.config.workers > 1, backlog=1024)
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._servers.append(server)
        self.start_background()
        if self.config.grpc_listen:
            from proxy.doors.grpc.door import GrpcDoor
            self.grpc = GrpcDoor(self)
            try:
                await self.grpc.start(self.config.grpc_listen)
            except (OSError, RuntimeError) as exc:
                log.error("gRPC door not served on %s: %s", self.config.grpc_listen, exc)
                self.grpc = None
        if self.config.mcp_listen:
            from proxy.doors.mcp.door import McpHttpDoor
            self.mcp = McpHttpDoor(self)
            try:  # every worker on the same port: the door keeps no state between requests
                await self.mcp.start(self.config.mcp_listen, reuse_port=self.config.workers > 1)
            except OSError as exc:
                log.error("MCP door not served on %s: %s", self.config.mcp_listen, exc)
                self.mcp = None
        if self.config.metrics_listen:
            self.metrics = MetricsServer(self)
            try:  # every worker on the same port: each answers with the sum over all of them
                await self.metrics.start(self.config.metrics_listen, reuse_port=self.config.workers > 1,
                                         tls=door_context(self.config) if self.config.metrics_tls else None)
            except OSError as exc:
                log.error("metrics not served on %s: %s", self.config.metrics_listen, exc)
                self.metrics = None
        if wire:
            log.info("pgsluice listening on %s:%d, upstream %s:%d", host, port,
                     self.upstream.host, self.upstream.port)

    @property
    def port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    async def shutdown(self, timeout: float | None = None) -> None:
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        self.shutting_down = True
        for server in self._servers:
            server.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.grpc is not None:
            await self.grpc.stop(grace=timeout)
        if self.mcp is not None:
            await self.mcp.stop()
        await self.drain(timeout)
        await self.close()
