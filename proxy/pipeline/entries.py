"""The record of what a client's server connection owes it: one Entry per message sent that
gets a response, in order, and what each kind of Entry carries.

A backend message ends the head Entry when it is that Entry's terminal response (ParseComplete
for Parse, ReadyForQuery for Sync or Query...). This is what lets pgsluice (a) answer
CloseComplete itself for prepared statements it keeps on the backend, in the right place
(FAKE_CLOSE), and (b) swallow the responses to messages it injected (SWALLOW_*: re-preparing
a client's statement on another backend). An ErrorResponse to an extended-protocol message
voids the Entries up to the next Sync, as Postgres skips those messages.

relay.py and prepared.py append Entries (client -> backend), replies.py ends them (backend ->
client), caching.py and session.py count those that end at ReadyForQuery: this module holds
what they share, so that none of them imports another for it.
"""

from __future__ import annotations

from proxy.pgwire import encode

# Entry kinds.
QUERY, SYNC, FUNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE = range(8)
FAKE_CLOSE, SWALLOW_PARSE, SWALLOW_CLOSE, SWALLOW_BIND, SWALLOW_QUERY = range(8, 13)
ENDS_AT_READY = (QUERY, SYNC, FUNC)
# kinds pgsluice answers itself (the bytes), in their place among the backend's responses
FAKE_BYTES = {FAKE_CLOSE: encode.CLOSE_COMPLETE}

# The mark of a Query entry for COPY ... FROM STDIN, and of the Syncs the client sent after it
# before its CopyDone / CopyFail: once the COPY has started (CopyInResponse), Postgres ignores
# those Syncs, so no ReadyForQuery is owed for them; if it never started, they count.
COPY_IN = object()

Entry = tuple[int, object]
Chunks = list[bytes | bytearray]


class QueryInfo:
    """What a simple Query will change in session state if it succeeds."""

    __slots__ = ("changes", "discard_seen", "discards", "failed")

    def __init__(self, changes: tuple[tuple[str, str | None], ...], discards: bool) -> None:
        self.changes = changes
        self.discards = discards
        self.discard_seen = False
        self.failed = False
