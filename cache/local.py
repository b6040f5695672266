"""The in-process cache tier: an LRU bounded in bytes, with a TTL as the last safety net.

Values are the wire messages a result is made of (bytes). An entry is charged what it
really takes in memory: the value object, the key's own parts (keys.key_footprint) and the
bookkeeping (entry tuple, timestamp, dict and order slots), so that `max_bytes` bounds what
the process holds (tests/test_cache_units.py checks it with tracemalloc). Entries larger
than `max_entry` are refused by `put` (the caller counts that as a bypass).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .keys import key_footprint

# Per entry besides key and value: the (value, stored, size) tuple (64), the timestamp (24),
# the size (28), and the OrderedDict's hash-table and order slots (about 90, averaged over
# its fill factor), measured with tracemalloc on CPython 3.11.
ENTRY_OVERHEAD = 200


def entry_size(key: Hashable, value: bytes) -> int:
    """What an entry takes in memory, as far as the cache is charged for it."""
    return key_footprint(key) + sys.getsizeof(value) + ENTRY_OVERHEAD


@dataclass(slots=True)
class LocalStats:
    hits: int = 0
    misses: int = 0
    expired: int = 0
    evictions: int = 0
    too_large: int = 0
    bytes: int = 0
    entries: int = 0


class LocalCache:
    def __init__(self, max_bytes: int = 256 * 1024 * 1024, max_entry: int = 1024 * 1024,
                 ttl: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1 or max_entry < 1 or ttl <= 0:
            raise ValueError("max_bytes, max_entry and ttl must be positive")
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.ttl = ttl
        self.stats = LocalStats()
        self._clock = clock
        self._data: OrderedDict[Hashable, tuple[bytes, float, int]] = OrderedDict()

    def get(self, key: Hashable, max_age: float | None = None) -> bytes | None:
        """The value if present and younger than both the TTL and `max_age` seconds."""
        item = self._data.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        value, stored, size = item
        age = self._clock() - stored
        if age >= self.ttl:
            self._drop(key, size)
            self.stats.expired += 1
            self.stats.misses += 1
            return None
        if max_age is not None and age > max_age:
            self.stats.misses += 1  # too old for this caller, still fine for others
            return None
        self._data.move_to_end(key)
        self.stats.hits += 1
        return value

    def put(self, key: Hashable, value: bytes) -> bool:
        if len(value) > self.max_entry:
            self.stats.too_large += 1
            return False
        size = entry_size(key, value)
        if size > self.max_bytes:
            self.stats.too_large += 1
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.stats.bytes -= old[2]
            self.stats.entries -= 1
        while self._data and self.stats.bytes + size > self.max_bytes:
            _, (_, _, victim_size) = self._data.popitem(last=False)
            self.stats.bytes -= victim_size
            self.stats.entries -= 1
            self.stats.evictions += 1
        self._data[key] = (value, self._clock(), size)
        self.stats.bytes += size
        self.stats.entries += 1
        return True

    def discard(self, key: Hashable) -> None:
        item = self._data.get(key)
        if item is not None:
            self._drop(key, item[2])

    def clear(self) -> None:
        self._data.clear()
        self.stats.bytes = self.stats.entries = 0

    def __len__(self) -> int:
        return len(self._data)

    def _drop(self, key: Hashable, size: int) -> None:
        del self._data[key]
        self.stats.bytes -= size
        self.stats.entries -= 1
