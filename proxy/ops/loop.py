"""The event loop every pgsluice command runs on: uvloop unless the config says otherwise."""

from __future__ import annotations

import asyncio

from proxy.base.config import Config


def install_loop(config: Config) -> None:
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            return
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
