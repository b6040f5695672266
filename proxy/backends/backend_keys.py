"""Which client a server connection last served, by process ids, for all workers.

A NotificationResponse names its sender by the server's process id; its client knows itself
by the process id pgsluice gave it in BackendKeyData, and drivers compare the two (asyncpg,
psycopg). The sender may be any worker's client, so the table is a small shared mapping (a
file the workers' parent made): slot `server pid % SLOTS` holds (server pid, client pid).
A slot taken by another server pid, or a torn read, only means "unknown": the notification
then keeps Postgres's own process id.
"""

from __future__ import annotations

import mmap
import os
import struct

SLOTS = 1 << 16
_SLOT = struct.Struct("II")
FILE_NAME = "backend-keys.bin"


def make_file(directory: str) -> None:
    """The parent's part, before the workers start."""
    with open(os.path.join(directory, FILE_NAME), "wb") as f:
        f.truncate(_SLOT.size * SLOTS)


class BackendKeys:
    def __init__(self, directory: str | None = None) -> None:
        path = os.path.join(directory, FILE_NAME) if directory else ""
        if path and os.path.exists(path):
            with open(path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), _SLOT.size * SLOTS)
        else:
            self._map = mmap.mmap(-1, _SLOT.size * SLOTS)

    def set(self, server_pid: int, client_pid: int) -> None:
        _SLOT.pack_into(self._map, (server_pid % SLOTS) * _SLOT.size, server_pid & 0xFFFFFFFF,
                        client_pid & 0xFFFFFFFF)

    def get(self, server_pid: int) -> int | None:
        pid, client = _SLOT.unpack_from(self._map, (server_pid % SLOTS) * _SLOT.size)
        return client if pid == server_pid and client else None
