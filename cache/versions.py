"""Table versions: the part of a cache key that moves when data changes.

A version name is `database/schema.table`, plus `database/*` for each database (every key
includes it: DDL, procedures, unknown writes and a change-feed reconnect bump it, which
invalidates everything in that database at once). Versions only ever grow, and a key also
carries `generation`, a random token that changes whenever the history of versions may have
been lost (Redis restarted, or this process lost sight of it) so an old key can never match
again.
"""

from __future__ import annotations

import mmap
import multiprocessing
import secrets
import struct
import zlib
from collections.abc import Iterable

GLOBAL = "*"
_Q = struct.Struct("<Q")


class SharedCounters:
    """Versions shared by the worker processes of one box (no Redis): an anonymous shared
    mapping of `slots` 64-bit counters, made before the workers fork. A table's version is
    its slot's counter: two tables hashing to one slot only invalidate each other more
    often, never less. Increments take a lock; reads do not (8-byte aligned loads)."""

    def __init__(self, slots: int = 1 << 16) -> None:
        self.slots = slots
        self.buf = mmap.mmap(-1, 8 * slots, flags=mmap.MAP_SHARED)
        self.lock = multiprocessing.Lock()
        self.generation = secrets.token_hex(8)

    def slot(self, version_name: str) -> int:
        return zlib.crc32(version_name.encode()) % self.slots

    def get(self, slots: tuple[int, ...]) -> tuple[int, ...]:
        buf = self.buf
        return tuple([_Q.unpack_from(buf, 8 * i)[0] for i in slots])

    def bump(self, slots: Iterable[int]) -> None:
        with self.lock:
            for i in set(slots):
                _Q.pack_into(self.buf, 8 * i, _Q.unpack_from(self.buf, 8 * i)[0] + 1)


def name(database: str, table: str) -> str:
    return f"{database}/{table}"


class Versions:
    """The versions this process knows: the only store without Redis, a mirror with it."""

    def __init__(self, shared: SharedCounters | None = None) -> None:
        self.shared = shared
        self.generation = shared.generation if shared is not None else secrets.token_hex(8)
        self._v: dict[str, int] = {}
        self._names: dict[tuple[str, frozenset[str]], tuple[str, ...]] = {}
        self._slots: dict[tuple[str, ...], tuple[int, ...]] = {}

    def names(self, database: str, tables: frozenset[str]) -> tuple[str, ...]:
        """The version names a read of `tables` depends on, in a stable order (memoized)."""
        key = (database, tables)
        out = self._names.get(key)
        if out is None:
            if len(self._names) > 100_000:
                self._names.clear()
            out = self._names[key] = (name(database, GLOBAL), *(name(database, t) for t in sorted(tables)))
        return out

    def known(self, names: Iterable[str]) -> list[str]:
        """Those of `names` this mirror has no value for yet."""
        v = self._v
        return [n for n in names if n not in v]

    def get(self, names: tuple[str, ...]) -> tuple[int, ...]:
        shared = self.shared
        if shared is not None:
            slots = self._slots.get(names)
            if slots is None:
                if len(self._slots) > 100_000:
                    self._slots.clear()
                slots = self._slots[names] = tuple(shared.slot(n) for n in names)
            return shared.get(slots)
        v = self._v
        return tuple([v.get(n, 0) for n in names])

    def bump(self, names: Iterable[str]) -> None:
        if self.shared is not None:
            self.shared.bump(self.shared.slot(n) for n in names)
            return
        v = self._v
        for n in names:
            v[n] = v.get(n, 0) + 1

    def observe(self, version_name: str, value: int) -> None:
        """A value seen in the shared store: versions never go back."""
        if value > self._v.get(version_name, -1):
            self._v[version_name] = value

    def reset(self) -> None:
        """Forget everything: the next keys can never equal an earlier one."""
        self.generation = secrets.token_hex(8)
        self._v.clear()
