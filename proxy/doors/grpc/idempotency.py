"""Idempotency keys for the gRPC door: a write retried with the same key returns the first
execution's result. Kept in Redis when configured (SET NX while running, then the result,
both expiring after `window` seconds), else in this process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from cache.redis_tier import PREFIX, RedisDown, RedisTier

_PENDING = b"\x00pending"


class Idempotency:
    def __init__(self, window: float, redis: RedisTier | None) -> None:
        self.window = window
        self.redis = redis
        self._done: dict[str, tuple[float, bytes]] = {}
        self._running: dict[str, asyncio.Future[bytes | None]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        """The stored result for `key`, or `work()`'s (None: it failed, nothing is kept)."""
        redis = self.redis
        if redis is not None and redis.up:
            try:
                return await self._run_redis(redis, key, work)
            except RedisDown:
                pass  # Redis went away: this process's memory is the best there is
        now = time.monotonic()
        stored = self._done.get(key)
        if stored is not None and now - stored[0] < self.window:
            return stored[1]
        running = self._running.get(key)
        if running is not None:
            result = await asyncio.shield(running)
            return result if result is not None else await self.run(key, work)
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._running[key] = fut
        try:
            result = await work()
        except BaseException:
            fut.set_result(None)
            raise
        finally:
            self._running.pop(key, None)
        if not fut.done():
            fut.set_result(result)
        if result is not None:
            if len(self._done) > 100_000:
                self._done = {k: v for k, v in self._done.items() if now - v[0] < self.window}
            self._done[key] = (now, result)
        return result

    async def _run_redis(self, redis: RedisTier, key: str,
                         work: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        name = PREFIX + "idem:" + key
        ms = max(1, int(self.window * 1000))
        deadline = time.monotonic() + self.window
        while True:
            if await redis.call(redis.client.set(name, _PENDING, nx=True, px=ms)):
                try:
                    result = await work()
                except BaseException:
                    await redis.call(redis.client.delete(name))
                    raise
                if result is None:
                    await redis.call(redis.client.delete(name))
                else:
                    await redis.call(redis.client.set(name, result, px=ms))
                return result
            stored = await redis.call(redis.client.get(name))
            if isinstance(stored, bytes) and stored != _PENDING:
                return stored
            if time.monotonic() > deadline:
                raise RedisDown("the first execution of this idempotency key never finished")
            await asyncio.sleep(0.02)  # another instance (or call) is running it
