"""Version names at the grain of what a write can change (DESIGN.md, "Consistency of the cache").

For a table T of database D (prefix `D/T`) there are these versions, and a read's key carries
the ones it depends on:

    D/*          everything in D (DDL, unknown writes)        every read
    D/T          anything in T (a write whose reach is unknown) every read of T
    D/T|R        T's rows inserted or deleted, anywhere        reads of T not pinned to keys
    D/T|C:c      column c updated, anywhere (c = * : any)      those reads, per column they use
    D/T|r        rows inserted or deleted, keys not known      reads of T pinned to keys
    D/T|c:c      column c updated, keys not known (* : any)    those reads, per column they use
    D/T|k:c:n    slot n (a hash of the key value) of column c     those reads, per key value
                 (r: the row itself, *: any column)

A write bumps what it can change: an INSERT/DELETE of given keys `D/T|R` and the key slots (r);
of unknown keys `D/T|R` and `D/T|r`; an UPDATE of columns C on given keys `D/T|C:c`, `D/T|C:*`
and the slots (c, *); on unknown keys `D/T|C:c`, `D/T|c:c` and both `*`; anything else `D/T`.
So a read referencing none of the updated columns keeps its entry, and a read pinned to other
keys keeps it too. Key values are hashed into SLOTS per table and column (memory stays
bounded; a collision only costs a miss).

Key values come from placeholders: lifted literals (Plan.params, canonical SQL text) or values
bound at Bind (text or binary), or from the change feed (JSON). They are normalized by the key
column's type — integers, ASCII text without backslashes, uuids; anything else (or a value that
cannot be read back exactly as Postgres would) makes the pin unknown, which is always safe.
"""

from __future__ import annotations

import re
import struct
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from planner.reach import Pin, ReadDep, Value
from planner.tables import INT_TYPES, TEXT_TYPES, UUID_TYPE, Effect, TableFacts

from .feed import Change
from .versions import GLOBAL

SLOTS = 16384  # key slots per table and column
Bound = Sequence[tuple[int, bytes | None, int]]  # per $n: (format 0/1, value or NULL, declared type)
Key = tuple[object, ...]

_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")
_INT_BINARY = {2: struct.Struct("!h"), 4: struct.Struct("!i"), 8: struct.Struct("!q")}
_TEXT_DECLARED = frozenset({0, 25, 1043, 705})  # unspecified, text, varchar, unknown
_ARRAY_HEAD = struct.Struct("!iii")
_ARRAY_DIM = struct.Struct("!ii")
_I = struct.Struct("!i")


@dataclass(frozen=True, slots=True)
class FeedKeys:
    """Key values reported by the change feed, already Python values (from JSON)."""

    key: tuple[str, ...]
    rows: tuple[Key, ...]


class Values:
    """Where a statement's placeholders get their values: $1..$own bound, the rest lifted."""

    __slots__ = ("bound", "literals", "own")

    def __init__(self, own: int, literals: Sequence[str], bound: Bound | None = None) -> None:
        self.own = own
        self.literals = literals
        self.bound = bound

    def keys(self, pin: Pin) -> list[Key] | None:
        """The normalized key values of `pin`, or None when any cannot be known exactly."""
        if pin.array:
            if len(pin.types) != 1:
                return None
            elements = self._array(pin.array, pin.types[0])
            return None if elements is None else [(e,) for e in elements]
        out: list[Key] = []
        for row in pin.rows:
            key = tuple(self._one(v, t) for v, t in zip(row, pin.types, strict=True))
            if any(k is None for k in key):
                return None
            out.append(key)
        return out

    def _one(self, value: Value, type_oid: int) -> object:
        if isinstance(value, str):
            return from_sql(value, type_oid)
        if value > self.own:
            i = value - self.own - 1
            return from_sql(self.literals[i], type_oid) if i < len(self.literals) else None
        bound = self.bound
        if bound is None or value > len(bound):
            return None
        fmt, data, declared = bound[value - 1]
        return from_bound(fmt, data, declared, type_oid)

    def _array(self, value: int, type_oid: int) -> list[object] | None:
        if value > self.own:
            i = value - self.own - 1
            text = self.literals[i] if i < len(self.literals) else ""
            if len(text) < 2 or text[0] != "'" or text[-1] != "'":
                return None
            return array_text(text[1:-1].replace("''", "'"), type_oid)
        bound = self.bound
        if bound is None or value > len(bound):
            return None
        fmt, data, _declared = bound[value - 1]
        if data is None:
            return None
        if fmt == 0:
            try:
                return array_text(data.decode("ascii"), type_oid)
            except UnicodeDecodeError:
                return None
        return array_binary(data, type_oid)


