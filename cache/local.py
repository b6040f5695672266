"""The in-process cache tier: an LRU bounded in bytes, with a TTL as the last safety net.

Values are the wire messages a result is made of (bytes). An entry is charged what it
really takes in memory: the value object, the key's own parts (keys.key_footprint) and the
bookkeeping (entry object, timestamp, dict and order slots), so that `max_bytes` bounds what
the process holds (tests/test_cache_units.py checks it with tracemalloc). Entries larger
than `max_entry` are refused by `put` (the caller counts that as a bypass).

An entry may have aliases: other dicts that map something else to it (the wire door's fast
path, proxy/pipeline/fastpath.py). They are charged to the entry and removed with it, so an alias
never outlives its entry nor escapes `max_bytes`. A hit through an alias only marks the
entry used; eviction gives a used entry a second chance (CLOCK), as it would have moved to
the end on a hit by key.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .keys import key_footprint

# Per entry besides key and value: the Entry object (72), the timestamp (24), the size (28),
# and the OrderedDict's hash-table and order slots (about 90, averaged over its fill factor),
# measured with tracemalloc on CPython 3.11.
ENTRY_OVERHEAD = 200
Alias = tuple[dict[Any, Any], Hashable]  # (a dict, the key of what it holds: an object whose
                                         # `entry` is the Entry)


class Entry:
    """A value in the cache, with when it was stored and what it is charged."""

    __slots__ = ("aliases", "size", "stored", "used", "value")

    def __init__(self, value: bytes, stored: float, size: int) -> None:
        self.value = value
        self.stored = stored
        self.size = size
        self.used = False  # hit through an alias since the eviction hand last passed
        self.aliases: list[Alias] | None = None

    def unlink(self) -> None:
        """The entry leaves the cache: so do its aliases."""
        aliases, self.aliases = self.aliases, None
        if aliases:
            for holder, key in aliases:
                if getattr(holder.get(key), "entry", None) is self:  # not replaced since
                    del holder[key]


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
        self._data: OrderedDict[Hashable, Entry] = OrderedDict()

    def get(self, key: Hashable, max_age: float | None = None) -> bytes | None:
        """The value if present and younger than both the TTL and `max_age` seconds."""
        entry = self.entry(key, max_age)
        return entry.value if entry is not None else None

    def entry(self, key: Hashable, max_age: float | None = None) -> Entry | None:
        """get(), as the Entry (to make an alias of it)."""
        entry = self._data.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        age = self._clock() - entry.stored
        if age >= self.ttl:
            self._drop(key, entry)
            self.stats.expired += 1
            self.stats.misses += 1
            return None
        if max_age is not None and age > max_age:
            self.stats.misses += 1  # too old for this caller, still fine for others
            return None
        self._data.move_to_end(key)
        self.stats.hits += 1
        return entry

    def alias(self, entry: Entry, holder: dict[Any, Any], key: Hashable, size: int) -> None:
        """`holder[key]` refers to `entry` (the caller stored it): charge `size` bytes for it,
        and remove it when the entry goes. The entry must be in the cache."""
        if entry.aliases is None:
            entry.aliases = []
        entry.aliases.append((holder, key))
        entry.size += size
        self.stats.bytes += size
        self._evict(0)

    def put(self, key: Hashable, value: bytes) -> bool:
        if len(value) > self.max_entry:
            self.stats.too_large += 1
            return False
        size = entry_size(key, value)
        if size > self.max_bytes:
            self.stats.too_large += 1
            return False
        old = self._data.get(key)
        if old is not None:
            self._drop(key, old)
        self._evict(size)
        self._data[key] = Entry(value, self._clock(), size)
        self.stats.bytes += size
        self.stats.entries += 1
        return True

    def _evict(self, room: int) -> None:
        """Least recently used first, until `room` more bytes fit; an entry hit through an
        alias since the hand last passed goes to the end instead, once."""
        data, stats = self._data, self.stats
        while data and stats.bytes + room > self.max_bytes:
            key, victim = data.popitem(last=False)
            if victim.used:
                victim.used = False
                data[key] = victim
                continue
            victim.unlink()
            stats.bytes -= victim.size
            stats.entries -= 1
            stats.evictions += 1

    def discard(self, key: Hashable) -> None:
        entry = self._data.get(key)
        if entry is not None:
            self._drop(key, entry)

    def clear(self) -> None:
        for entry in self._data.values():
            entry.unlink()
        self._data.clear()
        self.stats.bytes = self.stats.entries = 0

    def __len__(self) -> int:
        return len(self._data)

    def _drop(self, key: Hashable, entry: Entry) -> None:
        del self._data[key]
        entry.unlink()
        self.stats.bytes -= entry.size
        self.stats.entries -= 1
