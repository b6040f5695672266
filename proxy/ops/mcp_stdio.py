"""`pgsluice mcp`: the pipeline for the MCP door over stdio only, in a process an agent
runtime launches (no listener of any door)."""

from __future__ import annotations

import asyncio
import logging
import signal

from mcp.server.stdio import stdio_server

from proxy.base.config import Config
from proxy.doors.mcp.door import mcp_server, stdio_agent, stdio_config
from proxy.doors.mcp.service import McpService
from proxy.ops.server import Server

log = logging.getLogger("pgsluice.mcp")


async def serve_stdio(config: Config) -> None:

    agent = stdio_agent(config)
    server = Server(stdio_config(config))
    await server.start(wire=False)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if main is not None:
            loop.add_signal_handler(sig, main.cancel)
    lowlevel = mcp_server(McpService(server), lambda ctx: agent)
    log.info("MCP over stdio as agent %s (user %s)", agent.name, agent.user)
    try:
        async with stdio_server() as (read, write):
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
    except asyncio.CancelledError:
        pass
    finally:
        await server.shutdown(timeout=min(server.config.shutdown_timeout, 5.0))
