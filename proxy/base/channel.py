"""Messages between the workers of `--workers N`, over a unix socket per worker.

Why: the kernel (SO_REUSEPORT) hands each new TCP connection to any worker, but some
requests concern state only one worker has. A CancelRequest arrives on a connection of its
own; its key names the worker that owns the session (the low byte of the key's process
id, see Server.new_cancel_key), which is sent the request here. `DROP DATABASE` must not
find idle server connections of any worker in its way, so every worker is asked to close
its own first.

Rules: one request per connection (kind byte, payload), answered with one byte once it
has been handled, so the sender knows it is done; a worker that does not answer within
the timeout is skipped (a cancel is then lost, as Postgres may lose one too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger("pgsluice.channel")
CANCEL, CLOSE_DATABASE = b"C", b"D"
_MAX_PAYLOAD = 1024
Handler = Callable[[bytes, bytes], Awaitable[None]]


def socket_path(directory: str, worker: int) -> str:
    return os.path.join(directory, f"worker-{worker}.sock")


class WorkerChannel:
    """This worker's end: serves requests from the others, sends requests to them."""

    def __init__(self, directory: str, worker: int, workers: int, handler: Handler) -> None:
        self.directory = directory
        self.worker = worker
        self.workers = workers
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = socket_path(self.directory, self.worker)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        self._server = await asyncio.start_unix_server(self._serve, path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                data = await reader.read(-1)  # the sender writes EOF after its one request
                if data and len(data) <= _MAX_PAYLOAD:
                    await self.handler(data[:1], data[1:])
                writer.write(b"k")
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            log.debug("worker channel request failed: %s", exc)
        except Exception:
            log.exception("worker channel request failed")
        finally:
            writer.close()

    async def send(self, worker: int, kind: bytes, payload: bytes, timeout: float = 2.0) -> bool:
        """Send one request to `worker`; True once it says it has handled it."""
        if not 0 <= worker < self.workers or worker == self.worker:
            return False
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(socket_path(self.directory, worker))
                try:
                    writer.write(kind + payload)
                    await writer.drain()
                    writer.write_eof()
                    return await reader.read(1) == b"k"
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("worker %d did not take a request (%s)", worker, exc)
            return False

    async def broadcast(self, kind: bytes, payload: bytes, timeout: float = 2.0) -> None:
        """Send to every other worker at once; returns when all have answered or timed out."""
        await asyncio.gather(*(self.send(w, kind, payload, timeout) for w in range(self.workers)
                               if w != self.worker))
