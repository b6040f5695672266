"""The gRPC door: `pgsluice.v1.Sluice` on `grpc_listen`, plus grpc.health.v1 and reflection.

This module is the server around the service: its options, TLS credentials, the health status
that follows Postgres, reflection, start and stop. The door's other rooms:
- service.py: the Sluice methods and how they are registered; session.py: the Session stream.
- statements.py: how one agent's statement runs. Every call goes through an InternalClient
  (proxy/pipeline/internal.py), so it shares the planner, guardrails, cache, single-flight and
  pool with the wire door; a query cached by a psql client is a hit for a gRPC agent with the
  same role and settings, and the other way round.
- calls.py: agents authenticate with `authorization: Bearer <token>` ([pgsluice.agents.NAME]
  in the config); Postgres errors come back as gRPC status codes with the SQLSTATE, message,
  detail, hint and position in the trailing metadata (`pgsluice-sqlstate`, ...).
- wire.py: Query, Batch and Session replies written as bytes from the wire messages the
  pipeline produced (no protobuf objects per row); idempotency.py: idempotency keys.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.doors.grpc.service import SERVICE, SluiceService, handlers

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.grpc")


class GrpcDoor:
    """The gRPC server of one pgsluice process, serving SluiceService, health and reflection."""

    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", server.config.max_message_size),
            ("grpc.max_send_message_length", server.config.max_message_size),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)])
        self.service = SluiceService(server)
        self.grpc.add_generic_rpc_handlers((handlers(self.service),))
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (pb.DESCRIPTOR.services_by_name["Sluice"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        self.port = 0
        self._checker: asyncio.Task[None] | None = None

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS from the wire door's files (tls_ca: client certificates required); None: plain."""
        c = self.server.config
        if not c.tls_cert or c.tls_mode == "disable":
            return None
        with open(c.tls_key, "rb") as key, open(c.tls_cert, "rb") as cert:
            pair = (key.read(), cert.read())
        ca = None
        if c.tls_ca:
            with open(c.tls_ca, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    async def start(self, listen: str) -> None:
        credentials = self._credentials()
        self.port = (self.grpc.add_secure_port(listen, credentials) if credentials is not None
                     else self.grpc.add_insecure_port(listen))
        if not self.port:
            raise OSError(f"cannot listen on {listen}")
        await self.grpc.start()
        self._checker = asyncio.get_running_loop().create_task(self._check())
        log.info("gRPC door on %s%s", listen, " (TLS)" if credentials is not None else "")

    async def _check(self) -> None:
        """NOT_SERVING while Postgres cannot be reached."""
        while True:
            try:
                async with asyncio.timeout(2):
                    conn = await self.server.control_connection(self.server.admin_database())
                    await conn.close()
                status = health_pb2.HealthCheckResponse.SERVING
            except Exception:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE):
                await self.health.set(name, status)
            await asyncio.sleep(1.0)

    async def stop(self, grace: float) -> None:
        """Session streams stop reading and end once what they read is answered; unary calls
        in flight get `grace` seconds, as grpc's own stop gives them."""
        if self._checker is not None:
            self._checker.cancel()
        for stream in list(self.service.streams):
            stream.shutdown()
        await self.grpc.stop(grace)
        self.service.sessions.close()
