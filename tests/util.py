"""Shared test helpers: polling waits and the handle for proxy subprocesses."""

from __future__ import annotations

import asyncio
import inspect
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, cast
from urllib.parse import quote

T = TypeVar("T")

# Passwords of the roles the session `pg` fixture creates (trusted_user has none).
PASSWORDS: dict[str, str] = {
    "postgres": "postgres",
    "alice": "alice-pw",
    "bob": "bob-pw",
    "md5_user": "md5-pw",
}


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10,
    interval: float = 0.02,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that value.

    Exceptions listed in ``ignore`` count as "not yet". Raises TimeoutError after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"condition not met within {timeout}s: {what}") from last_exc
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10,
    interval: float = 0.02,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Async twin of :func:`wait_until`; ``predicate`` may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return cast(T, value)
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"condition not met within {timeout}s: {what}") from last_exc
        await asyncio.sleep(interval)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ProxyHandle:
    """A `python -m proxy serve` subprocess started by the ``proxy_factory`` fixture."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    def dsn(
        self, user: str = "postgres", password: str | None = "postgres", database: str = "postgres"
    ) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def log_text(self) -> str:
        """Everything the proxy wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return cast(int, self.proc.returncode)


class ProxyFactory(Protocol):
    def __call__(self, *extra_args: str, env: Mapping[str, str] | None = None,
                 listen_host: str = "127.0.0.1") -> ProxyHandle: ...
