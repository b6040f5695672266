"""LISTEN/NOTIFY through pgsluice: a notification names its sender by the process id of the
BackendKeyData pgsluice gave the sending client (as Postgres does with its own), so drivers
can tell their own notifications from others' (asyncpg's test_listen_01/02)."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg

from tests.util import PASSWORDS, ProxyHandle

USER, DB = "alice", "app"


def dsn(proxy: ProxyHandle) -> str:
    return proxy.dsn(USER, PASSWORDS[USER], DB)


async def test_asyncpg_notification_pids(proxy: ProxyHandle) -> None:
    listener = await asyncpg.connect(dsn(proxy))
    sender = await asyncpg.connect(dsn(proxy))
    try:
        got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        await listener.add_listener("nt_chan", lambda _c, pid, channel, payload: got.put_nowait(
            (pid, channel, payload)))
        await listener.execute("NOTIFY nt_chan, 'mine'")
        assert await asyncio.wait_for(got.get(), 5) == (listener.get_server_pid(), "nt_chan", "mine")
        await sender.execute("NOTIFY nt_chan, 'yours'")
        assert await asyncio.wait_for(got.get(), 5) == (sender.get_server_pid(), "nt_chan", "yours")
        assert sender.get_server_pid() != listener.get_server_pid()
    finally:
        await listener.close()
        await sender.close()


def test_psycopg_notification_pid(proxy: ProxyHandle) -> None:
    with psycopg.connect(dsn(proxy), autocommit=True) as conn:
        conn.execute("LISTEN nt_psy")
        conn.execute("NOTIFY nt_psy, 'x'")
        notify = next(conn.notifies(timeout=5))
        assert (notify.pid, notify.channel, notify.payload) == (conn.info.backend_pid, "nt_psy", "x")
