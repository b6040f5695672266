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
_I = struct.Struct("<I")


class SharedCounters:
    """What the worker processes of one box share, in anonymous shared mappings made before
    they fork:

    * versions (used without Redis): `slots` 64-bit counters; a version is its slot's counter,
      so two names hashing to one slot only invalidate each other more often, never less.
      Slot 0 is the epoch, part of every key: the parent moves it when a worker dies, since a
      write of that worker may have committed without its bump. After the slots, the stamp:
      it moves with every bump, after the slots it bumps, so a reader that sees the stamp it
      saw before knows no version moved since (the wire door's fast path).
    * the server process ids of each worker's pool (with or without Redis), so that a change
      feed notification of a write made through any worker is known as one pgsluice bumped.

    Increments take a lock; reads do not (aligned loads)."""

    PIDS = 1024  # server connections per worker that can be told apart (more: bumped twice)

    def __init__(self, slots: int = 1 << 20, workers: int = 1) -> None:
        self.slots = slots
        self.buf = mmap.mmap(-1, 8 * (slots + 1), flags=mmap.MAP_SHARED)
        self.lock = multiprocessing.Lock()
        self.generation = secrets.token_hex(8)
        self.workers = workers
        self.pid_buf = mmap.mmap(-1, 4 * (self.PIDS + 2) * workers, flags=mmap.MAP_SHARED)
        self.lsns: SharedLsns | None = None  # with replicas: their write positions
        self._pid_seen: tuple[int, ...] = ()
        self._pid_set: frozenset[int] = frozenset()

    def slot(self, version_name: str) -> int:
        return 1 + zlib.crc32(version_name.encode()) % (self.slots - 1)

    def get(self, slots: tuple[int, ...]) -> tuple[int, ...]:
        buf = self.buf
        return tuple([_Q.unpack_from(buf, 8 * i)[0] for i in (0, *slots)])

    def bump(self, slots: Iterable[int]) -> None:
        with self.lock:
            for i in (*set(slots), self.slots):  # the stamp last
                _Q.pack_into(self.buf, 8 * i, _Q.unpack_from(self.buf, 8 * i)[0] + 1)

    def stamp(self) -> int:
        return int(_Q.unpack_from(self.buf, 8 * self.slots)[0])

    def new_epoch(self) -> None:
        """Every key made so far is dead (a worker died: its last writes may not be bumped)."""
        self.bump((0,))

    # ---- server process ids ----
    # per worker: a change counter, a count, then the pids (u32 each)

    def _region(self, worker: int) -> int:
        return 4 * (self.PIDS + 2) * worker

    def set_pids(self, worker: int, pids: Iterable[int]) -> None:
        """Worker `worker`'s pool connections now (the first PIDS of them)."""
        at = self._region(worker)
        values = sorted(pids)[:self.PIDS]
        with self.lock:
            change = _I.unpack_from(self.pid_buf, at)[0]
            _I.pack_into(self.pid_buf, at, (change + 1) & 0xFFFFFFFF)  # odd: being written
            _I.pack_into(self.pid_buf, at + 4, len(values))
            struct.pack_into(f"<{len(values)}I", self.pid_buf, at + 8, *values)
            _I.pack_into(self.pid_buf, at, (change + 2) & 0xFFFFFFFF)

    def clear_pids(self, worker: int) -> None:
        self.set_pids(worker, ())

    def has_pid(self, pid: int) -> bool:
        """Whether `pid` is a server connection of some worker's pool."""
        buf = self.pid_buf
        changes = tuple(_I.unpack_from(buf, self._region(w))[0] for w in range(self.workers))
        if changes != self._pid_seen:
            if any(c & 1 for c in changes):
                return False  # a worker is writing its list: not known to be ours
            pids: set[int] = set()
            for w in range(self.workers):
                at = self._region(w)
                count = _I.unpack_from(buf, at + 4)[0]
                pids.update(struct.unpack_from(f"<{min(count, self.PIDS)}I", buf, at + 8))
            if tuple(_I.unpack_from(buf, self._region(w))[0] for w in range(self.workers)) != changes:
                return False  # changed while read
            self._pid_seen, self._pid_set = changes, frozenset(pids)
        return pid in self._pid_set


