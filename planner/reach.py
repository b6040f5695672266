"""What a statement reads and writes at the grain of invalidation: for each table read, the
columns the read references and the key values it is pinned to; for each table written, the
kind of write (tables.Effect), the columns an UPDATE assigns and the key values it is pinned to.

Computed once per shape, from sqlglot's parse of the canonical SQL (planner.canonical), where
every literal is a placeholder: a pin's values are placeholder numbers — the text's own $n
(bound at Bind) or lifted literals (Plan.params) — or the rare literal left in the canonical
text, so one analysis serves every text of a shape (`Reach.own_params` tells the two apart).

Conservative wherever it cannot be sure (a coarser answer only costs misses):
  * columns: every column name in the statement counts for every table that has a column of
    that name (qualifiers are ignored); `*` (not count(*)), a whole-row reference (`t`,
    `row_to_json(t)`), NATURAL JOIN, `tableoid`, or a name that is neither a column of a table
    read nor an output name make it "every column"; a table read through a view depends on
    every column of it and is never pinned;
  * pins: a table occurring once in the statement, listed directly in a SELECT's (or the
    UPDATE's / DELETE's) FROM, whose WHERE has, among its top-level AND terms, equality of each
    key column (qualified by the table's name or alias, or unqualified when it is the only
    table there) with a placeholder or literal (maybe cast to the key's own type family), an IN
    list of them, or `= ANY($n)` for a one-column key; an INSERT's VALUES rows when every key
    column is given as such a value. An UPDATE that assigns a key column is not pinned and
    changes the row set too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import sqlglot
from sqlglot import exp

from .catalog import Catalog
from .plan import SessionFacts
from .sqltree import ident, is_cte, table_parts
from .tables import INT_TYPES, TEXT_TYPES, UUID_TYPE, Effect, TableInfo

Value = int | str  # a placeholder's number, or a literal left in the canonical SQL (its SQL text)
MAX_READ_KEYS = 100  # a read pinned to more key values than this depends on the table instead
MAX_WRITE_KEYS = 1000

_INT_CASTS = frozenset({exp.DataType.Type.SMALLINT, exp.DataType.Type.INT, exp.DataType.Type.BIGINT})
_TEXT_CASTS = frozenset({exp.DataType.Type.TEXT, exp.DataType.Type.VARCHAR})


@dataclass(frozen=True, slots=True)
class Pin:
    """Rows pinned by equality on a table's key: one tuple of value sources per key value, or
    (one-column keys) the elements of an array placeholder."""

    key: tuple[str, ...]
    types: tuple[int, ...]
    rows: tuple[tuple[Value, ...], ...] = ()
    array: int = 0


@dataclass(frozen=True, slots=True)
class ReadDep:
    table: str
    columns: frozenset[str] | None  # None: every column
    pin: Pin | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Reach:
    reads: tuple[ReadDep, ...] = ()
    writes: tuple[Effect, ...] = ()  # the statement's own effects first, then their closure
    own_params: int = 0  # placeholders up to this are the text's own (bound values)
    bound: bool = False  # some read pin takes a bound value (its version names vary per Bind)


def for_read(canonical: str, own_params: int, tables_read: Iterable[str], facts: SessionFacts,
             catalog: Catalog) -> Reach:
    deps = reads(canonical, own_params, tables_read, facts, catalog)
    bound = any(0 < v <= own_params for d in deps if d.pin is not None
                for v in (d.pin.array, *(x for row in d.pin.rows for x in row)) if isinstance(v, int))
    return Reach(reads=deps, own_params=own_params, bound=bound)


def for_write(canonical: str, own_params: int, facts: SessionFacts, catalog: Catalog) -> Reach | None:
    """The effects of a write with their closure (None: its reach is not known)."""
    effects, complete = writes(canonical, facts, catalog)
    if not complete or not effects:
        return None
    return Reach(writes=tuple(catalog.tables.closure(effects)), own_params=own_params)


def _parse(sql: str) -> list[exp.Expression] | None:
    try:
        return [cast(exp.Expression, e) for e in sqlglot.parse(sql, read="postgres") if e is not None]
    except Exception:  # sqlglot raises more than ParseError on odd input
        return None


def reads(canonical: str, own_params: int, tables_read: Iterable[str], facts: SessionFacts,
          catalog: Catalog) -> tuple[ReadDep, ...]:
    """The dependencies of a cacheable read (one statement) on each table it reads."""
    trees = _parse(canonical)
    tables = sorted(tables_read)
    if not trees or len(trees) != 1:
        return tuple(ReadDep(t, None) for t in tables)
    tree = trees[0]
    scan = _Scan(tree, facts, catalog)
    via_views: set[str] = set()
    for t in tables:
        view = catalog.view(t)
        if view is not None and not view.materialized:
            via_views |= view.relations
    out = []
    for t in tables:
        info = catalog.tables.info(t)
        if info is None or t in via_views or t not in scan.occurrences:
            out.append(ReadDep(t, None))
            continue
        columns = None if scan.whole else frozenset(c for c in info.columns if c in scan.names)
        pin = scan.pins.get(t) if scan.occurrences[t] == 1 else None
        if pin is not None and pin.rows and len(pin.rows) > MAX_READ_KEYS:
            pin = None
        out.append(ReadDep(t, columns, pin))
    return tuple(out)


def writes(canonical: str, facts: SessionFacts, catalog: Catalog) -> tuple[list[Effect], bool]:
    """The effects of a text's DML statements (before closure), and whether every write in it
    was understood (False: the caller treats its reach as unknown)."""
    trees = _parse(canonical)
    if not trees:
        return [], False
    effects: list[Effect] = []
    complete = True
    for tree in trees:
        if isinstance(tree, exp.Command):
            complete = False  # not understood by sqlglot
            continue
        if isinstance(tree, exp.Copy):
            if tree.args.get("kind"):  # COPY ... FROM: inserts
                target = tree.this.this if isinstance(tree.this, exp.Schema) else tree.this
                t = resolve_table(target, facts, catalog) if isinstance(target, exp.Table) else None
                if t is None:
                    complete = False
                else:
                    effects.append(Effect(t, "insert"))
            continue
        if isinstance(tree, exp.TruncateTable):
            for table in tree.expressions:
                t = resolve_table(table, facts, catalog) if isinstance(table, exp.Table) else None
                if t is None:
                    complete = False
                else:
                    effects.append(Effect(t, "truncate"))
            continue
        scan: _Scan | None = None
        for node in tree.find_all(exp.Insert, exp.Update, exp.Delete, exp.Merge):
            if isinstance(node.parent, exp.When):
                continue  # MERGE's actions: read with the MERGE
            scan = scan or _Scan(tree, facts, catalog)
            done = _write(node, scan, facts, catalog)
            if done is None:
                complete = False
            else:
                effects += done
    return effects, complete


# ---- writes -------------------------------------------------------------------------------------

def _write(node: exp.Expression, scan: _Scan, facts: SessionFacts, catalog: Catalog) -> list[Effect] | None:
    target = node.this
    if isinstance(target, exp.Schema):
        target = target.this
    if not isinstance(target, exp.Table):
        return None
    t = resolve_table(target, facts, catalog)
    if t is None:
        return None
    schema, _, name = t.partition(".")
    rel = catalog.relation(schema, name)
    view = catalog.view(t)
    if view is not None or (rel is not None and rel.kind not in ("r", "p")):
        # an updatable view writes its base tables: which rows and columns, not worked out here
        bases = view.relations if view is not None else frozenset()
        return [Effect(t, "table"), *(Effect(b, "table") for b in sorted(bases))]
    info = catalog.tables.info(t)
    if isinstance(node, exp.Delete):
        return [Effect(t, "delete", None, scan.where_pin(node, target, info, MAX_WRITE_KEYS))]
    if isinstance(node, exp.Update):
        pin = scan.where_pin(node, target, info, MAX_WRITE_KEYS)
        return _update(t, info, _assigned(node.expressions), pin)
    if isinstance(node, exp.Insert):
        return _insert(node, t, info)
    if isinstance(node, exp.Merge):
        return _merge(node, t)
    return None


def _update(t: str, info: TableInfo | None, columns: frozenset[str] | None, pin: Pin | None) -> list[Effect]:
    if columns is not None and info is not None and info.key and not columns.isdisjoint(info.key):
        return [Effect(t, "update", columns), Effect(t, "insert")]  # rows move between keys
    return [Effect(t, "update", columns, pin)]


def _assigned(assignments: Sequence[exp.Expression]) -> frozenset[str] | None:
    out: set[str] = set()
    for eq in assignments:
        left = eq.this if isinstance(eq, exp.EQ) else None
        targets = left.expressions if isinstance(left, exp.Tuple) else [left]
        for col in targets:
            if not isinstance(col, exp.Column) or not ident(col.this):
                return None
            out.add(ident(col.this))
    return frozenset(out)


def _insert(node: exp.Insert, t: str, info: TableInfo | None) -> list[Effect]:
    pin = _values_pin(node, info)
    effects = [Effect(t, "insert", None, pin)]
    conflict = node.args.get("conflict")
    if isinstance(conflict, exp.OnConflict):
        action = conflict.args.get("action")
        if "UPDATE" in str(action.this if isinstance(action, exp.Var) else action or "").upper():
            columns = _assigned(conflict.expressions)
            keys = conflict.args.get("conflict_keys") or []
            arbiter = {ident(k.this.this) if isinstance(k, exp.Ordered) and isinstance(k.this, exp.Column)
                       else "" for k in keys}
            same_key = info is not None and bool(info.key) and arbiter == set(info.key)
            effects += _update(t, info, columns, pin if same_key else None)
    return effects


def _values_pin(node: exp.Insert, info: TableInfo | None) -> Pin | None:
    values = node.expression
    if info is None or not info.key or not isinstance(values, exp.Values):
        return None
    target = node.this
    names = [ident(i) for i in target.expressions] if isinstance(target, exp.Schema) else list(info.columns)
    try:
        positions = [names.index(k) for k in info.key]
    except ValueError:
        return None  # a key column left to its default
    rows: list[tuple[Value, ...]] = []
    for row in values.expressions:
        items = row.expressions if isinstance(row, exp.Tuple) else [row]
        if len(rows) >= MAX_WRITE_KEYS or max(positions) >= len(items):
            return None
        got = tuple(_value(items[p], ty) for p, ty in zip(positions, info.key_types, strict=True))
        if any(v is None for v in got):
            return None
        rows.append(tuple(v for v in got if v is not None))
    return Pin(info.key, info.key_types, tuple(rows)) if rows else None


def _merge(node: exp.Merge, t: str) -> list[Effect]:
    whens = node.args.get("whens")
    out: list[Effect] = []
    for when in whens.expressions if whens is not None else []:
        then = when.args.get("then")
        if isinstance(then, exp.Update):
            out.append(Effect(t, "update", _assigned(then.expressions)))
        elif isinstance(then, exp.Insert):
            out.append(Effect(t, "insert"))
        elif isinstance(then, exp.Var) and "DELETE" in str(then.this).upper():
            out.append(Effect(t, "delete"))
        elif not (isinstance(then, exp.Var) and "NOTHING" in str(then.this).upper()):
            return [Effect(t, "table")]
    return out or [Effect(t, "table")]


# ---- the statement's tables, columns and pins ---------------------------------------------------

def resolve_table(table: exp.Table, facts: SessionFacts, catalog: Catalog) -> str | None:
    """'schema.name' of a table reference in the session's search_path (None if unknown)."""
    parts = table_parts(table)
    if parts is None:
        return None
    if len(parts) > 1:
        return f"{'pg_temp' if parts[-2].startswith('pg_temp') else parts[-2]}.{parts[-1]}"
    schema = catalog.resolve(parts[-1], facts.search_path, facts.user)
    return f"{schema}.{parts[-1]}" if schema is not None else None


