"""Write tracking: which cache versions each statement sent may change, and their bumps when its
transaction is over.

relay notes the tables each statement writes (`note_writes`, `mark_bound`, `mark`) as it sends
it; replies counts ReadyForQuery (`ready`), and at the one that ends the transaction `commit`
bumps their versions before the client sees it (with Redis, output to the client is gated until
the bump is acknowledged) and tells replica routing. A client or server connection that goes
away commits whatever it sent (`commit_all`): it may have committed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cache.deps import Bound, Values, write_names
from cache.versions import GLOBAL
from planner import Flag, Kind, Plan, Planner
from planner.tables import Effect
from proxy.pgwire.decode import parse_bind_params
from proxy.pipeline.entries import ENDS_AT_READY

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

_COMMIT_PREPARED = re.compile(r"(?i)\bcommit\s+prepared\b")


class Writes:
    """What executing a statement may change (planner/tables.Effect, with key pins); its
    version names are worked out per execution, when the bound values are known. `ddl`: it may
    change the catalog too (DDL, utility, unknown), so plans are made again after it."""

    __slots__ = ("ddl", "effects", "generation", "own", "params")

    def __init__(self, effects: tuple[Effect, ...], own: int = 0, params: tuple[str, ...] = (),
                 ddl: bool = False) -> None:
        self.effects = effects
        self.own = own  # placeholders up to this are bound at Bind; the rest are `params`
        self.params = params
        self.ddl = ddl
        self.generation = 0  # of the catalog it was worked out with (0: none)

    def names(self, database: str, bound: Bound | None = None) -> frozenset[str]:
        if not self.effects:
            return frozenset()
        return write_names(database, self.effects, Values(self.own, self.params, bound))


NO_WRITES = Writes(())
EVERYTHING = Writes((Effect(GLOBAL, "table"),))  # data anywhere (a user function, a trigger...)


def write_set(plan: Plan, planner: Planner) -> Writes:
    """What a statement may change, as finely as its plan allows; unknown reach is the whole
    database, and a table with triggers or rules may write anywhere."""
    kind = plan.kind
    if kind is Kind.READ:
        if plan.tables_written:
            return _tables(plan.tables_written)
        if Flag.VOLATILE_FUNCTION in plan.flags and any(
                not f.startswith("pg_catalog.") for f in plan.functions):
            return EVERYTHING  # a user function may write anything
        return NO_WRITES
    if kind is Kind.TXN:
        if _COMMIT_PREPARED.search(plan.sql):
            return EVERYTHING  # a prepared transaction's writes show now; which, unknown
        return NO_WRITES
    if kind is Kind.SESSION:
        head = plan.sql.lstrip().split(None, 1)
        return EVERYTHING if head and head[0].lower() == "execute" else NO_WRITES
    if kind is Kind.WRITE and plan.tables_written:
        reach = plan.reach
        triggers = planner.catalog.triggers
        if reach is not None:
            effects = reach.writes
            if any(e.table in triggers for e in effects):
                effects = (*effects, Effect(GLOBAL, "table"))  # a trigger or rule may write elsewhere
            return Writes(effects, reach.own_params, plan.params)
        if plan.tables_written & triggers:
            return _tables(plan.tables_written | {GLOBAL})
        return _tables(plan.tables_written)
    return _tables(plan.tables_written | {GLOBAL}, ddl=True)  # DDL, utility, unknown


def _tables(tables: frozenset[str], ddl: bool = False) -> Writes:
    """Anything in each of `tables`; a name the catalog could not qualify (it was loading, or
    the relation is unknown) may be any table: the whole database."""
    if any("." not in t for t in tables):
        tables = tables | {GLOBAL}
    return Writes(tuple(Effect(t, "table") for t in sorted(tables)), ddl=ddl)


def writes_of(s: Session, sql: bytes, plan: Plan | None = None) -> Writes:
    """What executing `sql` may change; `plan`: its plan, when the caller has it already."""
    cache = s.server.cache
    if (cache is None or not cache.active(s.database)) and s.server.replicas is None:
        return NO_WRITES
    planner = s.planner or s.server.planner_for(s.database)
    if plan is None:
        plan = planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    if plan.kind is Kind.DDL:
        s.server.ddl_seen(s.database)
    writes = write_set(plan, planner)
    if writes.effects and writes.generation != planner.catalog.generation:
        writes = Writes(writes.effects, writes.own, writes.params, writes.ddl)
        writes.generation = planner.catalog.generation
    return writes


def current(s: Session, writes: Writes, sql: bytes) -> Writes:
    """A prepared statement's write set, worked out again if the catalog changed since (a new
    foreign key's cascade; or it was prepared while the catalog was loading)."""
    planner = s.planner
    if planner is None or writes.generation == planner.catalog.generation:
        return writes
    return writes_of(s, sql)