class SharedLsns:
    """Write positions (WAL LSNs, proxy/backends/replicas.py) shared by the worker processes of one
    box, in mappings made before the fork: `slots` 64-bit maxima (a name's position is its
    slot's: two names in one slot only make replica reads stricter), and per worker a count
    of writes per slot whose position is still being read (only that worker writes its
    counts; the parent clears them when it dies)."""

    def __init__(self, slots: int = 1 << 16, workers: int = 1) -> None:
        self.slots = slots
        self.workers = workers
        # the slots, then two counters: gaps opened (a worker died) and gaps closed
        self.buf = mmap.mmap(-1, 8 * (slots + 2), flags=mmap.MAP_SHARED)
        self.pending = mmap.mmap(-1, 4 * slots * workers, flags=mmap.MAP_SHARED)
        self.lock = multiprocessing.Lock()

    def slot(self, name: str) -> int:
        return zlib.crc32(name.encode()) % self.slots

    def raise_to(self, names: Iterable[str], lsn: int) -> None:
        with self.lock:
            for i in {self.slot(n) for n in names}:
                if _Q.unpack_from(self.buf, 8 * i)[0] < lsn:
                    _Q.pack_into(self.buf, 8 * i, lsn)

    def get(self, name: str) -> int:
        return int(_Q.unpack_from(self.buf, 8 * self.slot(name))[0])

    def hold(self, worker: int, names: Iterable[str], delta: int) -> None:
        """Worker `worker` starts (+1) or ends (-1) reading the position of a write to `names`."""
        base = 4 * self.slots * worker
        for i in {self.slot(n) for n in names}:
            at = base + 4 * i
            _I.pack_into(self.pending, at, max(0, _I.unpack_from(self.pending, at)[0] + delta))

    def held(self, name: str) -> bool:
        i = self.slot(name)
        return any(_I.unpack_from(self.pending, 4 * (self.slots * w + i))[0] for w in range(self.workers))

    def clear_worker(self, worker: int) -> None:
        base = 4 * self.slots * worker
        self.pending[base:base + 4 * self.slots] = bytes(4 * self.slots)

    def open_gap(self) -> None:
        """A worker died: a write of it may have committed with its position unread. No replica
        reads until a worker has read the primary's position since (close_gap)."""
        with self.lock:
            _Q.pack_into(self.buf, 8 * self.slots, _Q.unpack_from(self.buf, 8 * self.slots)[0] + 1)

    def gap(self) -> int:
        """The gap to close (0: none)."""
        at = 8 * self.slots
        opened, closed = _Q.unpack_from(self.buf, at)[0], _Q.unpack_from(self.buf, at + 8)[0]
        return int(opened) if opened != closed else 0

    def close_gap(self, gap: int, names: Iterable[str], lsn: int) -> None:
        """`lsn`, read after gap `gap` was seen, covers whatever the dead worker wrote."""
        self.raise_to(names, lsn)
        with self.lock:
            if _Q.unpack_from(self.buf, 8 * self.slots + 8)[0] < gap:
                _Q.pack_into(self.buf, 8 * self.slots + 8, gap)


class Versions:
    """The versions this process knows: the only store without Redis, a mirror with it.

    `stamp()` changes whenever any version or the generation may have: equal stamps mean
    equal versions, so a reader can skip comparing them name by name."""

    def __init__(self, shared: SharedCounters | None = None) -> None:
        self.shared = shared
        self.generation = shared.generation if shared is not None else secrets.token_hex(8)
        self._v: dict[str, int] = {}
        self._slots: dict[tuple[str, ...], tuple[int, ...]] = {}
        self._stamp = 0  # local changes (bump, observe, reset); shared ones are the shared stamp's
        self.stamp = self._local_stamp if shared is None else self._shared_stamp

    def _local_stamp(self) -> int:
        return self._stamp

    def _shared_stamp(self) -> int:
        assert self.shared is not None
        return self.shared.stamp() + self._stamp

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
        self._stamp += 1

    def observe(self, version_name: str, value: int) -> None:
        """A value seen in the shared store: versions never go back."""
        if value > self._v.get(version_name, -1):
            self._v[version_name] = value
            self._stamp += 1

    def reset(self) -> None:
        """Forget everything: the next keys can never equal an earlier one."""
        self.generation = secrets.token_hex(8)
        self._v.clear()
        self._stamp += 1
