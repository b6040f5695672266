"""LISTEN/NOTIFY through pgsluice: a notification names its sender by the process id of the
BackendKeyData pgsluice gave the sending client (as Postgres does with its own), so drivers
can tell their own notifications from others' (asyncpg's test_listen_01/02)."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg

from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

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


async def test_sender_on_another_worker(proxy_factory: ProxyFactory) -> None:
    """With two workers the sender's client may be on the other one: still its own pid."""
    proxy = proxy_factory(env={"PGSLUICE_WORKERS": "2"})

    async def worker(conn: asyncpg.Connection) -> str:
        return str(dict((r[0], r[1]) for r in await conn.fetch("SHOW CACHE"))["worker_pid"])

    listener = await asyncpg.connect(dsn(proxy))
    senders: list[asyncpg.Connection] = []
    try:
        mine = await worker(listener)
        for _ in range(40):  # the kernel spreads connections over the workers
            senders.append(await asyncpg.connect(dsn(proxy)))
            if await worker(senders[-1]) != mine:
                break
            await asyncio.sleep(0.05)
        sender = senders[-1]
        assert await worker(sender) != mine, "every connection landed on one worker"
        got: asyncio.Queue[int] = asyncio.Queue()
        await listener.add_listener("nt_two", lambda _c, pid, _ch, _p: got.put_nowait(pid))
        await sender.execute("NOTIFY nt_two")
        assert await asyncio.wait_for(got.get(), 5) == sender.get_server_pid()
    finally:
        await listener.close()
        for conn in senders:
            await conn.close()
