"""The MCP door: Model Context Protocol over Streamable HTTP (`mcp_listen`, path /mcp) and
over stdio (`pgsluice mcp`: proxy/ops/mcp_stdio.py), with the official `mcp` SDK; the tools
are in service.py (their schemas and value conversions in tools.py).

HTTP callers authenticate with the gRPC door's per-agent bearer tokens
([pgsluice.agents.NAME]); a missing or unknown token gets 401 before any MCP message is
read. The door is stateless (no MCP session kept between requests, JSON responses), so
every worker can serve the same port and any request can land on any of them. Over stdio
the process runs as one configured agent (`mcp_agent`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

import mcp_types as types
import uvicorn
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server as McpServer
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.routing import Route

from proxy import __version__
from proxy.base.config import AgentAuth, Config, parse_upstream, split_host_port
from proxy.base.errors import ConfigError
from proxy.doors.mcp.service import McpService
from proxy.pipeline.agents import agent_for_token

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.mcp")
PATH = "/mcp"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTRUCTIONS = (
    "PostgreSQL through pgsluice. Explore with list_schemas, list_tables, describe_table and "
    "sample_rows, then query with one SQL statement per call and $1-style params. Results are "
    "bounded: check `truncated`. Repeated reads are served from cache (`served`).")


def mcp_server(service: McpService, agent_of: Callable[[ServerRequestContext[Any, Any]], AgentAuth]
               ) -> McpServer[Any]:
    """The SDK's low-level server, its handlers calling `service` as the request's agent."""

    async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
        agent_of(ctx)
        return types.ListToolsResult(tools=list(service.tools.values()))

    async def call_tool(ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        return await service.call_tool(agent_of(ctx), params.name, params.arguments)

    async def list_resources(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListResourcesResult:
        return await service.list_resources(agent_of(ctx))

    async def read_resource(ctx: ServerRequestContext[Any, Any],
                            params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        return await service.read_resource(agent_of(ctx), str(params.uri))

    def input_schema(name: str) -> dict[str, Any] | None:
        tool = service.tools.get(name)
        return tool.input_schema if tool is not None else None

    return McpServer("pgsluice", version=__version__, title="pgsluice (PostgreSQL)",
                     instructions=INSTRUCTIONS, get_tool_input_schema=input_schema,
                     on_list_tools=list_tools, on_call_tool=call_tool, on_list_resources=list_resources,
                     on_read_resource=read_resource)


class _Tokens:
    """The SDK's TokenVerifier over [pgsluice.agents.NAME]: the access token names the agent."""

    def __init__(self, server: Runtime) -> None:
        self.server = server

    async def verify_token(self, token: str) -> AccessToken | None:
        agent = agent_for_token(self.server.config.agents, token)
        if agent is None:
            log.info("MCP request refused: unknown bearer token")
            return None
        return AccessToken(token=token, client_id=agent.name, scopes=[])


class McpHttpDoor:
    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.service = McpService(server)
        self.port = 0
        self._uvicorn: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._main: asyncio.Task[None] | None = None

    def _agent(self, ctx: ServerRequestContext[Any, Any]) -> AgentAuth:
        user = ctx.request.scope.get("user") if ctx.request is not None else None
        if isinstance(user, AuthenticatedUser):
            for agent in self.server.config.agents:
                if agent.name == user.access_token.client_id:
                    return agent
        raise PermissionError("pgsluice: no agent for this request")  # RequireAuthMiddleware let it by?

    def app(self, host: str) -> Starlette:
        security = None
        if host in _LOOPBACK:  # as the SDK does for a loopback server: no DNS rebinding
            security = TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
                allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*",
                                 "https://127.0.0.1:*", "https://localhost:*", "https://[::1]:*"])
        manager = StreamableHTTPSessionManager(app=mcp_server(self.service, self._agent), stateless=True,
                                               json_response=True, security_settings=security)
        endpoint = RequireAuthMiddleware(StreamableHTTPASGIApp(manager), [])
        auth = Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(_Tokens(self.server)))
        return Starlette(routes=[Route(PATH, endpoint=endpoint)], middleware=[auth],
                         lifespan=lambda app: manager.run())

    def _tls(self) -> dict[str, Any]:
        """HTTPS with the wire door's files, as the gRPC door (tls_ca: client certificates)."""
        c = self.server.config
        if not c.tls_cert or c.tls_mode == "disable":
            return {}
        return {"ssl_certfile": c.tls_cert, "ssl_keyfile": c.tls_key, "ssl_ca_certs": c.tls_ca or None,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if c.tls_ca else ssl.CERT_NONE}

    async def start(self, listen: str, reuse_port: bool = False) -> None:
        host, port = split_host_port(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=reuse_port, backlog=1024)
        sock.setblocking(False)
        tls = self._tls()
        # log_config=None: uvicorn leaves our logging alone; it and the SDK log each start, stop
        # and request at INFO, which our own lines already say
        for name in ("mcp", "uvicorn"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
        config = uvicorn.Config(self.app(host), log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=int(self.server.config.shutdown_timeout) or None,
                                **tls)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        self._uvicorn, self._sock, self.port = server, sock, sock.getsockname()[1]
        self._main = asyncio.get_running_loop().create_task(server.main_loop())
        log.info("MCP door on %s://%s:%d%s", "https" if tls else "http", host, self.port, PATH)

    async def stop(self) -> None:
        if self._uvicorn is None:
            return
        self._uvicorn.should_exit = True
        if self._main is not None:
            await self._main
        await self._uvicorn.shutdown(sockets=[self._sock] if self._sock is not None else None)
        self._uvicorn = None


# ---- stdio: `pgsluice mcp` ----------------------------------------------------------------------

def stdio_agent(config: Config) -> AgentAuth:
    """The agent `pgsluice mcp` runs as: `mcp_agent`, or the only one configured, or (none
    configured) the upstream URL's user."""
    if config.mcp_agent:
        for agent in config.agents:
            if agent.name == config.mcp_agent:
                return agent
        raise ConfigError(f"mcp_agent {config.mcp_agent!r} is not among [pgsluice.agents.NAME] "
                          f"({', '.join(a.name for a in config.agents) or 'none configured'})")
    if len(config.agents) == 1:
        return config.agents[0]
    if config.agents:
        raise ConfigError("several agents are configured: choose one with --mcp-agent NAME")
    url = parse_upstream(config.upstream)
    return AgentAuth("mcp", "", url.user, url.password, url.database)


def stdio_config(config: Config) -> Config:
    """Only the pipeline: no listener of any door in a process an agent runtime launches."""
    return dataclasses.replace(config, grpc_listen="", metrics_listen="", mcp_listen="", workers=1)