def note_writes(s: Session, sql: bytes, plan: Plan | None = None) -> tuple[frozenset[str], bool]:
    """A Query is about to be sent: mark what it writes; (the versions, whether the catalog too)."""
    writes = writes_of(s, sql, plan)
    names = writes.names(s.database)
    mark(s, names, writes.ddl)
    return names, writes.ddl


def mark_bound(s: Session, writes: Writes, bind_rest: bytes, types: bytes) -> None:
    """A Bind of a statement that writes: its key values are the ones bound here."""
    if not writes.effects:
        return
    bound = parse_bind_params(bind_rest, types) if writes.own else None
    mark(s, writes.names(s.database, bound), writes.ddl)


def mark(s: Session, names: frozenset[str], ddl: bool = False) -> None:
    """Statements about to be sent change what `names` stand for: they are done (committed, or
    part of the transaction) at the ReadyForQuery of the next message that ends at one."""
    if names:
        due = s.ready_seen + 1 + sum(1 for kind, _ in s.entries if kind in ENDS_AT_READY)
        s.write_marks.append((due, names, ddl))


def mark_everything(s: Session, ddl: bool) -> None:
    """Anything in the database may change (`ddl`: the catalog too)."""
    mark(s, EVERYTHING.names(s.database), ddl)


def ready(s: Session, idle: bool) -> bool:
    """A ReadyForQuery from the server: True if a transaction with writes just ended."""
    s.ready_seen += 1
    marks = s.write_marks
    while marks and marks[0][0] <= s.ready_seen:
        _, names, ddl = marks.popleft()
        s.committing |= names
        s.committing_ddl |= ddl
    return idle and bool(s.committing)


def write_due(s: Session) -> bool:
    """Whether the next ReadyForQuery may end a transaction that wrote."""
    return bool(s.committing) or bool(s.write_marks and s.write_marks[0][0] == s.ready_seen + 1)


def commit(s: Session) -> None:
    """The transaction that wrote s.committing is over (committed or not): bump them."""
    names, s.committing = s.committing, set()
    ddl, s.committing_ddl = s.committing_ddl, False
    cache = s.server.cache
    if not names or (cache is None and s.server.replicas is None):
        return
    if ddl:
        s.server.ddl_seen(s.database)  # plans may depend on what changed: read the catalog again
    if s.server.replicas is not None:
        # no replica read of these tables until the commit's position is known: marked before
        # the client (or a read of the new versions) can see the write
        s.server.replicas.committed(s.database, names)
    if cache is None:
        return
    task = cache.bump(names)
    if task is not None and not task.done():
        s.gate_until(task)


def commit_all(s: Session) -> frozenset[str]:
    """The client or its server connection is gone: whatever it sent may have committed."""
    while s.write_marks:
        _, names, ddl = s.write_marks.popleft()
        s.committing |= names
        s.committing_ddl |= ddl
    names = frozenset(s.committing)
    commit(s)
    return names
