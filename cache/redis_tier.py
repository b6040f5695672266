"""The shared tier: cached answers and table versions in Redis, bumps published to every instance.

Commands go through redis.asyncio, each under `timeout` seconds (milliseconds in practice):
Redis slow or gone costs a lookup that much, never more. Version bumps are INCR + PUBLISH
in one script, so a bump is visible to every instance once the writer's client sees its
CommandComplete.

Each instance keeps a mirror of the versions it has used, updated by the published bumps,
read by a subscriber connection of our own (plain RESP). Read-your-writes across instances
needs one more thing: before a lookup, every bump another instance finished before the
lookup began must have reached the mirror. A PING on the subscriber connection gives
exactly that — Redis answers it after delivering every message published before it — and
one PING serves every lookup that arrived before it was sent (`barrier`). At most one PING
is in flight: look-ups that arrive meanwhile share the next one, sent when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .versions import Versions

log = logging.getLogger("pgsluice.cache.redis")

PREFIX = "pgsluice:"
CHANNEL = PREFIX + "bumps"
_BUMP = """
local out = {}
for i, k in ipairs(KEYS) do
  local n = redis.call('INCR', k)
  out[i] = n
  redis.call('PUBLISH', ARGV[1], k .. ' ' .. n)
end
return out
"""
_STAMP = 8  # bytes of store time (ms since the epoch) before each stored value


class RedisDown(Exception):
    """Redis is unreachable or did not answer within the timeout."""


def _resp(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def _read_reply(reader: asyncio.StreamReader) -> object:
    line = await reader.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"*":
        return [await _read_reply(reader) for _ in range(int(rest))]
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2]
    if kind == b":":
        return int(rest)
    if kind == b"-":
        raise ConnectionError(rest.decode("utf-8", "replace"))
    return rest


class RedisTier:
    def __init__(self, url: str, versions: Versions, timeout: float = 0.05,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.url = url
        self.versions = versions
        self.timeout = timeout
        self.on_change = on_change
        self.up = False
        self.errors = 0
        self.client = aioredis.Redis.from_url(url, socket_timeout=max(timeout * 4, 0.5),
                                              socket_connect_timeout=max(timeout * 4, 0.5))
        self._bump_script = self.client.register_script(_BUMP)
        self._writer: asyncio.StreamWriter | None = None
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._next: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty: set[str] = set()  # bumped while Redis was away: pushed when it is back
        self._slow = 0

    # ---- lifecycle ----

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._set_up(False)
        await self.client.aclose()

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            log.warning("redis %s", "is back" if up else "is unreachable: serving without it")
            if not up:
                self._fail_pongs()
            if self.on_change is not None:
                self.on_change(up)

    def _fail_pongs(self) -> None:
        for fut in self._pongs:
            if not fut.done():
                fut.set_exception(RedisDown("redis connection lost"))
        self._pongs.clear()
        if self._next is not None and not self._next.done():
            self._next.set_exception(RedisDown("redis connection lost"))
        self._next = None

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._subscribe_loop()
            except asyncio.CancelledError:
                raise
            except (OSError, ConnectionError, RedisError, asyncio.IncompleteReadError, TimeoutError,
                    ValueError) as exc:
                if self.up:
                    log.warning("redis subscriber: %s", exc)
            finally:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                self._set_up(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _subscribe_loop(self) -> None:
        parts = urlsplit(self.url)
        async with asyncio.timeout(max(self.timeout * 20, 1.0)):
            reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379)
            self._writer = writer
            if parts.password is not None:
                user = unquote(parts.username or "")
                auth = _resp("AUTH", user, unquote(parts.password)) if user else \
                    _resp("AUTH", unquote(parts.password))
                writer.write(auth)
                await _read_reply(reader)
            writer.write(_resp("SUBSCRIBE", CHANNEL))
            await _read_reply(reader)
            # a fresh Redis (restarted, flushed) gets a new generation: old keys never match
            await self.client.set(PREFIX + "generation", secrets.token_hex(8), nx=True)
            generation = await self.client.get(PREFIX + "generation")
            dirty = sorted(self._dirty)
            if dirty:
                await self._bump_script(keys=[PREFIX + "v:" + n for n in dirty], args=[CHANNEL])
                self._dirty.clear()
        self.versions.reset()
        self.versions.generation = "r" + (generation.decode() if isinstance(generation, bytes) else "")
        self._set_up(True)
        while True:
            reply = await _read_reply(reader)
            if not isinstance(reply, list) or not reply:
                continue
            kind = reply[0]
            data = reply[2] if len(reply) == 3 else None
            if kind == b"message" and isinstance(data, bytes):
                key, _, n = data.decode("utf-8", "replace").rpartition(" ")
                if key.startswith(PREFIX + "v:") and n.isdigit():
                    self.versions.observe(key[len(PREFIX) + 2:], int(n))
            elif kind == b"pong" and self._pongs:
                fut = self._pongs.popleft()
                if not fut.done():
                    fut.set_result(None)
                if not self._pongs and self._next is not None:
                    self._send_ping()  # the look-ups that came while it was in flight: one PING

    # ---- the barrier ----

    def barrier_future(self) -> asyncio.Future[None] | None:
        """A future done once every bump published before this call is in the mirror (its
        exception: RedisDown); None when Redis is down. The caller owns the timeout."""
        if not self.up or self._writer is None:
            return None
        fut = self._next
        if fut is None:
            fut = self._next = asyncio.get_running_loop().create_future()
            if not self._pongs:  # else it goes when the PING in flight comes back
                asyncio.get_running_loop().call_soon(self._send_ping)
        return fut

    def barrier_answered(self) -> None:
        self._slow = 0

    async def barrier(self) -> None:
        """Return once every bump published before this call is in the mirror."""
        fut = self.barrier_future()
        if fut is None:
            raise RedisDown("redis is down")
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            self._slow_answer()
            raise RedisDown("redis did not answer in time") from None
        self._slow = 0

    def _send_ping(self) -> None:
        fut, self._next = self._next, None
        if fut is None or fut.done():
            return
        if self._writer is None or self._writer.is_closing():
            fut.set_exception(RedisDown("redis is down"))
            return
        self._pongs.append(fut)
        self._writer.write(_resp("PING"))

    def resync(self) -> None:
        """A bump may not have reached Redis (it is kept to push again): reconnect now. Until
        the new connection has pushed it and read the generation again, this instance
        serves without Redis (its reads bypass the cache)."""
        if self._writer is not None:
            self._writer.close()

    def slow_answer(self) -> None:
        """A look-up gave up waiting for Redis (after enough of them, reconnect)."""
        self._slow_answer()

    def _slow_answer(self) -> None:
        self.errors += 1
        self._slow += 1
        if self._slow >= 20 and self._writer is not None:  # consistently too slow: reconnect
            self._slow = 0
            self._writer.close()

    # ---- versions and values ----

    async def load_versions(self, names: list[str]) -> None:
        """Fill the mirror for names it has not seen (after a barrier)."""
        values = await self._call(self.client.mget([PREFIX + "v:" + n for n in names]))
        assert isinstance(values, list)
        for n, value in zip(names, values, strict=True):
            self.versions.observe(n, int(value) if value else 0)

    async def bump(self, names: list[str]) -> None:
        """INCR + PUBLISH each version; the mirror learns the new values at once."""
        keys = [PREFIX + "v:" + n for n in names]
        try:
            values = await self._call(self._bump_script(keys=keys, args=[CHANNEL]))
        except RedisDown:
            self._dirty.update(names)
            raise
        assert isinstance(values, list)
        for n, value in zip(names, values, strict=True):
            self.versions.observe(n, int(value))

    async def get(self, key: str) -> tuple[bytes, float] | None:
        """A stored value and its age in seconds, or None."""
        raw = await self._call(self.client.get(PREFIX + "c:" + key))
        if not isinstance(raw, bytes) or len(raw) < _STAMP:
            return None
        stored = int.from_bytes(raw[:_STAMP], "big") / 1000.0
        return raw[_STAMP:], max(0.0, time.time() - stored)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        stamp = int(time.time() * 1000).to_bytes(_STAMP, "big")
        await self._call(self.client.set(PREFIX + "c:" + key, stamp + value, px=max(1, int(ttl * 1000))))

    async def call(self, coro: object) -> object:
        """A command under the timeout; RedisDown if Redis is down, slow or failing."""
        return await self._call(coro)

    async def _call(self, coro: object) -> object:
        if not self.up:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise RedisDown("redis is down")
        try:
            async with asyncio.timeout(self.timeout):
                return await coro  # type: ignore[misc]
        except TimeoutError:
            self._slow_answer()
            raise RedisDown("redis did not answer in time") from None
        except (RedisError, OSError) as exc:
            self.errors += 1
            raise RedisDown(str(exc)) from None