class _Scan:
    """One walk over a statement: which tables occur (and how often), every name that may be a
    column, whether some reference takes whole rows, and the pins of SELECTs' tables."""

    def __init__(self, tree: exp.Expression, facts: SessionFacts, catalog: Catalog) -> None:
        self.facts, self.catalog = facts, catalog
        self.occurrences: dict[str, int] = {}
        self.names: set[str] = set()
        self.whole = False
        self.pins: dict[str, Pin] = {}
        tables: list[exp.Table] = []
        outputs: set[str] = set()  # names a query gives its outputs or sources
        for node in tree.walk():
            if isinstance(node, exp.Table):
                tables.append(node)
            elif isinstance(node, exp.Column):
                if isinstance(node.this, exp.Star):
                    self.whole = True
                else:
                    self.names.add(ident(node.this))
            elif isinstance(node, exp.Star):
                if not isinstance(node.parent, exp.Count | exp.Column):
                    self.whole = True
            elif isinstance(node, exp.Join):
                if str(node.args.get("method") or "").upper() == "NATURAL":
                    self.whole = True
                using = node.args.get("using") or []
                self.names |= {ident(i) for i in using if isinstance(i, exp.Identifier)}
            elif isinstance(node, exp.Alias):
                outputs.add(ident(node.args.get("alias")))
            elif isinstance(node, exp.TableAlias):
                outputs.add(ident(node.this))
                outputs |= {ident(c) for c in node.args.get("columns") or []}
        sources: set[str] = set()  # every table's name and alias
        known: set[str] = set()  # every column of every table occurring
        for table in tables:
            parts = table_parts(table)
            if parts is None or not isinstance(table.this, exp.Identifier) \
                    or (len(parts) == 1 and is_cte(table, parts[0])):
                continue
            sources.add(parts[-1])
            sources.add(_alias(table))
            t = resolve_table(table, facts, catalog)
            if t is None:
                self.whole = True
                continue
            self.occurrences[t] = self.occurrences.get(t, 0) + 1
            info = catalog.tables.info(t)
            known |= set(info.columns) if info is not None else set()
        if self.names & sources or "tableoid" in self.names or (self.names - known - outputs):
            self.whole = True  # whole rows, the partition a row is in, or a name we cannot place
        for select in tree.find_all(exp.Select):
            from_ = select.args.get("from_")
            joins = select.args.get("joins") or []
            listed = [from_.this] if from_ is not None else []
            listed += [j.this for j in joins]
            for table in listed:
                if isinstance(table, exp.Table) and isinstance(table.this, exp.Identifier):
                    t = resolve_table(table, facts, catalog)
                    info = catalog.tables.info(t) if t is not None else None
                    pin = _pin(select.args.get("where"), table, info, alone=len(listed) == 1,
                               limit=MAX_READ_KEYS)
                    if t is not None and pin is not None:
                        self.pins[t] = pin

    def where_pin(self, node: exp.Expression, target: exp.Table, info: TableInfo | None,
                  limit: int) -> Pin | None:
        """The pin of an UPDATE's or DELETE's target (None if it occurs elsewhere too)."""
        t = resolve_table(target, self.facts, self.catalog)
        if t is None or self.occurrences.get(t, 0) != 1:
            return None
        extra = node.args.get("from_") or node.args.get("using")
        return _pin(node.args.get("where"), target, info, alone=not extra, limit=limit)