# ---- normalization -----------------------------------------------------------------------------

def normalize(text: str, type_oid: int) -> object:
    """A key value given as text (as Postgres's input function would read it), or None."""
    if type_oid in INT_TYPES:
        return int(text) if _INT_TEXT.fullmatch(text) else None
    if type_oid in TEXT_TYPES:
        return text if text.isascii() and "\\" not in text else None
    if type_oid == UUID_TYPE:
        try:
            return str(uuid.UUID(text.strip()))
        except ValueError:
            return None
    return None


def from_sql(literal: str, type_oid: int) -> object:
    """A key value from a canonical SQL literal ('…' string or number)."""
    if literal[:1] == "'" and literal[-1:] == "'" and len(literal) >= 2:
        return normalize(literal[1:-1].replace("''", "'"), type_oid)
    if type_oid in INT_TYPES and re.fullmatch(r"-?\d+", literal):
        return int(literal)
    return None


def from_bound(fmt: int, data: bytes | None, declared: int, type_oid: int) -> object:
    """A key value bound at Bind, in the format the client chose, for a parameter of declared
    type `declared` (0: inferred from the key column)."""
    if data is None:
        return None
    if type_oid in INT_TYPES:
        if declared not in INT_TYPES and declared != 0:
            return None
        if fmt == 1:
            unpack = _INT_BINARY.get(len(data))
            return unpack.unpack(data)[0] if unpack is not None else None
    elif type_oid in TEXT_TYPES:
        if declared not in _TEXT_DECLARED:
            return None
    elif type_oid == UUID_TYPE:
        if declared not in (0, UUID_TYPE):
            return None
        if fmt == 1:
            return str(uuid.UUID(bytes=data)) if len(data) == 16 else None
    else:
        return None
    if fmt != 0:
        return normalize(data.decode("utf-8", "replace"), type_oid) if type_oid in TEXT_TYPES else None
    try:
        return normalize(data.decode("ascii"), type_oid)
    except UnicodeDecodeError:
        return None


def from_json(value: object, type_oid: int) -> object:
    """A key value as the change feed reports it (to_jsonb of the column)."""
    if type_oid in INT_TYPES:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str):
        return normalize(value, type_oid)
    return None


def array_text(text: str, type_oid: int) -> list[object] | None:
    """The elements of a one-dimensional array literal of integers or uuids ({1,2,3})."""
    text = text.strip()
    if (type_oid not in INT_TYPES and type_oid != UUID_TYPE) or text[:1] != "{" or text[-1:] != "}":
        return None
    inner = text[1:-1]
    if any(c in inner for c in '{}"\\'):
        return None
    items = [normalize(e, type_oid) for e in inner.split(",")] if inner.strip() else []
    return None if any(i is None for i in items) else items


def array_binary(data: bytes, type_oid: int) -> list[object] | None:
    try:
        ndim, has_null, _elem = _ARRAY_HEAD.unpack_from(data)
        if ndim == 0:
            return []
        if ndim != 1 or has_null:
            return None
        count, _lower = _ARRAY_DIM.unpack_from(data, 12)
        pos, out = 20, []
        for _ in range(count):
            (n,) = _I.unpack_from(data, pos)
            item = data[pos + 4:pos + 4 + n]
            pos += 4 + n
            value = from_bound(1, item, 0, type_oid)
            if value is None or n < 0:
                return None
            out.append(value)
        return out if pos == len(data) else None
    except struct.error:
        return None


