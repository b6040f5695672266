"""Who gets in: `max_client_conn` logged-in clients in total over all workers, and at most as
many connections still logging in on each worker.

Why two counts: in a connection storm every accepted socket exists before it has logged
in; counting those against the limit refused nearly everyone (2,000 connects for 1,000
places admitted 0 to 881). A client takes a place when its startup packet is read (before
authentication, as Postgres counts a backend) and gives it back when it goes; one still
logging in only counts against the separate bound on logins in progress.

Over workers: each worker writes its own count in a slot of a small file the workers'
parent made (mapped shared), and adds up every slot to decide. Two workers admitting at the
same moment can pass the limit by one each, at most.
"""

from __future__ import annotations

import mmap
import os
import struct

_SLOT = struct.Struct("q")
FILE_NAME = "clients.bin"


def make_counts_file(directory: str, workers: int) -> None:
    """The parent's part, before the workers start: one zeroed slot per worker."""
    with open(os.path.join(directory, FILE_NAME), "wb") as f:
        f.write(b"\x00" * _SLOT.size * workers)


class Admission:
    def __init__(self, worker: int = 0, workers: int = 1, directory: str | None = None) -> None:
        self.worker = worker
        self.here = 0  # clients of this worker holding a place
        self.logging_in = 0  # connections of this worker that have not logged in yet
        self._map: mmap.mmap | None = None
        self._slots = workers
        path = os.path.join(directory, FILE_NAME) if directory else ""
        if workers > 1 and path and os.path.exists(path):
            with open(path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), _SLOT.size * workers)
            self._publish()  # a restarted worker starts from zero

    def total(self) -> int:
        """Places taken over all workers."""
        if self._map is None:
            return self.here
        return sum(_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self._slots))

    def admit(self, limit: int) -> bool:
        if self.total() >= limit:
            return False
        self.here += 1
        self._publish()
        return True

    def leave(self) -> None:
        self.here -= 1
        self._publish()

    def _publish(self) -> None:
        if self._map is not None:
            _SLOT.pack_into(self._map, self.worker * _SLOT.size, self.here)