def _alias(table: exp.Table) -> str:
    """What the table is called in its query: its alias, or its name."""
    alias = table.args.get("alias")
    if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
        return ident(alias.this)
    return ident(table.this)


def conjuncts(condition: exp.Expression) -> list[exp.Expression]:
    """The top-level AND terms of a condition (through parentheses)."""
    terms: list[exp.Expression] = []
    stack: list[exp.Expression] = [condition]
    while stack:
        term = stack.pop()
        if isinstance(term, exp.And):
            stack += [term.this, term.expression]
        elif isinstance(term, exp.Paren):
            stack.append(term.this)
        else:
            terms.append(term)
    return terms


def _pin(where: object, table: exp.Table, info: TableInfo | None, alone: bool, limit: int) -> Pin | None:
    if not isinstance(where, exp.Where) or info is None or not info.key:
        return None
    name = _alias(table)
    terms = conjuncts(where.this)
    found: dict[str, list[Value] | int] = {}  # key column -> its values, or an array placeholder
    for term in terms:
        got = _equality(term, name, alone, info)
        if got is not None and got[0] not in found:
            found[got[0]] = got[1]
    if any(k not in found for k in info.key):
        return None
    if len(info.key) == 1 and isinstance(found[info.key[0]], int):
        return Pin(info.key, info.key_types, array=found[info.key[0]])  # type: ignore[arg-type]
    rows: list[tuple[Value, ...]] = [()]
    for k in info.key:
        values = found[k]
        if isinstance(values, int):
            return None  # = ANY over a column of a longer key
        rows = [(*row, v) for row in rows for v in values]
        if len(rows) > limit:
            return None
    return Pin(info.key, info.key_types, tuple(rows))


