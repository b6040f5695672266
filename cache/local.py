"""The in-process cache tier: an LRU bounded in bytes, with a TTL as the last safety net.

Values are the wire messages a result is made of (bytes). An entry is charged what it
really takes in memory: the value object, the key's own parts (keys.key_footprint) and the
bookkeeping (entry tuple, timestamp, dict and order slots), so that `max_bytes` bounds what
the process holds (tests/test_cache_units.py checks it with tracemalloc). Entries larger
than `max_entry` are refused by `put` (the caller counts that as a bypass).

An entry may have aliases: things other dicts (holders, registered here) map to it (the wire
door's fast path, proxy/pipeline/fastpath.py). They are charged to the entry and removed with
it, so an alias never outlives its entry nor escapes `max_bytes`. A hit through an alias only
marks the entry touched; eviction gives a touched entry a second chance (CLOCK), as it would
have moved to the end on a hit by key.

Entries and aliases are plain tuples of bytes, numbers and strings: CPython's collector stops
tracking such tuples, so a large cache adds next to nothing to the work of a full collection
(with an object per entry and per alias, full collections grew to 150 ms as the cache grew
under load, every request waiting meanwhile: docs/benchmarks.md). What changes in an entry (its
size and aliases) replaces its tuple; what an alias hit marks is a serial number in a set.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final

from .keys import key_footprint

# Per entry besides key and value: the entry tuple (80), the timestamp (24), size and serial
# (28 each), and the OrderedDict's hash-table and order slots (about 90, averaged over its fill
# factor), measured with tracemalloc on CPython 3.11.
ENTRY_OVERHEAD = 250
Alias = tuple[int, Hashable]  # (a holder's id, the key there of a tuple whose first item is the
                              # entry's serial)
Entry = tuple[bytes, float, int, int, tuple[Alias, ...]]  # value, stored, size, serial, aliases
VALUE: Final = 0
STORED: Final = 1
SIZE: Final = 2
SERIAL: Final = 3
ALIASES: Final = 4


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
        self._serials = itertools.count(1)
        self.touched: set[int] = set()  # serials hit through an alias since the hand last passed
        self.holders: dict[int, dict[Any, Any]] = {}
        self._holder_ids = itertools.count(1)

    def register(self, holder: dict[Any, Any]) -> int:
        """`holder` will hold aliases: its id for `alias`."""
        hid = next(self._holder_ids)
        self.holders[hid] = holder
        return hid

    def unregister(self, hid: int) -> None:
        self.holders.pop(hid, None)

    def get(self, key: Hashable, max_age: float | None = None) -> bytes | None:
        """The value if present and younger than both the TTL and `max_age` seconds."""
        entry = self.entry(key, max_age)
        return entry[VALUE] if entry is not None else None

    def entry(self, key: Hashable, max_age: float | None = None) -> Entry | None:
        """get(), as the Entry (to make an alias of it)."""
        entry = self._data.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        age = self._clock() - entry[STORED]
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

    def alias(self, key: Hashable, entry: Entry, hid: int, alias_key: Hashable, size: int) -> None:
        """`holders[hid][alias_key]` is an alias of `entry`, the entry at `key` (the caller
        stored it there: a tuple whose first item is the entry's serial): charge `size` bytes
        for it, and remove it when the entry goes (at once if it is gone already)."""
        now = self._data.get(key)
        if now is None or now[SERIAL] != entry[SERIAL]:
            self._unlink(entry[SERIAL], ((hid, alias_key),))
            return
        value, stored, charged, serial, aliases = now
        self._data[key] = (value, stored, charged + size, serial, (*aliases, (hid, alias_key)))
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
        self._data[key] = (value, self._clock(), size, next(self._serials), ())
        self.stats.bytes += size
        self.stats.entries += 1
        return True

    def _evict(self, room: int) -> None:
        """Least recently used first, until `room` more bytes fit; an entry hit through an
        alias since the hand last passed goes to the end instead, once."""
        data, stats, touched = self._data, self.stats, self.touched
        while data and stats.bytes + room > self.max_bytes:
            key, victim = data.popitem(last=False)
            if victim[SERIAL] in touched:
                touched.discard(victim[SERIAL])
                data[key] = victim
                continue
            self._unlink(victim[SERIAL], victim[ALIASES])
            stats.bytes -= victim[SIZE]
            stats.entries -= 1
            stats.evictions += 1

    def discard(self, key: Hashable) -> None:
        entry = self._data.get(key)
        if entry is not None:
            self._drop(key, entry)

    def clear(self) -> None:
        for entry in self._data.values():
            self._unlink(entry[SERIAL], entry[ALIASES])
        self._data.clear()
        self.touched.clear()
        self.stats.bytes = self.stats.entries = 0

    def __len__(self) -> int:
        return len(self._data)

    def _drop(self, key: Hashable, entry: Entry) -> None:
        del self._data[key]
        self._unlink(entry[SERIAL], entry[ALIASES])
        self.stats.bytes -= entry[SIZE]
        self.stats.entries -= 1

    def _unlink(self, serial: int, aliases: tuple[Alias, ...]) -> None:
        """The entry `serial` leaves the cache: so do its aliases (those not replaced since)."""
        self.touched.discard(serial)
        for hid, key in aliases:
            holder = self.holders.get(hid)
            if holder is not None:
                alias = holder.get(key)
                if type(alias) is tuple and alias[0] == serial:
                    del holder[key]
