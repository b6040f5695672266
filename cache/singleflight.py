"""Single-flight: while one execution of a key is in flight, identical requests wait for
its result instead of running again.

The leader runs the work in a task of its own, so a caller that goes away (its client
disconnected, its task was cancelled) never cancels the others: waiters are shielded,
and the work goes on while anyone still wants it. A failure reaches every waiter as the
same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class FlightStats:
    leaders: int = 0  # executions started
    joined: int = 0  # callers that waited for an execution already in flight


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Task[T]] = {}
        self.stats = FlightStats()

    def in_flight(self, key: Hashable) -> bool:
        return key in self._flights

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result of `work()` for `key`, and whether this caller joined another's flight."""
        task = self._flights.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lead(key, work))
            task.add_done_callback(_retrieve)  # everyone may have left: no "never retrieved"
            self._flights[key] = task
            self.stats.leaders += 1
        else:
            self.stats.joined += 1
        return await asyncio.shield(task), joined

    async def _lead(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        finally:
            self._flights.pop(key, None)


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()