def _equality(term: exp.Expression, name: str, alone: bool,
              info: TableInfo) -> tuple[str, list[Value] | int] | None:
    """(key column, its values) for `key = v`, `v = key`, `key IN (v, ...)`, `key = ANY($n)`."""
    if isinstance(term, exp.EQ):
        for col, other in ((term.this, term.expression), (term.expression, term.this)):
            column = _key_column(col, name, alone, info)
            if column is None:
                continue
            type_oid = info.types[column]
            if isinstance(other, exp.Any):
                inner = other.this.this if isinstance(other.this, exp.Paren) else other.this
                if isinstance(inner, exp.Cast) and _array_of(inner.args.get("to"), type_oid):
                    inner = inner.this  # $1::int[]
                if isinstance(inner, exp.Parameter) and type_oid not in TEXT_TYPES:
                    number = _placeholder(inner)
                    return (column, number) if number else None
                return None
            value = _value(other, type_oid)
            return (column, [value]) if value is not None else None
        return None
    if isinstance(term, exp.In) and not term.args.get("query") and not term.args.get("unnest"):
        column = _key_column(term.this, name, alone, info)
        if column is None or not term.expressions:
            return None
        values = [_value(v, info.types[column]) for v in term.expressions]
        if any(v is None for v in values):
            return None
        return column, [v for v in values if v is not None]
    return None