# ---- names ---------------------------------------------------------------------------------------

def slot(prefix: str, key: Key, part: str) -> str:
    """The version of key value `key`'s row (`part` "r"), of one of its columns, or of any of
    them ("*"). The part stays outside the hash: a write of one column never collides with a
    read of another; two keys share a slot of one column with probability 1/SLOTS."""
    return f"{prefix}|k:{part}:{zlib.crc32(repr(key).encode()) % SLOTS}"


def read_names(database: str, deps: Iterable[ReadDep], values: Values) -> tuple[str, ...]:
    """The versions a read depends on (the database's first), in a stable order."""
    out = [f"{database}/{GLOBAL}"]
    for dep in deps:
        prefix = f"{database}/{dep.table}"
        out.append(prefix)
        parts = sorted(dep.columns) if dep.columns is not None else ["*"]
        keys = values.keys(dep.pin) if dep.pin is not None else None
        if keys is None:
            out.append(prefix + "|R")
            out += [f"{prefix}|C:{c}" for c in parts]
            continue
        out.append(prefix + "|r")
        out += [f"{prefix}|c:{c}" for c in parts]
        for key in keys:
            out.append(slot(prefix, key, "r"))
            out += [slot(prefix, key, c) for c in parts]
    return tuple(out)


def write_names(database: str, effects: Iterable[Effect], values: Values | None) -> frozenset[str]:
    """The versions a write bumps (an Effect on table "*": the whole database)."""
    out: set[str] = set()
    for effect in effects:
        if effect.table == GLOBAL:
            out.add(f"{database}/{GLOBAL}")
            continue
        prefix = f"{database}/{effect.table}"
        pin = effect.pin
        keys: Sequence[Key] | None = None
        if isinstance(pin, FeedKeys):
            keys = pin.rows
        elif isinstance(pin, Pin) and values is not None:
            keys = values.keys(pin)
        kind = effect.kind
        if kind in ("insert", "delete", "truncate"):
            out.add(prefix + "|R")
            if keys is None:
                out.add(prefix + "|r")
            else:
                out.update(slot(prefix, key, "r") for key in keys)
        elif kind == "update" and effect.columns is not None:
            parts = [*effect.columns, "*"]
            out.update(f"{prefix}|C:{c}" for c in parts)
            if keys is None:
                out.update(f"{prefix}|c:{c}" for c in parts)
            else:
                out.update(slot(prefix, key, c) for key in keys for c in parts)
        else:
            out.add(prefix)  # unknown columns or reach: every read of the table
    return frozenset(out)


def change_effects(change: Change, facts: TableFacts) -> list[Effect]:
    """What a change-feed notification says was written, with its closure (an empty list:
    nothing changed — an UPDATE whose rows kept every value)."""
    if change.op == "*":
        return [Effect(GLOBAL, "table")]
    t = change.table
    if change.op not in ("insert", "update", "delete", "truncate"):
        return facts.closure([Effect(t, "table")])
    pin: FeedKeys | None = None
    info = facts.info(t)
    if change.keys is not None and info is not None and info.key and change.key_columns == info.key:
        rows = [tuple(from_json(v, ty) for v, ty in zip(key, info.key_types, strict=True))
                for key in change.keys]
        if all(None not in row for row in rows):
            pin = FeedKeys(info.key, tuple(rows))
    if change.op != "update":
        effects = [Effect(t, change.op, None, pin)]
    elif change.columns is None:
        if pin is None or info is None:
            effects = [Effect(t, "update")]  # a large statement: which rows and columns, not said
        else:  # its keys: any column of those rows (and the rows, if some may have moved)
            effects = [Effect(t, "update", frozenset(info.columns), pin)]
            if change.moved:
                effects.append(Effect(t, "insert", None, pin))
    elif change.moved:
        effects = [Effect(t, "update", change.columns, pin), Effect(t, "insert", None, pin)]
    elif not change.columns:
        return []
    else:
        effects = [Effect(t, "update", change.columns, pin)]
    return facts.closure(effects)