def _key_column(node: object, name: str, alone: bool, info: TableInfo) -> str | None:
    if not isinstance(node, exp.Column) or isinstance(node.this, exp.Star):
        return None
    column = ident(node.this)
    if column not in info.key:
        return None
    qualifier = ident(node.args.get("table")) if node.args.get("table") else ""
    if qualifier == name or (not qualifier and alone):
        return column
    return None


def _placeholder(node: exp.Parameter) -> int:
    inner = node.this
    text = str(inner.this) if isinstance(inner, exp.Literal) and not inner.is_string else ""
    return int(text) if text.isdigit() else 0


def _family(type_oid: int) -> frozenset[object]:
    return _INT_CASTS if type_oid in INT_TYPES else _TEXT_CASTS if type_oid in TEXT_TYPES else \
        frozenset({exp.DataType.Type.UUID}) if type_oid == UUID_TYPE else frozenset()


def _array_of(to: object, type_oid: int) -> bool:
    """Is `to` an array of a type of the key column's family (int[], bigint[], uuid[])?"""
    if not isinstance(to, exp.DataType) or to.this != exp.DataType.Type.ARRAY or len(to.expressions) != 1:
        return False
    element = to.expressions[0]
    return isinstance(element, exp.DataType) and not element.expressions and element.this in _family(type_oid)


def _value(node: object, type_oid: int) -> Value | None:
    """A placeholder's number or a literal's SQL text, where `node` is one (maybe cast to a type
    of the key column's family without a modifier: `$1::bigint`, `'…'::uuid`)."""
    if isinstance(node, exp.Cast):
        to = node.args.get("to")
        if not isinstance(to, exp.DataType) or to.expressions:
            return None  # varchar(3) would cut the value
        if to.this not in _family(type_oid):
            return None
        node = node.this
    if isinstance(node, exp.Parameter):
        return _placeholder(node) or None
    if isinstance(node, exp.Literal):
        text = str(node.this)
        return "'" + text.replace("'", "''") + "'" if node.is_string else text
    return None
